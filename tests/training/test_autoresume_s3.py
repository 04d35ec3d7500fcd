"""Autoresume from an object store, against a real S3 server (SeaweedFS, started by the `s3` fixture):
`kill -9` at chosen moments of a checkpoint's upload, then the same command again.

Data is read from the bucket too; every step's loss and batch must equal the uninterrupted run's on
local files. The writer pauses at a named stage when DBRX_TEST_CHECKPOINT_PAUSE asks it to:
'uploaded' is every file in the bucket but not yet its index.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import pytest

from dbrx_train import train as train_entry
from dbrx_train.checkpoints import load_pretrained
from dbrx_train.checkpoints.saver import PAUSE_ENV
from dbrx_train.data.shared_memory import remove_stale_shared_memory

from tests.training.conftest import CONFIG, launch, losses, run, tiny_overrides
from tests.training.test_autoresume import assert_same_losses, kill_when_paused, line_count, live_processes, logged_since


def s3_overrides(corpus: Path, s3_corpus: str, bucket: str, run_dir: Path, **extra) -> tuple[list[str], str]:
    """The tiny run with both streams read from the bucket and checkpoints saved there, every 2
    steps, the last 2 kept; and the save folder's key prefix (unique per test)."""
    prefix = f'runs/{uuid.uuid4().hex[:8]}/checkpoints'
    args = tiny_overrides(corpus, run_dir, **{
        'train_loader.dataset.streams.text.remote': f'{s3_corpus}/text',
        'train_loader.dataset.streams.text.local': run_dir / 'cache' / 'text',
        'train_loader.dataset.streams.code.remote': f'{s3_corpus}/code',
        'train_loader.dataset.streams.code.local': run_dir / 'cache' / 'code',
        'save_folder': f's3://{bucket}/{prefix}', 'save_num_checkpoints_to_keep': 2, 'python_log_level': 'info',
        **extra})
    return args, prefix


def checkpoint_objects(s3, prefix: str) -> list[str]:
    return [key[len(prefix) + 1:] for key in s3.keys(prefix + '/')]


def test_one_process_killed_mid_upload_resumes_from_the_bucket_with_the_same_losses(
        tiny_corpus, s3, s3_corpus, reference, tmp_path):
    args, prefix = s3_overrides(tiny_corpus, s3_corpus, s3.bucket, tmp_path)
    metrics = tmp_path / 'metrics.jsonl'

    # 1. Killed before its first checkpoint is complete: uploaded, not indexed.
    kill_when_paused(args, 'uploaded@2', tmp_path)
    assert checkpoint_objects(s3, prefix) == ['config.yaml', 'ep0-ba2-rank0.pt']

    # 2. Starts over cleanly (the same name is uploaded again); killed after ba2 is complete, while
    #    ba4 is half done.
    before = line_count(metrics)
    output = kill_when_paused(args, 'uploaded@4', tmp_path)
    assert 'ep0-ba2-rank0.pt (no ep0-ba2-rank0.pt.index.json: its upload was cut off)' in output
    assert 'starting from scratch' in output
    assert_same_losses(logged_since(metrics, before), reference)
    assert checkpoint_objects(s3, prefix) == ['config.yaml', 'ep0-ba2-rank0.pt', 'ep0-ba2-rank0.pt.index.json',
                                              'ep0-ba4-rank0.pt']

    # 3. Resumes from the complete one, never the partial one, and finishes.
    before = line_count(metrics)
    output = run(args)
    assert f'autoresume: resuming from s3://{s3.bucket}/{prefix}/ep0-ba2-rank0.pt (batch 2)' in output
    resumed = logged_since(metrics, before)
    assert sorted(resumed) == [2, 3, 4, 5]
    assert_same_losses(resumed, reference)
    assert_same_losses(losses(metrics), reference)
    # save_num_checkpoints_to_keep: 2, counted across attempts; ba2 deleted once ba6 was complete.
    assert checkpoint_objects(s3, prefix) == ['config.yaml', 'ep0-ba4-rank0.pt', 'ep0-ba4-rank0.pt.index.json',
                                              'ep0-ba6-rank0.pt', 'ep0-ba6-rank0.pt.index.json']

    # 4. Again: the run is complete, exit 0.
    before = line_count(metrics)
    output = run(args)
    assert 'run already complete at 6ba: nothing to train' in output and 'Traceback' not in output
    assert line_count(metrics) == before

    # 5. The bucket's save_folder loads as a local one does: its config and newest checkpoint.
    model = load_pretrained(f's3://{s3.bucket}/{prefix}')
    assert model.config.d_model == 64 and model.config.n_layers == 2


