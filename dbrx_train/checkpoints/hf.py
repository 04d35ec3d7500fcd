"""transformers' `DbrxForCausalLM` directories: their names and config, read and written.

The weights are the same tensors as ours under other names (`NAME_MAP`), so conversion streams
them one at a time into shards of at most `max_shard_bytes`: never more than one shard in memory.
A written directory loads with `DbrxForCausalLM.from_pretrained` (no remote code).

Only what the model computes is converted. Dropout rates in a transformers config
(`resid_pdrop`, `emb_pdrop`, `attn_config.attn_pdrop`) have no counterpart here: nonzero ones
are dropped with a warning (outputs in eval mode are unchanged). An activation other than
silu is an error. Tokenizer files are not copied (`export` writes one).

transformers is imported where it is used: it takes seconds to import, and only the functions
that build its config objects need it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from dbrx_train.checkpoints.native import read_config, write_config
from dbrx_train.checkpoints.storage import (
    DEFAULT_MAX_SHARD_BYTES,
    atomic_directory,
    index_tensors,
    materialize,
    stream_tensors,
    write_weights,
)
from dbrx_train.errors import CheckpointError, ConfigError
from dbrx_train.model.config import ModelConfig
from dbrx_train.model.dbrx import DbrxLM
from dbrx_train.model.generation import DEFAULT_STOP_TOKENS
from dbrx_train.typed_config import parse

HF_CONFIG_FILE = 'config.json'

# Our parameter name -> transformers' name; `{i}` is a block index. Read both ways.
NAME_MAP = (
    ('wte.weight', 'transformer.wte.weight'),
    ('blocks.{i}.norm_1.weight', 'transformer.blocks.{i}.norm_attn_norm.norm_1.weight'),
    ('blocks.{i}.attn.Wqkv.weight', 'transformer.blocks.{i}.norm_attn_norm.attn.Wqkv.weight'),
    ('blocks.{i}.attn.out_proj.weight', 'transformer.blocks.{i}.norm_attn_norm.attn.out_proj.weight'),
    ('blocks.{i}.norm_2.weight', 'transformer.blocks.{i}.norm_attn_norm.norm_2.weight'),
    ('blocks.{i}.ffn.router.weight', 'transformer.blocks.{i}.ffn.router.layer.weight'),
    ('blocks.{i}.ffn.experts.w1', 'transformer.blocks.{i}.ffn.experts.mlp.w1'),
    ('blocks.{i}.ffn.experts.v1', 'transformer.blocks.{i}.ffn.experts.mlp.v1'),
    ('blocks.{i}.ffn.experts.w2', 'transformer.blocks.{i}.ffn.experts.mlp.w2'),
    ('norm_f.weight', 'transformer.norm_f.weight'),
    ('lm_head.weight', 'lm_head.weight'),
)


def hf_names(n_layers: int) -> dict[str, str]:
    """Every parameter name of an `n_layers` model -> its transformers name."""
    names = {}
    for ours, theirs in NAME_MAP:
        for i in range(n_layers) if '{i}' in ours else [None]:
            names[ours.format(i=i)] = theirs.format(i=i)
    return names


# ---------------------------------------------------------------- configs

# Config keys named alike in `ModelConfig` and `DbrxConfig`, by section; only our `init_std`
# (transformers' `initializer_range`) differs.
CONFIG_KEYS = {
    '': ('d_model', 'n_heads', 'n_layers', 'max_seq_len', 'vocab_size'),
    'attn_config': ('kv_n_heads', 'clip_qkv', 'rope_theta'),
    'ffn_config': ('ffn_hidden_size', 'moe_num_experts', 'moe_top_k', 'moe_jitter_eps', 'moe_loss_weight',
                   'moe_normalize_expert_weights'),
}


def _shared_config_values(config) -> dict:
    """The `CONFIG_KEYS` values of a `ModelConfig` or a `DbrxConfig`, as a nested dict."""
    values = {key: getattr(config, key) for key in CONFIG_KEYS['']}
    for section in ('attn_config', 'ffn_config'):
        values[section] = {key: getattr(getattr(config, section), key) for key in CONFIG_KEYS[section]}
    return values


def is_hf_directory(path: str | Path) -> bool:
    return (Path(path) / HF_CONFIG_FILE).is_file()


def model_config_from_hf(hf_dir: str | Path) -> ModelConfig:
    """Our `ModelConfig` from a transformers DBRX `config.json` (transformers' defaults fill gaps)."""
    path = Path(hf_dir) / HF_CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f'missing file {path}')
    from transformers import DbrxConfig

    try:
        model_type = json.loads(path.read_text()).get('model_type')
        if model_type != 'dbrx':
            raise CheckpointError(f'{path}: model_type is {model_type!r}; only dbrx models convert')
        hf = DbrxConfig.from_json_file(str(path))
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f'{path}: not a valid DBRX config ({e})') from None
    activation = (hf.ffn_config.ffn_act_fn or {}).get('name', 'silu')
    if activation != 'silu':
        raise CheckpointError(f'{path}: ffn_config.ffn_act_fn is {activation!r}; only silu is supported')
    dropouts = {'resid_pdrop': hf.resid_pdrop, 'emb_pdrop': hf.emb_pdrop,
                'attn_config.attn_pdrop': hf.attn_config.attn_pdrop}
    nonzero = [f'{key}={value}' for key, value in dropouts.items() if value]
    if nonzero:
        warnings.warn(f'{path}: ignoring {", ".join(nonzero)}: this model has no dropout', stacklevel=2)
    data = _shared_config_values(hf) | {'init_std': hf.initializer_range}
    try:
        return parse(ModelConfig, data)
    except ConfigError as e:
        raise CheckpointError(f'{path}: {e}') from None


