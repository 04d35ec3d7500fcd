"""What a saved model holds, read without loading its weights: its format, its config, where its tensors are.

For the readers that stream a model tensor by tensor (`training.finetune` filling a sharded model,
`export`) instead of building it whole as `pretrained.load_pretrained` does.
"""

from __future__ import annotations

from pathlib import Path

from dbrx_train.checkpoint import StoredTensor, index_tensors, read_config
from dbrx_train.model.config import ModelConfig

COMPOSER = 'Composer training checkpoint'
HF = 'transformers DBRX directory'


def describe(path: str | Path) -> tuple[str, ModelConfig]:
    """The format of the model saved at `path` (`pretrained.detect_format`'s names) and its config."""
    from dbrx_train.convert import model_config_from_hf
    from dbrx_train.pretrained import detect_format

    kind = detect_format(path)
    if kind == COMPOSER:
        from dbrx_train.composer_checkpoint import resolve

        return kind, read_config(resolve(path).parent)
    return kind, model_config_from_hf(path) if kind == HF else read_config(path)


def safetensors_index(path: str | Path, kind: str, config: ModelConfig) -> dict[str, StoredTensor]:
    """Where each tensor of a transformers directory or a dbrx_train checkpoint lies, by model name,
    checked against `config` (names and shapes) before anything is read."""
    from dbrx_train.convert import hf_names

    return index_tensors(path, config, hf_names(config.n_layers) if kind == HF else None)
