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

        routed = x[token_of_row]
        outputs = []
        for e, rows in enumerate(routed.split(rows_per_expert)):
            if rows.shape[0]:
                outputs.append((F.silu(F.linear(rows, w1[e])) * F.linear(rows, v1[e])) @ w2[e])
        expert_out = torch.cat(outputs) * top_weights.reshape(-1, 1)[order].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token_of_row, expert_out)
