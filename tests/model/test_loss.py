"""The training losses' LM-head cross-entropy: fused over chunks of rows, and blockwise over a frozen head's
vocabulary blocks, both against the cross-entropy of full logits."""

import pytest
import torch
import torch.nn.functional as F

from dbrx_train.model import loss as loss_module
from dbrx_train.model.loss import blockwise_linear_cross_entropy, linear_cross_entropy


# One chunk, its softmax at once; or 5 chunks of 6 rows (30 rows, at most 7 * 50 logits each), their
# softmax over blocks of 4 rows and 2 (the bytes of 4 rows of fp32 logits).
@pytest.mark.parametrize(('chunk_logits', 'softmax_block_bytes'),
                         [(loss_module.CHUNK_LOGITS, loss_module.SOFTMAX_BLOCK_BYTES), (7 * 50, 4 * 50 * 4)])
def test_fused_cross_entropy_equals_full_logits(monkeypatch, chunk_logits, softmax_block_bytes):
    monkeypatch.setattr(loss_module, 'CHUNK_LOGITS', chunk_logits)
    monkeypatch.setattr(loss_module, 'SOFTMAX_BLOCK_BYTES', softmax_block_bytes)
    torch.manual_seed(0)
    hidden = torch.randn(30, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (30,))
    targets[[0, 7, 8, 29]] = -100
    fused = linear_cross_entropy(hidden, weight, targets, -100)
    full = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=-100)
    torch.testing.assert_close(fused, full)
    fused_grads = torch.autograd.grad(fused * 3.0, [hidden, weight])
    full_grads = torch.autograd.grad(full * 3.0, [hidden, weight])
    for got, want in zip(fused_grads, full_grads):
        torch.testing.assert_close(got, want)
    assert (fused_grads[0][[0, 7, 8, 29]] == 0).all()  # ignored rows get no gradient
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, -100), full)


def test_fused_cross_entropy_of_no_rows_is_zero_with_zero_head_gradient():
    weight = torch.randn(50, 16, requires_grad=True)
    loss = linear_cross_entropy(torch.zeros(0, 16, requires_grad=True), weight, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and (weight.grad == 0).all()


def test_chunks_are_equal_and_within_the_logits_budget():
    for rows, vocab in [(2048, 100352), (30, 50), (1, 100352), (5000, 10)]:
        size = loss_module._chunk_rows(rows, vocab)
        chunks = -(-rows // size)
        assert size * vocab <= max(loss_module.CHUNK_LOGITS, vocab)
        assert chunks * size - rows < chunks  # sizes differ by at most one row from an even split


def head_blocks(weight: torch.Tensor, sizes: list[int]):
    """`weight`'s rows in blocks of `sizes`, in the dtype asked, as a quantized head's are read."""
    def blocks(dtype):
        start = 0
        for size in sizes:
            yield slice(start, start + size), weight[start:start + size].to(dtype)
            start += size
    return blocks


@pytest.mark.parametrize('chunk_logits', [loss_module.CHUNK_LOGITS, 7 * 50])  # one chunk; 5 chunks of 6 rows
def test_blockwise_cross_entropy_over_uneven_vocabulary_blocks_equals_full_logits(monkeypatch, chunk_logits):
    """Targets in every block; the largest logit of a row in a later block than its first (the running max
    and its rescaling); rows that ignore their target."""
    monkeypatch.setattr(loss_module, 'CHUNK_LOGITS', chunk_logits)
    torch.manual_seed(0)
    hidden = torch.randn(30, 16, requires_grad=True)
    weight = torch.randn(50, 16)
    weight[45:] *= 4  # the last block holds each row's largest logits
    targets = torch.randint(0, 50, (30,))
    targets[[0, 7, 8, 29]] = -100
    blocks = head_blocks(weight, [13, 20, 12, 5])
    got = blockwise_linear_cross_entropy(hidden, blocks, 50, targets, -100)
    full = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=-100)
    torch.testing.assert_close(got, full)
    got_grad, = torch.autograd.grad(got * 3.0, [hidden])
    want_grad, = torch.autograd.grad(full * 3.0, [hidden])
    torch.testing.assert_close(got_grad, want_grad)
    assert (got_grad[[0, 7, 8, 29]] == 0).all()
    with torch.no_grad():
        torch.testing.assert_close(blockwise_linear_cross_entropy(hidden, blocks, 50, targets, -100), full)
    with torch.autocast('cpu', dtype=torch.bfloat16):  # blocks asked in the compute dtype
        in_bf16 = blockwise_linear_cross_entropy(hidden, blocks, 50, targets, -100)
        reference = linear_cross_entropy(hidden, weight, targets, -100)
    torch.testing.assert_close(in_bf16, reference, rtol=2e-2, atol=0)
