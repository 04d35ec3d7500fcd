"""Reading the model out of the Composer checkpoints that `train.py` writes.

The trainer saves the model config as `config.yaml` in `save_folder`, beside Composer's
checkpoints (`ep{E}-ba{B}/` sharded, or `ep{E}-ba{B}-rank0.pt` full). Loading needs no process
group and never reads the optimizer state.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from dbrx_train.checkpoints.native import CONFIG_FILE, read_config
from dbrx_train.errors import CheckpointError
from dbrx_train.model.config import ModelConfig
from dbrx_train.model.dbrx import DbrxLM

MODEL_PREFIX = 'state.model.model.'  # where Composer puts ComposerDbrx.model's tensors
LATEST = 'latest-rank0.pt'


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


def load_composer_checkpoint(path: str | Path, device='cpu', dtype: torch.dtype | None = None) -> DbrxLM:
    checkpoint = resolve(path)
    config = read_model_config(checkpoint)
    model = DbrxLM(config, device='meta').to_empty(device='cpu')
    shapes, read = stored_model_tensors(checkpoint)
    check_stored_shapes(checkpoint, shapes, {name: tuple(t.shape) for name, t in model.state_dict().items()})
    model.load_state_dict({name: read(name) for name in shapes}, strict=True)
    return model.to(device=device, dtype=dtype).eval()


def stored_model_tensors(checkpoint: Path) -> tuple[dict[str, tuple[int, ...]], Callable[[str], torch.Tensor]]:
    """The model tensors of a Composer checkpoint by their `DbrxLM` state-dict names (LoRA parts
    included): each one's shape, and a function that reads one. A sharded checkpoint is read
    tensor by tensor; a full one is a single pickle, loaded once."""
    if not checkpoint.is_dir():
        state = torch.load(checkpoint, map_location='cpu', weights_only=False)  # Composer pickles its state
        weights = {k.removeprefix('model.'): v for k, v in state['state']['model'].items()}
        return {name: tuple(t.shape) for name, t in weights.items()}, weights.__getitem__

    stored = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata

    def read(name: str) -> torch.Tensor:
        meta = stored[MODEL_PREFIX + name]
        tensor = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        with warnings.catch_warnings():  # 'assuming ... a single process': yes, on purpose
            warnings.simplefilter('ignore', UserWarning)
            dcp.load({MODEL_PREFIX + name: tensor}, checkpoint_id=str(checkpoint), no_dist=True)
        return tensor

    shapes = {key.removeprefix(MODEL_PREFIX): tuple(meta.size) for key, meta in stored.items()
              if key.startswith(MODEL_PREFIX)}
    return shapes, read


def check_stored_shapes(checkpoint: Path, stored: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]
                        ) -> None:
    """The tensors a checkpoint holds are the ones its config describes: the first that is missing,
    of another shape or unexpected is a `CheckpointError` naming it."""
    for name, shape in expected.items():
        if name not in stored:
            raise CheckpointError(f'{checkpoint}: tensor {name} is missing')
        if stored[name] != shape:
            raise CheckpointError(f'{checkpoint}: tensor {name} has shape {stored[name]}, the config needs {shape}')
    unexpected = sorted(set(stored) - set(expected))
    if unexpected:
        raise CheckpointError(f'{checkpoint}: unexpected tensor {unexpected[0]}')
