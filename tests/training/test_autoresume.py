"""Crash-safe checkpoints: `kill -9` at chosen moments of a checkpoint's write, then autoresume.

The writer pauses at a named stage when DBRX_TEST_CHECKPOINT_PAUSE asks it to (it creates a flag
file first), so each kill lands exactly there: 'staged' (every rank wrote, nothing in place yet)
or 'committed' (in place, `latest` not yet moved). At 6 steps the demo's curriculum switches phase
at step 3.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from dbrx_train.checkpoints.autoresume import incomplete, resume_checkpoint
from dbrx_train.checkpoints.saver import PAUSE_ENV, STAGING
from dbrx_train.data.shared_memory import file_identity, files_held_open

from tests.training.conftest import curriculum_log, launch, losses, run, tiny_overrides

STEPS = 6
KILLS = 6  # random kills in a row in the random-kill test (the issue killed six times)
SHARED_MEMORY = Path('/dev/shm')


def kill_when_paused(args: list[str], at: str, run_dir: Path, processes: int | None = None) -> str:
    """Runs until the checkpoint writer pauses `at` ('stage@batch'), then SIGKILLs every process of
    the run; returns its output (rank 0's: the launcher writes the other ranks' to run_dir/attempt-N/)."""
    attempt = run_dir / f'attempt-{len(list(run_dir.glob("attempt-*")))}'
    attempt.mkdir()
    shared_memory_before = _shared_memory()
    flag = attempt / 'paused'
    with open(attempt / 'output.txt', 'w') as output:
        proc = launch(args, processes, attempt, env={PAUSE_ENV: f'{at},{flag}'}, stdout=output,
                      start_new_session=True)  # its own process group: the launcher and its ranks
        deadline = time.monotonic() + 300
        while not flag.exists():
            assert proc.poll() is None, (attempt / 'output.txt').read_text()[-3000:]
            assert time.monotonic() < deadline, f'the writer never paused at {at}'
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # A killed run cannot unlink its Streaming shared memory. Left behind, it makes every later
    # Streaming dataset on this machine attach to it and hold descriptors open to the end of the
    # process: enough of them ran later test sessions out of open files.
    for name in _shared_memory() - shared_memory_before:
        (SHARED_MEMORY / name).unlink(missing_ok=True)
    return (attempt / 'output.txt').read_text()


def _shared_memory() -> set[str]:
    return set(os.listdir(SHARED_MEMORY)) if SHARED_MEMORY.is_dir() else set()


def logged_since(metrics_file: Path, lines_before: int) -> dict[int, float]:
    found = {}
    for line in metrics_file.read_text().splitlines()[lines_before:]:
        record = json.loads(line)
        if 'loss/train/lm' in record:
            found[record['step']] = record['loss/train/lm']
    return found


def assert_same_losses(logged: dict[int, float], reference: Path) -> None:
    expected = losses(reference / 'metrics.jsonl')
    assert logged, 'no step was logged'
    for step, loss in logged.items():
        assert loss == pytest.approx(expected[step], abs=1e-6), step


def line_count(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_one_process_killed_during_and_after_checkpoint_writes_resumes_with_the_same_losses(
        tiny_corpus, reference, tmp_path):
    # Checkpoints at 3 (the phase boundary) and 6.
    args = tiny_overrides(tiny_corpus, tmp_path, save_interval='3ba', python_log_level='info')
    folder, metrics = tmp_path / 'checkpoints', tmp_path / 'metrics.jsonl'
    latest = folder / 'latest-rank0.pt'

    # 1. During the first checkpoint's write: nothing under a checkpoint's name, no latest.
    kill_when_paused(args, 'staged@3', tmp_path)
    assert [p.name for p in (folder / STAGING).iterdir()] == ['ep0-ba3-rank0.pt']
    assert not (folder / 'ep0-ba3-rank0.pt').exists() and not latest.exists()

    # 2. The same command: the leftover is moved aside, training starts over; killed right after
    #    the first checkpoint is in place, before latest moves.
    before = line_count(metrics)
    output = kill_when_paused(args, 'committed@3', tmp_path)
    assert 'checkpoint .incomplete/ep0-ba3-rank0.pt: was being written when the run stopped; moved to ' in output
    assert 'no complete checkpoint' in output and 'starting from scratch' in output
    assert_same_losses(logged_since(metrics, before), reference)
    assert (folder / 'ep0-ba3-rank0.pt').is_file() and not latest.exists()

    # 3. Resumes at the phase boundary from the checkpoint latest never pointed to; killed during
    #    the second checkpoint's write.
    before = line_count(metrics)
    output = kill_when_paused(args, 'staged@6', tmp_path)
    assert 'autoresume: resuming from ' in output and 'ep0-ba3-rank0.pt (batch 3)' in output
    assert min(logged_since(metrics, before)) == 3
    assert_same_losses(logged_since(metrics, before), reference)
    # ...and as Composer alone would have left it: the second checkpoint cut short under its final name.
    with open(folder / 'ep0-ba3-rank0.pt', 'rb') as src, open(folder / 'ep0-ba6-rank0.pt', 'wb') as dst:
        dst.write(src.read(os.path.getsize(src.name) // 3))

    # 4. Both are reported and moved aside; resumes from batch 3 again and finishes.
    before = line_count(metrics)
    output = run(args)
    assert 'checkpoint .incomplete/ep0-ba6-rank0.pt: was being written when the run stopped' in output
    assert 'checkpoint ep0-ba6-rank0.pt: ep0-ba6-rank0.pt is truncated or corrupt' in output
    resumed = logged_since(metrics, before)
    assert sorted(resumed) == [3, 4, 5]
    assert_same_losses(resumed, reference)
    assert_same_losses(losses(metrics), reference)
    assert curriculum_log(metrics) == curriculum_log(reference / 'metrics.jsonl')
    # save_num_checkpoints_to_keep: 1 across restarts; nothing was deleted, only moved aside.
    assert sorted(p.name for p in folder.glob('ep*')) == ['ep0-ba6-rank0.pt']
    assert latest.resolve().name == 'ep0-ba6-rank0.pt'
    set_aside = sorted(str(p.relative_to(a)) for a in folder.glob('partial-*') for p in a.rglob('ep*'))
    assert set_aside == ['.incomplete/ep0-ba3-rank0.pt', '.incomplete/ep0-ba6-rank0.pt', 'ep0-ba6-rank0.pt']

    # 5. Again: the run is complete.
    before = line_count(metrics)
    output = run(args)
    assert 'run already complete at 6ba: nothing to train' in output and 'Traceback' not in output
    assert line_count(metrics) == before


def test_two_ranks_killed_mid_write_and_missing_a_shard_resume_from_the_last_complete_checkpoint(
        tiny_corpus, reference_two_ranks, tmp_path):
    args = tiny_overrides(tiny_corpus, tmp_path, python_log_level='info')  # sharded checkpoints at 2, 4 and 6
    folder, metrics = tmp_path / 'checkpoints', tmp_path / 'metrics.jsonl'

    # 1. During the first checkpoint's write: both ranks wrote their shards, nothing is in place.
    kill_when_paused(args, 'staged@2', tmp_path, processes=2)
    assert sorted(p.name for p in (folder / STAGING / 'ep0-ba2').iterdir()) == ['.metadata', '__0_0.distcp',
                                                                                  '__1_0.distcp']
    assert not (folder / 'ep0-ba2').exists()

    # 2. Starts over; killed during the second checkpoint's write.
    before = line_count(metrics)
    output = kill_when_paused(args, 'staged@4', tmp_path, processes=2)
    assert 'checkpoint .incomplete/ep0-ba2: was being written when the run stopped' in output
    assert 'starting from scratch' in output
    assert_same_losses(logged_since(metrics, before), reference_two_ranks)
    assert (folder / 'latest-rank0.pt').resolve().name == 'ep0-ba2'
    # ...and a copy of it in place that lost rank 1's shard file.
    shutil.copytree(folder / STAGING / 'ep0-ba4', folder / 'ep0-ba4')
    (folder / 'ep0-ba4' / '__1_0.distcp').unlink()

    # 3. Both are reported, the missing file named; resumes from batch 2 and finishes.
    before = line_count(metrics)
    log_dir = tmp_path / 'last'
    log_dir.mkdir()
    output = run(args, processes=2, log_dir=log_dir)
    assert 'checkpoint .incomplete/ep0-ba4: was being written when the run stopped' in output
    assert 'checkpoint ep0-ba4: ep0-ba4/__1_0.distcp is missing' in output
    assert 'ep0-ba2 (batch 2)' in output
    resumed = logged_since(metrics, before)
    assert sorted(resumed) == [2, 3, 4, 5]
    assert_same_losses(resumed, reference_two_ranks)
    assert (folder / 'latest-rank0.pt').resolve().name == 'ep0-ba6'


# In-process checks of the pieces, on small files (DCP warns that it saves without a process group).
quiet_dcp = pytest.mark.filterwarnings('ignore:torch.distributed is disabled:UserWarning',
                                            'ignore:TypedStorage is deprecated:UserWarning')

def _full_checkpoint(path: Path) -> Path:
    torch.save({'state': {'w': torch.arange(1000.0)}}, path)
    return path


def _sharded_checkpoint(path: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    dcp.save({'w': torch.arange(1000.0), 'b': torch.zeros(3)}, storage_writer=dcp.FileSystemWriter(str(path)))
    return path


@quiet_dcp
def test_a_complete_checkpoint_reads_as_complete(tmp_path):
    assert incomplete(_full_checkpoint(tmp_path / 'ep0-ba2-rank0.pt')) is None
    assert incomplete(_sharded_checkpoint(tmp_path / 'ep0-ba2')) is None


@quiet_dcp
def test_a_truncated_or_missing_file_is_named(tmp_path):
    full = _full_checkpoint(tmp_path / 'ep0-ba2-rank0.pt')
    full.write_bytes(full.read_bytes()[:-100])
    assert incomplete(full).startswith('ep0-ba2-rank0.pt is truncated or corrupt')

    sharded = _sharded_checkpoint(tmp_path / 'ep0-ba4')
    [shard] = sharded.glob('*.distcp')
    shard.write_bytes(shard.read_bytes()[:100])
    assert incomplete(sharded).startswith(f'ep0-ba4/{shard.name} is truncated (100 of ')
    shard.unlink()
    assert incomplete(sharded) == f'ep0-ba4/{shard.name} is missing'
    (sharded / '.metadata').unlink()
    assert incomplete(sharded).startswith('ep0-ba4/.metadata is missing')


def test_the_newest_complete_checkpoint_is_chosen_and_latest_points_at_it(tmp_path, caplog):
    _full_checkpoint(tmp_path / 'ep0-ba2-rank0.pt')
    _full_checkpoint(tmp_path / 'ep0-ba4-rank0.pt')
    (tmp_path / 'ep0-ba6-rank0.pt').write_bytes(b'PK\x03\x04 cut short')
    (tmp_path / 'latest-rank0.pt').symlink_to('ep0-ba6-rank0.pt')
    (tmp_path / STAGING).mkdir()
    _full_checkpoint(tmp_path / STAGING / 'ep0-ba8-rank0.pt')  # complete, but never renamed into place
    with caplog.at_level(logging.WARNING):
        assert resume_checkpoint(str(tmp_path), 'run', autoresume=True) == str(tmp_path / 'ep0-ba4-rank0.pt')
    assert os.readlink(tmp_path / 'latest-rank0.pt') == 'ep0-ba4-rank0.pt'
    [aside] = tmp_path.glob('partial-*')
    assert sorted(str(p.relative_to(aside)) for p in aside.rglob('ep*')) == [f'{STAGING}/ep0-ba8-rank0.pt',
                                                                              'ep0-ba6-rank0.pt']
    assert len(caplog.records) == 3  # one line per checkpoint moved aside, one for the resume
    assert 'checkpoint ep0-ba6-rank0.pt: ep0-ba6-rank0.pt is truncated or corrupt' in caplog.text

    assert resume_checkpoint(str(tmp_path), 'run', autoresume=False) is None  # nothing is moved a second time
    assert len(list(tmp_path.glob('partial-*'))) == 1


def test_without_a_complete_checkpoint_the_run_starts_from_scratch(tmp_path, caplog):
    (tmp_path / 'ep0-ba2').mkdir()  # a sharded checkpoint that never got its .metadata
    (tmp_path / 'latest-rank0.pt').symlink_to('ep0-ba2')
    with caplog.at_level(logging.WARNING):
        assert resume_checkpoint(str(tmp_path), 'run', autoresume=True) is None
    assert 'ep0-ba2/.metadata is missing' in caplog.text and 'starting from scratch' in caplog.text
    assert not os.path.lexists(tmp_path / 'latest-rank0.pt')


def test_one_process_resumes_two_ranks_and_two_ranks_resume_one_process(tiny_corpus, reference, tmp_path):
    """1 -> 2 -> 1 processes: each resume converts the checkpoint to the layout it loads (full file
    <-> sharded folder). Global batch 4 in micro-batches of 2 either way, so the same micro-batches."""
    args = tiny_overrides(tiny_corpus, tmp_path, python_log_level='info', save_num_checkpoints_to_keep=-1)
    folder, metrics = tmp_path / 'checkpoints', tmp_path / 'metrics.jsonl'

    kill_when_paused(args, 'committed@2', tmp_path)  # one process: ep0-ba2-rank0.pt
    before = line_count(metrics)
    output = kill_when_paused(args, 'committed@4', tmp_path, processes=2)  # two ranks: ep0-ba4/
    assert 'ep0-ba2-rank0.pt is full; this run loads sharded checkpoints: converting it' in output
    resumed = logged_since(metrics, before)
    assert sorted(resumed) == [2, 3]
    assert_same_losses(resumed, reference)
    assert (folder / 'ep0-ba4' / '.metadata').is_file()

    before = line_count(metrics)
    output = run(args)
    assert 'ep0-ba4 is sharded; this run loads full checkpoints: converting it' in output
    resumed = logged_since(metrics, before)
    assert sorted(resumed) == [4, 5]
    assert_same_losses(resumed, reference)


def test_hybrid_shard_replicas_on_gloo_train_and_resume_with_the_losses_of_one_process(tiny_corpus, reference,
                                                                                       tmp_path):
    """HYBRID_SHARD in groups of one rank: 2 replicas, each holding the whole model; gloo cannot average
    in an all-reduce, so `training.gradient_average` averages the replicas' gradients instead."""
    args = tiny_overrides(tiny_corpus, tmp_path, python_log_level='info',
                          **{'fsdp_config.sharding_strategy': 'HYBRID_SHARD', 'fsdp_config.shard_group_size': 1})
    metrics = tmp_path / 'metrics.jsonl'
    kill_when_paused(args, 'committed@4', tmp_path, processes=2)
    assert sorted(losses(metrics)) == [0, 1, 2, 3]
    assert_same_losses(losses(metrics), reference)
    before = line_count(metrics)
    output = run(args, processes=2, log_dir=tmp_path)
    assert 'autoresume: resuming from ' in output
    resumed = logged_since(metrics, before)
    assert sorted(resumed) == [4, 5]
    assert_same_losses(resumed, reference)