def test_two_ranks_killed_mid_upload_resume_from_the_bucket(tiny_corpus, s3, s3_corpus, reference_two_ranks,
                                                            tmp_path):
    args, prefix = s3_overrides(tiny_corpus, s3_corpus, s3.bucket, tmp_path)
    metrics = tmp_path / 'metrics.jsonl'

    # Both ranks uploaded their shards of ba4, the index is missing.
    kill_when_paused(args, 'uploaded@4', tmp_path, processes=2)
    assert checkpoint_objects(s3, prefix) == [
        'config.yaml', 'ep0-ba2.index.json', 'ep0-ba2/.metadata', 'ep0-ba2/__0_0.distcp', 'ep0-ba2/__1_0.distcp',
        'ep0-ba4/.metadata', 'ep0-ba4/__0_0.distcp', 'ep0-ba4/__1_0.distcp']

    before = line_count(metrics)
    log_dir = tmp_path / 'last'
    log_dir.mkdir()
    output = run(args, processes=2, log_dir=log_dir, timeout=600)
    assert 'ep0-ba4 (no ep0-ba4.index.json: its upload was cut off)' in output
    assert f'resuming from s3://{s3.bucket}/{prefix}/ep0-ba2 (batch 2)' in output
    resumed = logged_since(metrics, before)
    assert sorted(resumed) == [2, 3, 4, 5]
    assert_same_losses(resumed, reference_two_ranks)


def test_no_process_of_a_killed_run_remains(tiny_corpus, s3, s3_corpus, tmp_path):
    """kill -9 of the main process alone (as an OOM killer does): its DataLoader workers go too."""
    args, _ = s3_overrides(tiny_corpus, s3_corpus, s3.bucket, tmp_path, **{'train_loader.num_workers': 2})
    flag, output = tmp_path / 'paused', tmp_path / 'output.txt'
    with open(output, 'w') as out:
        proc = launch(args, env={PAUSE_ENV: f'uploaded@2,{flag}'}, stdout=out, start_new_session=True)
    group = proc.pid  # its own process group: the run and every process it started
    try:
        deadline = time.monotonic() + 300
        while not flag.exists():
            assert proc.poll() is None, output.read_text()[-3000:]
            assert time.monotonic() < deadline, 'the writer never paused'
            time.sleep(0.05)
        assert len(live_processes(group)) >= 3  # the run, its two DataLoader workers (and multiprocessing's resource tracker)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 5
        while live_processes(group) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert live_processes(group) == []
    finally:
        for pid in live_processes(group):
            os.kill(pid, signal.SIGKILL)
        proc.wait()
        remove_stale_shared_memory()  # the killed run's


@pytest.mark.parametrize('problem', ['wrong key', 'missing bucket'])
def test_a_save_folder_it_cannot_reach_is_one_line_naming_it_before_anything_is_built(
        tiny_corpus, s3, tmp_path, monkeypatch, capsys, problem):
    bucket = s3.bucket if problem == 'wrong key' else 'no-such-bucket'
    if problem == 'wrong key':
        monkeypatch.setenv('AWS_SECRET_ACCESS_KEY', 'wrong')
    uri = f's3://{bucket}/runs/unreachable'
    monkeypatch.setattr(train_entry, 'build_trainer', lambda cfg: pytest.fail('the trainer was built first'))
    with pytest.raises(SystemExit) as exit_info:
        train_entry.main([str(CONFIG), *tiny_overrides(tiny_corpus, tmp_path, save_folder=uri)])
    assert exit_info.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f'error: save_folder {uri}: cannot list it (')
    assert ('SignatureDoesNotMatch' if problem == 'wrong key' else 'NoSuchBucket') in line
