"""Every saved form of a DBRX model behind one interface, and `load_pretrained` on top of it.

    format                         looks like                               module
    Composer training checkpoint   a save_folder, ep*-ba*/ or *.pt          `composer`
    dbrx_train checkpoint          config.yaml + safetensors                `native`
    transformers DBRX directory    config.json + safetensors                `hf`

Any `path` may be an object-store URI (`s3://...`): the model is downloaded first (`remote.py`).
`open_saved(path)` tells the format from the files present and reads the model config (no
weights). The `SavedModel` it returns reads the weights under this project's names, whatever the
format, with a LoRA run's adapters merged into them:
- `tensors()` streams them one at a time (`export`);
- `load_into(targets)` fills tensors in place, each rank reading only the part of a sharded
  (DTensor) target it holds (`training.finetune`'s `init_from`);
- `region_reader()` reads regions of tensors (a QLoRA `init_from` quantizes its rows as it reads them);
- `load(device, dtype)` builds the `DbrxLM` (`load_pretrained`).
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from dbrx_train.checkpoints.composer import (
    MODEL_PREFIX,
    ComposerTensors,
    is_composer_checkpoint,
    load_sharded,
    read_model_config,
)
from dbrx_train.checkpoints.hf import hf_names, is_hf_directory, model_config_from_hf
from dbrx_train.checkpoints.native import is_native_checkpoint, read_config
from dbrx_train.checkpoints.remote import local_saved_model
from dbrx_train.checkpoints.storage import StoredTensor, index_tensors, materialize, stream_tensors
from dbrx_train.errors import CheckpointError
from dbrx_train.model.config import ModelConfig
from dbrx_train.model.dbrx import DbrxLM
from dbrx_train.model.init import local_part, local_region
from dbrx_train.model.quantize import dequantized_config
from dbrx_train.model.quantize import quantize as quantize_model
from dbrx_train.uri import is_remote

NamedTensors = Iterator[tuple[str, torch.Tensor]]


class SavedModel(ABC):
    """A model saved at `path` in `format`, with its `config`; the weights are read on demand."""

    def __init__(self, path: Path, format: Format, config: ModelConfig):
        self.path, self.format, self.config = path, format, config

    @abstractmethod
    def tensors(self, desc: str = 'reading') -> NamedTensors:
        """Every tensor of the model as `(DbrxLM state-dict name, tensor)`, one at a time, checked
        against the config (names and shapes) before the first is read."""

    @abstractmethod
    def load_into(self, targets: dict[str, torch.Tensor], desc: str = 'loading') -> None:
        """Copies each named tensor into `targets[name]` in place; of a DTensor, only this rank's part."""

    @abstractmethod
    def load(self, device='cpu', dtype: torch.dtype | None = None) -> DbrxLM:
        """The model on `device` in eval mode; `dtype` None keeps the stored dtype."""

    @abstractmethod
    def region_reader(self) -> Callable[[str, tuple[slice, ...]], torch.Tensor]:
        """`read(name, region)`: that region of tensor `name` (as `tensors()` names and merges it)."""


class SafetensorsModel(SavedModel):
    """A directory of safetensors files; `stored_names` maps our tensor names to the files' names."""

    def stored_names(self) -> dict[str, str]:
        return {}  # the same names

    def index(self) -> dict[str, StoredTensor]:
        return index_tensors(self.path, self.config, self.stored_names())

    def tensors(self, desc: str = 'reading') -> NamedTensors:
        return stream_tensors(self.index(), desc=desc)

    def load_into(self, targets: dict[str, torch.Tensor], desc: str = 'loading') -> None:
        index = self.index()
        by_file: dict[Path, list[str]] = {}
        for name in targets:
            by_file.setdefault(index[name].file, []).append(name)
        with torch.no_grad(), tqdm(total=len(targets), desc=desc, unit='tensor', disable=None) as progress:
            for file, names in by_file.items():
                with safe_open(file, framework='pt', device='cpu') as f:
                    for name in names:
                        target = targets[name]
                        local_part(target).copy_(f.get_slice(index[name].key)[local_region(target)])
                        progress.update()

    def load(self, device='cpu', dtype: torch.dtype | None = None) -> DbrxLM:
        return materialize(self.config, self.index(), device, dtype)

    def region_reader(self) -> Callable[[str, tuple[slice, ...]], torch.Tensor]:
        index = self.index()

        def read(name: str, region: tuple[slice, ...]) -> torch.Tensor:
            with safe_open(index[name].file, framework='pt', device='cpu') as f:
                return f.get_slice(index[name].key)[region]

        return read


class TransformersModel(SafetensorsModel):
    def stored_names(self) -> dict[str, str]:
        return hf_names(self.config.n_layers)


