"""A Composer logger that appends every metric to a JSON-lines file (training and evaluation)."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from composer.core import State
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist


class MetricsFileLogger(LoggerDestination):
    """Appends every logged metric to a JSON-lines file, one line per step: easy to plot and to diff.

    Only rank 0 writes. Each line is flushed as it is written, so a killed run keeps what it logged.
    """

    def __init__(self, path: str = '{run_name}/metrics.jsonl'):
        self.path_template = path
        self._file = None

    def init(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() != 0:
            return
        path = self.path_template.format(run_name=state.run_name)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._file = open(path, 'a', encoding='utf-8')

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self._file is None:
            return
        values = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
        self._file.write(json.dumps({'step': step, **values}) + '\n')
        self._file.flush()

    def close(self, state: State, logger: Logger) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
