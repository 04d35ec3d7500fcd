"""Dropless MoE in plain PyTorch: runs anywhere (CPU, GPU, meta).

Names used here and in the other backends:

    tokens        the flattened `(batch * seq)` inputs; `x` is `(tokens, d_model)`
    slot          one of a token's `top_k` choices; `top_experts`/`top_weights` are `(tokens, top_k)`
    row           one (token, slot) pair: the unit an expert multiplies; `tokens * top_k` rows in all
    E, e          `num_experts`, an expert's index; `rows_per_expert` `(E,)` counts each one's rows
    ffn           `ffn_hidden_size`, the width of one expert; `w1`/`v1`/`w2` are `(E * ffn, d_model)`

Each (token, expert) assignment is sorted by expert, every expert multiplies exactly the rows
routed to it (no capacity factor, no padding, no dense mask over all experts), and the weighted
results are scattered back. A token's output depends only on that token.

`dropless_moe` is the routing alone, given one expert's feed-forward as a function: the float
experts here and the quantized ones (`dbrx_train.model.quantize`) share it; the expert-parallel
backend shares its pieces (`sort_by_expert`, `glu_ffn`, `run_grouped`, `combine`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from dbrx_train.model.moe.base import GLUExperts

ExpertFFN = Callable[[int, torch.Tensor], torch.Tensor]  # (expert, its rows) -> its outputs


class TorchDroplessExperts(GLUExperts):
    def forward(self, x: torch.Tensor, top_weights: torch.Tensor, top_experts: torch.Tensor) -> torch.Tensor:
        return dropless_moe(x, top_weights, top_experts, self.num_experts,
                            glu_ffn(self.w1, self.v1, self.w2, self.num_experts))

    def gathered(self, x: torch.Tensor, top_weights: torch.Tensor, top_experts: torch.Tensor) -> torch.Tensor:
        return gathered_glu(x, top_weights, top_experts, self.w1, self.v1, self.w2, self.num_experts)


def dropless_moe(x: torch.Tensor, top_weights: torch.Tensor, top_experts: torch.Tensor, num_experts: int,
                 expert_ffn: ExpertFFN) -> torch.Tensor:
    """The weighted sum of each token's `top_experts` outputs, `(tokens, d_model)`."""
    if x.shape[0] == 1:
        # One token (batch-1 decoding): its top_k experts in turn, on views of their weights;
        # sorting, splitting and scattering a single row would cost more than the matmuls.
        weights = top_weights.to(x.dtype)
        out = None
        for slot, e in enumerate(top_experts[0].tolist()):
            y = expert_ffn(e, x) * weights[:, slot : slot + 1]
            out = y if out is None else out.add_(y)
        return out
    order, token_of_row, rows_per_expert = sort_by_expert(top_experts, num_experts)
    # Rows per expert decide the matmul shapes, so they must be known on the host. index_select, not
    # x[token_of_row]: its backward (an index_add) is parallel; indexing's (index_put) made the layer 6% slower.
    expert_out = run_grouped(x.index_select(0, token_of_row), rows_per_expert.tolist(), expert_ffn)
    return combine(x, expert_out, top_weights, order, token_of_row)


