"""Runs of the real entry point on a tiny DBRX and a tiny embedded corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
        'python_log_level': 'warning', 'callbacks.batch_fingerprint': '{}', **extra,
    }
    return [f'{k}={v}' for k, v in settings.items()]


def launch(args: list[str], processes: int | None = None, log_dir: Path | None = None, env: dict | None = None,
           **popen) -> subprocess.Popen:
    """`python dbrx_train/train.py ...`, or `composer -n N dbrx_train/train.py ...` with `processes`
    (each rank's output then goes to `log_dir/rank{N}.out` and `.err`); `env` adds variables."""
    if processes is None:
        command = [sys.executable, str(TRAIN), str(CONFIG), *args]
    else:
        composer = str(Path(sys.executable).with_name('composer'))
        command = [composer, '-n', str(processes), '--stdout', str(log_dir / 'rank{rank}.out'), '--stderr',
                   str(log_dir / 'rank{rank}.err'), str(TRAIN), str(CONFIG), *args]
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'WANDB_MODE': 'offline', **(env or {})}
    return subprocess.Popen(command, cwd=REPO, env=env, text=True,
                            **{'stdout': subprocess.PIPE, 'stderr': subprocess.STDOUT, **popen})


def run(args: list[str], processes: int | None = None, log_dir: Path | None = None, timeout: float = 600) -> str:
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


def curriculum_log(metrics_file: Path) -> dict[int, tuple]:
    """Step -> (phase, text proportion, code proportion, text share of the batch)."""
    keys = ('curriculum/phase', 'curriculum/proportion/text', 'curriculum/proportion/code',
            'curriculum/batch_share/text')
    columns = [losses(metrics_file, key) for key in keys]
    return {step: tuple(column[step] for column in columns) for step in columns[0]}


@pytest.fixture(scope='session')
def reference(tiny_corpus, tmp_path_factory) -> Path:
    """An uninterrupted one-process run: the losses (and curriculum) every other run must reproduce.
    Its output is in `output.txt`; it checkpoints every 3 steps, on the curriculum's phase boundary."""
    run_dir = tmp_path_factory.mktemp('reference')
    output = run(tiny_overrides(tiny_corpus, run_dir, save_interval='3ba', python_log_level='info'))
    (run_dir / 'output.txt').write_text(output)
    return run_dir


@pytest.fixture(scope='session')
def reference_two_ranks(tiny_corpus, tmp_path_factory) -> Path:
    """An uninterrupted run of two FSDP2 processes (sharded checkpoints), also logging to Weights &
    Biases offline: the losses every other two-rank run must reproduce."""
    run_dir = tmp_path_factory.mktemp('reference_two_ranks')
    wandb = f'{{project: dbrx-test, init_kwargs: {{dir: {run_dir}}}}}'
    # Every checkpoint kept: a run resumes from the one of step 4 with another layout (test_train.py).
    run(tiny_overrides(tiny_corpus, run_dir, save_num_checkpoints_to_keep=-1, **{'loggers.wandb': wandb}), processes=2,
        log_dir=run_dir)
    return run_dir