def hf_config(config: ModelConfig, torch_dtype: torch.dtype | None = None):
    """The transformers `DbrxConfig` of a model config."""
    from transformers import DbrxConfig

    if config.quantization is not None:
        raise CheckpointError(f'a {config.quantization} quantized model has no transformers form; '
                              'export its float checkpoint')

    values = _shared_config_values(config)
    values['ffn_config']['ffn_act_fn'] = {'name': 'silu'}
    return DbrxConfig(**values, initializer_range=config.init_std, architectures=['DbrxForCausalLM'],
                      torch_dtype=torch_dtype)


# ---------------------------------------------------------------- weights


def load_hf(hf_dir: str | Path, device='cpu', dtype: torch.dtype | None = None) -> DbrxLM:
    """A `DbrxLM` straight from a transformers DBRX directory, without an intermediate checkpoint."""
    config = model_config_from_hf(hf_dir)
    return materialize(config, index_tensors(hf_dir, config, hf_names(config.n_layers)), device, dtype)


def convert_from_hf(hf_dir: str | Path, out: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    overwrite: bool = False) -> Path:
    """Writes the checkpoint of a transformers DBRX directory to `out` (atomically)."""
    config = model_config_from_hf(hf_dir)
    index = index_tensors(hf_dir, config, hf_names(config.n_layers))
    with atomic_directory(out, overwrite) as tmp:
        write_config(tmp, config)
        write_weights(tmp, stream_tensors(index, desc='converting'), max_shard_bytes)
    return Path(out)


def convert_to_hf(checkpoint: str | Path, hf_dir: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                  overwrite: bool = False) -> Path:
    """Writes a transformers `DbrxForCausalLM` directory of a checkpoint to `hf_dir` (atomically)."""
    from transformers import GenerationConfig

    config = read_config(checkpoint)
    index = index_tensors(checkpoint, config)
    names = hf_names(config.n_layers)
    with atomic_directory(hf_dir, overwrite) as tmp:
        hf_config(config, index['wte.weight'].dtype).to_json_file(tmp / HF_CONFIG_FILE)
        stop_ids = [i for i in DEFAULT_STOP_TOKENS if i < config.vocab_size]
        if stop_ids:
            GenerationConfig(eos_token_id=stop_ids, pad_token_id=stop_ids[0]).save_pretrained(tmp)
        tensors = ((names[name], t) for name, t in stream_tensors(index, desc='converting'))
        write_weights(tmp, tensors, max_shard_bytes)
    return Path(hf_dir)
