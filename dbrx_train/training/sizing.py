"""Memory and communication per rank of a training layout, in closed form (no process group, no weights).

Layout: world = `moe_world_size` (M) x replicas (R). Non-expert parameters are FSDP-sharded over
all ranks (FULL_SHARD) or over `shard_group_size` ranks (HYBRID_SHARD, replicated across groups).
Expert parameters: with M = 1 they are sharded like the rest; with M > 1 each rank owns E/M whole
experts of every layer, FSDP-sharded over its R replicas (what `training.parallelize` builds).
FSDP2 splits dim 0 of every parameter into equal chunks, the last ones short or empty, and pads
to the largest: the numbers here are rank 0's, the busiest.

Bytes per parameter held: fp32 master weights (4), fp32 gradients (4) and AdamW's two fp32
moments (8), whatever the autocast precision.

All-to-all bytes sent (= received) per rank per step, under uniform routing:

    micro_batches x n_layers x passes x tokens x top_k x d_model x (M - 1) / M x (dispatch + combine bytes)

`tokens` is the tokens of one micro-batch of this rank; each of its `tokens x top_k` (token,
expert) rows crosses to the rank owning the expert unless it owns it itself (probability 1/M).
Per layer and pass, rows go out (dispatch) and expert outputs come back (combine); passes are the
forward and the backward (the gradients retrace both exchanges), plus the forward again under
activation checkpointing. The rows-per-expert counts exchanged first (E integers) are not counted.

FSDP all-gather bytes received per rank per step, for comparison: every unit's parameters in the
gather dtype, times (n - 1) / n of its group of n ranks, per micro-batch; the blocks are gathered
in the forward and again in the backward (`reshard_after_forward`), the root module (embedding,
final norm, LM head) once, as FSDP2 keeps the root gathered after its forward. Gradient
reduce-scatters and HYBRID_SHARD's all-reduce are not counted.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from dbrx_train.errors import ConfigError, UserError
from dbrx_train.model.config import ModelConfig

MOE_WORLD_SIZE_KEY = 'model.ffn_config.moe_world_size'
GIB = 2**30
# Bytes held per parameter: fp32 master weights, fp32 gradients, AdamW's exp_avg and exp_avg_sq.
STATE_BYTES = {'params': 4, 'grads': 4, 'AdamW': 2 * 4}


def check_moe_world_size(moe_world_size: int, world_size: int) -> None:
    if moe_world_size > world_size:
        raise ConfigError(MOE_WORLD_SIZE_KEY, f'{moe_world_size} is larger than the world size ({world_size})')
    if world_size % moe_world_size:
        raise ConfigError(MOE_WORLD_SIZE_KEY, f'the world size ({world_size}) is not divisible by {moe_world_size}')


@dataclass(frozen=True)
class Layout:
    world_size: int
    shard_group_size: int | None = None  # HYBRID_SHARD; None: FULL_SHARD over all ranks
    reshard_after_forward: bool = True
    activation_checkpointing: bool = False

    def check(self, config: ModelConfig) -> None:
        if self.world_size < 1:
            raise ConfigError('world_size', f'must be at least 1, got {self.world_size}')
        check_moe_world_size(config.ffn_config.moe_world_size, self.world_size)
        if self.shard_group_size is not None:
            if self.shard_group_size < 1 or self.world_size % self.shard_group_size:
                raise ConfigError('fsdp_config.shard_group_size', f'the world size ({self.world_size}) is not a '
                                                                  f'multiple of {self.shard_group_size}')
            if config.ffn_config.moe_world_size > 1:
                raise ConfigError(MOE_WORLD_SIZE_KEY, 'expert parallelism needs FULL_SHARD, not HYBRID_SHARD '
                                                      '(shard_group_size)')

    @property
    def shard_ranks(self) -> int:
        """The ranks each non-expert parameter is split over."""
        return self.shard_group_size or self.world_size


@dataclass(frozen=True)
class Traffic:
    """Bytes per element on the wire."""

    gather: int  # FSDP all-gathers: the mixed-precision param_dtype
    dispatch: int  # the MoE layer's input rows
    combine: int  # the experts' output rows

    @classmethod
    def of(cls, precision: str, mixed_precision: str = 'DEFAULT') -> Traffic:
        """On GPUs, for the training YAML's `precision` and `fsdp_config.mixed_precision`: Composer
        gathers in the autocast dtype unless FULL; the MoE input is a LayerNorm output, which CUDA
        autocast keeps in fp32; the experts' matmuls return the autocast dtype."""
        autocast = 4 if precision == 'fp32' else 2
        return cls(gather=4 if mixed_precision == 'FULL' else autocast, dispatch=4, combine=autocast)


