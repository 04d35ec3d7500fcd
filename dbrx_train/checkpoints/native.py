"""This project's model checkpoint: a directory that a `DbrxLM` can be rebuilt from.

    config.yaml                       the model config (`typed_config.to_dict(ModelConfig)`)
    model.safetensors                 every weight under the model's parameter names
 or model-0000i-of-0000N.safetensors  shards with their index (see `storage`)

Written atomically; loading checks every tensor's name and shape against config.yaml first.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from dbrx_train.checkpoints.storage import (
    DEFAULT_MAX_SHARD_BYTES,
    atomic_directory,
    index_tensors,
    materialize,
    write_weights,
)
from dbrx_train.errors import CheckpointError, ConfigError
from dbrx_train.model.config import ModelConfig
from dbrx_train.model.dbrx import DbrxLM
from dbrx_train.typed_config import load_yaml, parse, to_dict

CONFIG_FILE = 'config.yaml'


def is_native_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f'missing file {path}')
    try:
        return parse(ModelConfig, load_yaml(path))
    except ConfigError as e:
        raise CheckpointError(f'{path}: {e}') from None


def write_config(directory: Path, config: ModelConfig) -> None:
    (directory / CONFIG_FILE).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def load_checkpoint(directory: str | Path, device='cpu', dtype: torch.dtype | None = None) -> DbrxLM:
    """Rebuilds the model saved by `save_checkpoint`; `CheckpointError` if anything is off."""
    config = read_config(directory)
    return materialize(config, index_tensors(directory, config), device, dtype)


def save_checkpoint(
    model: DbrxLM, directory: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False
) -> Path:
    """Writes `model` as a checkpoint, atomically. `overwrite` replaces an existing checkpoint."""
    with atomic_directory(directory, overwrite) as tmp:
        write_config(tmp, model.config)
        write_weights(tmp, model.state_dict().items(), max_shard_bytes)
    return Path(directory)
