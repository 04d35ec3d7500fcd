import json
from types import SimpleNamespace

import torch

from dbrx_train.metrics_file import MetricsFileLogger


def test_metrics_file_logger_writes_one_json_line_per_call(tmp_path):
    path = tmp_path / 'sub' / 'metrics.jsonl'
    file_logger = MetricsFileLogger(str(path))
    file_logger.init(SimpleNamespace(run_name='r'), None)
    file_logger.log_metrics({'loss/train/total': torch.tensor(2.5), 'lr': 0.1}, step=3)
    file_logger.log_metrics({'loss/train/total': 2.0}, step=4)
    file_logger.close(None, None)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [{'step': 3, 'loss/train/total': 2.5, 'lr': 0.1}, {'step': 4, 'loss/train/total': 2.0}]


def test_metrics_file_lines_are_on_disk_as_soon_as_logged(tmp_path):
    """A killed run keeps every step it logged: each line is flushed when written, not at close."""
    path = tmp_path / 'metrics.jsonl'
    file_logger = MetricsFileLogger(str(path))
    file_logger.init(SimpleNamespace(run_name='r'), None)
    for step in range(3):
        file_logger.log_metrics({'loss/train/total': 1.0 + step}, step=step)
        assert len(path.read_text().splitlines()) == step + 1
    file_logger.close(None, None)