@dataclass(frozen=True)
class RankSize:
    """Rank 0's share of a layout. Numels are of its FSDP shards, padding included."""

    expert_numel: int
    non_expert_numel: int
    all_to_all_bytes: float  # per step, sent (= received under uniform routing)
    all_gather_bytes: int  # per step, received
    gathered_block_bytes: int  # one transformer block's parameters as FSDP gathers them (transient)

    @property
    def numel(self) -> int:
        return self.expert_numel + self.non_expert_numel


def _shard(dim0: int, rest: int, ranks: int) -> int:
    """Elements of rank 0's FSDP2 shard of a `(dim0, ...)` parameter over `ranks` ranks."""
    return -(-dim0 // ranks) * rest


def _shapes(config: ModelConfig) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[tuple[int, int]]]:
    """(dim 0, elements per row) of one block's non-expert parameters, of one expert weight
    (w1, v1 and w2 alike), and of the root module's parameters."""
    d, ffn = config.d_model, config.ffn_config
    qkv = d + 2 * config.attn_config.kv_n_heads * config.head_dim
    block = [(d, 1), (qkv, d), (d, d), (d, 1), (ffn.moe_num_experts, d)]  # norm_1, Wqkv, out_proj, norm_2, router
    expert = [(ffn.moe_num_experts * ffn.ffn_hidden_size, d)]
    root = [(config.vocab_size, d), (d, 1), (config.vocab_size, d)]  # wte, norm_f, lm_head
    return block, expert, root


def all_to_all_bytes(config: ModelConfig, tokens: int, micro_batches: int = 1, dispatch_bytes: int = 4,
                     combine_bytes: int = 4, activation_checkpointing: bool = False) -> float:
    """Bytes one rank sends by all-to-all in a training step, under uniform routing (the formula
    in this module's docstring); `tokens` is one micro-batch's tokens on this rank."""
    ffn = config.ffn_config
    m = ffn.moe_world_size
    passes = 3 if activation_checkpointing else 2
    rows = tokens * ffn.moe_top_k
    return micro_batches * config.n_layers * passes * rows * config.d_model * (m - 1) / m * (dispatch_bytes +
                                                                                              combine_bytes)


def _expert_fsdp_ranks(config: ModelConfig, layout: Layout) -> int:
    """The ranks FSDP2 shards a rank's expert tensors over: the replicas of its expert-parallel group,
    or, without expert parallelism, the ranks every parameter is sharded over."""
    m = config.ffn_config.moe_world_size
    return layout.world_size // m if m > 1 else layout.shard_ranks


def _rank_shards(config: ModelConfig, layout: Layout) -> tuple[int, int, int, int]:
    """Rank 0's elements of one layer's three expert weights and of one block's other parameters,
    of the root module's, and the ranks the experts are sharded over (FSDP)."""
    layout.check(config)
    m = config.ffn_config.moe_world_size
    block, (expert,), root = _shapes(config)
    n = layout.shard_ranks
    expert_rows = expert[0] // m  # this rank's experts, then FSDP over its replicas
    expert_ranks = _expert_fsdp_ranks(config, layout)
    expert_shard = 3 * _shard(expert_rows, expert[1], expert_ranks)
    block_shard = sum(_shard(dim0, rest, n) for dim0, rest in block)
    root_shard = sum(_shard(dim0, rest, n) for dim0, rest in root)
    return expert_shard, block_shard, root_shard, expert_ranks


def rank_size(config: ModelConfig, layout: Layout, tokens: int, micro_batches: int, traffic: Traffic) -> RankSize:
    """Rank 0's parameter shards and its traffic per step; `tokens` per micro-batch on this rank."""
    expert_shard, block_shard, root_shard, expert_ranks = _rank_shards(config, layout)
    n = layout.shard_ranks

    def received(shard: int, ranks: int) -> int:  # all-gather: every other rank's padded shard
        return (ranks - 1) * shard * traffic.gather

    block_gathers = 2 if layout.reshard_after_forward else 1
    per_block = block_gathers * (received(block_shard, n) + received(expert_shard, expert_ranks))
    gathers = micro_batches * (config.n_layers * per_block + received(root_shard, n))
    return RankSize(
        expert_numel=config.n_layers * expert_shard,
        non_expert_numel=config.n_layers * block_shard + root_shard,
        all_to_all_bytes=all_to_all_bytes(config, tokens, micro_batches, traffic.dispatch, traffic.combine,
                                          layout.activation_checkpointing),
        all_gather_bytes=gathers,
        gathered_block_bytes=(n * block_shard + expert_ranks * expert_shard) * traffic.gather,
    )


