"""MoE expert backends behind one seam: `build_experts(name, ...)` returns an `Experts` module.

Every backend holds the same parameters, so a checkpoint trained with one loads on any other.
- `torch`: dropless grouped experts in plain PyTorch (every device).
- `auto`: the best backend that can run here. Megablocks' CUDA `dMoE` kernels are the planned
  second backend (optional extra `.[gpu]`); until it lands `auto` resolves to `torch`.
"""

from __future__ import annotations

from dbrx_train.errors import ConfigError
from dbrx_train.model.moe.base import Experts
from dbrx_train.model.moe.torch_dropless import TorchDroplessExperts

BACKENDS: dict[str, type[Experts]] = {'torch': TorchDroplessExperts}

__all__ = ['BACKENDS', 'Experts', 'TorchDroplessExperts', 'build_experts']


def build_experts(backend: str, d_model: int, ffn_hidden_size: int, num_experts: int, device=None, dtype=None) -> Experts:
    name = 'torch' if backend == 'auto' else backend
    if name not in BACKENDS:
        raise ConfigError('model.moe_backend', f'backend {backend!r} is not available here; choose from auto, torch')
    return BACKENDS[name](d_model, ffn_hidden_size, num_experts, device=device, dtype=dtype)
