"""Runs of the real entry point on a tiny DBRX and a tiny embedded corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import CORPUS_SEQ_LEN as SEQ_LEN

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / 'dbrx_train' / 'train.py'
CONFIG = REPO / 'yamls' / 'pretrain' / 'dbrx-tiny.yaml'


def tiny_overrides(corpus: Path, run_dir: Path, **extra) -> list[str]:
    """The demo YAML shrunk to a few seconds of training: a 2-layer, d_model 64 DBRX (16 experts, top-4)."""
    settings = {
        'model.d_model': 64, 'model.n_heads': 4, 'model.n_layers': 2, 'model.max_seq_len': SEQ_LEN,
        'model.ffn_config.ffn_hidden_size': 96, 'max_seq_len': SEQ_LEN,
        'train_loader.dataset.streams.text.local': corpus / 'text',
        'train_loader.dataset.streams.code.local': corpus / 'code',
        'global_train_batch_size': 4, 'device_train_microbatch_size': 2, 'max_duration': '6ba',
        'scheduler.t_warmup': '2ba', 'save_folder': run_dir / 'checkpoints', 'save_interval': '2ba',
        'loggers.metrics_file.path': run_dir / 'metrics.jsonl', 'progress_bar': False,
        'python_log_level': 'warning', **extra,
    }
    return [f'{k}={v}' for k, v in settings.items()]


def launch(args: list[str], processes: int | None = None, log_dir: Path | None = None, **kwargs) -> subprocess.Popen:
    """`python dbrx_train/train.py ...`, or `composer -n N dbrx_train/train.py ...` with `processes`
    (each rank's output then goes to `log_dir/rank{N}.out` and `.err`)."""
    if processes is None:
        command = [sys.executable, str(TRAIN), str(CONFIG), *args]
    else:
        composer = str(Path(sys.executable).with_name('composer'))
        command = [composer, '-n', str(processes), '--stdout', str(log_dir / 'rank{rank}.out'), '--stderr',
                   str(log_dir / 'rank{rank}.err'), str(TRAIN), str(CONFIG), *args]
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'WANDB_MODE': 'offline'}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **kwargs)


def run(args: list[str], processes: int | None = None, log_dir: Path | None = None, timeout: float = 300) -> str:
    proc = launch(args, processes, log_dir)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def losses(metrics_file: Path, key: str = 'loss/train/lm') -> dict[int, float]:
    """Step -> loss as logged by the `metrics_file` logger (a resumed run's lines override)."""
    found = {}
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        if key in record:
            found[record['step']] = record[key]
    return found
