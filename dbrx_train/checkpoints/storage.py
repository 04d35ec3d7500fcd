"""Safetensors weight files as this package writes and reads them, whatever the format's names.

    model.safetensors                 every weight
 or model-00001-of-0000N.safetensors  shards of at most `max_shard_bytes`, with
    model.safetensors.index.json      {"metadata": {"total_size": bytes}, "weight_map": {name: file}}

transformers' layout, so this project's checkpoints (`native`) and transformers directories (`hf`)
share the writer and the reader and differ only in tensor names and config file.

A directory is written beside its destination and renamed into place when complete
(`atomic_directory`), so a failed or interrupted save never leaves a half-written checkpoint where
a good one was. Reading checks the safetensors headers (every tensor's name and shape against the
config) before any weight is read, then fills the model file by file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from dbrx_train.errors import CheckpointError, ConfigError
from dbrx_train.model.config import ModelConfig
from dbrx_train.model.dbrx import DbrxLM

WEIGHTS_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
# What a checkpoint directory of either format may hold; `overwrite` replaces nothing else.
_CHECKPOINT_FILE = re.compile(
    r'config\.yaml|config\.json|generation_config\.json'
    r'|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json'
    r'|tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json'  # what an export adds
)
# Floats, and the int8 and packed int4 (uint8) matrices of a quantized checkpoint
# (dbrx_train/model/quantize.py).
_SAFETENSORS_DTYPES = {'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
                       'I8': torch.int8, 'U8': torch.uint8}


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor of a checkpoint lives, read from the safetensors header (no data)."""

    file: Path
    key: str  # its name in the file
    shape: tuple[int, ...]
    dtype: torch.dtype


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of `config` holds, with its shape, from a model on the meta device."""
    return {name: tuple(t.shape) for name, t in DbrxLM(config, device='meta').state_dict().items()}


# ---------------------------------------------------------------- reading


def weight_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint (either format), from its index when it has one."""
    directory = Path(directory)
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())['weight_map']
            names = list(dict.fromkeys(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f'{index_path}: not a valid safetensors index ({e!r})') from None
        files = [directory / name for name in names]
    elif (directory / WEIGHTS_FILE).is_file():
        files = [directory / WEIGHTS_FILE]
    else:
        raise CheckpointError(f'missing file {directory / WEIGHTS_FILE} (and no {INDEX_FILE} in {directory})')
    for file in files:
        if not file.is_file():
            raise CheckpointError(f'missing file {file} (listed in {index_path})')
    return files


def index_tensors(
    directory: str | Path, config: ModelConfig, stored_names: dict[str, str] | None = None
) -> dict[str, StoredTensor]:
    """Reads the headers of a checkpoint's weight files and checks them against `config`.

    `stored_names` maps each model parameter name to its name in the files (default: the same).
    Returns the stored tensors by model name, file by file; raises `CheckpointError` naming the
    first tensor that is unexpected, of the wrong shape or missing.
    """
    expected = expected_shapes(config)
    stored_names = stored_names or {}
    model_name_of = {stored_names.get(n, n): n for n in expected}
    found: dict[str, StoredTensor] = {}
    for file in weight_files(directory):
        try:
            with safe_open(file, framework='pt') as f:
                for key in f.keys():
                    tensor_slice = f.get_slice(key)
                    name = model_name_of.get(key)
                    if name is None:
                        raise CheckpointError(f'unexpected tensor {key!r} in {file}')
                    if name in found:
                        raise CheckpointError(f'tensor {key!r} is in both {found[name].file} and {file}')
                    shape = tuple(tensor_slice.get_shape())
                    if shape != expected[name]:
                        raise CheckpointError(
                            f'tensor {key!r} in {file} has shape {shape}; the config expects {expected[name]}'
                        )
                    dtype = _SAFETENSORS_DTYPES.get(tensor_slice.get_dtype())
                    if dtype is None:
                        raise CheckpointError(
                            f'tensor {key!r} in {file} has dtype {tensor_slice.get_dtype()}; expected a float type (or int8)'
                        )
                    found[name] = StoredTensor(file, key, shape, dtype)
        except SafetensorError as e:
            raise CheckpointError(f'{file}: not a valid safetensors file ({e})') from None
    missing = [key for key, name in model_name_of.items() if name not in found]
    if missing:
        more = f' and {len(missing) - 1} more' if len(missing) > 1 else ''
        shape = expected[model_name_of[missing[0]]]
        raise CheckpointError(f'checkpoint {directory} is missing tensor {missing[0]!r} (shape {shape}){more}')
    return found


def stream_tensors(index: dict[str, StoredTensor], desc: str = 'tensors') -> Iterator[tuple[str, torch.Tensor]]:
    """(model name, tensor) pairs read one at a time, opening each file once."""
    by_file: dict[Path, list[tuple[str, StoredTensor]]] = {}
    for name, stored in index.items():
        by_file.setdefault(stored.file, []).append((name, stored))
    with tqdm(total=len(index), desc=desc, unit='tensor', disable=None) as progress:
        for file, entries in by_file.items():
            with safe_open(file, framework='pt', device='cpu') as f:
                for name, stored in entries:
                    yield name, f.get_tensor(stored.key)
                    progress.update()


def materialize(
    config: ModelConfig, index: dict[str, StoredTensor], device='cpu', dtype: torch.dtype | None = None
) -> DbrxLM:
    """A `DbrxLM` on `device` filled from `index` in eval mode. `dtype` None keeps the stored dtype."""
    dtype = dtype or index['wte.weight'].dtype
    model = DbrxLM(config, device='meta').to(dtype).to_empty(device=device)
    params = model.state_dict()
    with torch.no_grad():
        for name, tensor in stream_tensors(index, desc='loading'):
            params[name].copy_(tensor)
    return model.eval()


# ---------------------------------------------------------------- writing


def write_weights(
    directory: Path, named_tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> None:
    """Writes tensors in order into `model.safetensors`, or into shards of at most `max_shard_bytes`
    (a larger tensor gets a shard of its own) plus an index. Holds at most one shard in memory."""
    parts: list[Path] = []
    weight_map: dict[str, int] = {}  # name -> part number
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total_bytes = 0

    def flush():
        part = directory / f'part-{len(parts):05d}.safetensors'
        save_file(shard, part, metadata={'format': 'pt'})
        parts.append(part)
        shard.clear()

    for name, tensor in named_tensors:
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
            shard_bytes = 0
        shard[name] = tensor.detach().to('cpu').contiguous()
        weight_map[name] = len(parts)
        shard_bytes += size
        total_bytes += size
    if shard or not parts:
        flush()

    if len(parts) == 1:
        parts[0].rename(directory / WEIGHTS_FILE)
        return
    names = [f'model-{i + 1:05d}-of-{len(parts):05d}.safetensors' for i in range(len(parts))]
    for part, final in zip(parts, names):
        part.rename(directory / final)
    index = {'metadata': {'total_size': total_bytes}, 'weight_map': {k: names[v] for k, v in weight_map.items()}}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + '\n')


@contextlib.contextmanager
def atomic_directory(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields an empty temporary directory next to `path` that becomes `path` only if the block
    succeeds. With `overwrite`, an existing checkpoint at `path` is replaced (never a directory
    holding anything else); if the process dies between the two renames, the old checkpoint
    survives as `.<name>.old-*` next to it."""
    path = Path(path)
    if path.exists():
        _check_replaceable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{path.name}.tmp-', dir=path.parent))
    try:
        yield tmp
        _fsync_files(tmp)
        if path.exists():
            old = path.parent / f'.{path.name}.old-{uuid.uuid4().hex[:8]}'
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _check_replaceable(path: Path, overwrite: bool) -> None:
    if not path.is_dir():
        raise CheckpointError(f'{path} exists and is not a directory')
    entries = [p.name for p in path.iterdir()]
    if not entries:
        return
    if not overwrite:
        raise CheckpointError(f'{path} already exists (pass overwrite to replace it)')
    foreign = [name for name in entries if not _CHECKPOINT_FILE.fullmatch(name)]
    if foreign:
        raise CheckpointError(f'{path} holds {foreign[0]!r}, which is not part of a checkpoint; not replacing it')


def _fsync_files(directory: Path) -> None:
    for file in directory.iterdir():
        with open(file, 'rb') as f:
            os.fsync(f.fileno())


def parse_size(text: str) -> int:
    """Bytes from '5GB', '500MB', '64KiB' or a plain integer (the command lines' `--max-shard-size`)."""
    match = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*', text, re.IGNORECASE)
    if not match:
        raise ConfigError('max-shard-size', f'expected a size like 5GB or 500MB, got {text!r}')
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** ' KMGT'.index(unit.upper() or ' '))