# ---------------------------------------------------------------- does a layout fit


def optimizer_state_bytes(optimizer: str) -> int:
    """fp32 optimizer state per trainable parameter: Adam's two moments, Lion's one, else none counted."""
    name = optimizer.lower()
    return 8 if 'adam' in name else 4 if 'lion' in name else 0


def model_numel(config: ModelConfig) -> int:
    block, (expert,), root = _shapes(config)
    per_layer = sum(d * r for d, r in block) + 3 * expert[0] * expert[1]
    return config.n_layers * per_layer + sum(d * r for d, r in root)


@dataclass(frozen=True)
class Placement:
    """Where a layout's ranks run and what they hold besides their shards."""

    ranks_per_host: int
    on_gpu: bool
    builds_whole_model: bool  # init_device cpu: every rank builds the whole fp32 model before sharding
    bytes_per_param: int  # held per parameter of rank 0's shards: weights, and gradients and optimizer state


@dataclass(frozen=True)
class MemoryNeed:
    """Bytes that must be held at once at least (activations and temporaries not counted)."""

    state: int  # rank 0: its shards' weights, gradients and optimizer state
    build: int  # one rank's whole model before sharding (0 on meta)
    host: int  # every rank of one host together
    gpu: int  # one GPU (0 on CPU)


def memory_need(config: ModelConfig, layout: Layout, placement: Placement) -> MemoryNeed:
    expert_shard, block_shard, root_shard, _ = _rank_shards(config, layout)
    state = (config.n_layers * (expert_shard + block_shard) + root_shard) * placement.bytes_per_param
    build = 4 * model_numel(config) if placement.builds_whole_model else 0
    per_rank_on_host = max(build, 0 if placement.on_gpu else state)
    ranks = min(placement.ranks_per_host, layout.world_size)
    return MemoryNeed(state=state, build=build, host=ranks * per_rank_on_host, gpu=state if placement.on_gpu else 0)


def fits(need: MemoryNeed, host_bytes: int, gpu_bytes: int) -> bool:
    return need.host <= host_bytes and need.gpu <= gpu_bytes


def smallest_fitting_world(config: ModelConfig, layout: Layout, placement: Placement, host_bytes: int,
                           gpu_bytes: int, largest: int = 1 << 20) -> int | None:
    """The smallest world size (a multiple of the expert-parallel degree and of the shard group)
    whose rank 0 fits, with as many ranks per host; None when no world up to `largest` does. The
    need only shrinks as the world grows: doublings find a fitting world, bisection the smallest."""
    step = math.lcm(config.ffn_config.moe_world_size, layout.shard_group_size or 1)

    def fit(multiple: int) -> bool:
        world = dataclasses.replace(layout, world_size=multiple * step)
        return fits(memory_need(config, world, placement), host_bytes, gpu_bytes)

    high = 1
    while not fit(high):
        high *= 2
        if high * step > largest:
            return None
    low = high // 2  # does not fit (0: nothing below)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if fit(middle) else (middle, high)
    return high * step


