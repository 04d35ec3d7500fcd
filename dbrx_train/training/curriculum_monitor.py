"""Logs the curriculum every step: the phase, the proportions the schedule prescribes, the batch's actual mix."""

from __future__ import annotations

import logging

from composer.core import Callback, State
from composer.loggers import Logger

from dbrx_train.data.mixture import MixtureDataset
from dbrx_train.errors import ConfigError

log = logging.getLogger(__name__)


class CurriculumMonitor(Callback):
    """Per step: `curriculum/phase` (index), `curriculum/proportion/<stream>` (the schedule's) and
    `curriculum/batch_share/<stream>` (the global batch's); a log line when a phase begins."""

    def __init__(self, log_interval: int = 1):
        self.log_interval = log_interval
        self._dataset: MixtureDataset | None = None
        self._phase: int | None = None

    def fit_start(self, state: State, logger: Logger) -> None:
        dataset = getattr(state.train_dataloader, 'dataset', None)
        if not isinstance(dataset, MixtureDataset):
            raise ConfigError('callbacks.curriculum_monitor', 'needs a curriculum section (the train data has none)')
        self._dataset = dataset

    def batch_start(self, state: State, logger: Logger) -> None:
        step = int(state.timestamp.batch)
        schedule = self._dataset.schedule
        index = schedule.phase_index(step)
        if index != self._phase:
            phase = schedule.phases[index]
            began = 'begins' if step == phase.start else 'continues'
            log.info('curriculum: step %d: phase %d %s (%s)', step, index, began, phase.describe(schedule.streams))
            self._phase = index
        if step % self.log_interval:
            return
        counts = self._dataset.batch_counts(step)
        metrics = {'curriculum/phase': index}
        for name, share, count in zip(schedule.streams, schedule.proportions(step), counts):
            metrics[f'curriculum/proportion/{name}'] = float(share)
            metrics[f'curriculum/batch_share/{name}'] = float(count / schedule.global_batch_size)
        logger.log_metrics(metrics)
