"""Reading the model out of the Composer checkpoints that `train.py` writes.

The trainer saves the model config as `config.yaml` in `save_folder`, beside Composer's
checkpoints (`ep{E}-ba{B}/` sharded, or `ep{E}-ba{B}-rank0.pt` full). Loading needs no process
group and never reads the optimizer state.

A fine-tuning run with LoRA saves each adapted weight as its frozen base
(`...parametrizations.w1.original`) plus its factors (`lora_A`, `lora_B`, `scale`):
`ComposerTensors` reads such a checkpoint under the plain `DbrxLM` names, the adapters merged.
A QLoRA run's checkpoint (its model config quantized) holds the frozen base as stored (packed int4,
scales, zeros) and the adapters as `...lora.<tensor>.lora_A`: it reads as the float model, each base
matrix dequantized and merged with its adapter.

Loading a checkpoint runs no code from it: unpickling can run any code a file asks for, and
checkpoints get downloaded. A full checkpoint is read with `torch.load(weights_only=True)`, which
builds only tensors, containers and the few other types a checkpoint of `train.py` holds
(`SAFE_GLOBALS`: numpy's RNG state arrays, a timedelta, torch's version); a sharded one's
`.metadata` (a pickle too) with an unpickler that builds only `torch.distributed.checkpoint`'s
metadata types (`SafeReader`); its tensors are read by DCP with `weights_only=True`. Anything
else is refused in one line naming the file; `DBRX_TRAIN_TRUST_CHECKPOINTS=1` reads a trusted
full checkpoint with full unpickling.
"""

from __future__ import annotations

import datetime
import os
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.filesystem as dcp_filesystem
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch.torch_version import TorchVersion

from dbrx_train.checkpoints.native import CONFIG_FILE, read_config
from dbrx_train.checkpoints.storage import expected_shapes
from dbrx_train.errors import CheckpointError
from dbrx_train.model.config import ModelConfig
from dbrx_train.model.lora import merged_weight, split_adapted_name
from dbrx_train.model.quantize import dequantize_matrix, dequantized_config, matrix_layouts

MODEL_PREFIX = 'state.model.model.'  # where Composer puts ComposerDbrx.model's tensors
LATEST = 'latest-rank0.pt'
TRUST_ENV = 'DBRX_TRAIN_TRUST_CHECKPOINTS'
LORA_PARTS = ('lora_A', 'lora_B', 'scale')
# What unpickling a full checkpoint of train.py may build besides tensors and containers: numpy
# arrays (the RNG states), a timedelta and torch's version (Composer's metadata).
SAFE_GLOBALS = [np.ndarray, np.dtype, np._core.multiarray._reconstruct, *(getattr(np.dtypes, name) for name in
                np.dtypes.__all__), datetime.timedelta, TorchVersion]
# What a sharded checkpoint's `.metadata` may build: DCP's metadata types, paths, sizes, dtypes.
_DCP_METADATA_GLOBALS = {
    *((dcp_metadata.__name__, name) for name in ('Metadata', 'MetadataIndex', 'StorageMeta', 'TensorProperties',
                                                 'TensorStorageMetadata', 'BytesStorageMetadata',
                                                 'ChunkStorageMetadata', '_MEM_FORMAT_ENCODING')),
    (dcp_filesystem.__name__, '_StorageInfo'), ('torch', 'Size'), ('torch.serialization', '_get_layout'),
    ('pathlib', 'PosixPath'), ('pathlib', 'WindowsPath'), ('pathlib', 'PurePosixPath'),
}


def is_composer_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / '.metadata').is_file() or (path / LATEST).exists() or (path.is_file() and path.suffix == '.pt')


def resolve(path: str | Path) -> Path:
    """The checkpoint itself: a save folder means its latest checkpoint."""
    path = Path(path)
    if (path / LATEST).exists():
        path = (path / LATEST).resolve()
    if not path.exists():
        raise CheckpointError(f'no checkpoint at {path}')
    return path


def read_model_config(path: str | Path) -> ModelConfig:
    """The model config that train.py writes into save_folder, beside the checkpoints."""
    checkpoint = resolve(path)
    if not (checkpoint.parent / CONFIG_FILE).is_file():
        raise CheckpointError(f'{checkpoint.parent / CONFIG_FILE} is missing: the model config that train.py '
                              'writes into save_folder')
    return read_config(checkpoint.parent)


def load_full_checkpoint(checkpoint: Path) -> dict:
    """The pickled state of a full checkpoint, built from tensors, containers and `SAFE_GLOBALS`
    only, unless `TRUST_ENV` is 1."""
    if os.environ.get(TRUST_ENV) == '1':
        return torch.load(checkpoint, map_location='cpu', weights_only=False)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(checkpoint, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        allowed = {f'{g.__module__}.{g.__qualname__}' for g in SAFE_GLOBALS}
        unsafe = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(checkpoint) if g not in allowed]
        raise CheckpointError(
            f'{checkpoint}: refusing to unpickle {", ".join(unsafe) or "it"} (loading a checkpoint runs no code '
            f'from it); if you trust the file, set {TRUST_ENV}=1') from None


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_METADATA_GLOBALS or module == 'torch' and isinstance(getattr(torch, name, None),
                                                                                        torch.dtype):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f'{module}.{name}')


