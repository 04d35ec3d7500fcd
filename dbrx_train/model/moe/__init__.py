"""MoE expert backends behind one seam: `build_experts(name, ...)` returns an `Experts` module, and
`replace_experts(model, make)` swaps every block's experts (quantization, expert parallelism, LoRA).

Every float backend holds the same parameters, so a checkpoint trained with one loads on any other.
- `torch`: dropless grouped experts in plain PyTorch (every device).
- `auto`: the best backend that can run here; today that is `torch` everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import get_args

from torch import nn

from dbrx_train.errors import ConfigError
from dbrx_train.model.config import MoEBackendName
from dbrx_train.model.moe.base import Experts, GLUExperts, run_experts, traced_experts
from dbrx_train.model.moe.torch_dropless import TorchDroplessExperts

BACKENDS: dict[str, type[GLUExperts]] = {'torch': TorchDroplessExperts}

__all__ = ['BACKENDS', 'Experts', 'GLUExperts', 'TorchDroplessExperts', 'build_experts', 'replace_experts',
           'run_experts', 'traced_experts']


def build_experts(backend: MoEBackendName, d_model: int, ffn_hidden_size: int, num_experts: int, device=None,
                  dtype=None) -> GLUExperts:
    name = 'torch' if backend == 'auto' else backend
    if name not in BACKENDS:
        raise ConfigError('model.moe_backend', f'backend {backend!r} is not available; choose from '
                                               f'{", ".join(get_args(MoEBackendName))}')
    return BACKENDS[name](d_model, ffn_hidden_size, num_experts, device=device, dtype=dtype)


def replace_experts(model: nn.Module, make: Callable[[Experts], Experts], layers: Iterable[int] | None = None) -> None:
    """Gives each block of `model` (a `DbrxLM`; every block, or those of `layers`) the experts
    `make(its current experts)` returns, which may be the same module changed in place. The new
    module must be an `Experts` of the same sizes: a wrong one fails here, not at the next forward."""
    for i in range(len(model.blocks)) if layers is None else layers:
        ffn = model.blocks[i].ffn
        old, new = ffn.experts, make(ffn.experts)
        if not isinstance(new, Experts):
            raise TypeError(f'block {i}: {type(new).__name__} is not an Experts module')
        sizes = ('d_model', 'ffn_hidden_size', 'num_experts')
        if any(getattr(new, s) != getattr(old, s) for s in sizes):
            raise ValueError(f'block {i}: {new.extra_repr()} replaces experts of other sizes ({old.extra_repr()})')
        ffn.experts = new
