"""Size and cost of a model config, without allocating its weights.

    python -m dbrx_train.info yamls/models/dbrx-132b.yaml
    python -m dbrx_train.info yamls/pretrain/dbrx-tiny.yaml model.n_layers=4 --seq-len 1024
    python -m dbrx_train.info yamls/models/dbrx-132b.yaml --world-size 8 --moe-world-size 8
    python -m dbrx_train.info yamls/models/dbrx-132b.yaml --world-size 64 --moe-world-size 8 --dry-run
    python -m dbrx_train.info yamls/models/dbrx-132b.yaml --world-size 8 --quantization int4 --lora-rank 16
    python -m dbrx_train.info yamls/models/dbrx-132b.yaml --world-size 8 --quantization int4 --lora-rank 16 --lora-dtype bf16

With `--world-size`, it also sizes one rank of that training layout (see `training/sizing.py`):
its parameter, gradient and AdamW bytes, expert and non-expert apart, and its all-to-all and FSDP
all-gather bytes per step. The expert-parallel degree defaults to the YAML's
`ffn_config.moe_world_size`.

With `--quantization int4` (or int8) and `--lora-rank R` it sizes one rank of a QLoRA layout instead:
the frozen quantized base, the adapters (rank R on every target), their gradients and AdamW's moments
(`training.sizing.qlora_rank_size`); the group size is the YAML's `quantization_group_size` (128);
`--lora-dtype bf16` sizes the adapters, their state and the float rest of the base in bf16.

With `--dry-run` it also builds the real model on `meta` and runs the real `training.parallelize`
under a fake process group of that world size, as rank 0 (nothing is allocated, no process
started), and prints rank 0's parameter, gradient and AdamW bytes measured from its sharded
tensors beside `training/sizing.py`'s closed form.

The YAML is either a model preset (the keys of `ModelConfig` at the top level, as in
`yamls/models/`) or a training YAML whose `model:` section is one; `key=value` overrides use
the same paths as the file (`n_layers=4` in a preset, `model.n_layers=4` in a training YAML).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from dbrx_train.errors import ConfigError, cli_entry
from dbrx_train.model.config import ModelConfig
from dbrx_train.model.dbrx import DbrxLM
from dbrx_train.model.flops import attention_flops_per_token, count_parameters, train_flops_per_token
from dbrx_train.model.init import local_part
from dbrx_train.model.lora import LORA_DTYPES
from dbrx_train.model.moe import Experts
from dbrx_train.model.quantize import DEQUANTIZED_BLOCK_BYTES
from dbrx_train.training.config import FSDPConfig, layout_only
from dbrx_train.training.parallelize import build_mesh, parallelize
from dbrx_train.training.sizing import (STATE_BYTES, Layout, Traffic, qlora_rank_size, quantized_row_bytes,
                                       rank_size)
from dbrx_train.typed_config import load_yaml, parse

GIB = 2**30
PRECISIONS = ('fp32', 'amp_bf16', 'amp_fp16')


def load_model_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ModelConfig:
    """The `ModelConfig` of a model preset or of a training YAML's `model:` section."""
    data = load_yaml(path, overrides)
    if isinstance(data.get('model'), Mapping):
        return parse(ModelConfig, data['model'], 'model')
    return parse(ModelConfig, data)


def describe(config: ModelConfig, seq_len: int | None = None) -> str:
    """Total and active parameters and training FLOPs per token, counted on a `meta`-device model."""
    counts = count_parameters(DbrxLM(config, device='meta'))
    ffn = config.ffn_config
    seq_len = config.max_seq_len if seq_len is None else seq_len
    attention = attention_flops_per_token(config, seq_len)
    return '\n'.join([
        f'parameters:        {counts.total:,} total ({_short(counts.total)})',
        f'active per token:  {counts.active:,} ({_short(counts.active)}; {ffn.moe_top_k} of '
        f'{ffn.moe_num_experts} experts)',
        f'experts:           {counts.experts:,} ({_short(counts.experts)})',
        f'embedding table:   {counts.embedding:,} ({_short(counts.embedding)})',
        f'train FLOPs/token: {train_flops_per_token(config, seq_len):.4g} (seq_len {seq_len})',
        f'  of which attention: {attention:.4g} ({attention / train_flops_per_token(config, seq_len):.1%}); '
        f'{attention * seq_len:.4g} per {seq_len}-token sequence',
    ])


