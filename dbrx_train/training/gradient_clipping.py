"""Composer's `gradient_clipping` algorithm, with a `norm` clipping that works when the parameters
live on several device meshes.

With expert parallelism the expert weights are DTensors on the `(dp, ep)` mesh and the others on
FSDP2's own mesh; `torch.nn.utils.clip_grad_norm_` stacks the per-parameter norms and DTensor
refuses to stack across meshes. Here each mesh's gradients get their norm (a norm of the whole,
unsharded gradients), the norms are combined, and each mesh's gradients are scaled.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from composer.algorithms import GradientClipping as ComposerGradientClipping
from composer.core import Event, State
from composer.loggers import Logger
from torch.distributed.tensor import DTensor


class GradientClipping(ComposerGradientClipping):
    def apply(self, event: Event, state: State, logger: Logger) -> int | None:
        if event == Event.AFTER_TRAIN_BATCH and self.clipping_type == 'norm':
            clip_grad_norm_(state.model.parameters(), self.clipping_threshold)
            return None
        return super().apply(event, state, logger)


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scales all gradients so that their global 2-norm is at most `max_norm`; returns the norm before."""
    by_mesh: dict = {}
    for p in parameters:
        if p.grad is not None:
            by_mesh.setdefault(getattr(p, 'device_mesh', None), []).append(p)
    if not by_mesh:
        return torch.zeros(())
    norms = []
    for params in by_mesh.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.linalg.vector_norm(torch.stack([n.cpu() for n in norms]))
    for params in by_mesh.values():
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
