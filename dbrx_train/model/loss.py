"""Training losses: a fused LM-head cross-entropy and the MoE load-balancing loss."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

# Logits computed at once: 512 MiB of fp32 per chunk (1,337 rows of DBRX's 100k vocabulary). Each chunk
# reads the LM head twice and adds to its gradient once: with 128 MiB chunks the bench step ran 3.5% slower.
CHUNK_LOGITS = 2**27
# Logits a CPU core's L2 cache holds while the softmax makes its passes over them.
SOFTMAX_BLOCK_BYTES = 2 * 2**20


# A frozen LM head read block by block: `blocks(dtype)` yields (vocabulary rows, the head's rows there in dtype).
HeadBlocks = Callable[[torch.dtype], Iterable[tuple[slice, torch.Tensor]]]


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100):
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, over targets != ignore_index.

    Never holds more than one chunk of `(rows, vocab)` logits: the gradients of `hidden` and
    `weight` are computed chunk by chunk during the forward pass (when autograd will need them),
    so neither the fp32 logits of every position nor their gradient is ever materialised.
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index)
    loss, _, _ = _chunked_loss_and_grads(hidden, weight, targets, ignore_index, with_grads=False)
    return loss


def blockwise_linear_cross_entropy(hidden: torch.Tensor, head: HeadBlocks, vocab_size: int, targets: torch.Tensor,
                                   ignore_index: int = -100):
    """`linear_cross_entropy` for a frozen head that is never whole in float (QLoRA's quantized one, dequantized
    block by block): per chunk of rows, an online softmax over the head's blocks (flash attention's rescaling)
    gives the loss and the gradient of `hidden` in one pass over the head."""
    if torch.is_grad_enabled() and hidden.requires_grad:
        return _LinearCrossEntropy.apply(hidden, None, targets, ignore_index, (head, vocab_size))
    return _blockwise_loss_and_grad(hidden, head, vocab_size, targets, ignore_index, with_grads=False)[0]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, head_blocks=None):
        if head_blocks is None:
            loss, grad_hidden, grad_weight = _chunked_loss_and_grads(hidden, weight, targets, ignore_index, True,
                                                                     weight.requires_grad)
        else:  # a frozen head: no gradient of its own
            loss, grad_hidden = _blockwise_loss_and_grad(hidden, *head_blocks, targets, ignore_index, True)
            grad_weight = None
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        # Backpropagating the loss itself (grad 1) is the usual case: hand the gradients over
        # as they are instead of copying the LM head's (vocab, d_model) gradient at peak memory.
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
            grad_weight = None if grad_weight is None else grad_weight * grad_loss.to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype


def _chunked_loss_and_grads(hidden, weight, targets, ignore_index, with_grads, with_weight_grad=True):
    """With `with_grads`, the gradients of `hidden` and (unless the head is frozen, `with_weight_grad`
    False: LoRA) of `weight`: a frozen head's would be a `(vocab, d_model)` fp32 tensor of waste."""
    device_type, compute_dtype = hidden.device.type, _compute_dtype(hidden)
    with torch.autocast(device_type=device_type, enabled=False):
        h_all = hidden.detach().to(compute_dtype)
        w = weight.detach().to(compute_dtype)
        valid_all = targets != ignore_index
        n_valid = valid_all.sum().clamp(min=1)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if with_grads else None
        with_weight_grad = with_grads and with_weight_grad
        grad_weight = None
        if with_weight_grad:  # the first chunk writes it, the rest add to it: no (vocab, d_model) zero fill
            new = torch.empty if len(h_all) else torch.zeros
            grad_weight = new(weight.shape, dtype=torch.float32, device=weight.device)
        rows = _chunk_rows(len(h_all), weight.shape[0])
        # One logits buffer for every chunk: a fresh (rows, vocab) tensor per chunk is fresh pages from the
        # kernel, and faulting them in made the head's forward GEMM a quarter slower (bench_model, CPU).
        logits_buffer = torch.empty((min(rows, len(h_all)), weight.shape[0]), dtype=torch.float32,
                                    device=hidden.device)
        for start in range(0, h_all.shape[0], rows):
            h = h_all[start : start + rows]
            t = targets[start : start + rows]
            valid = valid_all[start : start + rows]
            safe_t = torch.where(valid, t, 0)
            logits = logits_buffer[: len(h)]
            _matmul_into(logits, h, w.t())
            target_logit = logits.gather(1, safe_t[:, None]).squeeze(1)
            row_weight = valid / n_valid
            # In place: exp(logits - max), the unnormalised softmax the gradient needs, exponentiated once
            # and never copied; with the gradient, scaled into d(mean loss)/d(logits) = (softmax -
            # one_hot(target)) / n_valid on valid rows.
            lse = _logsumexp_softmax_(logits, row_weight if with_grads else None)
            total += ((lse - target_logit) * valid).sum()
            if with_grads:
                logits[torch.arange(len(t), device=t.device), safe_t] -= row_weight
                grad_logits = logits.to(compute_dtype)
                _matmul_into(grad_hidden[start : start + rows], grad_logits, w)
                if with_weight_grad:
                    _matmul_into(grad_weight, grad_logits.t(), h, accumulate=start > 0)
    loss = total / n_valid
    if with_weight_grad:
        grad_weight = grad_weight.to(weight.dtype)
    return loss, grad_hidden, grad_weight


