"""The demo YAML's curriculum end to end: logged every step, resumed exactly at a phase boundary, two processes.

At 6 steps the demo's phases are text_heavy (steps 0-2) and more_code (3-5, ramping over 3-4);
checkpoints every 3 steps put one exactly on the boundary. (A mid-phase kill is test_train.py's:
it checkpoints every 2 steps on the same YAML. Refusing a changed phase on resume is test_mixture.py's.)
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from tests.training.conftest import launch, losses, run, tiny_overrides

STEPS = 6
BOUNDARY = 3


def curriculum_args(corpus, run_dir, **extra) -> list[str]:
    return tiny_overrides(corpus, run_dir, save_interval=f'{BOUNDARY}ba', python_log_level='info', **extra)


def curriculum_log(metrics_file) -> dict[int, tuple]:
    """Step -> (phase, text proportion, code proportion, text share of the batch)."""
    keys = ('curriculum/phase', 'curriculum/proportion/text', 'curriculum/proportion/code',
            'curriculum/batch_share/text')
    columns = [losses(metrics_file, key) for key in keys]
    return {step: tuple(column[step] for column in columns) for step in columns[0]}


@pytest.fixture(scope='module')
def reference(tiny_corpus, tmp_path_factory):
    """An uninterrupted one-process run: what the other runs must reproduce."""
    run_dir = tmp_path_factory.mktemp('curriculum-reference')
    output = run(curriculum_args(tiny_corpus, run_dir))
    return run_dir, output


def test_phase_and_live_proportions_are_logged_every_step(reference):
    run_dir, output = reference
    logged = curriculum_log(run_dir / 'metrics.jsonl')
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


def test_killed_at_a_phase_boundary_autoresumes_with_the_same_losses_and_mix(tiny_corpus, reference, tmp_path):
    args = curriculum_args(tiny_corpus, tmp_path)
    proc = launch(args)
    deadline = time.monotonic() + 240
    while not (tmp_path / 'checkpoints' / 'latest-rank0.pt').exists():  # linked once a save is complete
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, 'no checkpoint appeared'
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(losses(tmp_path / 'metrics.jsonl'), default=-1) < STEPS - 1, 'the run finished before the kill'

    lines_before = len((tmp_path / 'metrics.jsonl').read_text().splitlines())
    output = run(args)
    after = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()[lines_before:]]
    assert min(r['step'] for r in after if 'loss/train/lm' in r) == BOUNDARY, 'did not resume at the boundary'
    assert f"step {BOUNDARY}: phase 1 begins" in output
    expected, resumed = losses(reference[0] / 'metrics.jsonl'), losses(tmp_path / 'metrics.jsonl')
    assert sorted(resumed) == sorted(expected)
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6), step
    assert curriculum_log(tmp_path / 'metrics.jsonl') == curriculum_log(reference[0] / 'metrics.jsonl')


def test_two_processes_follow_the_same_curriculum(tiny_corpus, reference, tmp_path):
    run(curriculum_args(tiny_corpus, tmp_path), processes=2, log_dir=tmp_path)
    one, two = losses(reference[0] / 'metrics.jsonl'), losses(tmp_path / 'metrics.jsonl')
    assert sorted(two) == sorted(one)
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step
    assert curriculum_log(tmp_path / 'metrics.jsonl') == curriculum_log(reference[0] / 'metrics.jsonl')
    assert (tmp_path / 'rank1.out').exists()
