"""One AdamW step on the parameters of the bench model (`yamls/models/dbrx-bench.yaml`: 193M, the
embedding and LM head 103M of them), side by side in one run: Composer's `DecoupledAdamW` (what
llm-foundry's `decoupled_adamw` builds), torch's AdamW in its three implementations, and this
project's `decoupled_adamw` (`training/optimizer.py`: Composer's update on torch's fused kernel).
Best and median of 5 steps after 2 warm-up steps (which create the state), on this process's threads.

Run: `.venv/bin/python bench/bench_optimizer.py` (about a minute).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import bench_config, run_header  # noqa: E402
from dbrx_train.model.dbrx import DbrxLM  # noqa: E402
from dbrx_train.training.optimizer import DecoupledAdamW  # noqa: E402

KWARGS = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8)


def optimizers() -> dict:
    from composer.optim import DecoupledAdamW as ComposerDecoupledAdamW

    return {
        "Composer DecoupledAdamW (llm-foundry's decoupled_adamw)": lambda p: ComposerDecoupledAdamW(p, weight_decay=1e-5,
                                                                                                     **KWARGS),
        'torch AdamW, for-loop (its CPU default)': lambda p: torch.optim.AdamW(p, weight_decay=0.1, foreach=False, **KWARGS),
        'torch AdamW, foreach': lambda p: torch.optim.AdamW(p, weight_decay=0.1, foreach=True, **KWARGS),
        'torch AdamW, fused': lambda p: torch.optim.AdamW(p, weight_decay=0.1, fused=True, **KWARGS),
        "ours: decoupled_adamw (Composer's update, fused)": lambda p: DecoupledAdamW(p, weight_decay=1e-5, **KWARGS),
    }


def main() -> None:
    config, name = bench_config()
    model = DbrxLM(config, device='meta')
    shapes = [p.shape for p in model.parameters()]
    print(f'{run_header()}; {name}: {sum(s.numel() for s in shapes) / 1e6:.0f}M parameters in {len(shapes)} tensors, '
          f'fp32, {torch.get_num_threads()} threads\n')
    print('| optimizer | step, ms (best) | median | vs Composer |')
    print('|---|--:|--:|--:|')
    baseline = None
    for label, build in optimizers().items():
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 1e-3
        opt = build(params)
        times = []
        for i in range(7):
            start = time.perf_counter()
            opt.step()
            if i >= 2:
                times.append(time.perf_counter() - start)
        best, median = min(times) * 1e3, statistics.median(times) * 1e3
        baseline = baseline or median
        print(f'| {label} | {best:,.0f} | {median:,.0f} | {baseline / median:.2f}x |', flush=True)


if __name__ == '__main__':
    main()
