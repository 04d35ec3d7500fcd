"""Where the model's tensors live: the device mesh of a training layout and `parallelize`, the one
step that lays a `DbrxLM` out over it. Composer receives the model already parallelised.

The mesh, by layout (world = all ranks):
- FULL_SHARD: `('dp',)`, every rank.
- HYBRID_SHARD: `('dp_replicate', 'dp_shard')`: shard within groups of `shard_group_size` ranks,
  replicate across them (FSDP2's HSDP; on gloo, which cannot average in an all-reduce, FSDP2 over
  `dp_shard` and the replicas' average in `training.gradient_average`).
- expert parallelism (`moe_world_size` M > 1, FULL_SHARD): `('dp', 'ep')` = (world / M, M). Ranks
  `r = replica * M + i` form one expert-parallel group per replica (consecutive ranks: on GPUs the
  all-to-all stays inside a node); rank `i` of a group owns experts `[i * E / M, (i + 1) * E / M)`.
  The non-expert parameters are sharded over all ranks (the flattened mesh), as without experts
  parallelism; the expert weights over their group's ranks (`ep`, whole experts) and their replicas
  (`dp`), so expert gradients are reduced over the replicas only.

`parallelize` applies, in this order (each step needs the ones before it):
1. expert placement: each block's experts become `ExpertParallelExperts`, DTensors `Shard(0)` over
   `ep` (FSDP2 composes with them as with tensor parallelism: it shards them further over `dp`);
   their LoRA adapters go with them, sharded by expert the same way; a quantized (QLoRA) base's
   experts become `ExpertParallelQuantizedExperts`, their stored tensors sharded by expert over `ep`
   only (replicated over `dp`: `moe_world_size` = world, as for DBRX-132B on 8 ranks, shards them fully);
2. activation checkpointing, per block (torch's composable `checkpoint`: the parameter names stay);
   before FSDP2, as torchtitan orders them, so FSDP2's hooks run around the recomputed forward;
3. `compile_config`: torch.compile per block (`dbrx_train.model.compile`), the experts left eager;
   after checkpointing and before FSDP2, as torchtitan orders them;
4. FSDP2: each block's experts (EP) over `dp`, each block over the data mesh, the root module
   (embedding, final norm, LM head) last. A quantized (QLoRA) base is sharded by rows like the weights
   (`model.quantize.shard_quantized`: FSDP2 groups only tensors of one dtype, and packed int4 is
   uint8) and gathered by its modules matrix by matrix; its adapters are FSDP2's;
5. materialisation: a model built on `meta` becomes empty local shards on the device (`to_empty`)
   and every rank initialises its own shards (`DbrxLM.init_weights`: the values do not depend on
   the layout, see `dbrx_train.model.init`); LoRA adapters get their initial values;
6. the gradient average on gloo (`training.gradient_average`), HYBRID_SHARD's replicas' included.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from composer.core import Precision
from composer.distributed.fsdp2 import create_mixed_precision_policy
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from dbrx_train.errors import ConfigError
from dbrx_train.model.compile import compile_blocks
from dbrx_train.model.dbrx import DbrxLM
from dbrx_train.model.init import local_part, local_region
from dbrx_train.model.lora import initial_adapter_values
from dbrx_train.model.moe import replace_experts
from dbrx_train.model.moe.expert_parallel import ExpertParallelExperts
from dbrx_train.model.quantize import ExpertParallelQuantizedExperts, QuantizedExperts, shard_quantized
from dbrx_train.training.config import TrainConfig
from dbrx_train.training.gradient_average import all_reduce_averages, fix_gradient_average
from dbrx_train.training.hardware import gpu_memory_bytes, host_memory_bytes
from dbrx_train.training.sizing import Layout, Placement, check_fits, check_moe_world_size, optimizer_state_bytes

log = logging.getLogger(__name__)

EP_DIMS = ('dp', 'ep')  # replicas of an expert-parallel group, ranks within one


def torch_device(device: str) -> str:
    """torch's device type of a Composer device name ('gpu' -> 'cuda')."""
    return 'cuda' if device == 'gpu' else device


