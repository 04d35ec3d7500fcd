"""Incremental decoding: the KV cache, the samplers and the stopping rules."""

import pytest
import torch

from tests.model.conftest import tiny_dbrx
from dbrx_train.model.generation import KVCache, sample_next

VOCAB = 128


@pytest.fixture(scope='module')
def model():
    return tiny_dbrx(d_model=64, vocab=VOCAB, ffn=32, experts=16, top_k=4)


def prompt(batch=2, length=5, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize('padded', [False, True])
def test_kv_cache_decode_equals_full_recompute(model, padded):
    ids = prompt(3, 6)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0
        mask[2, :1] = 0
    out = model.generate(ids, max_new_tokens=12, stop_token_ids=(), attention_mask=mask if padded else None)
    full_mask = torch.cat([mask, torch.ones(3, 12, dtype=mask.dtype)], dim=1)
    full = model(out[:, :-1], attention_mask=full_mask[:, :-1] if padded else None)

    cache = KVCache.for_model(model, 3, out.shape[1])
    steps = [model(ids, attention_mask=mask if padded else None, kv_cache=cache)]
    for i in range(6, out.shape[1] - 1):
        steps.append(model(out[:, i : i + 1], attention_mask=full_mask[:, : i + 1] if padded else None,
                           kv_cache=cache))
    incremental = torch.cat(steps, dim=1)
    real = full_mask[:, :-1].bool()
    torch.testing.assert_close(incremental[real], full[real], atol=1e-5, rtol=1e-5)
    assert torch.equal(out[:, 6:], full[:, 5:].argmax(dim=-1))  # greedy picks the full-recompute argmax


def test_left_padding_does_not_change_a_rows_tokens(model):
    ids = prompt(2, 7)
    # Row 0: 10 real tokens; row 1: 3 pads, then the 7 tokens of the prompt it gets alone below.
    batch = torch.stack([torch.cat([ids[0], ids[0, :3]]), torch.cat([torch.zeros(3, dtype=ids.dtype), ids[1]])])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    together = model.generate(batch, max_new_tokens=8, attention_mask=mask, stop_token_ids=())
    alone = model.generate(ids[1:], max_new_tokens=8, stop_token_ids=())
    assert torch.equal(together[1, 3:], alone[0])


def test_top_k_1_and_tiny_top_p_sampling_equal_greedy(model):
    ids = prompt()
    greedy = model.generate(ids, max_new_tokens=10, stop_token_ids=())
    top_k_1 = model.generate(ids, max_new_tokens=10, temperature=1.5, top_k=1, stop_token_ids=(),
                             generator=torch.Generator().manual_seed(0))
    tiny_top_p = model.generate(ids, max_new_tokens=10, temperature=1.5, top_p=1e-6, stop_token_ids=(),
                                generator=torch.Generator().manual_seed(0))
    assert torch.equal(top_k_1, greedy)
    assert torch.equal(tiny_top_p, greedy)


def test_samplers_draw_only_inside_their_filter():
    probs = torch.tensor([0.04, 0.5, 0.01, 0.3, 0.1, 0.05])
    logits = probs.log().expand(2000, -1)
    generator = torch.Generator().manual_seed(0)
    top_k = sample_next(logits, temperature=1.0, top_k=3, generator=generator)
    assert set(top_k.tolist()) == {1, 3, 4}  # the three most likely, each drawn at least once
    # Nucleus 0.7: token 1 (0.5) and token 3 (0.3 reaches 0.8); token 4 comes after 0.8 >= 0.7.
    top_p = sample_next(logits, temperature=1.0, top_p=0.7, generator=generator)
    assert set(top_p.tolist()) == {1, 3}
    unfiltered = sample_next(logits, temperature=1.0, generator=generator)
    assert set(unfiltered.tolist()) == set(range(6))


def test_stop_tokens_end_rows_and_pad_them(model):
    ids = prompt(2, 5, seed=3)
    free = model.generate(ids, max_new_tokens=10, stop_token_ids=())[:, 5:]
    # Stop on row 0's first new token that row 0 has not produced before and row 1 never produces.
    step = next(i for i in range(1, 10) if free[0, i] not in free[0, :i] and free[0, i] not in free[1])
    stop = int(free[0, step])
    out = model.generate(ids, max_new_tokens=10, stop_token_ids=(stop,), pad_token_id=VOCAB - 1)[:, 5:]
    assert torch.equal(out[0, : step + 1], free[0, : step + 1])  # the stop token is kept
    assert (out[0, step + 1 :] == VOCAB - 1).all()
    assert torch.equal(out[1], free[1])  # the other row runs on to max_new_tokens
    # When every row has stopped, generation ends.
    both = model.generate(ids, max_new_tokens=10, stop_token_ids=(int(free[0, 0]), int(free[1, 0])))
    assert both.shape[1] == 5 + 1


def test_seeded_sampling_is_reproducible(model):
    ids = prompt()

    def sample(seed):
        return model.generate(ids, max_new_tokens=16, temperature=1.0, stop_token_ids=(),
                              generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))
