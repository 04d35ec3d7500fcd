from types import SimpleNamespace

import pytest
import torch

from dbrx_train.model.dbrx import LossOutput
from dbrx_train.training.callbacks import MoEMonitor


class RecordingLogger:
    def __init__(self):
        self.metrics = {}

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)


def _state(counts, batch=1, training=True):
    zero = torch.tensor(0.0)
    outputs = None if counts is None else LossOutput(loss=zero, lm_loss=zero, aux_loss=zero, tokens_per_expert=counts)
    return SimpleNamespace(outputs=outputs,
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


def test_moe_monitor_fails_loudly_when_the_training_output_is_not_a_loss_output():
    state = _state(None)
    state.outputs = SimpleNamespace(tokens_per_expert=torch.tensor([[1, 1]]))  # duck-typed: not accepted
    with pytest.raises(TypeError, match='moe_monitor reads the LossOutput of DbrxLM.loss; the training forward '
                                        'pass returned SimpleNamespace'):
        MoEMonitor().after_forward(state, RecordingLogger())
