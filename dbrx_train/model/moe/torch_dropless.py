"""Dropless MoE in plain PyTorch: runs anywhere (CPU, GPU, meta).

Each (token, expert) assignment is sorted by expert, every expert multiplies exactly the rows
routed to it (no capacity factor, no padding, no dense mask over all experts), and the weighted
results are scattered back. A token's output depends only on that token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dbrx_train.model.moe.base import Experts


class TorchDroplessExperts(Experts):
    def forward(self, x: torch.Tensor, top_weights: torch.Tensor, top_experts: torch.Tensor) -> torch.Tensor:
        top_k = top_experts.shape[-1]
        flat_experts = top_experts.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        token_of_row = order // top_k
        # Rows per expert decide the matmul shapes, so they must be known on the host.
        rows_per_expert = torch.bincount(flat_experts, minlength=self.num_experts).tolist()

        # unbind, not w1[e]: each select's backward would write a zero-filled full-size gradient.
        w1, v1, w2 = (w.view(self.num_experts, self.ffn_hidden_size, self.d_model).unbind(0)
                      for w in (self.w1, self.v1, self.w2))

        # Under autocast autograd's own ops keep the casts right; otherwise the GLU saves less.
        glu = _glu if torch.is_autocast_enabled(x.device.type) else _GLU.apply
        routed = x[token_of_row]
        outputs = []
        for e, rows in enumerate(routed.split(rows_per_expert)):
            if rows.shape[0]:
                outputs.append(glu(rows, w1[e], v1[e], w2[e]))
        expert_out = torch.cat(outputs) * top_weights.reshape(-1, 1)[order].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token_of_row, expert_out)


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