class ComposerCheckpoint(SavedModel):
    """A Composer checkpoint of `train.py`: a save_folder (its latest checkpoint) or one checkpoint.
    A QLoRA run's (`stored_config` quantized) reads as the float model: `config` is its float config."""

    def __init__(self, path: Path, format: Format, config: ModelConfig):
        super().__init__(path, format, dequantized_config(config))
        self.stored_config = config

    def tensors(self, desc: str = 'reading') -> NamedTensors:
        source = ComposerTensors(self.path, self.stored_config)
        return iter(tqdm(source, desc=desc, total=len(source.shapes), unit='tensor', disable=None))

    def load_into(self, targets: dict[str, torch.Tensor], desc: str = 'loading') -> None:
        source = ComposerTensors(self.path, self.stored_config)
        for name, target in targets.items():
            if tuple(target.shape) != source.shapes[name]:
                raise CheckpointError(f'{source.checkpoint}: tensor {name} has shape {source.shapes[name]}, the '
                                      f'model needs {tuple(target.shape)}')
        read_in_place = {name for name in targets if source.sharded and source.is_stored_as_read(name)}
        if read_in_place:
            # DCP reads each rank's shard of every target, in place.
            load_sharded({MODEL_PREFIX + source.stored_name(name): targets[name] for name in read_in_place},
                         source.checkpoint, collective=True)
        with torch.no_grad():
            # Merged adapters and full checkpoints (one pickle) have no partial reading.
            for name in tqdm([n for n in targets if n not in read_in_place], desc=desc, unit='tensor', disable=None):
                target = targets[name]
                local_part(target).copy_(source.read(name)[local_region(target)])

    def region_reader(self) -> Callable[[str, tuple[slice, ...]], torch.Tensor]:
        # Merged adapters and full checkpoints have no partial reading: the last tensor read is kept
        # for the next regions of it (an expert w2's are read one expert at a time).
        read_whole = functools.lru_cache(maxsize=1)(ComposerTensors(self.path, self.stored_config).read)
        return lambda name, region: read_whole(name)[region]

    def load(self, device='cpu', dtype: torch.dtype | None = None) -> DbrxLM:
        model = DbrxLM(self.config, device='meta').to_empty(device='cpu')
        model.load_state_dict(dict(ComposerTensors(self.path, self.stored_config)), strict=True)
        return model.to(device=device, dtype=dtype).eval()


@dataclass(frozen=True)
class Format:
    name: str
    looks_like: str  # for the error when nothing matches
    matches: Callable[[Path], bool]
    read_config: Callable[[Path], ModelConfig]
    opens_as: type[SavedModel]


# The first match wins: a Composer save_folder also holds the config.yaml of its model.
COMPOSER = Format(name='Composer training checkpoint', looks_like='a save_folder, ep*-ba*/ or *.pt',
                  matches=is_composer_checkpoint, read_config=read_model_config, opens_as=ComposerCheckpoint)
NATIVE = Format(name='dbrx_train checkpoint', looks_like='config.yaml + safetensors', matches=is_native_checkpoint,
                read_config=read_config, opens_as=SafetensorsModel)
HF = Format(name='transformers DBRX directory', looks_like='config.json + safetensors', matches=is_hf_directory,
            read_config=model_config_from_hf, opens_as=TransformersModel)
FORMATS = (COMPOSER, NATIVE, HF)


def detect_format(path: str | Path) -> Format:
    path = local_saved_model(str(path)) if is_remote(path) else Path(path)
    if not path.exists():
        raise CheckpointError(f'{path} does not exist')
    for candidate in FORMATS:
        if candidate.matches(path):
            return candidate
    expected = ', '.join(f'a {f.name} ({f.looks_like})' for f in FORMATS)
    raise CheckpointError(f'{path} is not a model checkpoint: expected {expected}')


def open_saved(path: str | Path) -> SavedModel:
    """The format and model config of the model saved at `path` (a local path, or a URI: downloaded
    first), without reading its weights."""
    path = local_saved_model(str(path)) if is_remote(path) else Path(path)
    kind = detect_format(path)
    return kind.opens_as(path, kind, kind.read_config(path))


def load_pretrained(path: str | Path, device='cpu', dtype: torch.dtype | None = None,
                    quantize: str | None = None, group_size: int | None = None) -> DbrxLM:
    """The model saved at `path` (any format above, LoRA adapters merged), on `device`, in eval mode.
    `dtype` None keeps the stored dtype, except that `quantize` ('int8' or 'int4', see
    `dbrx_train.model.quantize`; `group_size` for int4, 128 by default) computes in bfloat16 unless
    told otherwise: torch's int8 CPU kernel is fast only with 16-bit activations."""
    if quantize is not None and dtype is None:
        dtype = torch.bfloat16
    return quantize_model(open_saved(path).load(device, dtype), quantize, group_size=group_size).eval()