def with_moe_world_size(config: ModelConfig, moe_world_size: int) -> ModelConfig:
    ffn = dataclasses.replace(config.ffn_config, moe_world_size=moe_world_size)
    try:
        ffn.check()
    except ConfigError as e:
        raise ConfigError(f'ffn_config.{e.key}', e.problem) from None
    return dataclasses.replace(config, ffn_config=ffn)


def describe_layout(config: ModelConfig, layout: Layout, seq_len: int, micro_batch: int = 1,
                    micro_batches: int = 1, precision: str = 'amp_bf16', mixed_precision: str = 'DEFAULT') -> str:
    """Rank 0's memory and traffic per step for `layout`, `micro_batch` sequences of `seq_len`
    tokens per micro-batch and `micro_batches` of them per step."""
    for key, value in (('micro_batch', micro_batch), ('micro_batches', micro_batches), ('seq_len', seq_len)):
        if value < 1:
            raise ConfigError(key, f'must be at least 1, got {value}')
    traffic = Traffic.of(precision, mixed_precision)
    tokens = micro_batch * seq_len
    size = rank_size(config, layout, tokens, micro_batches, traffic)
    ffn, m, world = config.ffn_config, config.ffn_config.moe_world_size, layout.world_size
    sharding = (f'HYBRID_SHARD over groups of {layout.shard_group_size}' if layout.shard_group_size
                else 'FULL_SHARD')
    experts = (f'each rank owns {ffn.moe_num_experts // m} of {ffn.moe_num_experts} experts per layer, '
               f'FSDP-sharded over its {world // m} replica(s)' if m > 1 else 'experts sharded like the rest')
    passes = 3 if layout.activation_checkpointing else 2

    def row(name: str, numel: int) -> str:
        cells = [numel * b for b in (*STATE_BYTES.values(), sum(STATE_BYTES.values()))]
        return f'  {name:<11}{numel:>16,}' + ''.join(f'{b / GIB:>10.2f}' for b in cells)

    return '\n'.join([
        f'layout:            {world} ranks = moe_world_size {m} x {world // m} replica(s); {sharding}; {experts}',
        f'precision:         {precision}, mixed_precision {mixed_precision}: fp32 master weights, gradients and '
        f'AdamW moments; all-gathers of {traffic.gather}-byte elements',
        'per rank (rank 0; GiB = 2^30 bytes):',
        f'  {"":<11}{"parameters":>16}' + ''.join(f'{name:>10}' for name in (*STATE_BYTES, 'total')),
        row('experts', size.expert_numel),
        row('non-expert', size.non_expert_numel),
        row('total', size.numel),
        f'gathered block:    {size.gathered_block_bytes / GIB:.2f} GiB (one block\'s parameters while FSDP '
        f'holds them gathered)',
        f'per step:          {micro_batches} micro-batch(es) of {micro_batch} x {seq_len} tokens per rank'
        f'{", activation checkpointing" if layout.activation_checkpointing else ""}',
        f'  all-to-all:      {size.all_to_all_bytes / GIB:.2f} GiB sent = {micro_batches} micro-batch(es) x '
        f'{config.n_layers} layers x {passes} passes x {tokens} tokens x top_k {ffn.moe_top_k} x d_model '
        f'{config.d_model} x ({m} - 1)/{m} x ({traffic.dispatch} dispatch + {traffic.combine} combine bytes)',
        f'  FSDP all-gather: {size.all_gather_bytes / GIB:.2f} GiB received',
    ])


