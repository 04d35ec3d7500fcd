"""Save a checkpoint and stop cleanly when the cluster asks a job to leave.

Slurm (time limit warning, preemption, `scancel`), Kubernetes (pod eviction) and most schedulers
send SIGTERM or SIGUSR1 a little while before they kill a job. `SaveOnSignal` turns that signal
into a checkpoint written by the trainer's own `CheckpointSaver` (so `autoresume` finds it) and a
normal end of `fit()`, so the process exits 0 and the scheduler can requeue the job.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from composer.callbacks import CheckpointSaver
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist

from dbrx_train.errors import ConfigError
from dbrx_train.typed_config import parse

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SaveOnSignalConfig:
    # Names as in the `signal` module; 'SIG' may be left out ('USR1').
    signals: tuple[str, ...] = ('SIGTERM', 'SIGUSR1')

    def check(self) -> None:
        if not self.signals:
            raise ConfigError('signals', 'name at least one signal, e.g. [SIGTERM, SIGUSR1]')
        for name in self.signals:
            number = _signal_number(name)
            if number is None:
                raise ConfigError('signals', f'unknown signal {name!r}')
            if number in (signal.SIGKILL, signal.SIGSTOP):
                raise ConfigError('signals', f'{name} cannot be caught')

    @property
    def numbers(self) -> tuple[signal.Signals, ...]:
        return tuple(dict.fromkeys(_signal_number(name) for name in self.signals))


def _signal_number(name: str) -> signal.Signals | None:
    name = name.upper()
    return getattr(signal.Signals, name if name.startswith('SIG') else f'SIG{name}', None)


class SaveOnSignal(Callback):
    """On one of `signals`, checkpoint at the next batch end and end training.

    The handler only records the signal. At each batch checkpoint all ranks agree (one tiny
    all-reduce) whether any rank got it, so every rank stops after the same batch even when the
    signal reaches them at different moments, and they save the sharded checkpoint together.
    Needs `save_folder`; the trainer's `CheckpointSaver` must run after this callback, which it
    does when the trainer creates it from `save_folder`.
    """

    def __init__(self, signals: Sequence[str] = SaveOnSignalConfig.signals):
        self.config = parse(SaveOnSignalConfig, {'signals': list(signals)})
        self._received: signal.Signals | None = None
        self._stopping = False
        self._previous_handlers: dict[signal.Signals, object] = {}
        self._saver: CheckpointSaver | None = None

    def init(self, state: State, logger: Logger) -> None:
        savers = [cb for cb in state.callbacks if isinstance(cb, CheckpointSaver)]
        if not savers:
            raise ConfigError('callbacks.save_on_signal', 'needs save_folder: there is nowhere to save a checkpoint')
        self._saver = savers[0]
        if state.callbacks.index(self._saver) < state.callbacks.index(self):
            raise ConfigError('callbacks.save_on_signal', 'must come before the CheckpointSaver in the callbacks')
        interval = self._saver.save_interval
        # The saver decides at BATCH_CHECKPOINT, just after this callback: make it say yes when stopping.
        self._saver.save_interval = lambda s, event: (self._stopping and event == Event.BATCH_CHECKPOINT
                                                      ) or interval(s, event)
        for number in self.config.numbers:
            self._previous_handlers[number] = signal.signal(number, self._on_signal)
        log.info('save_on_signal: on %s, training saves a checkpoint and stops',
                 ' or '.join(s.name for s in self.config.numbers))

    def _on_signal(self, number: int, frame) -> None:
        # Only record it: the training step in progress finishes first.
        if self._received is None:
            self._received = signal.Signals(number)

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        if self._stopping or not self._any_rank_received(state):
            return
        self._stopping = True
        reason = self._received.name if self._received is not None else 'a signal on another rank'
        log.warning('save_on_signal: received %s; saving a checkpoint at batch %d and stopping training',
                    reason, int(state.timestamp.batch))
        state.stop_training()

    def fit_end(self, state: State, logger: Logger) -> None:
        if not self._stopping:
            return
        assert self._saver is not None
        saved = self._saver.saved_checkpoints[-1] if self._saver.saved_checkpoints else self._saver.folder
        log.warning('save_on_signal: checkpoint of batch %d saved (%s); training stopped, autoresume continues it',
                    int(state.timestamp.batch), saved)

    def post_close(self) -> None:
        for number, handler in self._previous_handlers.items():
            signal.signal(number, handler)
        self._previous_handlers.clear()

    def _any_rank_received(self, state: State) -> bool:
        flag = torch.tensor([int(self._received is not None)], dtype=torch.int32)
        if dist.get_world_size() > 1:
            flag = state.device.tensor_to_device(flag)
            dist.all_reduce(flag, reduce_operation='MAX')
        return bool(flag.item())
