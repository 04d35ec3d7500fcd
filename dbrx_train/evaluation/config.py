"""The evaluation YAML and llm-foundry's `icl_tasks` list, as typed configs.

An `icl_tasks` value is what llm-foundry users already have: a list of tasks, or the path of a
YAML holding one under `icl_tasks:`. Every task is checked against llm-foundry's own registry
(its task types, the options each task type's dataset takes, its metrics) before anything slow.
"""

from __future__ import annotations

import difflib
import inspect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal

from dbrx_train.chat_template import TokenizerConfig
from dbrx_train.composer_model import generation_options, icl_metrics
from dbrx_train.data import LoaderConfig
from dbrx_train.errors import ConfigError, check_local_path
from dbrx_train.evaluation.gauntlet import EvalGauntletConfig, parse_eval_gauntlet
from dbrx_train.foundry_yaml import FoundryModelConfig
from dbrx_train.model.config import ModelConfig, Quantization
from dbrx_train.typed_config import load_yaml, parse
from dbrx_train.uri import is_remote

log = logging.getLogger(__name__)

# Keys llm-foundry's builder reads itself; every other set key goes to the task type's dataset class.
_BUILDER_KEYS = frozenset({'label', 'dataset_uri', 'icl_task_type', 'num_fewshot', 'metric_names', 'batch_size',
                           'has_categories', 'hf_loading_vars', 'hf_parsing_map', 'question_prelimiter'})