def describe_qlora_layout(config: ModelConfig, layout: Layout, lora_rank: int, lora_dtype: str = 'fp32') -> str:
    """Rank 0's bytes in a QLoRA layout of `config` (quantized) with adapters of rank `lora_rank`, its float
    tensors in `lora_dtype`."""
    float_bytes = LORA_DTYPES[lora_dtype].itemsize
    size = qlora_rank_size(config, layout, lora_rank, float_bytes)
    bits = config.quantization if config.quantization == 'int8' else (
        f'int4 in groups of {config.quantization_group_size} '
        f'({4 + 32 / config.quantization_group_size:g} bits per weight)')
    sharding = (f'HYBRID_SHARD over groups of {layout.shard_group_size}' if layout.shard_group_size
                else 'FULL_SHARD')
    m = config.ffn_config.moe_world_size
    if m > 1:
        sharding += f', expert parallelism over {m} ranks (each stores its experts whole)'
    block = f'one dequantized block of at most {DEQUANTIZED_BLOCK_BYTES / 2**20:g} MiB'
    gathered = (f'{size.gathered_bytes / GIB:.2f} GiB (one layer\'s quantized experts while they run); {block}'
                if m == 1 else f'none (expert parallelism: a rank runs its own experts); {block}')
    head_gathered = config.vocab_size * quantized_row_bytes(config.d_model, config.quantization,
                                                           config.quantization_group_size)
    rows = [('base, quantized', size.base_quantized), ('base, float', size.base_float),
            ('adapters', size.adapters), ('adapter grads', size.adapter_grads), ('AdamW', size.adamw),
            ('total', size.total)]
    return '\n'.join([
        f'QLoRA:             {layout.world_size} ranks, {sharding}; frozen base {bits}, 16-bit scales and zeros; '
        f'the rest of the base (embedding, norms, router) {lora_dtype}',
        f'adapters:          rank {lora_rank} on Wqkv, out_proj and every expert\'s w1, v1, w2 of every layer: '
        f'{size.adapter_numel:,} parameters on rank 0, {lora_dtype} with {lora_dtype} gradients and AdamW moments',
        'per rank (rank 0; GiB = 2^30 bytes):',
        *(f'  {name:<16}{value / GIB:>10.2f}' for name, value in rows),
        f'gathered module:   {gathered}',
        f'loss:              the LM head read block by block, its quantized rows gathered: '
        f'{head_gathered / GIB:.2f} GiB, besides one chunk of logits',
    ])


def dry_run(config: ModelConfig, layout: Layout, precision: str = 'amp_bf16', mixed_precision: str = 'DEFAULT') -> str:
    """Rank 0 of `layout` as `parallelize` really builds it (on meta, under a fake process group of
    `layout.world_size` ranks), measured, beside `training.sizing`'s closed form."""
    cfg = layout_only(config, global_train_batch_size=layout.world_size, precision=precision, init_device='meta',
                      fsdp_config=FSDPConfig('HYBRID_SHARD' if layout.shard_group_size else 'FULL_SHARD',
                                             layout.shard_group_size, mixed_precision,
                                             layout.activation_checkpointing, layout.reshard_after_forward))
    cfg.check()
    torch_dist.init_process_group('fake', rank=0, world_size=layout.world_size, store=FakeStore())
    try:
        model = DbrxLM(config, device='meta')
        parallelize(model, cfg, build_mesh(cfg, layout.world_size, 'cpu'), device='meta')
        measured = {'experts': 0, 'non-expert': 0}
        for module_name, module in model.named_modules():
            for param in module.parameters(recurse=False):
                measured['experts' if isinstance(module, Experts) else 'non-expert'] += local_part(param).numel()
        # AdamW's state as torch creates it at the first step: two zeros_like of each parameter.
        adamw = sum(local_part(torch.zeros_like(p)).nbytes for p in model.parameters() for _ in range(2))
    finally:
        torch_dist.destroy_process_group()
    size = rank_size(config, layout, 1, 1, Traffic.of(precision, mixed_precision))
    closed = {'experts': size.expert_numel, 'non-expert': size.non_expert_numel}
    lines = [f'dry run: the real parallelize on meta under a fake process group of {layout.world_size} ranks; '
             'rank 0 (GiB = 2^30 bytes):',
             f'  {"":<11}{"measured":>16}{"sizing.py":>16}{"difference":>12}']
    for name in ('experts', 'non-expert'):
        lines.append(f'  {name:<11}{measured[name]:>16,}{closed[name]:>16,}{measured[name] - closed[name]:>12,}  '
                     'parameters')
    total, closed_total = sum(measured.values()), size.numel
    for name, measured_bytes, closed_bytes in (('params', 4 * total, 4 * closed_total),
                                               ('grads', 4 * total, 4 * closed_total),
                                               ('AdamW', adamw, 8 * closed_total)):
        lines.append(f'  {name:<11}{measured_bytes / GIB:>16.2f}{closed_bytes / GIB:>16.2f}'
                     f'{(measured_bytes - closed_bytes) / GIB:>12.2f}  GiB')
    return '\n'.join(lines)


