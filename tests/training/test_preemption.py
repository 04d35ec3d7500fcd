import multiprocessing
import os
import signal
import socket

import pytest
import torch
from composer import Trainer
from composer.core import Callback
from composer.models import ComposerClassifier
from composer.utils import dist
from torch.utils.data import DataLoader, TensorDataset

from dbrx_train.errors import ConfigError
from dbrx_train.training.preemption import SaveOnSignal


class SignalAt(Callback):
    """Sends `signum` to this very process at the end of batch `batch` (when `rank` matches)."""

    def __init__(self, batch: int, signum: int = signal.SIGUSR1, rank: int | None = None):
        self.batch, self.signum, self.rank = batch, signum, rank

    def batch_end(self, state, logger):
        if int(state.timestamp.batch) == self.batch and self.rank in (None, int(os.environ.get('RANK', 0))):
            os.kill(os.getpid(), self.signum)


def _trainer(save_folder, max_duration='12ba', callbacks=(), **kwargs) -> Trainer:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    model = ComposerClassifier(torch.nn.Linear(4, 2), num_classes=2)
    return Trainer(model=model, optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
                   train_dataloader=DataLoader(data, batch_size=2, sampler=dist.get_sampler(data)),
                   max_duration=max_duration, device='cpu', run_name='toy', progress_bar=False,
                   save_folder=str(save_folder) if save_folder else None, save_interval='1000ba',
                   callbacks=list(callbacks), **kwargs)


def test_signal_saves_a_checkpoint_stops_and_autoresume_continues(tmp_path, caplog):
    trainer = _trainer(tmp_path, callbacks=[SignalAt(3), SaveOnSignal(['SIGUSR1'])])
    trainer.fit()
    assert int(trainer.state.timestamp.batch) == 3
    assert os.path.isfile(tmp_path / 'ep0-ba3-rank0.pt')
    assert os.path.realpath(tmp_path / 'latest-rank0.pt') == str(tmp_path / 'ep0-ba3-rank0.pt')
    assert 'received SIGUSR1; saving a checkpoint at batch 3' in caplog.text
    trainer.close()

    resumed = _trainer(tmp_path, callbacks=[SaveOnSignal()], autoresume=True)
    resumed.fit()
    assert int(resumed.state.timestamp.batch) == 12  # continued from batch 3 up to max_duration
    assert os.path.isfile(tmp_path / 'ep0-ba12-rank0.pt')
    resumed.close()


def test_handlers_are_installed_for_the_run_and_restored_after_close(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    callback = SaveOnSignal(['TERM'])
    trainer = _trainer(tmp_path, max_duration='1ba', callbacks=[callback])
    assert signal.getsignal(signal.SIGTERM) == callback._on_signal
    trainer.fit()
    trainer.close()
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_run_without_the_signal_trains_to_max_duration(tmp_path):
    trainer = _trainer(tmp_path, max_duration='5ba', callbacks=[SaveOnSignal()])
    trainer.fit()
    assert int(trainer.state.timestamp.batch) == 5
    trainer.close()


def test_needs_a_save_folder():
    with pytest.raises(ConfigError, match='needs save_folder'):
        _trainer(None, callbacks=[SaveOnSignal()])


@pytest.mark.parametrize('signals, problem', [(['SIGFOO'], "unknown signal 'SIGFOO'"),
                                              (['SIGKILL'], 'cannot be caught'),
                                              ([], 'at least one signal')])
def test_bad_signal_names_are_config_errors(signals, problem):
    with pytest.raises(ConfigError, match=problem):
        SaveOnSignal(signals)


def _rank_main(rank, world_size, port, folder, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), NODE_RANK='0', MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    trainer = _trainer(folder, callbacks=[SignalAt(2, rank=1), SaveOnSignal()])
    trainer.fit()
    results.put((rank, int(trainer.state.timestamp.batch)))
    trainer.close()


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_batch(tmp_path):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context('spawn')  # fork would inherit a process group an earlier test set up
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(rank, 2, port, tmp_path, results)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():  # a hung collective: fail instead of hanging the suite
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    stopped = dict(results.get(timeout=1) for _ in procs)
    assert stopped == {0: 2, 1: 2}  # rank 0 never got the signal, yet stopped with rank 1
    assert os.path.isfile(tmp_path / 'ep0-ba2-rank0.pt')