@dataclass(frozen=True)
class ICLTaskConfig:
    """One entry of llm-foundry's `icl_tasks` (same keys; unset options keep llm-foundry's defaults)."""

    label: str
    dataset_uri: str  # a JSONL file in the task type's format, a remote URI, or hf://dataset
    icl_task_type: str  # multiple_choice, schema, language_modeling, generation_task_with_answers
    num_fewshot: list[int]  # one evaluation per entry, labelled <label>/<n>-shot
    metric_names: list[str] | None = None  # default: the task type's accuracy
    max_seq_len: int | None = None  # default: icl_seq_len
    batch_size: int | None = None  # default: device_eval_batch_size
    has_categories: bool = False  # one evaluation per value of the examples' `category`
    prompt_string: str | None = None
    example_delimiter: str | None = None
    continuation_delimiter: str | None = None
    prelimiter: str | None = None
    question_prelimiter: str | None = None  # llm-foundry's older name of prelimiter
    context_key: str | None = None
    answer_key: str | None = None
    choices_key: str | None = None
    fewshot_random_seed: int | None = None
    strip_dataset: bool | None = None
    early_stopping_criteria: list[str] | None = None  # generation stops at (and is cut before) these
    do_normalization: bool | None = None
    cot_delimiter: str | None = None
    generation_kwargs: dict[str, Any] | None = None
    hf_loading_vars: dict[str, Any] | None = None
    hf_parsing_map: dict[str, list[str]] | None = None

    def check(self) -> None:
        from llmfoundry import registry  # seconds to import: only once there are ICL tasks

        task_types = registry.icl_datasets.get_all()
        if self.icl_task_type not in task_types:
            close = difflib.get_close_matches(self.icl_task_type, list(task_types), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ''
            raise ConfigError('icl_task_type', f'unknown task type {self.icl_task_type!r}{hint}; llm-foundry has '
                                               f'{", ".join(map(repr, task_types))}')
        accepted = inspect.signature(task_types[self.icl_task_type]).parameters
        for name in self.options():
            if name not in _BUILDER_KEYS and name not in accepted:
                raise ConfigError(name, f'is not an option of {self.icl_task_type} tasks')
        if not self.num_fewshot or any(n < 0 for n in self.num_fewshot):
            raise ConfigError('num_fewshot', f'must be a non-empty list of counts >= 0, got {self.num_fewshot}')
        for name in ('max_seq_len', 'batch_size'):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(name, f'must be at least 1, got {getattr(self, name)}')
        if self.prelimiter is not None and self.question_prelimiter is not None:
            raise ConfigError('question_prelimiter', 'is the older name of prelimiter: give one of them')
        known_metrics = list(icl_metrics())
        for name in self.metric_names or ():
            if name not in known_metrics:
                raise ConfigError('metric_names', f'unknown metric {name!r}; the model reports {", ".join(known_metrics)}')
        try:
            generation_options(self.generation_kwargs or {})
        except ValueError as e:
            raise ConfigError('generation_kwargs', str(e)) from None
        if not is_remote(self.dataset_uri) and not Path(self.dataset_uri).is_file():
            raise ConfigError('dataset_uri', f'task file not found: {self.dataset_uri}')

    def options(self) -> dict[str, Any]:
        """The task as llm-foundry's `build_icl_evaluators` takes it: the keys that are set."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: value for name, value in values.items() if value is not None}


def parse_icl_tasks(value: Any, key: str = 'icl_tasks') -> tuple[ICLTaskConfig, ...]:
    """`icl_tasks` given inline (a list) or as the path of a YAML with an `icl_tasks` list."""
    if isinstance(value, str):
        data = load_yaml(value)
        if 'icl_tasks' not in data:
            raise ConfigError(key, f'{value} has no icl_tasks list')
        value, key = data['icl_tasks'], f'{value}: icl_tasks'
    if not isinstance(value, list) or not value:
        raise ConfigError(key, 'expected a non-empty list of tasks or the path of a YAML holding one')
    tasks = tuple(parse(ICLTaskConfig, task, f'{key}[{i}]') for i, task in enumerate(value))
    labels = [task.label for task in tasks]
    for i, label in enumerate(labels):
        if label in labels[:i]:
            raise ConfigError(f'{key}[{i}].label', f'{label!r} is used by an earlier task')
    return tasks


# A list of tasks, or the path of a YAML holding one, parsed into the tasks.
ICLTasks = Annotated[tuple[ICLTaskConfig, ...] | None, parse_icl_tasks]


def check_icl_seq_lens(tasks: Sequence[ICLTaskConfig], icl_seq_len: int | None, model_max_seq_len: int) -> None:
    """No ICL example may be longer than the positions the model was trained for."""
    if icl_seq_len is not None and not 1 <= icl_seq_len <= model_max_seq_len:
        raise ConfigError('icl_seq_len', f'must be in 1..{model_max_seq_len} (the model max_seq_len), got {icl_seq_len}')
    for task in tasks:
        if task.max_seq_len is not None and task.max_seq_len > model_max_seq_len:
            raise ConfigError('icl_tasks', f'task {task.label!r}: max_seq_len {task.max_seq_len} exceeds the model '
                                           f'max_seq_len ({model_max_seq_len})')


# llm-foundry's eval YAML keys with no effect in a one-process CPU/GPU evaluation here, dropped with a note.
_FOUNDRY_EVAL_NOTED = ('fsdp_config', 'dist_timeout', 'icl_seq_len_per_model')


def translate_eval_yaml(data: Mapping) -> Mapping:
    """llm-foundry's eval YAML (`models: [{model_name, model: {name: hf_causal_lm, ...}, tokenizer}]`) in
    this schema: its one model's `pretrained_model_name_or_path` is the checkpoint evaluated."""
    if 'models' not in data:
        return data
    out = {k: v for k, v in data.items() if k not in ('models', *_FOUNDRY_EVAL_NOTED)}
    for key in _FOUNDRY_EVAL_NOTED:
        if key in data:
            log.warning('llm-foundry eval YAML: %s has no effect here', key)
    models = data['models']
    if not isinstance(models, list) or len(models) != 1:
        raise ConfigError('models', 'give one model (run eval.py once per model)')
    entry = models[0]
    if not isinstance(entry, Mapping) or 'model' not in entry:
        raise ConfigError('models[0].model', 'required key is missing')
    for key in entry:
        if key not in ('model_name', 'model', 'tokenizer'):
            raise ConfigError(f'models[0].{key}', 'not supported here (model_name, model, tokenizer)')
    model = parse(FoundryModelConfig, entry['model'], 'models[0].model')
    if model.config_overrides or model.peft_config is not None:
        raise ConfigError('models[0].model', 'config_overrides and peft_config do not apply to evaluating a saved '
                                             'model: export the fine-tuned model and evaluate that')
    if 'checkpoint' in data:
        raise ConfigError('checkpoint', 'give models (llm-foundry) or checkpoint, not both')
    out['checkpoint'] = str(check_local_path('models[0].model.pretrained_model_name_or_path',
                                             model.pretrained_model_name_or_path, 'model'))
    parse(TokenizerConfig, entry.get('tokenizer', {}), 'models[0].tokenizer')  # a DBRX name, or one clear line
    out.setdefault('run_name', entry.get('model_name') or 'dbrx-eval')
    return out


@dataclass(frozen=True)
class EvalConfig:
    """`dbrx_train/eval.py`'s YAML. Key names are llm-foundry's eval YAML's wherever it has one."""

    checkpoint: str  # what `load_pretrained` reads: a save_folder, a checkpoint, a transformers directory
    eval_loader: LoaderConfig | None = None  # held-out MDS streams: perplexity of each stream
    icl_tasks: ICLTasks = None
    run_name: str = 'dbrx-eval'
    seed: int = 17
    max_seq_len: int | None = None  # of the perplexity samples; default: the model's
    icl_seq_len: int | None = None  # default: max_seq_len
    device_eval_batch_size: int = 4
    eval_subset_num_batches: int = -1  # per stream (-1: all of it)
    icl_subset_num_batches: int | None = None  # per task (None: all of it)
    precision: Literal['fp32', 'amp_bf16', 'amp_fp16'] = 'fp32'
    # The weights' dtype for inference (None: as stored; bfloat16 with quantize) and weight-only
    # quantization ('int8' or 'int4', dbrx_train/model/quantize.py; int4 in groups of
    # quantize_group_size, None: 128), as `load_pretrained` takes them.
    dtype: Literal['float32', 'bfloat16', 'float16'] | None = None
    quantize: Quantization | None = None
    quantize_group_size: int | None = None
    device: Literal['auto', 'cpu', 'gpu'] = 'auto'
    loggers: dict[str, dict[str, Any]] = field(default_factory=dict)  # by llm-foundry registry name
    progress_bar: bool = True
    python_log_level: str | None = 'warning'
    # llm-foundry's aggregate over the ICL tasks (evaluation/gauntlet.py): inline, or a YAML's path.
    eval_gauntlet: Annotated[EvalGauntletConfig | None, parse_eval_gauntlet] = None

    translate_input = staticmethod(translate_eval_yaml)  # llm-foundry's eval schema too

    def check(self) -> None:
        if self.eval_loader is None and self.icl_tasks is None:
            raise ConfigError('eval_loader', 'nothing to evaluate: give eval_loader (held-out streams), icl_tasks, '
                                             'or both')
        if self.device_eval_batch_size < 1:
            raise ConfigError('device_eval_batch_size', f'must be at least 1, got {self.device_eval_batch_size}')
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise ConfigError('max_seq_len', f'must be at least 1, got {self.max_seq_len}')
        if self.eval_gauntlet is not None:
            self.eval_gauntlet.check_tasks(self.icl_tasks or ())

    def check_model(self, model: ModelConfig) -> None:
        """The lengths asked for fit in the positions `model` was trained for."""
        if self.max_seq_len is not None and self.max_seq_len > model.max_seq_len:
            raise ConfigError('max_seq_len', f'{self.max_seq_len} exceeds the model max_seq_len ({model.max_seq_len})')
        check_icl_seq_lens(self.icl_tasks or (), self.icl_seq_len, model.max_seq_len)

