"""What layout-independent initialisation costs (`dbrx_train.model.init`): rank 0's rows of one
expert weight of DBRX-132B (`w1`, 16 x 10752 rows of 6144), drawn in keyed blocks of rows, beside
one `normal_` of as many elements from a single generator (what a layout-dependent init draws),
for world sizes 8 and 64 with moe_world_size 8; and rank 0's whole init time, extrapolated from
the measured rate to its parameter count (`training.sizing`).

Run: `.venv/bin/python bench/bench_init.py [--quick]` (about a minute; one thread, as a rank of a node).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dbrx_train.info import load_model_config, with_moe_world_size  # noqa: E402
from dbrx_train.model.init import draw_normal  # noqa: E402
from dbrx_train.training.sizing import Layout, Traffic, rank_size  # noqa: E402


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='world size 8 only, one repeat (smoke run)')
    args = parser.parse_args()
    repeats, worlds = (1, (8,)) if args.quick else (3, (8, 64))
    torch.set_num_threads(1)
    config = with_moe_world_size(load_model_config(REPO / 'yamls' / 'models' / 'dbrx-132b.yaml'), 8)
    ffn = config.ffn_config
    shape = (ffn.moe_num_experts * ffn.ffn_hidden_size, config.d_model)
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    print(f'{datetime.date.today()}, commit {commit}, {platform.processor() or platform.machine()}, '
          f'capability {torch.backends.cpu.get_cpu_capability()}, 1 thread\n')
    print('| world (EP 8) | rank 0 rows of w1 | keyed blocks, s | one normal_, s | ratio | rank 0 parameters | '
          'rank 0 init, keyed (extrapolated), s |')
    print('|---:|---:|---:|---:|---:|---:|---:|')
    for world in worlds:
        # Rank 0's rows: its experts (1/8), then its FSDP shard over the world/8 replicas.
        rows = shape[0] // 8 // (world // 8)
        region = (slice(0, rows), slice(0, shape[1]))
        keyed = best_of(lambda: draw_normal(0, 'blocks.0.ffn.experts.w1', shape, region, 0.02), repeats)
        plain = best_of(lambda: torch.empty(rows, shape[1]).normal_(0.0, 0.02), repeats)
        numel = rank_size(config, Layout(world), 1, 1, Traffic.of('amp_bf16')).numel
        rate = rows * shape[1] / keyed
        print(f'| {world} | {rows:,} | {keyed:.3f} | {plain:.3f} | {keyed / plain:.2f}x | {numel:,} | '
              f'{numel / rate:.1f} |')


if __name__ == '__main__':
    main()
