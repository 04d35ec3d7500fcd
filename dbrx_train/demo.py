"""`make demo`: the main job end to end on the embedded corpus, on this machine.

1. builds the embedded corpus (Python's standard library: docstrings as "text", source as "code");
2. trains `yamls/pretrain/dbrx-tiny.yaml` with the Composer launcher (progress bar, checkpoints);
3. loads the last checkpoint and prints sample generations.

Re-running resumes from the last checkpoint (`autoresume`); `make clean` starts over.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from dbrx_train.checkpoints import load_pretrained
from dbrx_train.data import make_embedded_corpus
from dbrx_train.errors import UserError, cli_entry
from dbrx_train.tokenizer import get_encoding
from dbrx_train.training.config import TrainConfig
from dbrx_train.typed_config import load_yaml, parse

CONFIG = Path('yamls/pretrain/dbrx-tiny.yaml')
PROMPTS = ('def read_file(path):\n    """', 'Return the number of')


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('overrides', nargs='*', help='dotted.key=value overrides of the training YAML')
    parser.add_argument('--processes', type=int, default=1, help='training processes (composer -n)')
    args = parser.parse_args(argv)

    cfg = parse(TrainConfig, load_yaml(CONFIG, args.overrides))
    print(f'== 1/3 embedded corpus ({cfg.seq_len}-token samples)', flush=True)
    make_embedded_corpus('data/embedded', seq_len=cfg.seq_len)

    print(f'== 2/3 training {CONFIG} ({cfg.max_duration}) -> {cfg.save_folder}', flush=True)
    composer = Path(sys.executable).with_name('composer')
    command = [str(composer), '-n', str(args.processes), 'dbrx_train/train.py', str(CONFIG), *args.overrides]
    print('$ ' + ' '.join(command), flush=True)
    if subprocess.run(command, env={**os.environ, 'PYTHONUNBUFFERED': '1'}).returncode != 0:
        raise UserError('training failed (see the log above)')

    metrics_file = cfg.loggers.get('metrics_file', {}).get('path')
    if metrics_file and Path(metrics_file).is_file():
        print(training_summary(Path(metrics_file)), flush=True)
    print('== 3/3 sample generations from the trained model', flush=True)
    show_samples(cfg.save_folder)


def training_summary(metrics_file: Path, window: int = 10) -> str:
    """LM loss over the first and last `window` steps of each curriculum phase, and the speed."""
    steps: dict[int, dict] = {}
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        steps.setdefault(record.pop('step'), {}).update(record)
    phases: dict[int, list[float]] = {}
    for step in sorted(steps):
        if 'loss/train/lm' in steps[step]:
            phases.setdefault(int(steps[step].get('curriculum/phase', 0)), []).append(steps[step]['loss/train/lm'])
    lines = [f'training summary ({metrics_file}): LM loss, mean of the first / last {window} steps']
    for phase, losses in phases.items():
        lines.append(f'  phase {phase}: {statistics.fmean(losses[:window]):.3f} -> {statistics.fmean(losses[-window:]):.3f}'
                     f' over {len(losses)} steps')
    speeds = [m['throughput/tokens_per_sec'] for m in steps.values() if 'throughput/tokens_per_sec' in m]
    mfus = [m['throughput/device/mfu'] for m in steps.values() if 'throughput/device/mfu' in m]
    if speeds:
        lines.append(f'  speed: {statistics.median(speeds):,.0f} tokens/s, MFU {statistics.median(mfus):.1%} '
                     f'of the measured fp32 matmul peak (medians)')
    return '\n'.join(lines)


def show_samples(save_folder: str) -> None:
    model = load_pretrained(save_folder)
    encoding = get_encoding()
    generator = torch.Generator().manual_seed(0)
    for prompt in PROMPTS:
        ids = torch.tensor([encoding.encode(prompt)])
        out = model.generate(ids, max_new_tokens=40, temperature=0.7, top_k=40, generator=generator)
        print('-' * 60)
        print(encoding.decode(out[0].tolist()))
    print('-' * 60)


if __name__ == '__main__':
    main()
