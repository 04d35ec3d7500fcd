"""The demo YAML's curriculum end to end: logged every step, the same in two processes.

At 6 steps the demo's phases are text_heavy (steps 0-2) and more_code (3-5, ramping over 3-4).
(Killed and resumed exactly at the phase boundary: test_autoresume.py. Refusing a changed phase on
resume is test_mixture.py's.)
"""

from __future__ import annotations

import pytest

from tests.training.conftest import curriculum_log

STEPS = 6
BOUNDARY = 3


def test_phase_and_live_proportions_are_logged_every_step(reference):
    output = (reference / 'output.txt').read_text()
    logged = curriculum_log(reference / 'metrics.jsonl')
    assert sorted(logged) == list(range(STEPS))
    assert [logged[t][0] for t in range(STEPS)] == [0, 0, 0, 1, 1, 1]
    expected_text = [0.9, 0.9, 0.9, 0.9 - 0.6 * 0.25, 0.9 - 0.6 * 0.75, 0.3]  # a 2-step ramp, then 0.3
    for step, (_, text, code, _) in logged.items():
        assert text == pytest.approx(expected_text[step]) and text + code == pytest.approx(1.0)
    # 4 samples a step: 10.8 text samples due in phase 0 and 6.0 in phase 1, each within one sample.
    text_samples = [round(4 * logged[t][3]) for t in range(STEPS)]
    assert abs(sum(text_samples[:BOUNDARY]) - 10.8) <= 1 and abs(sum(text_samples[BOUNDARY:]) - 6.0) <= 1
    assert "step 0: phase 0 begins ('text_heavy'" in output
    assert "step 3: phase 1 begins ('more_code': steps 3-5, ramp 2 steps, text 0.3 code 0.7)" in output


def test_two_processes_follow_the_same_curriculum(reference, reference_two_ranks):
    assert curriculum_log(reference_two_ranks / 'metrics.jsonl') == curriculum_log(reference / 'metrics.jsonl')
