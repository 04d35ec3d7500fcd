"""Curriculum data-mix schedules: which share of each stream every training step draws.

The YAML names phases in order; each lasts a duration (`ba` batches, `sp` samples, `tok` tokens,
or `dur`, a fraction of `max_duration`) and gives the proportions of the streams named in
`train_loader.dataset.streams`. A phase may open with a `transition`: over that span its
proportions move linearly from the previous phase's to its own; otherwise the switch is hard.

    curriculum:
      phases:
        text_heavy: {duration: 0.5dur, proportions: {text: 0.9, code: 0.1}}
        more_code: {duration: 0.5dur, proportions: {text: 0.4, code: 0.6}, transition: 0.25dur}

`resolve_schedule` turns that into whole steps once (`Schedule`); `dbrx_train.data.mixture`
draws the samples. Check a YAML's schedule before a long run (`dbrx_train.curriculum`):

    python -m dbrx_train.curriculum yamls/pretrain/dbrx-tiny.yaml [key=value ...] [--png mix.png]
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dbrx_train.errors import ConfigError

if TYPE_CHECKING:
    from dbrx_train.data.text_dataset import TextDatasetConfig

log = logging.getLogger(__name__)

_DURATION = re.compile(r'^\s*((?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*(ba|sp|tok|dur)\s*$')
_SUM_TOLERANCE = 1e-6


def parse_duration(text: str, key: str, units: tuple[str, ...] = ('ba', 'sp', 'tok', 'dur')) -> tuple[Fraction, str]:
    """`'0.5dur'` -> (Fraction(1, 2), 'dur'); whole, positive counts for ba/sp/tok; dur in (0, 1]."""
    match = _DURATION.match(text)
    if match is None or match.group(2) not in units:
        examples = {'ba': '60ba', 'sp': '480sp', 'tok': '2e9tok', 'dur': '0.5dur'}
        raise ConfigError(key, f'{text!r} is not a duration like {", ".join(examples[u] for u in units)}')
    value, unit = Fraction(match.group(1)), match.group(2)
    if value <= 0:
        raise ConfigError(key, f'{text!r} must be positive')
    if unit == 'dur' and value > 1:
        raise ConfigError(key, f'{text!r} is more than the whole max_duration (1dur)')
    if unit != 'dur' and value.denominator != 1:
        raise ConfigError(key, f'{text!r} is not a whole number of {unit}')
    return value, unit


@dataclass(frozen=True)
class PhaseConfig:
    """One phase of `curriculum.phases` (keyed by its name)."""

    duration: str
    proportions: dict[str, float]  # stream -> share; streams left out get none
    transition: str | None = None  # ramp from the previous phase's mix over this much of the phase's start

    def check(self) -> None:
        parse_duration(self.duration, 'duration')
        if self.transition is not None:
            parse_duration(self.transition, 'transition')
        for stream, share in self.proportions.items():
            if share < 0 or not math.isfinite(share):
                raise ConfigError(f'proportions.{stream}', f'must be a non-negative number, got {share}')
        if not sum(self.proportions.values()) > 0:
            raise ConfigError('proportions', 'give at least one stream a positive share')


@dataclass(frozen=True)
class CurriculumConfig:
    """`curriculum`: the phases, in training order."""

    phases: dict[str, PhaseConfig]

    def check(self) -> None:
        if not self.phases:
            raise ConfigError('phases', 'a curriculum needs at least one phase')
        first = next(iter(self.phases))
        if self.phases[first].transition is not None:
            raise ConfigError(f'phases.{first}.transition', 'the first phase has no previous mix to move from')


@dataclass(frozen=True)
class Phase:
    """A phase in whole steps: it runs over [start, end); its first `ramp` steps blend in from the previous mix."""

    name: str
    start: int
    end: int
    ramp: int
    proportions: tuple[float, ...]  # in `Schedule.streams` order, summing to 1

    def describe(self, streams: tuple[str, ...]) -> str:
        mix = ' '.join(f'{s} {p:.4g}' for s, p in zip(streams, self.proportions))
        ramp = f', ramp {self.ramp} steps' if self.ramp else ''
        return f'{self.name!r}: steps {self.start}-{self.end - 1}{ramp}, {mix}'

    def to_state(self, streams: tuple[str, ...]) -> dict[str, Any]:
        """Plain values for a checkpoint; proportions keyed by stream."""
        return {'name': self.name, 'start': self.start, 'end': self.end, 'ramp': self.ramp,
                'proportions': dict(zip(streams, self.proportions))}

    @staticmethod
    def describe_state(state: dict[str, Any]) -> str:
        phase = Phase(state['name'], state['start'], state['end'], state['ramp'], tuple(state['proportions'].values()))
        return phase.describe(tuple(state['proportions']))


@dataclass(frozen=True)
class Schedule:
    """The resolved curriculum: the stream proportions at every step."""

    streams: tuple[str, ...]
    phases: tuple[Phase, ...]
    global_batch_size: int
    seq_len: int

    @property
    def total_steps(self) -> int:
        return self.phases[-1].end

    def phase_index(self, step: int) -> int:
        """The phase running at `step`; past the end, the last one keeps going."""
        return max(0, bisect.bisect_right([p.start for p in self.phases], step) - 1)

    def proportions(self, step: int) -> np.ndarray:
        index = self.phase_index(step)
        return self._mix(index, np.array([step - self.phases[index].start]))[0]

    def proportions_table(self) -> np.ndarray:
        """(total_steps, streams): the proportions of every step."""
        return np.concatenate([self._mix(i, np.arange(p.end - p.start)) for i, p in enumerate(self.phases)])

    def _mix(self, index: int, into: np.ndarray) -> np.ndarray:
        """Proportions `into` steps after phase `index` began, one row each."""
        phase = self.phases[index]
        target = np.array(phase.proportions)
        if not phase.ramp:
            return np.tile(target, (len(into), 1))
        # At each step's midpoint: a ramp of n steps spends on average exactly half-way between the two mixes.
        weight = np.minimum((into + 0.5) / phase.ramp, 1.0)[:, None]
        return (1 - weight) * np.array(self.phases[index - 1].proportions) + weight * target

    def check_resumable(self, saved: list[dict[str, Any]], step: int) -> None:
        """Refuses a change to a phase the checkpoint at `step` had started (phases not yet started may change)."""
        for index, old in enumerate(saved):
            if old['start'] >= step:
                return
            new = self.phases[index].to_state(self.streams) if index < len(self.phases) else None
            if new is not None and _without_zeros(new) == _without_zeros(old):  # streams added since are fine
                continue
            now = 'now gone' if new is None else f'now {self.phases[index].describe(self.streams)}'
            state = 'had ended' if old['end'] <= step else 'was running'
            raise ConfigError(f"curriculum.phases.{old['name']}",
                              f'this phase {state} at the checkpoint (step {step}), so it cannot change on resume '
                              f'(was {Phase.describe_state(old)}; {now})')


def _without_zeros(state: dict[str, Any]) -> dict[str, Any]:
    return {**state, 'proportions': {s: p for s, p in state['proportions'].items() if p}}


def resolve_schedule(curriculum: CurriculumConfig, dataset: TextDatasetConfig, max_duration: str,
                     global_batch_size: int, seq_len: int) -> Schedule:
    """Whole-step phases from the YAML; every violation is one `ConfigError` naming its key."""
    streams = tuple(dataset.streams)
    if not streams:
        raise ConfigError('curriculum', 'needs named train_loader.dataset.streams to mix')
    for name, stream in dataset.streams.items():
        for weight in ('proportion', 'repeat', 'choose'):
            if getattr(stream, weight) is not None:
                raise ConfigError(f'train_loader.dataset.streams.{name}.{weight}',
                                  'the curriculum sets the mix; remove this key')
    samples_per_step = Fraction(global_batch_size)
    per_unit = {'ba': Fraction(1), 'sp': 1 / samples_per_step, 'tok': 1 / (samples_per_step * seq_len)}
    amount, unit = parse_duration(max_duration, 'max_duration', ('ba', 'sp', 'tok'))
    total = amount * per_unit[unit]

    def steps(text: str, key: str) -> Fraction:
        value, unit = parse_duration(text, key)
        return value * total if unit == 'dur' else value * per_unit[unit]

    phases: list[Phase] = []
    covered = Fraction(0)
    for name, phase in curriculum.phases.items():
        key = f'curriculum.phases.{name}'
        for stream in phase.proportions:
            if stream not in streams:
                raise ConfigError(f'{key}.proportions.{stream}', f'no such stream (streams: {", ".join(streams)})')
        start = phases[-1].end if phases else 0
        covered += steps(phase.duration, f'{key}.duration')
        end = math.ceil(covered)  # the step where its last sample or token is reached, as Composer counts
        if end <= start:
            raise ConfigError(f'{key}.duration', f'{phase.duration} ends within the step of the previous phase '
                                                 f'(a step is {global_batch_size} samples of {seq_len} tokens)')
        ramp = math.ceil(steps(phase.transition, f'{key}.transition')) if phase.transition else 0
        if ramp > end - start:
            raise ConfigError(f'{key}.transition', f'{phase.transition} ({ramp} steps) is longer than the phase '
                                                   f'({end - start} steps)')
        shares = np.array([phase.proportions.get(s, 0.0) for s in streams], dtype=np.float64)
        if abs(shares.sum() - 1) > _SUM_TOLERANCE:
            log.warning('%s.proportions add up to %.6g; normalised to 1', key, shares.sum())
        phases.append(Phase(name, start, end, ramp, tuple(float(p) for p in shares / shares.sum())))
    if covered != total:
        raise ConfigError('curriculum.phases', f'the phases add up to {_steps_text(covered)} steps but max_duration '
                                               f'{max_duration} is {_steps_text(total)} steps; they must cover it '
                                               'exactly')
    return Schedule(streams, tuple(phases), global_batch_size, seq_len)


def _steps_text(steps: Fraction) -> str:
    return str(steps.numerator) if steps.denominator == 1 else f'{float(steps):.6g}'


# --- the command: print or plot a YAML's schedule ----------------------------------------------


def schedule_table(schedule: Schedule) -> str:
    """One row per phase: steps, tokens, ramp, proportions."""
    tokens_per_step = schedule.global_batch_size * schedule.seq_len
    rows = [['phase', 'steps', 'tokens', 'ramp', *schedule.streams]]
    for phase in schedule.phases:
        rows.append([phase.name, f'{phase.start}-{phase.end - 1}',
                     f'{phase.start * tokens_per_step:,}-{phase.end * tokens_per_step:,}',
                     f'{phase.ramp}ba' if phase.ramp else '-', *(f'{p:.3f}' for p in phase.proportions)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return '\n'.join('  '.join([row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])])
                     for row in rows)


def plot_schedule(schedule: Schedule, path: str | Path, title: str = '') -> None:
    """A stacked-area PNG of the proportions per step, phases marked; written atomically."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    table = schedule.proportions_table()
    table = np.vstack([table, table[-1:]])  # 'post' steps: the last one drawn up to total_steps
    steps = np.arange(schedule.total_steps + 1)
    figure, axes = plt.subplots(figsize=(9, 3.6), dpi=120)
    axes.stackplot(steps, table.T, labels=schedule.streams, step='post', alpha=0.85)
    for phase in schedule.phases:
        if phase.start:
            axes.axvline(phase.start, color='black', linewidth=0.8, linestyle='--')
        if phase.ramp:
            axes.axvspan(phase.start, phase.start + phase.ramp, color='white', alpha=0.25, linewidth=0)
        axes.text((phase.start + phase.end) / 2, 1.02, phase.name, ha='center', va='bottom', fontsize=9)
    axes.set(xlim=(0, schedule.total_steps), ylim=(0, 1), xlabel='step', ylabel='share of samples')
    axes.set_title(title, pad=18, fontsize=10)
    axes.legend(loc='center left', bbox_to_anchor=(1.01, 0.5), frameon=False)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.png')
    os.close(handle)
    try:
        figure.savefig(tmp, format='png')
        os.replace(tmp, path)
    finally:
        plt.close(figure)
        if os.path.exists(tmp):
            os.remove(tmp)
