"""Expert parallelism composed with FSDP2: the rank layout and where the expert weights live.

world = moe_world_size x replicas. Ranks `r = replica * moe_world_size + i` form one expert-parallel
group per replica: consecutive ranks, so on GPUs the all-to-all stays inside a node. Rank `i` of
a group owns experts `[i * E / moe_world_size, (i + 1) * E / moe_world_size)` of every layer.

As FSDP2's 2-D (tensor-parallel) pattern: the expert weights become DTensors `Shard(0)` over the
`ep` mesh dimension, then each `experts` module is `fully_shard`ed over the `dp` dimension (its
replicas) before Composer wraps the blocks. Composer's FSDP2 leaves a module that is already
sharded alone, so the other parameters stay sharded over all ranks, as without experts parallelism,
and the expert gradients are reduced over the replicas only.
"""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from dbrx_train.errors import ConfigError
from dbrx_train.model.dbrx import DbrxLM
from dbrx_train.model.moe import GLUExperts, replace_experts
from dbrx_train.model.moe.expert_parallel import ExpertParallelExperts

KEY = 'model.ffn_config.moe_world_size'
MESH_DIMS = ('dp', 'ep')  # replicas of an expert-parallel group, ranks within one


def check_moe_world_size(moe_world_size: int, world_size: int) -> None:
    if moe_world_size > world_size:
        raise ConfigError(KEY, f'{moe_world_size} is larger than the world size ({world_size})')
    if world_size % moe_world_size:
        raise ConfigError(KEY, f'the world size ({world_size}) is not divisible by {moe_world_size}')


def expert_parallel_mesh(moe_world_size: int, device_type: str = 'cpu') -> DeviceMesh:
    """The `(dp, ep)` mesh of all ranks (collective: every rank calls it)."""
    world_size = dist.get_world_size()
    check_moe_world_size(moe_world_size, world_size)
    return init_device_mesh(device_type, (world_size // moe_world_size, moe_world_size), mesh_dim_names=MESH_DIMS)


def parallelize_experts(model: DbrxLM, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy | None = None,
                        reshard_after_forward: bool = True) -> None:
    """Gives every block its expert-parallel experts over `mesh['ep']`, fully sharded over `mesh['dp']`.

    Call it on a model whose weights are the same on every rank, before the optimizer is built
    and before Composer applies FSDP2 (the parameters are replaced; their names stay)."""
    def shard(experts: GLUExperts) -> ExpertParallelExperts:
        parallel = ExpertParallelExperts(experts, mesh['ep'])
        fully_shard(parallel, mesh=mesh['dp'], reshard_after_forward=reshard_after_forward,
                    mp_policy=mp_policy or MixedPrecisionPolicy())
        return parallel

    replace_experts(model, shard)
