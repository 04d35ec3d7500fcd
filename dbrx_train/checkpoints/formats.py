"""Every saved form of a DBRX model behind one interface, and `load_pretrained` on top of it.

    format                         looks like                               module
    Composer training checkpoint   a save_folder, ep*-ba*/ or *.pt          `composer`
    dbrx_train checkpoint          config.yaml + safetensors                `native`
    transformers DBRX directory    config.json + safetensors                `hf`

`open_saved(path)` tells the format from the files present and reads the model config (no
weights). The `SavedModel` it returns indexes a safetensors format's tensors under this project's
names, for the readers that stream a model tensor by tensor (`training.finetune` filling a sharded
model, `export`); a Composer checkpoint is read through `composer.stored_model_tensors` instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dbrx_train.checkpoints.composer import is_composer_checkpoint, load_composer_checkpoint, read_model_config
from dbrx_train.checkpoints.hf import HF_CONFIG_FILE, hf_names, load_hf, model_config_from_hf
from dbrx_train.checkpoints.native import CONFIG_FILE, load_checkpoint, read_config
from dbrx_train.checkpoints.storage import StoredTensor, index_tensors
from dbrx_train.errors import CheckpointError
from dbrx_train.model.config import ModelConfig
from dbrx_train.model.dbrx import DbrxLM
from dbrx_train.model.quantize import quantize as quantize_model


@dataclass(frozen=True)
class Format:
    name: str
    looks_like: str  # for the error when nothing matches
    matches: Callable[[Path], bool]
    read_config: Callable[[Path], ModelConfig]
    load: Callable[[Path, object, torch.dtype | None], DbrxLM]
    # Our tensor names -> the names in its safetensors files; None: not a safetensors format.
    stored_names: Callable[[ModelConfig], dict[str, str]] | None


def _has(marker: str) -> Callable[[Path], bool]:
    return lambda path: (path / marker).is_file()


# The first match wins: a Composer save_folder also holds the config.yaml of its model.
FORMATS = (
    Format('Composer training checkpoint', 'a save_folder, ep*-ba*/ or *.pt', is_composer_checkpoint,
           read_model_config, load_composer_checkpoint, None),
    Format('dbrx_train checkpoint', CONFIG_FILE, _has(CONFIG_FILE), read_config, load_checkpoint, lambda config: {}),
    Format('transformers DBRX directory', HF_CONFIG_FILE, _has(HF_CONFIG_FILE), model_config_from_hf, load_hf,
           lambda config: hf_names(config.n_layers)),
)
COMPOSER, NATIVE, HF = FORMATS


@dataclass(frozen=True)
class SavedModel:
    path: Path
    format: Format
    config: ModelConfig

    def index(self) -> dict[str, StoredTensor]:
        """Where each tensor lies, by model name, checked against the config (names and shapes)
        before anything is read. Safetensors formats only."""
        if self.format.stored_names is None:
            raise TypeError(f'a {self.format.name} has no safetensors index')
        return index_tensors(self.path, self.config, self.format.stored_names(self.config))


def detect_format(path: str | Path) -> Format:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f'{path} does not exist')
    for candidate in FORMATS:
        if candidate.matches(path):
            return candidate
    expected = ', '.join(f'a {f.name} ({f.looks_like})' for f in FORMATS)
    raise CheckpointError(f'{path} is not a model checkpoint: expected {expected}')


def open_saved(path: str | Path) -> SavedModel:
    """The format and model config of the model saved at `path`, without reading its weights."""
    path = Path(path)
    kind = detect_format(path)
    return SavedModel(path, kind, kind.read_config(path))


def load_pretrained(path: str | Path, device='cpu', dtype: torch.dtype | None = None,
                    quantize: str | None = None) -> DbrxLM:
    """The model saved at `path` (any format above), on `device`, in eval mode. `dtype` None keeps
    the stored dtype, except that `quantize` ('int8', see `dbrx_train.model.quantize`) computes in
    bfloat16 unless told otherwise: torch's int8 CPU kernel is fast only with 16-bit activations."""
    if quantize is not None and dtype is None:
        dtype = torch.bfloat16
    return quantize_model(detect_format(path).load(Path(path), device, dtype), quantize).eval()
