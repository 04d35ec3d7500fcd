"""The attention seam: packed rows, left padding and cached chunks without a (seq, seq) mask."""

import pytest
import torch
import torch.nn.functional as F

from tests.model.conftest import tiny_dbrx
from dbrx_train.model import attention
from dbrx_train.model.attention import Causal, Dense, Documents, LeftPadded
from dbrx_train.model.dbrx import packed_positions_and_mask
from dbrx_train.model.generation import KVCache

VOCAB = 128
# Uneven examples, one of a single token; the second row ends in collate_finetuning's padding (-1).
ROWS = [(5, 1, 9, 3), (12, 4)]


@pytest.fixture(scope='module')
def model():
    return tiny_dbrx(d_model=64, vocab=VOCAB, ffn=32, experts=16, top_k=4)


def packed_batch(rows=ROWS, seed=0):
    seq = max(sum(r) for r in rows)
    ids = torch.randint(0, VOCAB, (len(rows), seq), generator=torch.Generator().manual_seed(seed))
    sequence_id = torch.full((len(rows), seq), -1)
    for row, lengths in enumerate(rows):
        bounds = torch.tensor((0, *lengths)).cumsum(0).tolist()
        for number, (start, end) in enumerate(zip(bounds, bounds[1:])):
            sequence_id[row, start:end] = number
    return ids, sequence_id


def examples(ids, sequence_id):
    """(row, slice) of every example and padding run, in order."""
    for row in range(ids.shape[0]):
        start = 0
        for length in packed_positions_and_mask(sequence_id[row : row + 1])[1].lengths[0]:
            yield row, slice(start, start + length)
            start += length


def test_packed_rows_equal_the_examples_run_one_by_one(model):
    ids, sequence_id = packed_batch()
    positions, mask = packed_positions_and_mask(sequence_id)
    assert mask.lengths == ((5, 1, 9, 3), (12, 4, 2))  # the row's padding is one more run
    assert positions[0].tolist() == [*range(5), 0, *range(9), *range(3)]  # positions restart per example
    with torch.no_grad():
        packed = model(ids, sequence_id=sequence_id)
        for row, part in examples(ids, sequence_id):
            torch.testing.assert_close(packed[row, part], model(ids[row : row + 1, part])[0], atol=2e-5, rtol=0)


def test_packed_gradients_equal_the_examples_trained_one_by_one(model):
    ids, sequence_id = packed_batch(rows=[(6, 1, 9)])
    model.zero_grad(set_to_none=True)
    model(ids, sequence_id=sequence_id).square().sum().backward()
    packed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    for row, part in examples(ids, sequence_id):
        model(ids[row : row + 1, part]).square().sum().backward()
    for p, expected in zip(model.parameters(), packed):
        torch.testing.assert_close(p.grad, expected, atol=1e-4, rtol=1e-4)
    model.zero_grad(set_to_none=True)


def test_no_mask_reaches_sdpa_for_causal_packed_or_left_padded_rows(model, monkeypatch):
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        seen.append(None if attn_mask is None else tuple(attn_mask.shape))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(attention.F, 'scaled_dot_product_attention', spy)
    ids, sequence_id = packed_batch()
    padded = torch.ones(2, 18, dtype=torch.long)
    padded[1, :7] = 0
    with torch.no_grad():
        model(ids, sequence_id=sequence_id)
        model(ids)
        model(ids, attention_mask=padded)
    assert seen and all(shape is None for shape in seen)


def test_masks_are_described_without_a_square_mask(model):
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    _, left = model._positions_and_mask(2, 5, 0, mask, 'cpu')
    assert isinstance(left, LeftPadded) and left.padding == (2, 0)
    assert isinstance(model._positions_and_mask(2, 5, 0, torch.ones(2, 5), 'cpu')[1], Causal)
    assert isinstance(model._positions_and_mask(2, 5, 0, None, 'cpu')[1], Causal)
    holes = torch.tensor([[1, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert isinstance(model._positions_and_mask(2, 5, 0, holes, 'cpu')[1], Dense)
    _, decoding = model._positions_and_mask(2, 1, 4, mask, 'cpu')  # one new token: its key mask alone
    assert isinstance(decoding, Dense) and decoding.allowed.shape == (2, 1, 1, 5)


@torch.no_grad()
def test_chunked_prefill_of_left_padded_rows_equals_one_pass(model):
    """Chunks after a cached part take a (chunk, keys) mask, aligned bottom-right."""
    ids = torch.randint(0, VOCAB, (3, 23), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :9] = 0  # padding that spans more than the first chunk
    mask[2, :2] = 0
    whole = model(ids, attention_mask=mask)
    cache = KVCache.for_model(model, 3, 23)
    chunks = [model(ids[:, s : s + 7], attention_mask=mask[:, : s + 7], kv_cache=cache) for s in range(0, 23, 7)]
    real = mask.bool()
    torch.testing.assert_close(torch.cat(chunks, dim=1)[real], whole[real], atol=1e-5, rtol=1e-5)
    alone = model(ids[:1, 9:])[0]
    torch.testing.assert_close(whole[0, 9:], alone, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_each_mask_kind_matches_its_dense_equivalent():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 10, 8) for _ in range(3))
    idx = torch.arange(10)
    causal = idx[None, :] <= idx[:, None]
    documents = Documents(((4, 1, 5), (10,)))
    doc = torch.tensor([[0] * 4 + [1] + [2] * 5, [0] * 10])
    dense_docs = (doc[:, :, None] == doc[:, None, :]) & causal
    torch.testing.assert_close(documents.attend(q, k, v), Dense(dense_docs[:, None]).attend(q, k, v))
    padded = LeftPadded((3, 0))
    dense_pad = causal[None] & (idx[None, :] >= torch.tensor([[3], [0]]))[:, None, :]
    expected = Dense(dense_pad[:, None]).attend(q, k, v)
    torch.testing.assert_close(padded.attend(q, k, v)[0, :, 3:], expected[0, :, 3:])
    torch.testing.assert_close(padded.attend(q, k, v)[1], expected[1])
    # The last 4 queries over all 10 keys (a chunk after a cached part), padded or not.
    torch.testing.assert_close(Causal().attend(q[:, :, 6:], k, v), Dense(causal[6:]).attend(q[:, :, 6:], k, v))
    torch.testing.assert_close(padded.attend(q[:, :, 6:], k, v), expected[:, :, 6:])
