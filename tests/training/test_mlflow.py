"""The `mlflow` logger (llm-foundry's `loggers: mlflow: {tracking_uri, experiment_name}`) against a real
tracking server: `mlflow server` on 127.0.0.1 with a SQLite store, started and stopped (by pid) here."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.training.conftest import losses, run, tiny_overrides

mlflow = pytest.importorskip('mlflow')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class TrackingServer:
    """`mlflow server` on a free port of 127.0.0.1 with a SQLite store; `uri()` waits until it answers."""

    def __init__(self, folder: Path):
        self.address = f'http://127.0.0.1:{_free_port()}'
        mlflow_cli = str(Path(sys.executable).with_name('mlflow'))
        self.process = subprocess.Popen(
            [mlflow_cli, 'server', '--backend-store-uri', f'sqlite:///{folder}/mlflow.db', '--default-artifact-root',
             str(folder / 'artifacts'), '--host', '127.0.0.1', '--port', self.address.rsplit(':', 1)[1],
             '--workers', '1'], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def uri(self, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f'mlflow server exited: {self.process.stdout.read()[-3000:]}'
            try:
                with urllib.request.urlopen(f'{self.address}/health', timeout=2) as response:
                    if response.status == 200:
                        return self.address
            except OSError:
                pass
            assert time.monotonic() < deadline, f'mlflow server did not answer within {timeout} s'
            time.sleep(0.5)

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)  # the server and its workers, by the server's pid
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def tracking_server(tmp_path_factory):
    """Started before the other fixtures are built (it takes seconds to migrate its store)."""
    server = TrackingServer(tmp_path_factory.mktemp('mlflow'))
    try:
        yield server
    finally:
        server.stop()


def test_training_logs_every_steps_loss_and_the_curriculum_to_an_mlflow_server(tracking_server, tiny_corpus,
                                                                                 tmp_path):
    from mlflow.tracking import MlflowClient

    uri = tracking_server.uri()
    run(tiny_overrides(tiny_corpus, tmp_path, save_interval='2ba', max_duration='2ba',
                       run_name='mlflow-run', **{'loggers.mlflow.tracking_uri': uri,
                                                 'loggers.mlflow.experiment_name': 'dbrx-ft',
                                                 'loggers.mlflow.log_system_metrics': False}))
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name('dbrx-ft')
    (logged,) = client.search_runs([experiment.experiment_id])
    assert logged.info.status == 'FINISHED' and logged.info.run_name == 'mlflow-run'
    ours = losses(tmp_path / 'metrics.jsonl')
    theirs = {m.step: m.value for m in client.get_metric_history(logged.info.run_id, 'loss/train/lm')}
    assert sorted(theirs) == sorted(ours) == [0, 1]
    assert theirs == pytest.approx(ours, rel=1e-6)
    for key in ('curriculum/phase', 'curriculum/proportion/text', 'curriculum/batch_share/text'):
        expected = losses(tmp_path / 'metrics.jsonl', key)
        history = {m.step: m.value for m in client.get_metric_history(logged.info.run_id, key)}
        # Composer's logger skips a value repeated from the step before; every change is there.
        changes = {step: v for step, v in sorted(expected.items()) if expected.get(step - 1) != v}
        assert history == pytest.approx(changes, rel=1e-6), key
