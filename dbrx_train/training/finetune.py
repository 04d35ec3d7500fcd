"""Fine-tuning around the trainer: what trains (freezing, LoRA) and the weights it starts from.

`prepare_model` runs before the optimizer is built: it freezes what the `freeze` section names and
adds the `lora` adapters (which freeze everything else). `start_from_pretrained` runs once Composer
has placed, and with FSDP sharded, the model: it fills the model from `init_from`, each rank reading
only the slices of the tensors it holds (safetensors slices; `torch.distributed.checkpoint` for a
sharded Composer checkpoint). With `init_device: meta` no process ever holds more than its shards
of the model; with `cpu` every rank first builds the whole model. A run that resumed from its own
checkpoint keeps what it resumed.

`init_from` is a transformers DBRX directory, a dbrx_train checkpoint, or a Composer save_folder /
checkpoint of this framework (a full `.pt` one is a single pickle, read whole).

QLoRA (`model.quantization` with `lora`): a float `init_from` is quantized as it is read, each rank
reading the float rows of the quantized rows it holds (safetensors slices; a Composer checkpoint's
tensors one at a time) and quantizing them: no rank ever holds the float model. A quantized
checkpoint of the same format is copied as stored.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX
from tqdm import tqdm

from dbrx_train.checkpoints.formats import open_saved
from dbrx_train.errors import ConfigError
from dbrx_train.model.config import ModelConfig
from dbrx_train.model.dbrx import DbrxLM
from dbrx_train.model.lora import LoraConfig, apply_lora, base_parameters, check_layers
from dbrx_train.model.quantize import matrix_layouts, quantize_into, store_scales_in
from dbrx_train.typed_config import to_dict

log = logging.getLogger(__name__)

# Model settings that only shape training, so a checkpoint and the YAML may disagree on them.
TRAINING_ONLY_SETTINGS = {'max_seq_len', 'init_std', 'moe_backend', 'ffn_config.moe_jitter_eps',
                          'ffn_config.moe_loss_weight', 'ffn_config.moe_zloss_weight'}


@dataclass(frozen=True)
class FreezeConfig:
    """The `freeze` section: parameters that keep their starting values."""

    embeddings: bool = False  # wte
    lm_head: bool = False
    router: bool = False  # every block's router
    layers: list[int] = field(default_factory=list)  # whole transformer blocks
    params: list[str] = field(default_factory=list)  # glob patterns on parameter names, e.g. 'blocks.*.norm_*'

    def patterns(self) -> list[tuple[str, str]]:
        """(YAML key, glob pattern) of everything to freeze."""
        found = [('freeze.embeddings', 'wte.*')] if self.embeddings else []
        found += [('freeze.lm_head', 'lm_head.*')] if self.lm_head else []
        found += [('freeze.router', 'blocks.*.ffn.router.*')] if self.router else []
        found += [(f'freeze.layers[{n}]', f'blocks.{i}.*') for n, i in enumerate(self.layers)]
        return found + [(f'freeze.params[{n}]', p) for n, p in enumerate(self.params)]


def apply_freeze(model: DbrxLM, config: FreezeConfig) -> None:
    check_layers(config.layers, model.config.n_layers, 'freeze.layers')
    params = base_parameters(model)
    for key, pattern in config.patterns():
        matched = [name for name in params if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise ConfigError(key, f'{pattern!r} matches no parameter (names look like {next(iter(params))!r})')
        for name in matched:
            params[name].requires_grad_(False)


def prepare_model(model: DbrxLM, freeze: FreezeConfig | None, lora: LoraConfig | None) -> None:
    """Freezing and adapters, before the optimizer sees the parameters. A quantized (QLoRA) base keeps
    bf16 scales and zeros, whatever the training precision: it is frozen, and dequantized to compute."""
    if model.config.quantization is not None:
        store_scales_in(model, torch.bfloat16)
    if freeze is not None:
        apply_freeze(model, freeze)
    if lora is not None:
        apply_lora(model, lora)
    if freeze is not None or lora is not None:
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info('training %d of %d parameters (%.2f%%)', trainable, total, 100 * trainable / total)


# ---------------------------------------------------------------- starting weights


def check_compatible(config: ModelConfig, source_config: ModelConfig, source: str | Path) -> None:
    """`ConfigError` naming the first `model` setting that differs from the checkpoint's architecture.
    A float checkpoint fits a quantized model (it is quantized as it is read); the layout
    (`moe_world_size`) is not part of it: an expert-parallel run starts from any checkpoint."""
    if source_config.quantization is None:
        source_config = replace(source_config, quantization=config.quantization,
                                quantization_group_size=config.quantization_group_size)
    ours, theirs = _flatten(to_dict(config.without_layout())), _flatten(to_dict(source_config.without_layout()))
    for key, value in ours.items():
        if key not in TRAINING_ONLY_SETTINGS and theirs[key] != value:
            raise ConfigError(f'model.{key}', f'is {value!r} but {source} has {theirs[key]!r}: the model section must '
                                              'describe the init_from checkpoint')


def _flatten(values: dict, prefix: str = '') -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = value
    return flat


def start_from_pretrained(trainer, init_from: str | None) -> None:
    """Loads `init_from` into the base parameters of the trainer's (possibly sharded) model, unless
    the trainer resumed from a checkpoint of its own (the adapters keep their initial values)."""
    if init_from is None:
        return
    if int(trainer.state.timestamp.batch) > 0:
        log.info('resumed at batch %d: not loading init_from', int(trainer.state.timestamp.batch))
        return
    load_initial_weights(trainer.state.model.model, init_from)


def check_init_from(init_from: str | None, config: ModelConfig) -> None:
    """Fails fast, before a model is built, when `init_from` is missing or of another architecture."""
    if init_from is not None:
        check_compatible(config, open_saved(init_from).config, init_from)


def load_initial_weights(model: DbrxLM, source: str | Path) -> None:
    """Fills every base parameter of `model` (plain, LoRA-adapted, FSDP-sharded) from `source`; the
    stored tensors of a quantized base (QLoRA) too, quantizing a float `source` as it is read."""
    saved = open_saved(source)
    check_compatible(model.config, saved.config, saved.path)
    targets = base_parameters(model)
    quantized = {}
    if model.config.quantization is not None:
        quantized = {name.replace(_CHECKPOINT_PREFIX, ''): buffer for name, buffer in model.named_buffers()
                     if not name.endswith('.scale')}  # .scale: LoRA's alpha / r, not a weight
        if saved.config.quantization is not None:  # the same format (check_compatible): copied as stored
            targets.update(quantized)
            quantized = {}
    saved.load_into(targets, desc='loading init_from')
    if quantized:
        read = saved.region_reader()
        shapes = {name: tuple(t.shape) for name, t in base_parameters(DbrxLM(saved.config, device='meta')).items()}
        for layout in tqdm(matrix_layouts(model.config), desc='quantizing init_from', unit='matrix', disable=None):
            quantize_into(model.config, layout, quantized, functools.partial(read, layout.float_name),
                          shapes[layout.float_name])
    log.info('loaded %d tensors from %s (%s)%s', len(targets) + len(quantized), saved.path, saved.format.name,
             f', quantized to {model.config.quantization}' if quantized else '')
