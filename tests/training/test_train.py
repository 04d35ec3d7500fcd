"""The training entry point end to end: one process, two FSDP2 processes, kill and autoresume, bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

import dbrx_train

from tests.training.conftest import CONFIG, REPO, TRAIN, launch, losses, run, tiny_overrides

STEPS = 6


@pytest.fixture(scope='module')
def reference(tiny_corpus, tmp_path_factory):
    """An uninterrupted one-process run: the losses every other run must reproduce."""
    run_dir = tmp_path_factory.mktemp('reference')
    run(tiny_overrides(tiny_corpus, run_dir))
    return run_dir


def test_one_process_run_logs_every_step_and_leaves_a_loadable_checkpoint(reference):
    lm = losses(reference / 'metrics.jsonl')
    aux = losses(reference / 'metrics.jsonl', 'loss/train/moe_aux')
    assert sorted(lm) == list(range(STEPS))
    assert all(0.5 < a < 2.0 for a in aux.values())  # load-balancing loss is ~1 near balance
    moe = losses(reference / 'metrics.jsonl', 'moe/max_cv')
    assert len(moe) == STEPS

    model = dbrx_train.load_pretrained(reference / 'checkpoints')  # the save folder: its latest checkpoint
    logits = model(torch.tensor([[100257, 1, 2, 3]]))
    assert logits.shape == (1, 4, 100352) and torch.isfinite(logits).all()
    assert not model.training


def test_a_checkpoint_that_does_not_fit_its_config_names_the_tensor(reference, tmp_path):
    import shutil

    import yaml

    from dbrx_train.errors import CheckpointError

    copy = tmp_path / 'checkpoints'
    shutil.copytree(reference / 'checkpoints', copy, symlinks=True)
    config = yaml.safe_load((copy / 'config.yaml').read_text())
    config['ffn_config']['ffn_hidden_size'] = 32
    (copy / 'config.yaml').write_text(yaml.safe_dump(config))
    with pytest.raises(CheckpointError, match=r'blocks\.0\.ffn\.experts\.w1 has shape \(1536, 64\)'):
        dbrx_train.load_pretrained(copy)
    (copy / 'config.yaml').unlink()
    with pytest.raises(CheckpointError, match='config.yaml is missing'):
        dbrx_train.load_pretrained(copy)


def test_two_fsdp2_processes_match_one_process_with_the_same_global_batch(tiny_corpus, reference, tmp_path):
    # Also logs to Weights & Biases, offline (the test environment sets WANDB_MODE=offline).
    wandb = f'{{project: dbrx-test, init_kwargs: {{dir: {tmp_path}}}}}'
    run(tiny_overrides(tiny_corpus, tmp_path, **{'loggers.wandb': wandb}), processes=2, log_dir=tmp_path)
    one, two = losses(reference / 'metrics.jsonl'), losses(tmp_path / 'metrics.jsonl')
    assert sorted(two) == sorted(one)
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step
    assert (tmp_path / 'rank1.out').exists()
    [wandb_log] = tmp_path.glob('wandb/offline-run-*/run-*.wandb')
    assert b'loss/train/lm' in wandb_log.read_bytes() and b'moe/max_cv' in wandb_log.read_bytes()


def test_killed_run_autoresumes_from_its_last_checkpoint_with_the_same_losses(tiny_corpus, reference, tmp_path):
    args = tiny_overrides(tiny_corpus, tmp_path)
    proc = launch(args)
    checkpoints = tmp_path / 'checkpoints'
    deadline = time.monotonic() + 240
    while not (checkpoints / 'latest-rank0.pt').exists():  # Composer links it once a save is complete
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, 'no checkpoint appeared'
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no chance to save anything more
    proc.wait()
    logged_before_kill = losses(tmp_path / 'metrics.jsonl')
    assert max(logged_before_kill, default=-1) < STEPS - 1, 'the run finished before it could be killed'

    lines_before = len((tmp_path / 'metrics.jsonl').read_text().splitlines())
    run(args)  # the same command again
    after = (tmp_path / 'metrics.jsonl').read_text().splitlines()[lines_before:]
    first_step_after = min(json.loads(line)['step'] for line in after if 'loss/train/lm' in line)
    assert first_step_after >= 2, 'the second run started over instead of resuming'
    expected, resumed = losses(reference / 'metrics.jsonl'), losses(tmp_path / 'metrics.jsonl')
    assert sorted(resumed) == sorted(expected)
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6), step


def _fails_with_one_line(args: list[str], expected: str) -> None:
    proc = subprocess.run([sys.executable, str(TRAIN), *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('error: ') and expected in last, last


def test_a_typo_in_the_yaml_is_one_line_naming_the_key_and_the_fix(tmp_path):
    _fails_with_one_line([str(CONFIG), 'model.d_modle=64'], "model.d_modle: unknown key (did you mean 'd_model'?)")


def test_a_missing_data_directory_is_one_line_naming_the_stream(tiny_corpus, tmp_path):
    _fails_with_one_line([str(CONFIG), f'train_loader.dataset.streams.text.local={tiny_corpus / "text"}',
                          f'train_loader.dataset.streams.code.local={tmp_path / "nowhere"}'],
                         'train_loader.dataset.streams.code.local: data directory not found')


def test_expert_parallel_processes_match_one_process(tiny_corpus, reference, tmp_path):
    # Each of the 2 ranks owns 8 of the 16 experts of each layer; tokens travel to them.
    run(tiny_overrides(tiny_corpus, tmp_path, **{'model.ffn_config.moe_world_size': 2}), processes=2,
        log_dir=tmp_path)
    for key in ('loss/train/lm', 'loss/train/moe_aux'):
        one, two = losses(reference / 'metrics.jsonl', key), losses(tmp_path / 'metrics.jsonl', key)
        assert sorted(two) == sorted(one)
        for step in one:
            assert two[step] == pytest.approx(one[step], rel=1e-4), (key, step)


def test_an_expert_parallel_degree_above_the_world_size_is_one_line(tiny_corpus, tmp_path):
    _fails_with_one_line([str(CONFIG), *tiny_overrides(tiny_corpus, tmp_path, **{'model.ffn_config.moe_world_size': 2})],
                         'model.ffn_config.moe_world_size: 2 is larger than the world size (1)')
