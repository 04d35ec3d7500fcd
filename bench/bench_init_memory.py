"""Memory of starting a run: `init_device: meta` vs `cpu` on 4 gloo ranks with expert parallelism
2 x 2 replicas, for a ~830M-parameter DBRX (3.3 GB in fp32), in one run.

Each rank does what the trainer does before the optimizer exists: builds the model (on `meta`, or
whole on the CPU), and `training.parallelize` lays it out (expert placement, FSDP2) and, on `meta`,
materialises and initialises its shards. Reported: the busiest rank's peak resident memory
(`ru_maxrss`) above the same command's with a tiny model (imports, process group, allocator), as a
fraction of the model's fp32 bytes. Goal: under 0.7x with `meta`; with `cpu` every rank builds the
whole model first, so it is over 1.0x.

The `cpu` row needs about 4 x 3.3 GB at once: it runs first (while the memory seen at the start is still
free), and only when MemAvailable allows it.
Run: `.venv/bin/python bench/bench_init_memory.py [--quick]` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import mem_available_bytes, run_header  # noqa: E402
from dbrx_train.info import load_model_config  # noqa: E402
from dbrx_train.model.dbrx import DbrxLM  # noqa: E402
from dbrx_train.model.init import local_part  # noqa: E402
from dbrx_train.training.config import layout_only  # noqa: E402
from dbrx_train.training.parallelize import build_mesh, parallelize  # noqa: E402
from dbrx_train.training.sizing import model_numel  # noqa: E402
from tests.spawn import run_ranks  # noqa: E402

WORLD, MOE_WORLD_SIZE = 4, 2
BASE = load_model_config(REPO / 'yamls' / 'models' / 'dbrx-small.yaml')
BIG = dataclasses.replace(BASE, d_model=1024, n_layers=8,
                          ffn_config=dataclasses.replace(BASE.ffn_config, ffn_hidden_size=1536,
                                                         moe_world_size=MOE_WORLD_SIZE))
TINY = dataclasses.replace(BIG, d_model=64, n_heads=4, n_layers=1, vocab_size=1024,
                           ffn_config=dataclasses.replace(BIG.ffn_config, ffn_hidden_size=64))


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def on_rank(config, init_device: str) -> dict:
    model = DbrxLM(config, device=init_device, seed=0)
    cfg = layout_only(config, global_train_batch_size=WORLD, init_device=init_device)
    parallelize(model, cfg, build_mesh(cfg, WORLD, 'cpu'))
    return {'peak': peak_rss_bytes(), 'shards': sum(local_part(p).nbytes for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='the init_device: meta row only (smoke run)')
    args = parser.parse_args()
    model_bytes = 4 * model_numel(BIG)
    print(f'{run_header()}; {WORLD} gloo ranks, '
          f'moe_world_size {MOE_WORLD_SIZE}; model {model_numel(BIG):,} parameters = {model_bytes / 2**20:,.0f} MiB '
          'fp32\n')
    print('| init_device | busiest rank peak RSS, MiB | tiny model, MiB | above tiny, MiB | x model fp32 bytes | '
          'rank shards, MiB |')
    print('|---|---:|---:|---:|---:|---:|')
    for init_device in ('meta',) if args.quick else ('cpu', 'meta'):
        if init_device == 'cpu' and mem_available_bytes() < 1.1 * WORLD * model_bytes:
            print(f'| cpu | not run: MemAvailable {mem_available_bytes() / 2**30:.1f} GiB < 1.1 x {WORLD} x the model '
                  '| | | | |')
            continue
        tiny = max(r['peak'] for r in run_ranks(on_rank, WORLD, TINY, init_device))
        ranks = run_ranks(on_rank, WORLD, BIG, init_device)
        busiest = max(r['peak'] for r in ranks)
        above = busiest - tiny
        print(f'| {init_device} | {busiest / 2**20:,.0f} | {tiny / 2**20:,.0f} | {above / 2**20:,.0f} | '
              f'{above / model_bytes:.2f}x | {max(r["shards"] for r in ranks) / 2**20:,.0f} |', flush=True)


if __name__ == '__main__':
    main()