def sort_by_expert(top_experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (token, slot) rows in expert order: `order` (indices into the flattened `top_experts`),
    the token of each row, and the rows of each expert `(num_experts,)`, on the device of the data."""
    flat_experts = top_experts.reshape(-1)
    order = torch.argsort(flat_experts, stable=True)
    return order, order // top_experts.shape[-1], torch.bincount(flat_experts, minlength=num_experts)


def glu_ffn(w1: torch.Tensor, v1: torch.Tensor, w2: torch.Tensor, num_experts: int) -> ExpertFFN:
    """Expert `e`'s GLU, for `w1`, `v1`, `w2` holding `num_experts` experts as `(num_experts * ffn, d_model)`."""
    # Under autocast autograd's own ops keep the casts right; otherwise the GLU saves less.
    glu = _glu if torch.is_autocast_enabled(w1.device.type) else _GLU.apply
    w1, v1, w2 = (w.view(num_experts, -1, w.shape[-1]) for w in (w1, v1, w2))
    if torch.is_grad_enabled() and w1.requires_grad:
        # unbind, not w1[e]: each select's backward would write a zero-filled full-size gradient.
        w1, v1, w2 = w1.unbind(0), v1.unbind(0), w2.unbind(0)
    return lambda e, rows: glu(rows, w1[e], v1[e], w2[e])


def run_grouped(rows: torch.Tensor, rows_per_expert: list[int], expert_ffn: ExpertFFN) -> torch.Tensor:
    """Each expert's feed-forward on its block of `rows` (sorted by expert), concatenated."""
    outputs = [expert_ffn(e, block) for e, block in enumerate(rows.split(rows_per_expert)) if len(block)]
    if not outputs:
        # An expert-parallel rank can receive no row. Its weights still take part in the backward
        # pass (with a zero gradient), so every rank runs the same gradient collectives.
        outputs.append(expert_ffn(0, rows))
    return torch.cat(outputs)


def combine(x: torch.Tensor, expert_out: torch.Tensor, top_weights: torch.Tensor, order: torch.Tensor,
            token_of_row: torch.Tensor) -> torch.Tensor:
    """Each token's router-weighted sum of its rows of `expert_out` (in `sort_by_expert` order)."""
    weighted = expert_out * top_weights.reshape(-1, 1)[order].to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token_of_row, weighted)


def gathered_glu(x: torch.Tensor, top_weights: torch.Tensor, top_experts: torch.Tensor, w1: torch.Tensor,
                 v1: torch.Tensor, w2: torch.Tensor, num_experts: int) -> torch.Tensor:
    """`dropless_moe` with the GLU written as multiplies and sums over each token's gathered expert
    weights. Compiled by inductor, each matrix becomes one reduction kernel that reads only the
    chosen experts' rows (indexing fused into the loads): no host sync, no sort, static shapes.
    Run eagerly it would copy `(tokens, top_k, ffn, d_model)` weights: for compiled graphs only."""
    w1, v1, w2 = (w.view(num_experts, -1, w.shape[-1]) for w in (w1, v1, w2))
    rows = x[:, None, None, :]  # (tokens, 1, 1, d_model)
    h = (w1[top_experts] * rows).sum(-1)  # (tokens, top_k, ffn)
    gated = F.silu(h) * (v1[top_experts] * rows).sum(-1)
    out = (gated[..., None] * w2[top_experts]).sum(-2)  # (tokens, top_k, d_model)
    return (out * top_weights[..., None].to(out.dtype)).sum(1)


def _glu(x, w1, v1, w2):
    return (F.silu(F.linear(x, w1)) * F.linear(x, v1)) @ w2


class _GLU(torch.autograd.Function):
    """`_glu` saving only its inputs and the two projections: the gated product is recomputed in
    the backward pass instead of stored, which keeps two of four `(rows, ffn)` activations per
    expert out of training memory for an elementwise recomputation."""

    @staticmethod
    def forward(ctx, x, w1, v1, w2):
        h, v = F.linear(x, w1), F.linear(x, v1)
        ctx.save_for_backward(x, w1, v1, w2, h, v)
        return (F.silu(h) * v) @ w2

    @staticmethod
    def backward(ctx, grad_out):
        x, w1, v1, w2, h, v = ctx.saved_tensors
        sig = torch.sigmoid(h)
        silu = h * sig
        grad_w2 = (silu * v).t() @ grad_out if ctx.needs_input_grad[3] else None
        grad_gated = grad_out @ w2.t()
        grad_v = grad_gated * silu
        grad_h = grad_gated.mul_(v).mul_(sig * (1 + h * (1 - sig)))  # d silu(h)/dh = sig (1 + h (1 - sig))
        grad_x = grad_h @ w1 + grad_v @ v1 if ctx.needs_input_grad[0] else None
        grad_w1 = grad_h.t() @ x if ctx.needs_input_grad[1] else None
        grad_v1 = grad_v.t() @ x if ctx.needs_input_grad[2] else None
        return grad_x, grad_w1, grad_v1, grad_w2
