"""Expert parallelism (`moe_world_size: 2`) vs FSDP alone, on 2 gloo ranks of this machine, on the
bench model config (`yamls/models/dbrx-bench.yaml`), in one run.

Each rank builds the same model twice and places it as the trainer does: once with its experts split
over the 2 ranks (`training.parallelize`: expert placement, then FSDP2 on the rest), once with
FSDP2 alone (every parameter sharded over both ranks). A step is the training loss (with the load
balancing loss, through `forward` as the trainer calls it) + backward + AdamW (`DecoupledAdamW`, as
`decoupled_adamw` builds it) on a batch already in memory, different on each rank; the two layouts
run in turns.

- step time: median over the timed steps after warm-up, the slower rank's;
- split: one step per rank under `torch.profiler`: the time gloo reports for each collective
  (all-to-all, FSDP's all-gathers and gradient reductions; `gloo:*` events) and the rest of the
  step's wall time (compute, and FSDP's copies in and out of its buffers); a prefetched gather that
  overlaps compute is counted in both, so "rest" is a lower bound;
- memory per rank: parameter and AdamW state bytes of the local shards, and how far the resident
  memory rises above its level before a step, during one step (gathered weights, activations,
  gradients);
- all-to-all bytes per step: counted by the MoE layers (`take_traffic`) vs
  `dbrx_train.training.sizing.all_to_all_bytes`, evaluated at the rows that actually crossed and,
  as `info` does, under uniform routing.

On CPU the ranks share the machine's cores and gloo's all-to-all goes through shared memory: the
point is correctness and the memory split, not speed.
Run: `.venv/bin/python bench/bench_expert_parallel.py` (`--quick`: 1 layer, vocabulary 1024).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import sys
from fractions import Fraction
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORLD = 2
LAYOUTS = {'EP 2 + FSDP2': 2, 'FSDP2 only': 1}  # name: moe_world_size
# gloo's own profiler events: each collective from start to completion, on gloo's thread (FSDP2's
# gradient reduce-scatter runs as an all-reduce on gloo). The c10d::* ops that launch them return
# before they finish, so their self CPU time would miss the wait.
COLLECTIVES = {'gloo:all_to_all': 'all-to-all', 'gloo:all_gather': 'FSDP all-gathers',
               'gloo:reduce_scatter': 'FSDP gradient reduce', 'gloo:all_reduce': 'FSDP gradient reduce'}


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def shard_layout(model, moe_world_size: int, optimizer_factory):
    """`model` laid out as the trainer lays it out (`training.parallelize`), then its optimizer."""
    from dbrx_train.training.config import layout_only
    from dbrx_train.training.parallelize import build_mesh, parallelize

    config = dataclasses.replace(model.config, ffn_config=dataclasses.replace(model.config.ffn_config,
                                                                              moe_world_size=moe_world_size))
    cfg = layout_only(config, global_train_batch_size=WORLD)
    parallelize(model, cfg, build_mesh(cfg, WORLD, 'cpu'))
    return optimizer_factory(model.parameters())


def local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)


def take_traffic(model) -> torch.Tensor:
    """[rows sent to the other rank, bytes sent] by every MoE layer since the last call."""
    from dbrx_train.model.moe.expert_parallel import ExpertParallelExperts

    experts = [block.ffn.experts for block in model.blocks if isinstance(block.ffn.experts, ExpertParallelExperts)]
    return sum((e.take_traffic() for e in experts), torch.zeros(2, dtype=torch.int64))


def profiled_split(step) -> dict[str, float]:
    """Seconds of one step: its wall time, and each group of collectives' time in gloo."""
    from torch.profiler import ProfilerActivity, profile

    from bench.common import timed

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = timed(step)
    split = {'wall': wall, 'names': set()}
    for event in prof.key_averages():
        group = COLLECTIVES.get(event.key)
        if group:
            split[group] = split.get(group, 0.0) + event.cpu_time_total / 1e6
            split['names'].add(event.key)
    return split


