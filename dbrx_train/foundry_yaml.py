"""llm-foundry's fine-tuning YAML, read as it is: its keys mapped onto this project's at the config edge.

A YAML whose `model` section names llm-foundry's `hf_causal_lm` is llm-foundry's schema:

    llm-foundry                                   here
    model.pretrained_model_name_or_path           the architecture (its config.json) and, with
                                                  model.pretrained (default true), init_from
    model.config_overrides                        applied to that architecture (unknown keys: an error)
    model.init_device                             init_device
    model.peft_config (peft_type LORA)            lora: r, lora_alpha -> alpha, lora_dropout -> dropout,
                                                  target_modules -> targets (Wqkv, out_proj and the
                                                  fused experts w1, v1, w2), layers_to_transform -> layers
    model.use_flash_attention_2,                  accepted, with a logged note: attention is torch's
    attn_implementation                           scaled_dot_product_attention (flash kernels on GPUs)
    model.use_auth_token, trust_remote_code       accepted, with a logged note: offline, no remote code
    run_name: (empty)                             $RUN_NAME, as llm-foundry, else 'dbrx'
    autoresume without save_folder                nothing to resume from: a logged note

`translate(data)` returns the mapping in this project's schema, which `TrainConfig` then validates like
any other; a YAML already in this project's schema passes through unchanged. The tokenizer section,
the finetuning loader's llm-foundry keys, `fsdp_config`'s and the callbacks are the typed configs' own.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dbrx_train.checkpoints.formats import open_saved
from dbrx_train.errors import CheckpointError, ConfigError, check_local_path
from dbrx_train.model.lora import ATTENTION_TARGETS, EXPERT_TARGETS
from dbrx_train.typed_config import parse, to_dict

log = logging.getLogger(__name__)

FOUNDRY_MODEL_NAMES = ('hf_causal_lm',)
DEFAULT_RUN_NAME = 'dbrx'


@dataclass(frozen=True)
class PeftConfig:
    """`model.peft_config`: PEFT's LoRA keys (its defaults)."""

    peft_type: Literal['LORA']
    target_modules: list[str] | str
    r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    task_type: Literal['CAUSAL_LM'] = 'CAUSAL_LM'
    layers_to_transform: list[int] | int | None = None
    bias: Literal['none'] = 'none'  # PEFT's default; training biases is not supported (DBRX has none)


@dataclass(frozen=True)
class FoundryModelConfig:
    """llm-foundry's `model` section for `hf_causal_lm` (the keys of its `ComposerHFCausalLM`)."""

    name: Literal['hf_causal_lm']
    pretrained_model_name_or_path: str
    pretrained: bool = True
    init_device: Literal['cpu', 'meta', 'mixed'] = 'cpu'
    config_overrides: dict[str, Any] = field(default_factory=dict)
    peft_config: PeftConfig | None = None
    use_auth_token: bool = False
    trust_remote_code: bool = True
    use_flash_attention_2: bool = False
    attn_implementation: str | None = None
    use_train_metrics: bool = True
    should_save_peft_only: bool = True
    # llm-foundry keys with no equivalent here: set, they are an error naming them.
    pretrained_lora_id_or_path: str | None = None
    load_in_8bit: bool = False
    allow_embedding_resizing: bool = False
    additional_train_metrics: list | None = None
    additional_eval_metrics: list | None = None

    def check(self) -> None:
        unsupported = {
            'pretrained_lora_id_or_path': 'start adapters from a saved PEFT adapter',
            'load_in_8bit': 'train on 8-bit weights (quantize a model for serving instead)',
            'allow_embedding_resizing': 'resize the embeddings (the DBRX tokenizer is fixed)',
            'additional_train_metrics': 'add training metrics',
            'additional_eval_metrics': 'add evaluation metrics',
        }
        for key, what in unsupported.items():
            if getattr(self, key):
                raise ConfigError(key, f'not supported: this framework cannot {what}; remove the key')


