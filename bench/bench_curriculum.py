"""What a curriculum costs the train loader: per batch against the plain streaming loader, and at a phase switch.

    .venv/bin/python bench/bench_curriculum.py [--quick] [--repeats 500] [--json PATH]

Data: the embedded corpus (data/embedded, built when missing) through yamls/pretrain/dbrx-tiny.yaml
(8 samples of 256 tokens a step, 120 steps; at step 60 phase 2 begins with a 30-step ramp).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
from pathlib import Path

import numpy as np

from common import alternate, timed

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / 'yamls' / 'pretrain' / 'dbrx-tiny.yaml'


def per_call(fn, repeats: int) -> float:
    """Median seconds of `fn()`."""
    return statistics.median(timed(fn) for _ in range(repeats))


def endless(loader):
    """Batches forever: a new iterator (epoch) when one runs out, as Composer does."""
    while True:
        yield from loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--repeats', type=int, default=500)
    parser.add_argument('--quick', action='store_true', help='50 repeats (smoke run)')
    parser.add_argument('--json', help='also write the rows here')
    args = parser.parse_args()
    if args.quick:
        args.repeats = 50

    from dbrx_train.data import build_text_dataloader, make_embedded_corpus
    from dbrx_train.data.mixture import DEFAULT_BLOCK_SIZE, MixturePlan, StreamOrder, build_mixture_dataloader
    from dbrx_train.training.config import TrainConfig
    from dbrx_train.typed_config import load_yaml, parse

    os.chdir(REPO)  # the YAML's data paths are relative to the repository
    cfg = parse(TrainConfig, load_yaml(CONFIG))
    make_embedded_corpus('data/embedded', seq_len=cfg.seq_len)
    schedule = cfg.schedule
    batch = cfg.global_train_batch_size
    mixture_cfg = cfg.train_loader
    fixed_mix = {name: dataclasses.replace(stream, proportion=share) for (name, stream), share in
                 zip(mixture_cfg.dataset.streams.items(), schedule.phases[0].proportions)}
    plain_cfg = dataclasses.replace(mixture_cfg, dataset=dataclasses.replace(mixture_cfg.dataset, streams=fixed_mix))

    rows = []

    def row(what: str, seconds: float, note: str = '') -> None:
        rows.append({'measurement': what, 'ms': seconds * 1e3, 'note': note})

    # 1. Per batch, plain streaming loader (fixed mix) against the curriculum loader: runs of batches in turns,
    # so that Streaming's background threads, which prefetch, are counted in its time.
    loaders = {'plain': endless(build_text_dataloader(plain_cfg, batch, cfg.seq_len)),
               'curriculum': endless(build_mixture_dataloader(mixture_cfg, schedule, cfg.seq_len, rank=0,
                                                              world_size=1))}
    run_length = 100
    medians = alternate({name: lambda it=it: [next(it) for _ in range(run_length)] for name, it in loaders.items()},
                        warmup=1, repeats=max(3, args.repeats // run_length))
    row('batch, plain StreamingDataset loader', medians['plain'] / run_length, f'{batch} x {cfg.seq_len} tokens, '
                                                                               'fixed mix')
    row('batch, curriculum loader', medians['curriculum'] / run_length, 'same streams, the mix of each step')

    # 2. The schedule's own work per step, without reading any sample.
    for global_batch in (batch, 1024):
        plan = MixturePlan(type(schedule)(schedule.streams, schedule.phases, global_batch, schedule.seq_len))
        row(f'plan one step (global batch {global_batch})', per_call(plan.advance, args.repeats),
            'proportions + interleave + ordinals')
    shard_sizes = np.full(1000, 10_000)  # a 10M-sample stream
    order = StreamOrder(shard_sizes, seed=17, tag=1)
    ordinals = iter(range(10**9))
    row('sample id lookup, 10M-sample stream', per_call(lambda: order[next(ordinals)], args.repeats * 10),
        'per sample, within a shuffle block')
    row('first read of a shuffle block', per_call(lambda: StreamOrder(shard_sizes, seed=17, tag=1)[0], 5),
        f'permutes {DEFAULT_BLOCK_SIZE:,} samples; once per block per stream')

    # 3. The phase switch: every batch of a whole run, in order; per step the median over a few runs.
    runs = []
    for _ in range(5):
        iterator = iter(build_mixture_dataloader(mixture_cfg, schedule, cfg.seq_len, rank=0, world_size=1))
        runs.append([timed(lambda: next(iterator)) for _ in range(schedule.total_steps)])
    per_step = np.median(np.array(runs), axis=0)
    switch = schedule.phases[1].start
    ramp_end = switch + schedule.phases[1].ramp
    others = np.delete(per_step, [0, switch, ramp_end])
    spread = f'other steps: median {np.median(others) * 1e3:.3f}, p90 {np.percentile(others, 90) * 1e3:.3f} ms'
    row(f'batch at the phase switch (step {switch})', per_step[switch], spread)
    row(f'batch at the end of the ramp (step {ramp_end})', per_step[ramp_end], '')

    # 4. For comparison: what a switch costs when it rebuilds the loader (llm-foundry's CurriculumLearning).
    row('new loader + first batch', per_call(lambda: next(iter(build_text_dataloader(plain_cfg, batch, cfg.seq_len))),
                                             5), 'new StreamingDataset, new iterator')
    existing = build_text_dataloader(plain_cfg, batch, cfg.seq_len)
    row('new iterator + first batch', per_call(lambda: next(iter(existing)), 5), 'same StreamingDataset, new epoch')

    # 5. For scale: one training step (forward and backward) of the demo model on such a batch.
    import torch

    from dbrx_train.model import DbrxLM

    model = DbrxLM(cfg.model)
    tokens = next(iter(build_mixture_dataloader(mixture_cfg, schedule, cfg.seq_len, rank=0, world_size=1)))
    row('training step of the demo model (fwd + bwd)', per_call(lambda: model.loss(tokens['input_ids']).loss.backward(),
                                                                3), f'{torch.get_num_threads()} threads, for scale')

    width = max(len(r['measurement']) for r in rows)
    print(f'{"measurement":<{width}}  {"ms":>9}  note')
    for r in rows:
        print(f'{r["measurement"]:<{width}}  {r["ms"]:>9.3f}  {r["note"]}')
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + '\n')


if __name__ == '__main__':
    main()