def kill_at_random(args: list[str], run_dir: Path, rng: random.Random, metrics: Path, processes: int) -> None:
    """Runs until a random moment (seeded): while it starts, or some way into a random step's
    training, checkpoint write or rename; then SIGKILLs the launcher alone, as an OOM killer or a
    preempted node would, and checks that its ranks (and their workers) die with it within seconds."""
    attempt = run_dir / f'attempt-{len(list(run_dir.glob("attempt-*")))}'
    attempt.mkdir()
    before = line_count(metrics)
    step, delay = rng.choice([None, 1, 2, 3, 4, 5]), rng.uniform(0, 1.5)
    with open(attempt / 'output.txt', 'w') as output:
        proc = launch(args, processes, attempt, stdout=output, start_new_session=True)
        group = proc.pid  # its own process group: the launcher and every process it started
        try:
            deadline = time.monotonic() + 600
            while step is not None and _last_step(metrics, before) < step:
                if proc.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            time.sleep(delay * (5 if step is None else 1))  # a start-up kill: 0 to 7.5 s in
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            deadline = time.monotonic() + 10
            while live_processes(group) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert live_processes(group) == [], f'left behind by the killed launcher (attempt {attempt.name})'
        finally:
            for pid in live_processes(group):
                os.kill(pid, signal.SIGKILL)