def is_foundry_schema(data: Mapping) -> bool:
    model = data.get('model')
    return isinstance(model, Mapping) and model.get('name') in FOUNDRY_MODEL_NAMES


def translate(data: Mapping) -> Mapping:
    """`data` in this project's schema (see the module doc); notes on keys without effect are logged once."""
    notes: list[str] = []
    out = dict(data)
    if 'run_name' in out and out['run_name'] is None:
        out['run_name'] = os.environ.get('RUN_NAME') or DEFAULT_RUN_NAME
    if is_foundry_schema(data):
        _translate_model(out, notes)
        if out.get('autoresume') and not out.get('save_folder'):
            out['autoresume'] = False
            notes.append('autoresume: true without save_folder has nothing to resume from; set save_folder to '
                         'resume (hf_checkpointer writes transformers directories, not resumable checkpoints)')
    if notes and os.environ.get('RANK', '0') == '0':
        for note in notes:
            log.warning('llm-foundry YAML: %s', note)
    return out


def _translate_model(out: dict, notes: list[str]) -> None:
    for ours in ('init_from', 'lora'):
        if ours in out:
            raise ConfigError(ours, f'not with model.name hf_causal_lm: llm-foundry\'s model section sets it '
                                    f'(pretrained_model_name_or_path, peft_config)')
    model = parse(FoundryModelConfig, out['model'], 'model')
    source = _local_model(model.pretrained_model_name_or_path)
    architecture = to_dict(open_saved(source).config)
    out['model'] = _merged(architecture, model.config_overrides)
    if model.pretrained:
        out['init_from'] = str(source)
    if 'init_device' in out and out['init_device'] != model.init_device:
        raise ConfigError('init_device', f'is {out["init_device"]!r} but model.init_device is '
                                         f'{model.init_device!r}: give one')
    out['init_device'] = model.init_device
    if model.peft_config is not None:
        out['lora'] = _lora(model.peft_config)
    if model.use_flash_attention_2 or model.attn_implementation:
        notes.append('model.use_flash_attention_2 / attn_implementation: attention here is torch\'s '
                     'scaled_dot_product_attention, which picks flash-attention kernels by itself on GPUs')
    if model.use_auth_token:
        notes.append('model.use_auth_token: no hub access here, the model is read from '
                     f'{model.pretrained_model_name_or_path}')
    if model.peft_config is not None and model.should_save_peft_only:
        notes.append('model.should_save_peft_only: hf_checkpointer writes the model with the adapters merged '
                     '(training checkpoints keep the adapters apart)')


def _local_model(name_or_path: str) -> Path:
    key = 'model.pretrained_model_name_or_path'
    path = check_local_path(key, name_or_path, 'model')
    try:
        open_saved(path)
    except CheckpointError as e:
        raise ConfigError(key, str(e)) from None
    return path


def _merged(base: dict, overrides: Mapping) -> dict:
    """`base` with `overrides` applied, nested sections key by key (as llm-foundry's config_overrides)."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def _lora(peft: PeftConfig) -> dict:
    """The `lora` section of a PEFT LoRA config. PEFT matches target_modules by module-name suffix;
    the fused experts (w1, v1, w2), which PEFT cannot reach in DBRX, are targets here too."""
    known = ATTENTION_TARGETS + EXPERT_TARGETS
    names = [peft.target_modules] if isinstance(peft.target_modules, str) else peft.target_modules
    targets = []
    for i, name in enumerate(names):
        short = name.rsplit('.', 1)[-1]
        if short not in known:
            raise ConfigError(f'model.peft_config.target_modules[{i}]',
                              f'{name!r} is not an adaptable module of DBRX; choose from {", ".join(known)}')
        if short not in targets:
            targets.append(short)
    layers = peft.layers_to_transform
    return {'r': peft.r, 'alpha': peft.lora_alpha, 'dropout': peft.lora_dropout, 'targets': targets,
            'layers': [layers] if isinstance(layers, int) else layers}
