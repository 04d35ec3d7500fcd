"""FSDP2 averages gradients with `reduce_scatter_tensor(op=ReduceOp.AVG)`; torch 2.7's gloo backend
returns the sum for it (2 ranks reducing ones get 2, not 1), so on CPU every rank would step with
world-size times the mean gradient. Adam and gradient clipping mostly hide a constant factor;
SGD, weight decay's balance and a comparison with one process do not.

`fix_gradient_average(model)` probes each FSDP2 unit's group once and, where AVG sums, divides the
reduced gradient by the group size in FSDP2's post-reduce hook. Where AVG works (NCCL) it does
nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule


def fix_gradient_average(model: torch.nn.Module) -> int:
    """Installs the division on every FSDP2 unit of `model` whose group sums under AVG (collective:
    every rank calls it after FSDP2 has wrapped the model); returns how many units needed it."""
    fixed, probed = 0, {}
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        param_group = module._get_fsdp_state()._fsdp_param_group  # private: the unit's reduce-scatter group
        if param_group is None:
            continue
        group = param_group.mesh_info.shard_process_group
        if group not in probed:
            probed[group] = _avg_sums(group, param_group.device)
        if probed[group]:
            module.set_all_reduce_hook(lambda grad, size=dist.get_world_size(group): grad.div_(size))
            fixed += 1
    return fixed


def _avg_sums(group, device: torch.device) -> bool:
    size = dist.get_world_size(group)
    out = torch.empty(1, device=device)
    dist.reduce_scatter_tensor(out, torch.ones(size, device=device), op=dist.ReduceOp.AVG, group=group)
    return size > 1 and out.item() != 1.0
