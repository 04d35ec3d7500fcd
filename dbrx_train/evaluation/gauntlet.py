"""llm-foundry's `eval_gauntlet`: one aggregate score over the ICL tasks (the DBRX card's "Databricks Model
Gauntlet"), computed by llm-foundry's own `EvalGauntlet` callback from the evaluated metrics.

    eval_gauntlet:                 # or the path of a YAML holding `eval_gauntlet:` (llm-foundry's files)
      weighting: EQUAL
      subtract_random_baseline: true
      rescale_accuracy: true
      categories:
      - name: reading
        benchmarks:
        - {name: my_task, num_fewshot: 0, random_baseline: 0.25}   # an icl_tasks label and shot count
      averages: {core_average: [reading]}                          # default: the mean of every category

Each benchmark's accuracy, less its random baseline and rescaled by `1 - random_baseline`, is averaged
within its category; the averages are means over categories. Scores are logged and reported as
`icl/metrics/eval_gauntlet/<category or average>`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from composer import Trainer
from composer.core import Evaluator

from dbrx_train.errors import ConfigError
from dbrx_train.typed_config import load_yaml, parse, to_dict

if TYPE_CHECKING:
    from dbrx_train.evaluation.config import ICLTaskConfig


@dataclass(frozen=True)
class GauntletBenchmark:
    name: str  # an icl_tasks label
    num_fewshot: int
    random_baseline: float

    def check(self) -> None:
        if not 0 <= self.random_baseline < 1:
            raise ConfigError('random_baseline', f'must be in [0, 1), got {self.random_baseline}')


@dataclass(frozen=True)
class GauntletCategory:
    name: str
    benchmarks: list[GauntletBenchmark]


@dataclass(frozen=True)
class EvalGauntletConfig:
    categories: list[GauntletCategory]
    # llm-foundry's SAMPLE_SZ / LOG_SAMPLE_SZ weight by dataset sizes, which its own builder measures: not here.
    weighting: Literal['EQUAL'] = 'EQUAL'
    subtract_random_baseline: bool = True
    rescale_accuracy: bool = True
    averages: dict[str, list[str]] | None = None

    def check(self) -> None:
        if self.rescale_accuracy and not self.subtract_random_baseline:
            raise ConfigError('rescale_accuracy', 'needs subtract_random_baseline')
        names = [c.name for c in self.categories]
        for average, members in (self.averages or {}).items():
            if average in names:
                raise ConfigError(f'averages.{average}', 'is also a category name')
            for member in members:
                if member not in names:
                    raise ConfigError(f'averages.{average}', f'{member!r} is not a category ({", ".join(names)})')

    def check_tasks(self, tasks: Sequence[ICLTaskConfig], key: str = 'eval_gauntlet') -> None:
        """Every benchmark is an ICL task evaluated with its shot count."""
        shots = {task.label: task.num_fewshot for task in tasks}
        for i, category in enumerate(self.categories):
            for j, benchmark in enumerate(category.benchmarks):
                if benchmark.num_fewshot not in shots.get(benchmark.name, ()):
                    raise ConfigError(f'{key}.categories[{i}].benchmarks[{j}]',
                                      f'{benchmark.name}/{benchmark.num_fewshot}-shot is not among icl_tasks '
                                      f'({", ".join(f"{t}/{n}-shot" for t, ns in shots.items() for n in ns)})')


def parse_eval_gauntlet(value: Any, key: str = 'eval_gauntlet') -> EvalGauntletConfig:
    """`eval_gauntlet` given inline or as the path of a YAML with an `eval_gauntlet` section."""
    if isinstance(value, str):
        data = load_yaml(value)
        if 'eval_gauntlet' not in data:
            raise ConfigError(key, f'{value} has no eval_gauntlet section')
        value, key = data['eval_gauntlet'], f'{value}: eval_gauntlet'
    return parse(EvalGauntletConfig, value, key)


def gauntlet_scores(config: EvalGauntletConfig, trainer: Trainer, icl_evaluators: list[Evaluator]) -> dict[str, float]:
    """The aggregate scores of the ICL metrics `trainer` just evaluated, also logged to its loggers."""
    from llmfoundry.callbacks import EvalGauntlet  # seconds to import: only when evaluating

    keys = [f'metrics/{evaluator.label}/{metric}' for evaluator in icl_evaluators for metric in evaluator.metric_names]
    # EQUAL weighting needs no sizes; EvalGauntlet asks for some unless handed its enum, not the YAML's string.
    gauntlet = EvalGauntlet(logger_keys=keys, benchmark_sizes={}, **to_dict(config))
    return {key: float(value) for key, value in gauntlet.eval_after_all(trainer.state, trainer.logger).items()}
