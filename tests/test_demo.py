"""The demo's closing summary reads the metrics file the trainer writes."""

import json

from dbrx_train.demo import training_summary


def test_summary_reports_loss_per_phase_and_median_speed(tmp_path):
    records = [{'step': 0, 'time/epoch': 0}]
    for step in range(6):
        phase = 0 if step < 3 else 1
        records += [{'step': step, 'curriculum/phase': phase},
                    {'step': step, 'loss/train/lm': 10.0 - step, 'loss/train/total': 10.1 - step},
                    {'step': step, 'throughput/tokens_per_sec': 100.0 * (step + 1), 'throughput/device/mfu': 0.1}]
    metrics = tmp_path / 'metrics.jsonl'
    metrics.write_text(''.join(json.dumps(r) + '\n' for r in records))
    lines = training_summary(metrics, window=2).splitlines()
    assert lines[1] == '  phase 0: 9.500 -> 8.500 over 3 steps'
    assert lines[2] == '  phase 1: 6.500 -> 5.500 over 3 steps'
    assert lines[3] == '  speed: 350 tokens/s, MFU 10.0% of the measured fp32 matmul peak (medians)'