def _blockwise_loss_and_grad(hidden, head: HeadBlocks, vocab_size, targets, ignore_index, with_grads):
    """The loss and (with `with_grads`) the gradient of `hidden`, reading the head once per chunk of rows.
    Per row: running max `m`, sum `s` of exp(logit - m) and `acc` = sum of exp(logit - m) * head row, each
    rescaled when `m` grows; then loss = m + log(s) - target logit, gradient = acc / s - target's head row."""
    device_type, compute_dtype = hidden.device.type, _compute_dtype(hidden)
    with torch.autocast(device_type=device_type, enabled=False):
        h_all = hidden.detach().to(compute_dtype)
        valid_all = targets != ignore_index
        n_valid = valid_all.sum().clamp(min=1)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if with_grads else None
        rows = _chunk_rows(len(h_all), vocab_size)
        for start in range(0, h_all.shape[0], rows):
            h, t, valid = h_all[start:start + rows], targets[start:start + rows], valid_all[start:start + rows]
            row_max = torch.full((len(h),), -torch.inf, device=h.device)
            sum_exp, target_logit = torch.zeros_like(row_max), torch.zeros_like(row_max)
            if with_grads:
                acc, target_rows = (torch.zeros(h.shape, dtype=torch.float32, device=h.device) for _ in range(2))
            for vocab, w in head(compute_dtype):
                logits = (h @ w.t()).float()
                hit = valid & (t >= vocab.start) & (t < vocab.stop)
                local_t = torch.where(hit, t - vocab.start, 0)
                target_logit = torch.where(hit, logits.gather(1, local_t[:, None]).squeeze(1), target_logit)
                new_max = torch.maximum(row_max, logits.amax(dim=-1))
                rescale = (row_max - new_max).exp()
                exp_logits = logits.sub_(new_max[:, None]).exp_()
                sum_exp = sum_exp * rescale + exp_logits.sum(dim=-1)
                row_max = new_max
                if with_grads:
                    _matmul_into(acc.mul_(rescale[:, None]), exp_logits.to(compute_dtype), w, accumulate=True)
                    target_rows[hit] = w[local_t[hit]].float()
                del w, logits, exp_logits  # before the next block is dequantized
            total += ((sum_exp.log() + row_max - target_logit) * valid).sum()
            if with_grads:  # d(mean loss)/d(h) = (softmax @ head - head[target]) / n_valid on valid rows
                grad = acc.div_(sum_exp[:, None]).sub_(target_rows).mul_((valid / n_valid)[:, None])
                grad_hidden[start:start + rows] = grad.to(hidden.dtype)
    return total / n_valid, grad_hidden


def _chunk_rows(rows: int, vocab_size: int) -> int:
    """Rows per chunk: at most CHUNK_LOGITS logits, in chunks of equal size (no small last GEMM)."""
    chunks = -(-rows * vocab_size // CHUNK_LOGITS)
    return max(1, -(-rows // max(1, chunks)))


def _logsumexp_softmax_(logits: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Each row's logsumexp; in place, `logits` become exp(logits - row max), times `scale / sum of
    them` per row where `scale` is given (the softmax, scaled). On CPU a few rows at a time, so that a
    row's passes (max, exp, sum, scale) read it from cache: over a whole chunk each went to memory, and
    took twice as long; an accelerator takes the chunk at once (one kernel launch per pass)."""
    block = max(1, len(logits))
    if logits.device.type == 'cpu':
        block = max(1, SOFTMAX_BLOCK_BYTES // (logits.shape[1] * logits.element_size()))
    lse = torch.empty(len(logits), dtype=logits.dtype, device=logits.device)
    for start in range(0, len(logits), block):
        rows = logits[start : start + block]
        row_max = rows.amax(dim=-1, keepdim=True)
        sum_exp = rows.sub_(row_max).exp_().sum(dim=-1, keepdim=True)
        torch.add(sum_exp.log(), row_max, out=lse[start : start + block, None])
        if scale is not None:
            rows.mul_(scale[start : start + block, None] / sum_exp)
    return lse


def _matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool = False) -> None:
    """out = a @ b, or out += a @ b with `accumulate`, in a's dtype: inside the GEMM (no product-sized
    temporary) when out's dtype is a's."""
    if a.dtype != out.dtype:
        product = (a @ b).to(out.dtype)
        if accumulate:
            out.add_(product)
        else:
            out.copy_(product)
    elif accumulate:
        torch.addmm(out, a, b, out=out)  # not addmm_, which FLOP counters do not see
    else:
        torch.mm(a, b, out=out)


def load_balancing_loss(mean_probs: torch.Tensor, tokens_per_expert: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss as Megablocks (DBRX's trainer) defines it.

    Per layer `E * sum_e f_e * P_e`, with `f_e` the fraction of (token, slot) assignments that
    went to expert e and `P_e` its mean router probability, averaged over layers: 1.0 when
    routing is perfectly balanced. `mean_probs` and `tokens_per_expert` are `(layers, E)`.

    transformers' `load_balancing_loss_func` differs on purpose: it is `top_k` times larger,
    pools all layers' tokens before multiplying, and (in `DbrxForCausalLM`) applies its softmax
    to router outputs that are already probabilities. On one layer fed the raw router logits it
    equals `top_k *` this loss.
    """
    num_experts = mean_probs.shape[-1]
    counts = tokens_per_expert.to(mean_probs.dtype)
    fraction = counts / counts.sum(dim=-1, keepdim=True).clamp(min=1)
    return (num_experts * (fraction * mean_probs).sum(dim=-1)).mean()
