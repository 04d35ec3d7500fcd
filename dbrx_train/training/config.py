"""The training YAML, as a typed config. Key names are llm-foundry's wherever it has one."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Literal

from dbrx_train.chat_template import TokenizerConfig
from dbrx_train.data import LoaderConfig
from dbrx_train.data.curriculum import CurriculumConfig, Schedule, resolve_schedule
from dbrx_train.data.finetuning import FinetuningLoaderConfig
from dbrx_train.errors import ConfigError
from dbrx_train.evaluation.config import ICLTasks, check_icl_seq_lens
from dbrx_train.foundry_yaml import translate
from dbrx_train.model.compile import CompileConfig
from dbrx_train.model.config import ModelConfig
from dbrx_train.model.lora import LoraConfig, check_layers
from dbrx_train.training.finetune import FreezeConfig
from dbrx_train.training.sizing import MOE_WORLD_SIZE_KEY
from dbrx_train.typed_config import parse

# A loader section is parsed by the schema its `name` selects ('text' when it has none).
AnyLoader = LoaderConfig | FinetuningLoaderConfig


@dataclass(frozen=True)
class FSDPConfig:
    """FSDP2 through Composer: one shard unit per transformer block."""

    sharding_strategy: Literal['FULL_SHARD', 'HYBRID_SHARD'] = 'FULL_SHARD'
    # HYBRID_SHARD: shard within groups of this many ranks (usually one node), replicate across them.
    shard_group_size: int | None = None
    mixed_precision: Literal['DEFAULT', 'PURE', 'FULL'] = 'DEFAULT'
    activation_checkpointing: bool = False
    activation_cpu_offload: bool = False  # activations saved for backward wait on the CPU
    reshard_after_forward: bool = True
    state_dict_type: Literal['sharded', 'full'] = 'sharded'
    # llm-foundry's FSDP1 keys: FSDP2 always bounds the all-gathers in flight, and checkpoints non-reentrantly.
    limit_all_gathers: bool = True
    activation_checkpointing_reentrant: bool = False

    def check(self) -> None:
        if self.sharding_strategy == 'HYBRID_SHARD' and not self.shard_group_size:
            raise ConfigError('shard_group_size', 'HYBRID_SHARD needs shard_group_size (ranks per shard group)')

    def notes(self) -> list[str]:
        found = []
        if not self.limit_all_gathers:
            found.append('fsdp_config.limit_all_gathers: false has no effect: FSDP2 always bounds the all-gathers '
                         'in flight')
        if self.activation_checkpointing_reentrant:
            found.append('fsdp_config.activation_checkpointing_reentrant: FSDP2 checkpoints activations '
                         'non-reentrantly (the same result, less memory)')
        return found


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    train_loader: AnyLoader
    max_duration: str
    global_train_batch_size: int
    curriculum: CurriculumConfig | None = None  # the data mix per phase of training (replaces stream proportions)
    run_name: str = 'dbrx'
    seed: int = 17
    max_seq_len: int | None = None  # defaults to model.max_seq_len; llm-foundry's top-level key
    device_train_microbatch_size: int | None = None  # defaults to the per-device batch
    device_eval_batch_size: int | None = None
    eval_loader: AnyLoader | None = None
    eval_interval: str = '1dur'
    eval_first: bool = False
    eval_subset_num_batches: int = -1
    # llm-foundry's ICL tasks (a list, or the path of a YAML holding one), run at eval_interval too.
    icl_tasks: ICLTasks = None
    icl_seq_len: int | None = None  # defaults to max_seq_len
    icl_subset_num_batches: int | None = None  # per task; defaults to eval_subset_num_batches
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optimizer: dict[str, Any] = field(
        default_factory=lambda: {'name': 'decoupled_adamw', 'lr': 6e-4, 'betas': [0.9, 0.95], 'eps': 1e-8,
                                 'weight_decay': 0.0})
    scheduler: dict[str, Any] = field(
        default_factory=lambda: {'name': 'cosine_with_warmup', 't_warmup': '0.05dur', 'alpha_f': 0.1})
    algorithms: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {'gradient_clipping': {'clipping_type': 'norm', 'clipping_threshold': 1.0}})
    # amp_bf16 on a CPU without native bf16 (AVX512_BF16 or AMX) trains in fp32, with a warning.
    precision: Literal['fp32', 'amp_bf16', 'amp_fp16'] = 'fp32'
    # torch.compile each transformer block (dbrx_train.model.compile); {} for torch's defaults.
    compile_config: CompileConfig | None = None
    device: Literal['auto', 'cpu', 'gpu'] = 'auto'
    # meta: every rank builds the model without storage and materialises and initialises only its
    # own shards (training.parallelize); cpu: every rank builds the whole model first. Both give the
    # same weights. llm-foundry's 'mixed' (rank 0 builds it) is taken as 'meta'.
    init_device: Literal['cpu', 'meta', 'mixed'] = 'cpu'
    fsdp_config: FSDPConfig | None = field(default_factory=FSDPConfig)
    # Refuse, before the model is built, a layout whose weights, gradients and optimizer state
    # (training.sizing) cannot fit this host's or GPU's memory; false: start anyway.
    check_memory: bool = True
    save_folder: str | None = None
    save_interval: str = '1000ba'
    save_num_checkpoints_to_keep: int = -1
    save_overwrite: bool = False
    autoresume: bool = False
    load_path: str | None = None
    # Fine-tuning: the starting weights (a transformers DBRX directory, a dbrx_train checkpoint or a
    # Composer save_folder; loaded shard by shard after FSDP has sharded the model), what stays frozen,
    # and LoRA adapters (which freeze everything else).
    init_from: str | None = None
    freeze: FreezeConfig | None = None
    lora: LoraConfig | None = None
    loggers: dict[str, dict[str, Any]] = field(default_factory=dict)
    callbacks: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {'speed_monitor': {'window_size': 10}, 'lr_monitor': {}, 'moe_monitor': {}})
    progress_bar: bool = True
    log_to_console: bool = False
    console_log_interval: str = '1ba'
    dist_timeout: float = 600.0
    python_log_level: str | None = 'info'

    translate_input = staticmethod(translate)  # llm-foundry's YAML schema, read as it is

    def check(self) -> None:
        if self.global_train_batch_size < 1:
            raise ConfigError('global_train_batch_size', f'must be at least 1, got {self.global_train_batch_size}')
        if self.device_train_microbatch_size is not None and self.device_train_microbatch_size < 1:
            raise ConfigError('device_train_microbatch_size', 'must be at least 1')
        if self.max_seq_len is not None and self.max_seq_len > self.model.max_seq_len:
            raise ConfigError('max_seq_len', f'{self.max_seq_len} exceeds model.max_seq_len ({self.model.max_seq_len})')
        if self.tokenizer.model_max_length is not None and self.seq_len > self.tokenizer.model_max_length:
            raise ConfigError('tokenizer.kwargs.model_max_length', f'{self.tokenizer.model_max_length} is shorter '
                                                                   f'than max_seq_len ({self.seq_len})')
        check_icl_seq_lens(self.icl_tasks or (), self.icl_seq_len, self.model.max_seq_len)
        if self.model.quantization is not None and self.lora is None:
            raise ConfigError('model.quantization', 'a quantized base trains only frozen, under LoRA adapters '
                                                    '(QLoRA): add a lora section, or train the float model')
        if self.autoresume and not self.save_folder:
            raise ConfigError('autoresume', 'needs save_folder (where to look for the latest checkpoint)')
        for section in ('optimizer', 'scheduler'):
            if 'name' not in getattr(self, section):
                raise ConfigError(f'{section}.name', 'required key is missing')
        if self.init_from is not None and self.load_path is not None:
            raise ConfigError('init_from', 'give init_from (starting weights) or load_path (a Composer checkpoint '
                                           'to resume), not both')
        if self.lora is not None:
            if self.init_from is None and self.load_path is None:
                raise ConfigError('lora', 'adapters tune pretrained weights: set init_from')
            check_layers(self.lora.layers, self.model.n_layers, 'lora.layers')
        if self.freeze is not None:
            check_layers(self.freeze.layers, self.model.n_layers, 'freeze.layers')
        if self.curriculum is not None and self.train_loader.name != 'text':
            raise ConfigError('curriculum', f'mixes the streams of a text train_loader, not of a '
                                            f'{self.train_loader.name} one')
        if self.init_device == 'meta' and self.fsdp_config is None:
            raise ConfigError('init_device', "'meta' needs fsdp_config (each rank materialises only its shards)")
        if self.model.ffn_config.moe_world_size > 1:
            self._check_expert_parallel()
        _ = self.schedule  # the curriculum's streams, durations and coverage of max_duration, checked now

    def _check_expert_parallel(self) -> None:
        if self.fsdp_config is None or self.fsdp_config.sharding_strategy != 'FULL_SHARD':
            raise ConfigError(MOE_WORLD_SIZE_KEY, 'expert parallelism needs fsdp_config with sharding_strategy '
                                                  'FULL_SHARD')

    @functools.cached_property
    def schedule(self) -> Schedule | None:
        """The curriculum in whole steps; None without a `curriculum` section."""
        if self.curriculum is None:
            return None
        return resolve_schedule(self.curriculum, self.train_loader.dataset, self.max_duration,
                                self.global_train_batch_size, self.seq_len)

    def notes(self) -> list[str]:
        """Keys accepted from llm-foundry's schema that change nothing here, one line each (logged once)."""
        found = self.tokenizer.notes() + (self.fsdp_config.notes() if self.fsdp_config else [])
        for section in ('train_loader', 'eval_loader'):
            loader = getattr(self, section)
            if loader is not None and hasattr(loader.dataset, 'notes'):
                found += [f'{section}.dataset.{note}' for note in loader.dataset.notes()]
        return found

    @property
    def seq_len(self) -> int:
        return self.max_seq_len or self.model.max_seq_len


def layout_only(model: ModelConfig, **settings) -> TrainConfig:
    """A `TrainConfig` that describes a layout and no data (`info --dry-run`, benchmarks, tests of
    `training.parallelize`); `settings` are more of its keys, as typed values. Not checked."""
    loader = parse(LoaderConfig, {'dataset': {'local': 'unused'}}, 'train_loader')
    return TrainConfig(**{'model': model, 'train_loader': loader, 'max_duration': '1ba', 'global_train_batch_size': 1,
                          **settings})
