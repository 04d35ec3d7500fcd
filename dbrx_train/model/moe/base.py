"""The seam between the router and the expert computation.

`Experts` is the slot every MoE layer holds (`block.ffn.experts`): it knows its sizes and maps
routed tokens to their weighted expert outputs. How the weights are stored is the subclass's
business: `GLUExperts` holds them as float parameters `w1`, `v1` and `w2`, each
`(E * ffn_hidden_size, d_model)`, the layout transformers' `DbrxExpertGLU` and Megablocks' GLU
share, so weights copy across backends and checkpoints without transposes; the float backends
only decide how the tokens reach them (`DbrxLM.init_weights` draws them by name). Quantized
experts (`dbrx_train.model.quantize`) store integer buffers instead and are loaded, never initialised.
"""

from __future__ import annotations

import torch
from torch import nn


class Experts(nn.Module):
    """GLU experts: `expert_e(x) = (silu(x @ w1[e].T) * (x @ v1[e].T)) @ w2[e]`, however stored."""

    def __init__(self, d_model: int, ffn_hidden_size: int, num_experts: int):
        super().__init__()
        self.d_model = d_model
        self.ffn_hidden_size = ffn_hidden_size
        self.num_experts = num_experts

    def forward(self, x: torch.Tensor, top_weights: torch.Tensor, top_experts: torch.Tensor) -> torch.Tensor:
        """x `(tokens, d_model)`; top_weights/top_experts `(tokens, top_k)`: the weighted sum of each
        token's experts' outputs, `(tokens, d_model)`."""
        raise NotImplementedError

    def gathered(self, x: torch.Tensor, top_weights: torch.Tensor, top_experts: torch.Tensor) -> torch.Tensor | None:
        """The same result for one token (or a few) inside a compiled inference graph, written with
        static shapes and no host sync (see `traced_experts`); None: this backend has no such form."""
        return None

    def extra_repr(self) -> str:
        return f'num_experts={self.num_experts}, d_model={self.d_model}, ffn_hidden_size={self.ffn_hidden_size}'


class GLUExperts(Experts):
    """Experts whose weights are the float parameters `w1`, `v1`, `w2` (trainable)."""

    def __init__(self, d_model: int, ffn_hidden_size: int, num_experts: int, device=None, dtype=None):
        super().__init__(d_model, ffn_hidden_size, num_experts)
        shape = (num_experts * ffn_hidden_size, d_model)
        self.w1 = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.v1 = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.w2 = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))


@torch.compiler.disable
def run_experts(experts: Experts, x: torch.Tensor, top_weights: torch.Tensor, top_experts: torch.Tensor) -> torch.Tensor:
    """`experts(x, top_weights, top_experts)`, left out of torch.compile's graphs: how many rows each
    expert gets decides the shapes of its matmuls and changes every step, so traced experts would
    recompile every step. Under compile they run eagerly between the graphs around them."""
    return experts(x, top_weights, top_experts)


def traced_experts(experts: Experts, x: torch.Tensor, top_weights: torch.Tensor,
                   top_experts: torch.Tensor) -> torch.Tensor | None:
    """The experts' `gathered` form while torch.compile traces a batch-1 decoding step (one token, no
    gradients), else None: then `run_experts`. So the whole step is one graph; a graph break per
    layer and a host sync per token cost more than its top_k rows. A batch of one is a graph of its
    own under dynamic batch sizes anyway (torch specialises sizes 0 and 1), so this adds none. (The
    caller calls `run_experts` itself: a graph break inside a function dynamo inlines would make
    that function a frame of its own, compiled once per experts module.)"""
    if torch.compiler.is_compiling() and not torch.is_grad_enabled() and x.shape[0] == 1:
        return experts.gathered(x, top_weights, top_experts)
    return None
