"""Curriculum schedules: durations to steps, proportions per step, validation, resume rules, the command."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import yaml

from dbrx_train.errors import ConfigError
from dbrx_train.training.config import TrainConfig
from dbrx_train.typed_config import load_yaml, parse
from tests.training.conftest import CONFIG

# 4 samples of 32 tokens a step: 128 tokens a step; 100 steps in all.
SMALL = ['global_train_batch_size=4', 'max_seq_len=32', 'model.max_seq_len=32', 'max_duration=100ba']


def config(*overrides: str, phases: str | None = None) -> TrainConfig:
    """The demo YAML, small; `phases` (YAML text) replaces its phases (an override would merge into them)."""
    data = load_yaml(CONFIG, [*SMALL, *overrides])
    if phases is not None:
        data['curriculum'] = {'phases': yaml.safe_load(phases)}
    return parse(TrainConfig, data)


def test_durations_in_tokens_batches_samples_and_fractions_become_whole_steps():
    schedule = config(phases=('{warm: {duration: 1280tok, proportions: {text: 1}},'
                              ' half: {duration: 0.5dur, proportions: {text: 0.5, code: 0.5}},'
                              ' rest: {duration: 160sp, proportions: {code: 1}, transition: 0.1dur}}')).schedule
    assert schedule.streams == ('text', 'code')
    assert [(p.name, p.start, p.end, p.ramp) for p in schedule.phases] == [
        ('warm', 0, 10, 0), ('half', 10, 60, 0), ('rest', 60, 100, 10)]
    assert schedule.total_steps == 100
    assert [p.proportions for p in schedule.phases] == [(1.0, 0.0), (0.5, 0.5), (0.0, 1.0)]


def test_hard_switches_and_a_linear_ramp_over_the_stated_span():
    schedule = config(phases=('{a: {duration: 30ba, proportions: {text: 0.8, code: 0.2}},'
                              ' b: {duration: 30ba, proportions: {text: 0.2, code: 0.8}},'
                              ' c: {duration: 40ba, proportions: {text: 0.6, code: 0.4}, transition: 20ba}}')).schedule
    table = schedule.proportions_table()
    assert table.shape == (100, 2)
    np.testing.assert_allclose(table.sum(axis=1), 1.0)
    np.testing.assert_allclose(table[:30], [[0.8, 0.2]] * 30)
    np.testing.assert_allclose(table[30:60], [[0.2, 0.8]] * 30)  # hard switch at step 30
    ramp = table[60:80, 0]
    np.testing.assert_allclose(ramp, 0.2 + 0.4 * (np.arange(20) + 0.5) / 20)  # step midpoints on the line
    assert np.all(np.diff(ramp) > 0)
    np.testing.assert_allclose(table[80:], [[0.6, 0.4]] * 20)
    assert [schedule.phase_index(t) for t in (0, 29, 30, 59, 60, 99, 150)] == [0, 0, 1, 1, 2, 2, 2]
    np.testing.assert_allclose(schedule.proportions(150), [0.6, 0.4])  # past the end the last mix goes on


def test_proportions_not_summing_to_one_are_normalised_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger='dbrx_train.data.curriculum'):
        schedule = config(phases='{only: {duration: 1dur, proportions: {text: 3, code: 1}}}').schedule
    assert schedule.phases[0].proportions == (0.75, 0.25)
    assert 'curriculum.phases.only.proportions add up to 4; normalised to 1' in caplog.text


BAD_PHASES = [
    ('{a: {duration: 1dur, proportions: {text: 0.5, cod: 0.5}}}',
     'curriculum.phases.a.proportions.cod: no such stream (streams: text, code)'),
    ('{a: {duration: 1dur, proportions: {text: 1.5, code: -0.5}}}',
     'curriculum.phases.a.proportions.code: must be a non-negative number, got -0.5'),
    ('{a: {duration: 1dur, proportions: {text: 0, code: 0}}}',
     'curriculum.phases.a.proportions: give at least one stream a positive share'),
    ('{a: {duration: 40ba, proportions: {text: 1}}, b: {duration: 50ba, proportions: {code: 1}}}',
     'curriculum.phases: the phases add up to 90 steps but max_duration 100ba is 100 steps'),
    ('{a: {duration: 0.6dur, proportions: {text: 1}}, b: {duration: 0.5dur, proportions: {code: 1}}}',
     'curriculum.phases: the phases add up to 110 steps'),
    ('{a: {duration: 1dur, proportions: {text: 1}, transition: 5ba}}',
     'curriculum.phases.a.transition: the first phase has no previous mix to move from'),
    ('{a: {duration: 90ba, proportions: {text: 1}}, b: {duration: 10ba, proportions: {code: 1}, transition: 11ba}}',
     'curriculum.phases.b.transition: 11ba (11 steps) is longer than the phase (10 steps)'),
    ('{a: {duration: 60 batches, proportions: {text: 1}}}',
     "curriculum.phases.a.duration: '60 batches' is not a duration like 60ba, 480sp, 2e9tok, 0.5dur"),
    ('{a: {duration: 1.5dur, proportions: {text: 1}}}',
     "curriculum.phases.a.duration: '1.5dur' is more than the whole max_duration (1dur)"),
    ('{a: {duration: 2.5ba, proportions: {text: 1}}}', "curriculum.phases.a.duration: '2.5ba' is not a whole number"),
    ('{a: {duration: 64tok, proportions: {text: 1}}, b: {duration: 64tok, proportions: {code: 1}},'
     ' c: {duration: 12672tok, proportions: {code: 1}}}',
     'curriculum.phases.b.duration: 64tok ends within the step of the previous phase'),
    ('{}', 'curriculum.phases: a curriculum needs at least one phase'),
]
BAD_OVERRIDES = [
    ('train_loader.dataset.streams.code.proportion=0.5',
     'train_loader.dataset.streams.code.proportion: the curriculum sets the mix; remove this key'),
    ('max_duration=2ep', "max_duration: '2ep' is not a duration like 60ba, 480sp, 2e9tok"),
    ('curriculum.phases.more_code.duration=60', 'curriculum.phases.more_code.duration: expected a string'),
]


BAD = [(p, None, e) for p, e in BAD_PHASES] + [(None, o, e) for o, e in BAD_OVERRIDES]


@pytest.mark.parametrize(('phases', 'override', 'expected'), BAD, ids=[f'{i}-{e.split(":")[0]}' for i, (*_, e) in
                                                                        enumerate(BAD)])
def test_a_bad_curriculum_is_one_line_naming_the_key(phases, override, expected):
    with pytest.raises(ConfigError) as error:
        config(*([override] if override else []), phases=phases)
    message = str(error.value)
    assert expected in message and '\n' not in message, message


def test_resume_refuses_changes_to_started_phases_and_accepts_changes_to_later_ones():
    spec = '{a: {duration: 30ba, proportions: {text: 0.8, code: 0.2}}, b: {duration: 30ba, proportions: {code: 1}},' \
           ' c: {duration: 40ba, proportions: {text: 1}, transition: 10ba}}'
    saved = [p.to_state(('text', 'code')) for p in config(phases=spec).schedule.phases]

    def resumed(new_spec: str, step: int) -> None:
        config(phases=new_spec).schedule.check_resumable(saved, step)

    resumed(spec, 45)
    later = spec.replace('{text: 1}, transition: 10ba', '{text: 0.5, code: 0.5}, transition: 20ba')
    resumed(later, 45)  # c has not started
    resumed(later, 60)  # ... not even at its first step: b has just ended
    with pytest.raises(ConfigError, match=r'^curriculum.phases.c: this phase was running at the checkpoint \(step 61'):
        resumed(later, 61)
    changed_b = spec.replace('{code: 1}', '{text: 0.1, code: 0.9}')
    with pytest.raises(ConfigError, match=r'^curriculum.phases.b: this phase was running .* \(was .b.: steps 30-59'):
        resumed(changed_b, 45)
    longer_a = spec.replace('a: {duration: 30ba', 'a: {duration: 31ba')
    longer_a = longer_a.replace('c: {duration: 40ba', 'c: {duration: 39ba')
    with pytest.raises(ConfigError, match=r'^curriculum.phases.a: this phase had ended at the checkpoint \(step 45\)'):
        resumed(longer_a, 45)
    # A finished run may go on with a new phase after the old ones (here with a longer max_duration).
    extended = config('max_duration=120ba', phases=spec[:-1] + ', d: {duration: 20ba, proportions: {code: 1}}}')
    extended.schedule.check_resumable(saved, 100)
    # ... or with a new stream, which the finished phases did not use.
    more_streams = config('max_duration=120ba', 'train_loader.dataset.streams.docs.local=data/docs',
                          phases=spec[:-1] + ', d: {duration: 20ba, proportions: {docs: 1}}}')
    more_streams.schedule.check_resumable(saved, 100)