def on_rank(config, micro_batch: int, seq: int, warmup: int, repeats: int) -> dict:
    from dbrx_train.training.optimizer import DecoupledAdamW
    import torch.distributed as dist

    from bench.common import alternate, peak_resident_mib, reset_peak_resident, resident_mib
    from dbrx_train.model import DbrxLM

    rank = dist.get_rank()
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own micro-batch, as data parallelism
    ids = torch.randint(0, config.vocab_size, (micro_batch, seq), generator=g)

    models, optimizers, out = {}, {}, {}
    for name, moe_world_size in LAYOUTS.items():
        torch.manual_seed(0)  # the same weights on every rank and in both layouts
        model = DbrxLM(dataclasses.replace(config, ffn_config=dataclasses.replace(
            config.ffn_config, moe_world_size=moe_world_size))).train()
        optimizers[name] = shard_layout(model, moe_world_size,
                                        lambda p: DecoupledAdamW(p, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0))
        models[name] = model

    def step(name: str):
        def run():
            models[name](ids, labels=ids).loss.backward()  # forward: FSDP's hooks gather
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
        return run

    steps = {name: step(name) for name in LAYOUTS}
    times = alternate(steps, warmup, repeats)
    out['peak_mib'] = peak_resident_mib()  # building both layouts and the timed steps
    for name in LAYOUTS:
        model = models[name]
        take_traffic(model)  # drop the earlier steps' count
        before = resident_mib()
        reset_peak_resident()
        split = profiled_split(steps[name])
        rows, sent = take_traffic(model).tolist()
        out[name] = {
            'step_s': times[name], 'split': split, 'peak_rise_mib': peak_resident_mib() - before,
            'param_bytes': local_bytes(model.parameters()),
            'expert_param_bytes': local_bytes(p for n, p in model.named_parameters() if '.experts.' in n),
            'optimizer_bytes': local_bytes(t for s in optimizers[name].state.values() for t in s.values()
                                           if isinstance(t, torch.Tensor) and t.dim() > 0),
            'a2a_rows': rows, 'a2a_bytes': sent,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--micro-batch', type=int, default=2, help='sequences per rank per step')
    parser.add_argument('--seq', type=int, default=128)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=4)
    parser.add_argument('--quick', action='store_true', help='a 1-layer, small-vocabulary model, for a smoke run')
    args = parser.parse_args()

    from bench.common import bench_config
    from dbrx_train.training.sizing import all_to_all_bytes
    from tests.spawn import run_ranks

    config, source = bench_config()
    if args.quick:
        config, source = dataclasses.replace(config, n_layers=1, vocab_size=1024), f'{source} (1 layer, vocab 1024)'
    log(f'{WORLD} ranks, {source}, micro-batch {args.micro_batch} x {args.seq} per rank')
    ranks = run_ranks(on_rank, WORLD, config, args.micro_batch, args.seq, args.warmup, args.repeats)

    ffn = config.ffn_config
    ep = dataclasses.replace(config, ffn_config=dataclasses.replace(ffn, moe_world_size=2))
    tokens = args.micro_batch * args.seq
    print(f'\n{source}: d_model {config.d_model}, {config.n_layers} layers, {ffn.moe_num_experts} experts top-'
          f'{ffn.moe_top_k}, vocab {config.vocab_size}; {WORLD} gloo ranks x 1 thread, micro-batch '
          f'{args.micro_batch} x {args.seq} tokens per rank, fp32; {platform.node()} ({os.cpu_count()} '
          f'cores, shared), {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n')
    print('| per rank (rank 0; step time: slower rank) | ' + ' | '.join(LAYOUTS) + ' | EP / FSDP |')
    print('|---|---:|---:|---:|')
    mib = 2 ** 20

    def row(label: str, values: list[float], fmt: str) -> None:
        ratio = f'{values[0] / values[1]:.2f}x' if values[1] else ''
        print(f'| {label} | ' + ' | '.join(format(v, fmt) for v in values) + f' | {ratio} |')

    def per_layout(key, rank=0):
        return [ranks[rank][name][key] for name in LAYOUTS]

    row('step time (fwd + bwd + AdamW), s', [max(r[name]['step_s'] for r in ranks) for name in LAYOUTS], '.3f')
    splits = per_layout('split')
    row('profiled step wall time, s', [s['wall'] for s in splits], '.3f')
    for group in dict.fromkeys(COLLECTIVES.values()):
        row(f'  {group} (gloo), s', [s.get(group, 0.0) for s in splits], '.3f')
    row('  rest (compute), s', [s['wall'] - sum(v for k, v in s.items() if k in set(COLLECTIVES.values()))
                                for s in splits], '.3f')
    row('parameters (local shards), MiB', [b / mib for b in per_layout('param_bytes')], ',.1f')
    row('  of which experts, MiB', [b / mib for b in per_layout('expert_param_bytes')], ',.1f')
    row('AdamW state (local), MiB', [b / mib for b in per_layout('optimizer_bytes')], ',.1f')
    row('resident memory rise during a step, MiB', per_layout('peak_rise_mib'), ',.0f')

    name = next(iter(LAYOUTS))
    print(f'\nall-to-all per step ({name}), bytes sent:\n')
    print('| rank | rows sent to the other rank | measured (`take_traffic`) | formula at the rows that crossed '
          '| formula, uniform routing (`info`) |')
    print('|---:|---:|---:|---:|---:|')
    rows = [r[name]['a2a_rows'] for r in ranks]
    uniform = all_to_all_bytes(ep, tokens)
    for rank, r in enumerate(ranks):
        # Per layer the formula's `tokens x top_k x (M - 1) / M` is the rows crossing each way;
        # here: (rows this rank sent + rows it got back to process) / 2, summed over layers.
        crossing = Fraction(rows[rank] + rows[1 - rank], 2)
        at_rows = all_to_all_bytes(ep, crossing / (config.n_layers * ffn.moe_top_k) * 2)  # x M / (M - 1)
        measured = r[name]['a2a_bytes']
        mark = '' if at_rows == measured else ' (differs)'
        print(f'| {rank} | {rows[rank]:,} | {measured:,} | {int(at_rows):,}{mark} | {uniform:,.0f} |')
    names = sorted(set().union(*(s['names'] for r in ranks for s in (r[n]['split'] for n in LAYOUTS))))
    print(f'\nprofiler events counted as collectives: {", ".join(f"`{n}`" for n in names)}')
    peaks = ', '.join(f"{r['peak_mib']:,.0f} MiB" for r in ranks)
    print(f'peak resident memory of the rank processes (both layouts built, timed steps): {peaks}')


if __name__ == '__main__':
    main()