class SafeReader(dcp.FileSystemReader):
    """DCP's reader of a sharded checkpoint, unpickling its `.metadata` with DCP's types only."""

    def read_metadata(self) -> dcp_metadata.Metadata:
        path = Path(self.path) / '.metadata'
        try:
            with open(path, 'rb') as f:
                metadata = _MetadataUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise CheckpointError(f'{path}: refusing to unpickle {e} (loading a checkpoint runs no code from it)'
                                  ) from None
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise CheckpointError(f'{path}: not a torch.distributed.checkpoint metadata file')
        if metadata.storage_meta is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def load_sharded(state_dict: dict[str, torch.Tensor], checkpoint: Path, collective: bool = False) -> None:
    """Fills `state_dict` (keys as stored; DTensors get their local shards) from a sharded checkpoint;
    `collective`: every rank of the process group calls it (when there is one)."""
    with warnings.catch_warnings():  # 'assuming ... a single process': yes, on purpose
        warnings.simplefilter('ignore', UserWarning)
        dcp.load(state_dict, storage_reader=SafeReader(str(checkpoint)),
                 no_dist=not (collective and torch.distributed.is_initialized()))


class ComposerTensors:
    """The model tensors of a Composer checkpoint under plain `DbrxLM` names, LoRA adapters merged
    into their weights; checked against `config` (names and shapes) on opening. A sharded
    checkpoint is read tensor by tensor; a full one is a single pickle, loaded once. With a quantized
    `config` (QLoRA) the tensors are those of the float model (`dequantized_config`)."""

    def __init__(self, path: str | Path, config: ModelConfig, weights: dict[str, torch.Tensor] | None = None):
        """`weights`: a model's full state dict in memory instead (`path` then only names it in errors)."""
        self.checkpoint = Path(path) if weights is not None else resolve(path)
        self.sharded = weights is None and self.checkpoint.is_dir()
        if weights is not None:
            self._weights = weights
            self._stored = {name: tuple(t.shape) for name, t in weights.items()}
        elif self.sharded:
            metadata = SafeReader(str(self.checkpoint)).read_metadata().state_dict_metadata
            self._dcp = {key.removeprefix(MODEL_PREFIX): meta for key, meta in metadata.items()
                         if key.startswith(MODEL_PREFIX)}
            self._stored = {name: tuple(meta.size) for name, meta in self._dcp.items()}
        else:
            state = load_full_checkpoint(self.checkpoint)
            self._weights = {k.removeprefix('model.'): v for k, v in state['state']['model'].items()}
            self._stored = {name: tuple(t.shape) for name, t in self._weights.items()}
        self._parts: dict[str, dict[str, str]] = {}  # plain name -> part ('weight', 'lora_A', ...) -> stored name
        for name in self._stored:
            plain, part = split_adapted_name(name)
            self._parts.setdefault(plain, {})[part] = name
        self.config = config
        self._layouts = {layout.float_name: layout for layout in matrix_layouts(config)} if config.quantization else {}
        self._stored_shapes = expected_shapes(config)
        self.shapes = expected_shapes(dequantized_config(config))  # what it reads as
        self._check()

    def _check(self) -> None:
        """The first tensor that is missing, of another shape or unexpected is a `CheckpointError` naming it."""
        for name, shape in self._stored_shapes.items():
            stored = self._parts.get(name, {}).get('weight')
            if stored is None:
                raise CheckpointError(f'{self.checkpoint}: tensor {name} is missing')
            if self._stored[stored] != shape:
                raise CheckpointError(f'{self.checkpoint}: tensor {name} has shape {self._stored[stored]}, '
                                      f'the config needs {shape}')
            missing = [p for p in LORA_PARTS if p not in self._parts[name]]
            if len(missing) < len(LORA_PARTS) and missing:
                raise CheckpointError(f'{self.checkpoint}: the LoRA adapter of {name} has no {missing[0]}')
        unexpected = sorted(set(self._parts) - set(self._stored_shapes))
        if unexpected:
            raise CheckpointError(f'{self.checkpoint}: unexpected tensor {unexpected[0]}')

    def is_adapted(self, name: str) -> bool:
        return 'lora_A' in self._parts[name]

    def is_stored_as_read(self, name: str) -> bool:
        """Whether tensor `name` is read as stored (neither merged with an adapter nor dequantized)."""
        return name not in self._layouts and not self.is_adapted(name)

    def stored_name(self, name: str) -> str:
        """Where the base weight of `name` is in the checkpoint (without `MODEL_PREFIX`)."""
        return self._parts[name]['weight']

    def read(self, name: str) -> torch.Tensor:
        """The weight `name` (`DbrxLM` name), merged with its adapter as `merge_lora` would."""
        if name in self._layouts:
            layout = self._layouts[name]
            dtype = self._dtype(layout.stored['scales'])
            weight = dequantize_matrix(self.config, layout, lambda n: self._read(self.stored_name(n)), torch.float32)
            weight = weight.to(dtype)
        else:
            weight = self._read(self.stored_name(name))
        if self.is_adapted(name):
            adapter = [self._read(self._parts[name][part]).float() for part in LORA_PARTS]
            weight = merged_weight(weight.float(), *adapter).to(weight.dtype)
        return weight

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.shapes:
            yield name, self.read(name)

    def _dtype(self, name: str) -> torch.dtype:
        stored = self.stored_name(name)
        return self._dcp[stored].properties.dtype if self.sharded else self._weights[stored].dtype

    def _read(self, stored_name: str) -> torch.Tensor:
        if not self.sharded:
            return self._weights[stored_name]
        meta = self._dcp[stored_name]
        tensor = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        load_sharded({MODEL_PREFIX + stored_name: tensor}, self.checkpoint)
        return tensor
