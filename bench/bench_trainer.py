"""Framework overhead and data-loader speed, measured in one run on the demo model (dbrx-tiny).

- bare step: `DbrxLM.loss` + backward + gradient clipping + AdamW step, on a batch already in memory;
- Composer trainer: the same model, batch and optimizer through `build_trainer` (FSDP2, Streaming
  loader, callbacks), timed by Composer's own speed monitor over the last `--steps` batches;
- data loaders: tokens/s of the Streaming text loader alone, and of the curriculum loader the demo
  config trains with.

MFU is against this process's measured fp32 matmul peak. Run: `.venv/bin/python bench/bench_trainer.py`.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = REPO / 'yamls' / 'pretrain' / 'dbrx-tiny.yaml'


def bare_step_tokens_per_s(cfg, batch, steps: int, warmup: int) -> float:
    from dbrx_train.training.optimizer import DecoupledAdamW

    from dbrx_train.model.dbrx import DbrxLM

    torch.manual_seed(0)
    model = DbrxLM(cfg.model).train()
    kwargs = {k: v for k, v in cfg.optimizer.items() if k != 'name'}
    optimizer = DecoupledAdamW(model.parameters(), **kwargs)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        model.loss(batch['input_ids'], batch['labels']).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return batch['input_ids'].numel() / statistics.median(times)


def trainer_tokens_per_s(overrides: list[str], steps: int, warmup: int) -> float:
    from composer.loggers import InMemoryLogger

    from dbrx_train.train import load_config
    from dbrx_train.training.trainer import build_trainer

    save_folder = tempfile.mkdtemp(prefix='bench-trainer-')  # save_on_signal needs one; nothing is timed there
    cfg = load_config([str(CONFIG), *overrides, f'max_duration={warmup + steps}ba', f'save_folder={save_folder}',
                       'save_interval=1000ba', 'autoresume=false', 'progress_bar=false', 'python_log_level=error',
                       f'callbacks.speed_monitor.window_size={steps}', 'loggers={inmemory: {}}'])
    trainer = build_trainer(cfg)
    memory = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
    trainer.fit()
    trainer.close()
    shutil.rmtree(save_folder, ignore_errors=True)
    return memory.data['throughput/tokens_per_sec'][-1][1]


def loader_tokens_per_s(loader, batches: int) -> float:
    iterator = iter(loader)
    next(iterator)  # open shards
    start, tokens = time.perf_counter(), 0
    for _ in range(batches):
        tokens += next(iterator)['input_ids'].numel()
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type=int, default=8)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--quick', action='store_true', help='fewer steps, for a smoke run')
    args = parser.parse_args()
    steps, warmup = (3, 1) if args.quick else (args.steps, args.warmup)

    from dbrx_train.data import build_mixture_dataloader, build_text_dataloader, make_embedded_corpus
    from dbrx_train.model.flops import train_flops_per_token
    from dbrx_train.train import load_config
    from dbrx_train.training.hardware import matmul_peak_flops

    overrides = ['device_train_microbatch_size=8', 'global_train_batch_size=8']
    cfg = load_config([str(CONFIG), *overrides])
    make_embedded_corpus('data/embedded', seq_len=cfg.seq_len)
    batch = next(iter(build_text_dataloader(cfg.train_loader, cfg.global_train_batch_size, cfg.seq_len)))

    peak = matmul_peak_flops(seconds=2.0)
    flops_per_token = train_flops_per_token(cfg.model, cfg.seq_len)
    bare = bare_step_tokens_per_s(cfg, batch, steps, warmup)
    composer = trainer_tokens_per_s(overrides, steps, warmup)
    plain = loader_tokens_per_s(build_text_dataloader(cfg.train_loader, cfg.global_train_batch_size, cfg.seq_len), 50)
    mixture = loader_tokens_per_s(build_mixture_dataloader(cfg.train_loader, cfg.schedule, cfg.seq_len, 0, 1), 50)

    print(f'\ndbrx-tiny, batch {cfg.global_train_batch_size} x {cfg.seq_len} tokens, fp32, '
          f'{torch.get_num_threads()} threads; measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s\n')
    print('| measurement | tokens/s | MFU | vs bare step |')
    print('|---|---:|---:|---:|')
    trainer_row = 'Composer trainer step (loader, callbacks; one process: no FSDP)'
    for name, rate in (('bare model step', bare), (trainer_row, composer)):
        print(f'| {name} | {rate:,.0f} | {rate * flops_per_token / peak:.1%} | {rate / bare:.2f}x |')
    print(f'| Streaming text loader alone | {plain:,.0f} | | {plain / composer:.0f}x the trainer |')
    print(f'| curriculum (mixture) loader alone, as trained | {mixture:,.0f} | | {mixture / composer:.0f}x the trainer |')
    print(f'\nframework overhead: {1 - composer / bare:.1%} of the bare step time')


if __name__ == '__main__':
    main()
