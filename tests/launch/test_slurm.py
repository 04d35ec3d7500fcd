"""The real `launch/slurm` scripts on a real (one-machine) Slurm: a 2-node job, preemption, requeue, autoresume.

Two tasks on the one host each run a Composer launcher with its own node rank; they meet over loopback.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tests.training.conftest import CONFIG, REPO, tiny_overrides

SUBMIT = REPO / 'launch' / 'slurm' / 'submit.sh'
STEPS = 12


def _python_on_a_host_of_its_own(tmp_path: Path) -> Path:
    """This Python in a private /dev/shm, as on a separate machine: Streaming keeps one node's state
    there, so two "nodes" sharing the real one would collide."""
    wrapper = tmp_path / 'python'
    wrapper.write_text('#!/bin/sh\n'
                       'exec unshare --mount sh -c \'mount -t tmpfs tmpfs /dev/shm && exec "$@"\' '
                       f'sh {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def _submit(slurm, tmp_path: Path, args: list[str], **env: str) -> str:
    env = {**slurm.env, 'PYTHON': str(_python_on_a_host_of_its_own(tmp_path)), 'LOG_ROOT': str(tmp_path / 'logs'),
           'WANDB_MODE': 'offline', **env}
    # Two launchers ("nodes") on the one host, one CPU process each.
    return slurm.run(str(SUBMIT), '--nodes=1', '--ntasks-per-node=2', '--gpus-per-node=0', str(CONFIG), *args,
                     env=env, cwd=tmp_path).stdout.strip()


def _logs(tmp_path: Path, job_id: str) -> dict[str, str]:
    found = {p.name: p.read_text() for p in (tmp_path / 'logs' / job_id).glob('*')}
    found['batch'] = next((tmp_path / 'logs').glob(f'*-{job_id}.out')).read_text()
    return found


def _decompress_shards(corpus: Path) -> None:
    """Writes each shard's raw file beside its compressed one. This test's two "nodes" share one
    disk, and Streaming coordinates decompression only among the ranks of one node: on a first
    read both nodes would decompress the same shard into the same temporary file."""
    from streaming.base.compression import decompress

    for index in corpus.glob('*/index.json'):
        for shard in json.loads(index.read_text())['shards']:
            raw = index.parent / shard['raw_data']['basename']
            if shard.get('zip_data') and not raw.exists():
                tmp = raw.with_name(raw.name + '.test-tmp')
                tmp.write_bytes(decompress(shard['compression'], (index.parent / shard['zip_data']['basename'])
                                           .read_bytes()))
                tmp.replace(raw)


def _logged_steps(metrics_file: Path) -> list[int]:
    """Every training step in the order the metrics were logged, across runs that append to the file."""
    if not metrics_file.exists():
        return []
    return [record['step'] for record in map(json.loads, metrics_file.read_text().splitlines())
            if 'loss/train/lm' in record]


def test_two_node_job_checkpoints_on_the_time_limit_signal_requeues_and_autoresumes(slurm, tiny_corpus, tmp_path):
    run_dir = tmp_path / 'run'
    _decompress_shards(tiny_corpus)
    overrides = tiny_overrides(tiny_corpus, run_dir, max_duration=f'{STEPS}ba', save_interval='1000ba',
                               save_num_checkpoints_to_keep=-1, **{  # keep the signal's checkpoint to look at
        'callbacks.save_on_signal.signals': '[SIGUSR1,SIGTERM]',
        'callbacks.speed_monitor.gpu_flops_available': 1e12})  # no peak measurement at start
    job_id = _submit(slurm, tmp_path, overrides)

    deadline = time.monotonic() + 240
    while not _logged_steps(run_dir / 'metrics.jsonl'):  # both ranks are training
        job = slurm.job(job_id)
        assert job['JobState'] in ('PENDING', 'RUNNING'), (job, _logs(tmp_path, job_id))
        assert time.monotonic() < deadline, ('training never started', _logs(tmp_path, job_id))
        time.sleep(0.05)
    # What `#SBATCH --signal=B:USR1@180` sends to the batch script ahead of the time limit.
    slurm.run('scancel', '--signal=USR1', '--batch', job_id)
    done = slurm.wait_for(job_id, {'COMPLETED', 'FAILED', 'CANCELLED', 'NODE_FAIL'}, timeout=300)
    logs = _logs(tmp_path, job_id)
    assert (done['JobState'], done['ExitCode'], done['Restarts']) == ('COMPLETED', '0:0', '1'), (done, logs)

    # The signal's checkpoint (save_interval alone would save at batch 1000), one shard a rank, and the end's.
    checkpoints = run_dir / 'checkpoints'
    signal_checkpoint, last = sorted(checkpoints.glob('ep*-ba*'), key=lambda p: int(p.name.split('-ba')[1]))
    stopped_at = int(signal_checkpoint.name.split('-ba')[1])
    assert 0 < stopped_at < STEPS and last.name == f'ep0-ba{STEPS}', (signal_checkpoint, last)
    assert sorted(p.name for p in signal_checkpoint.glob('*.distcp')) == ['__0_0.distcp', '__1_0.distcp']

    # Trained across both launchers, each with its own node rank, in both runs.
    for node in (0, 1):
        node_log = logs[f'node{node}.log']
        assert node_log.count(f'node {node}/2 on ') == 2 and 'world size 2 = 2 node(s) x 1 process(es)' in node_log
        assert f'saving a checkpoint at batch {stopped_at} and stopping training' in node_log, node_log[-3000:]
    assert 'restart 1' in logs['batch'] and 'requeueing' in logs['batch'], logs['batch']

    # The second run resumed at the signal's checkpoint: every step logged exactly once, none redone.
    assert _logged_steps(run_dir / 'metrics.jsonl') == list(range(STEPS))


def test_a_world_size_that_disagrees_with_the_nodes_fails_fast_with_one_clear_line(slurm, tmp_path):
    job_id = _submit(slurm, tmp_path, ['max_duration=1ba'], WORLD_SIZE='3')
    done = slurm.wait_for(job_id, {'COMPLETED', 'FAILED', 'CANCELLED'}, timeout=120)
    logs = _logs(tmp_path, job_id)
    # The first launcher to exit (code 2) ends the step (--kill-on-bad-exit), so the other may be cut short.
    assert done['JobState'] == 'FAILED' and done['ExitCode'] != '0:0', (done, logs)
    node_logs = logs['node0.log'] + logs['node1.log']
    assert 'error: world size 3 disagrees with 2 nodes x 1 processes per node (= 2)' in node_logs, logs
    assert 'Traceback' not in node_logs and 'node 0/2 on' not in node_logs  # stopped before starting anything