def check_fits(config: ModelConfig, layout: Layout, placement: Placement, host_bytes: int, gpu_bytes: int) -> None:
    """`UserError` in one line, before anything is allocated, when rank 0 of `layout` cannot hold its
    shards (or, with init_device cpu, the whole model it builds first) in this host's or GPU's memory."""
    need = memory_need(config, layout, placement)
    if fits(need, host_bytes, gpu_bytes):
        return
    if need.gpu > gpu_bytes:
        problem = f'rank 0 needs at least {need.gpu / GIB:,.1f} GiB on its GPU, which has {gpu_bytes / GIB:,.1f} GiB'
    else:
        ranks = min(placement.ranks_per_host, layout.world_size)
        what = ('builds the whole model first' if need.build >= need.state and need.build else
                'holds its shards with gradients and optimizer state')
        problem = (f'{ranks} rank(s) on this host need at least {need.host / GIB:,.1f} GiB (each {what}: '
                   f'{max(need.build, need.state) / GIB:,.1f} GiB), the host has {host_bytes / GIB:,.1f} GiB')
    world = smallest_fitting_world(config, layout, placement, host_bytes, gpu_bytes)
    prefix = ''
    if world is None and placement.builds_whole_model:
        prefix = 'more ranks cannot help, each builds the whole model: use init_device: meta; then '
        placement = dataclasses.replace(placement, builds_whole_model=False)
        world = smallest_fitting_world(config, layout, placement, host_bytes, gpu_bytes)
    if world is None:
        fix = f'{prefix}no world size up to 1048576 fits'
    else:
        hosts = -(-world // placement.ranks_per_host)
        fix = (f'{prefix}the smallest layout that fits is world size {world} ({hosts} host(s) of '
               f'{placement.ranks_per_host})')
    raise UserError(f'layout does not fit: {problem} (world size {layout.world_size}, moe_world_size '
                    f'{config.ffn_config.moe_world_size}); {fix}; set check_memory: false to start anyway')


# ---------------------------------------------------------------- QLoRA: a frozen quantized base


@dataclass(frozen=True)
class QLoraSize:
    """Rank 0's bytes in a QLoRA layout: the frozen base (its quantized matrices with their 16-bit
    scales and zeros, and the float rest) and the trainable adapters with their gradients and AdamW's
    two moments, the float tensors in `lora.dtype` (fp32, or bf16). FSDP-sharded like the weights of a
    float layout (rank 0's rows)."""

    base_quantized: int
    base_float: int
    adapters: int
    adapter_numel: int
    gathered_bytes: int  # transient, while a module runs: its whole quantized base (the experts' 3 matrices)

    @property
    def adapter_grads(self) -> int:
        return self.adapters

    @property
    def adamw(self) -> int:
        return 2 * self.adapters

    @property
    def total(self) -> int:
        return self.base_quantized + self.base_float + self.adapters + self.adapter_grads + self.adamw


def quantized_row_bytes(in_features: int, method: str, group_size: int) -> int:
    """Bytes of one stored row: int4 packs two weights a byte and keeps a 16-bit scale and zero per
    group (4 + 32 / group_size bits per weight); int8 a byte a weight and a 16-bit scale per row."""
    if method == 'int4':
        return in_features // 2 + 2 * 2 * (in_features // group_size)
    return in_features + 2


def qlora_rank_size(config: ModelConfig, layout: Layout, lora_rank: int, float_bytes: int = 4) -> QLoraSize:
    """The closed form of `QLoraSize` for `config` (quantized) with adapters of rank `lora_rank` on every
    target (Wqkv, out_proj, and each expert's w1, v1, w2), every layer; `float_bytes` per float value (4:
    fp32, 2: `lora.dtype: bf16`)."""
    layout.check(config)
    if config.quantization is None:
        raise ConfigError('quantization', 'QLoRA sizing needs a quantized model (int4 or int8)')
    if lora_rank < 1:
        raise ConfigError('lora_rank', f'must be at least 1, got {lora_rank}')
    n, d, ffn = layout.shard_ranks, config.d_model, config.ffn_config
    e, f, m = ffn.moe_num_experts, ffn.ffn_hidden_size, ffn.moe_world_size
    qkv = d + 2 * config.attn_config.kv_n_heads * config.head_dim

    def stored(rows: int, in_features: int, ranks: int = n) -> int:  # rank 0's rows of a quantized matrix
        row_bytes = quantized_row_bytes(in_features, config.quantization, config.quantization_group_size)
        return _shard(rows, row_bytes, ranks)

    # w1, v1; w2 stored per expert transposed. Under expert parallelism a rank stores its experts
    # whole (replicated over the replicas) and trains their adapters, FSDP-sharded over the replicas.
    store_ranks = m if m > 1 else n
    experts = 2 * stored(e * f, d, store_ranks) + stored(e * d, f, store_ranks)
    per_layer = stored(qkv, d) + stored(d, d) + experts
    base_quantized = config.n_layers * per_layer + stored(config.vocab_size, d)
    base_float = float_bytes * (config.n_layers * (2 * _shard(d, 1, n) + _shard(e, d, n)) + _shard(config.vocab_size, d, n)
                      + _shard(d, 1, n))
    r = lora_rank
    expert_ranks = _expert_fsdp_ranks(config, layout)
    adapter_numel = config.n_layers * (
        sum(_shard(dim0, rest, n) for dim0, rest in [(1, r * d), (1, qkv * r), (1, r * d), (1, d * r)])
        + 3 * (_shard(e // m, r * d, expert_ranks) + _shard(e // m, f * r, expert_ranks)))
    gathered = 0 if m > 1 else n * experts  # every rank's rows of one layer's experts (EP: its own, held)
    return QLoraSize(base_quantized, base_float, float_bytes * adapter_numel, adapter_numel, gathered)