def _short(n: int) -> str:
    for size, suffix in ((10**12, 'T'), (10**9, 'B'), (10**6, 'M'), (10**3, 'K')):
        if n >= size:
            return f'{n / size:.2f}{suffix}'
    return str(n)


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog='python -m dbrx_train.info', description=__doc__.split('\n\n')[0])
    parser.add_argument('yaml', help='a model preset or a training YAML with a model: section')
    parser.add_argument('overrides', nargs='*', help='dotted.key=value')
    parser.add_argument('--seq-len', type=int, default=None, help='sequence length for the attention FLOPs '
                        'and the micro-batch (default: the model max_seq_len)')
    layout = parser.add_argument_group('sizing one rank of a training layout')
    layout.add_argument('--world-size', type=int, help='ranks (GPUs) in all')
    layout.add_argument('--moe-world-size', type=int, help='expert-parallel degree (default: the YAML\'s '
                        'ffn_config.moe_world_size)')
    layout.add_argument('--shard-group-size', type=int, help='HYBRID_SHARD: shard within groups of this many '
                        'ranks, replicate across them (default: FULL_SHARD over all ranks)')
    layout.add_argument('--micro-batch', type=int, default=1, help='sequences per micro-batch per rank')
    layout.add_argument('--micro-batches', type=int, default=1, help='micro-batches per step per rank')
    layout.add_argument('--precision', choices=PRECISIONS, default='amp_bf16')
    layout.add_argument('--mixed-precision', choices=('DEFAULT', 'PURE', 'FULL'), default='DEFAULT')
    layout.add_argument('--activation-checkpointing', action='store_true')
    layout.add_argument('--quantization', choices=('int4', 'int8'), help='QLoRA: size a frozen quantized base with '
                        'LoRA adapters (needs --lora-rank)')
    layout.add_argument('--lora-rank', type=int, help='QLoRA: the adapters\' rank')
    layout.add_argument('--lora-dtype', choices=tuple(LORA_DTYPES), default='fp32',
                        help='QLoRA: the adapters\' (and the float base\'s) dtype, as lora.dtype')
    layout.add_argument('--dry-run', action='store_true', help='also build the model on meta, parallelize it '
                        'under a fake process group of --world-size ranks and measure rank 0')
    args = parser.parse_args(argv)
    config = load_model_config(args.yaml, args.overrides)
    print(describe(config, args.seq_len))
    if args.world_size is not None:
        if args.moe_world_size is not None:
            config = with_moe_world_size(config, args.moe_world_size)
        layout = Layout(args.world_size, args.shard_group_size, activation_checkpointing=args.activation_checkpointing)
        if (args.quantization is None) != (args.lora_rank is None):
            raise ConfigError('--quantization' if args.quantization is None else '--lora-rank',
                              'QLoRA sizing needs both --quantization and --lora-rank')
        if args.quantization is not None:
            if args.dry_run:
                raise ConfigError('--dry-run', 'measures float layouts; QLoRA sizing is the closed form alone')
            config = dataclasses.replace(config, quantization=args.quantization)
            config.check()
            print(describe_qlora_layout(config, layout, args.lora_rank, args.lora_dtype))
            return
        print(describe_layout(config, layout, args.seq_len or config.max_seq_len, args.micro_batch,
                              args.micro_batches, args.precision, args.mixed_precision))
        if args.dry_run:
            print(dry_run(config, layout, args.precision, args.mixed_precision))
    elif args.dry_run:
        raise ConfigError('--dry-run', 'needs --world-size')


if __name__ == '__main__':
    main()
