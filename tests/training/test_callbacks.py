import json
from types import SimpleNamespace

import pytest
import torch

from dbrx_train.training.callbacks import MetricsFileLogger, MoEMonitor


class RecordingLogger:
    def __init__(self):
        self.metrics = {}

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)


def _state(counts, batch=1, training=True):
    return SimpleNamespace(outputs=SimpleNamespace(tokens_per_expert=counts),
                           model=SimpleNamespace(training=training, modules=lambda: iter(())),
                           timestamp=SimpleNamespace(batch=batch))


def test_moe_monitor_reports_balance_per_layer_summed_over_microbatches():
    monitor, logger = MoEMonitor(), RecordingLogger()
    balanced = torch.tensor([[2, 2, 2, 2]])
    collapsed = torch.tensor([[8, 0, 0, 0]])
    # Two microbatches of one step: layer 0 balanced in both, layer 1 collapsed onto expert 0.
    for _ in range(2):
        monitor.after_forward(_state(torch.cat([balanced, collapsed])), logger)
    monitor.batch_end(_state(None), logger)
    assert logger.metrics['moe/layer_0/cv'] == pytest.approx(0.0)
    assert logger.metrics['moe/layer_0/max_load'] == pytest.approx(1.0)
    assert logger.metrics['moe/layer_1/cv'] == pytest.approx(3 ** 0.5)  # std/mean of [16,0,0,0]
    assert logger.metrics['moe/layer_1/max_load'] == pytest.approx(4.0)
    assert logger.metrics['moe/max_load'] == pytest.approx(4.0)


def test_moe_monitor_ignores_eval_forwards_and_resets_each_step():
    monitor, logger = MoEMonitor(), RecordingLogger()
    monitor.after_forward(_state(torch.tensor([[8, 0]]), training=False), logger)
    monitor.batch_end(_state(None), logger)
    assert logger.metrics == {}
    monitor.after_forward(_state(torch.tensor([[1, 1]])), logger)
    monitor.batch_end(_state(None), logger)
    assert logger.metrics['moe/max_cv'] == pytest.approx(0.0)


def test_metrics_file_logger_writes_one_json_line_per_call(tmp_path):
    path = tmp_path / 'sub' / 'metrics.jsonl'
    file_logger = MetricsFileLogger(str(path))
    file_logger.init(SimpleNamespace(run_name='r'), None)
    file_logger.log_metrics({'loss/train/total': torch.tensor(2.5), 'lr': 0.1}, step=3)
    file_logger.log_metrics({'loss/train/total': 2.0}, step=4)
    file_logger.close(None, None)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [{'step': 3, 'loss/train/total': 2.5, 'lr': 0.1}, {'step': 4, 'loss/train/total': 2.0}]
