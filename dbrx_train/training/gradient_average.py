"""FSDP2's gradient average on gloo, which lacks `ReduceOp.AVG`.

- FSDP2 averages gradients with `reduce_scatter_tensor(op=ReduceOp.AVG)`; torch 2.7's gloo backend
  returns the sum for it (2 ranks reducing ones get 2, not 1), so on CPU every rank would step with
  world-size times the mean gradient. Adam and gradient clipping mostly hide a constant factor;
  SGD, weight decay's balance and a comparison with one process do not.
- HYBRID_SHARD's replicas average with `all_reduce(op=ReduceOp.AVG)`, which gloo refuses ("Cannot use
  ReduceOp.AVG with Gloo") at the first backward pass. On such a backend `parallelize` shards each
  replica over its own group (a 1-D mesh) and the replicas' all-reduce happens here instead.

`fix_gradient_average(model, replicas)` probes each FSDP2 unit's group once and installs, in FSDP2's
post-reduce hook, what the backend left undone: the division of a summed reduce-scatter, and the sum
over `replicas` with its division. Where AVG works (NCCL) and FSDP2 does HSDP itself, it does nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule


def fix_gradient_average(model: torch.nn.Module, replicas: dist.ProcessGroup | None = None) -> int:
    """Installs the missing average on every FSDP2 unit of `model` that needs it (collective: every rank
    calls it after FSDP2 has wrapped the model); `replicas`: the group of ranks holding the same shards,
    to average the reduced gradients over. Returns how many units needed it."""
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
        shard_divisor = dist.get_world_size(group) if probed[group] else 1
        if shard_divisor > 1 or replicas is not None:
            module.set_all_reduce_hook(lambda grad, divisor=shard_divisor: _average(grad, divisor, replicas))
            fixed += 1
    return fixed


def all_reduce_averages(group: dist.ProcessGroup, device: str) -> bool:
    """Whether `all_reduce(op=ReduceOp.AVG)` runs on `group`'s backend for tensors on `device`
    (collective). gloo refuses it before communicating, on every rank alike."""
    try:
        dist.all_reduce(torch.ones(1, device=device), op=dist.ReduceOp.AVG, group=group)
    except RuntimeError:
        return False
    return True


def _average(grad: torch.Tensor, shard_divisor: int, replicas: dist.ProcessGroup | None) -> None:
    if replicas is not None:
        dist.all_reduce(grad, group=replicas)  # SUM
        shard_divisor *= dist.get_world_size(replicas)
    grad.div_(shard_divisor)


def _avg_sums(group, device: torch.device) -> bool:
    size = dist.get_world_size(group)
    out = torch.empty(1, device=device)
    dist.reduce_scatter_tensor(out, torch.ones(size, device=device), op=dist.ReduceOp.AVG, group=group)
    return size > 1 and out.item() != 1.0