def build_mesh(cfg: TrainConfig, world_size: int, device: str) -> DeviceMesh:
    """The mesh of `cfg`'s layout over `world_size` ranks (collective: every rank calls it)."""
    moe_world_size = cfg.model.ffn_config.moe_world_size
    check_moe_world_size(moe_world_size, world_size)
    device_type = torch_device(device)
    if moe_world_size > 1:
        return init_device_mesh(device_type, (world_size // moe_world_size, moe_world_size), mesh_dim_names=EP_DIMS)
    fsdp = cfg.fsdp_config
    if fsdp is not None and fsdp.sharding_strategy == 'HYBRID_SHARD':
        if world_size % fsdp.shard_group_size:
            raise ConfigError('fsdp_config.shard_group_size',
                              f'the world size ({world_size}) is not a multiple of {fsdp.shard_group_size}')
        return init_device_mesh(device_type, (world_size // fsdp.shard_group_size, fsdp.shard_group_size),
                                mesh_dim_names=('dp_replicate', 'dp_shard'))
    return init_device_mesh(device_type, (world_size,), mesh_dim_names=('dp',))


def uses_fsdp(cfg: TrainConfig, world_size: int) -> bool:
    # As llm-foundry does: one rank has nothing to shard, and FSDP2's per-block gathers and
    # gradient reduce-scatters still cost about a fifth of a CPU step (bench/bench_trainer.py).
    return cfg.fsdp_config is not None and world_size > 1


def layout_of(cfg: TrainConfig, world_size: int) -> Layout:
    """`training.sizing`'s description of the layout `parallelize` builds for `cfg` on `world_size` ranks."""
    fsdp = cfg.fsdp_config
    if not uses_fsdp(cfg, world_size):
        return Layout(world_size=1)  # every rank holds the whole model
    hybrid = fsdp.sharding_strategy == 'HYBRID_SHARD'
    return Layout(world_size, fsdp.shard_group_size if hybrid else None, fsdp.reshard_after_forward,
                  fsdp.activation_checkpointing)


def check_memory(cfg: TrainConfig, world_size: int, ranks_per_host: int, device: str) -> None:
    """One line, before the model is built, when this layout cannot fit this host's (or GPU's) memory."""
    trains_all = cfg.lora is None and cfg.freeze is None  # else a lower bound: the weights alone
    per_param = 4 + (4 + optimizer_state_bytes(cfg.optimizer['name']) if trains_all else 0)
    if cfg.model.quantization is not None:  # QLoRA: a byte bounds a stored weight (int4 ~0.53, int8 ~1)
        per_param = 1
    placement = Placement(ranks_per_host, device == 'gpu', cfg.init_device == 'cpu', per_param)
    check_fits(cfg.model, layout_of(cfg, world_size), placement, host_memory_bytes(),
               gpu_memory_bytes() if device == 'gpu' else 0)


def parallelize(model: DbrxLM, cfg: TrainConfig, mesh: DeviceMesh, device: str = 'cpu') -> DbrxLM:
    """Lays `model` (built on `meta`, or whole on the CPU, freezing and LoRA applied) out over
    `mesh` and leaves every rank with its initialised shards on `device` (collective); `device`
    'meta' stops before materialising (a dry run). `cfg` is
    trusted: `TrainConfig.check` refused the layouts this cannot build."""
    fsdp = cfg.fsdp_config
    is_meta = model.wte.weight.is_meta
    if not uses_fsdp(cfg, mesh.size()):
        log.info('one process or no fsdp_config: no FSDP')
    expert_parallel = 'ep' in (mesh.mesh_dim_names or ())

    # 1. Expert placement.
    if expert_parallel:
        replace_experts(model, lambda experts: (ExpertParallelQuantizedExperts if isinstance(experts, QuantizedExperts)
                                                else ExpertParallelExperts)(experts, mesh['ep']))
        log.info('expert parallelism: %s', mesh)
    # 2. Activation checkpointing.
    if fsdp is not None and fsdp.activation_checkpointing:
        for block in model.blocks:
            checkpoint(block)
    # 3. torch.compile.
    if cfg.compile_config is not None:
        log.info('compiling each transformer block: %s', cfg.compile_config.kwargs())
        compile_blocks(model, cfg.compile_config)
    # 4. FSDP2.
    replicas = None  # HYBRID_SHARD's replica group, where gradient_average (not FSDP2) averages over it
    if uses_fsdp(cfg, mesh.size()):
        mp_policy = create_mixed_precision_policy(Precision(cfg.precision), fsdp.mixed_precision)
        held = model.wte.weight.dtype  # bf16 with `lora.dtype: bf16`: gathered as held, not cast up
        if mp_policy.param_dtype is not None and mp_policy.param_dtype.itemsize > held.itemsize:
            mp_policy = dataclasses.replace(mp_policy, param_dtype=None)
        data_mesh = mesh._flatten('dp_ep') if expert_parallel else mesh
        options = dict(reshard_after_forward=fsdp.reshard_after_forward, mp_policy=mp_policy or MixedPrecisionPolicy())
        hybrid = fsdp.sharding_strategy == 'HYBRID_SHARD'
        if hybrid and not all_reduce_averages(mesh.get_group('dp_replicate'), mesh.device_type):
            data_mesh, replicas = mesh['dp_shard'], mesh.get_group('dp_replicate')
        shard_quantized(model, mesh['dp_shard'] if hybrid else data_mesh)
        for block in model.blocks:
            if expert_parallel:
                fully_shard(block.ffn.experts, mesh=mesh['dp'], **options)
            fully_shard(block, mesh=data_mesh, **options)
        fully_shard(model, mesh=data_mesh, **options)
    if device == 'meta':
        return model  # a dry run (dbrx_train.info): the layout alone, nothing allocated
    # 5. Materialisation and initialisation of each rank's shards.
    if is_meta:
        model.to_empty(device=torch_device(device))
        model.init_weights(cfg.seed)
        if cfg.lora is not None:
            with torch.no_grad():
                for tensor, value in initial_adapter_values(model, cfg.lora.seed):
                    local_part(tensor).copy_(value[local_region(tensor)])
    # 6. FSDP2's gradient mean on gloo.
    fix_gradient_average(model, replicas)
    return model