def live_processes(group: int) -> list[int]:
    """The live (not zombie) processes of a process group."""
    found = []
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/stat') as f:
                fields = f.read().rsplit(')', 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != 'Z':
            found.append(int(pid))
    return found


def _last_step(metrics: Path, lines_before: int) -> int:
    """The last step logged since `lines_before` (-1: none yet; a line still being written is skipped)."""
    try:
        return max(logged_since(metrics, lines_before), default=-1)
    except (ValueError, FileNotFoundError):
        return -1


def test_two_ranks_killed_at_random_moments_train_on_the_same_samples_with_the_same_losses(
        tiny_corpus, reference_two_ranks, tmp_path):
    """Several kills in a row at seeded random moments (as the issue's drift needed: a resumed run
    killed again, resumed from the same checkpoint twice), then the same command to the end: every
    step any attempt logged has the uninterrupted run's loss and trained on its samples."""
    args = tiny_overrides(tiny_corpus, tmp_path, python_log_level='info', save_num_checkpoints_to_keep=2)
    metrics = tmp_path / 'metrics.jsonl'
    rng = random.Random(26)  # the kill moments: reproducible
    shared_memory_before = _shared_memory()
    try:
        # The killed runs' Streaming shared memory stays in /dev/shm: each next start removes it.
        for _ in range(KILLS):
            kill_at_random(args, tmp_path, rng, metrics, processes=2)
        log_dir = tmp_path / 'last'
        log_dir.mkdir()
        run(args, processes=2, log_dir=log_dir, timeout=600)
        # Nothing of the dead runs is left (what a live process holds, another job's, may be there).
        held = files_held_open()
        assert [name for name in _shared_memory() - shared_memory_before
                if (SHARED_MEMORY / name).exists() and file_identity(SHARED_MEMORY / name) not in held] == []
    finally:
        for name in _shared_memory() - shared_memory_before:
            (SHARED_MEMORY / name).unlink(missing_ok=True)
    expected_losses = losses(reference_two_ranks / 'metrics.jsonl')
    expected_batches = losses(reference_two_ranks / 'metrics.jsonl', 'data/batch_hash')
    assert len(expected_batches) == STEPS
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    trained = [(r['step'], r['loss/train/lm']) for r in records if 'loss/train/lm' in r]
    batches = [(r['step'], r['data/batch_hash']) for r in records if 'data/batch_hash' in r]
    assert sorted({step for step, _ in trained}) == list(range(STEPS))
    for step, loss in trained:  # every attempt's, killed ones included
        assert loss == pytest.approx(expected_losses[step], abs=1e-6), step
    for step, batch in batches:
        assert batch == expected_batches[step], step


def test_router_jitter_continues_with_the_random_state_the_checkpoint_saved(tiny_corpus, tmp_path):
    """Composer never restores the RNG when the loader resumes itself mid-epoch; with router jitter
    (random in every training step) a resumed run would then differ from an uninterrupted one."""
    jitter = {'model.ffn_config.moe_jitter_eps': 0.1, 'max_duration': '4ba'}
    uninterrupted = tmp_path / 'uninterrupted'
    uninterrupted.mkdir()
    run(tiny_overrides(tiny_corpus, uninterrupted, **jitter))
    resumed = tmp_path / 'resumed'
    resumed.mkdir()
    args = tiny_overrides(tiny_corpus, resumed, **jitter)
    kill_when_paused(args, 'committed@2', resumed)
    run(args)
    assert losses(resumed / 'metrics.jsonl') == losses(uninterrupted / 'metrics.jsonl')
