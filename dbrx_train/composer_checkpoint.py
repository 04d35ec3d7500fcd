"""Reading the model out of the Composer checkpoints that `train.py` writes.

The trainer saves the model config as `config.yaml` in `save_folder`, beside Composer's
checkpoints (`ep{E}-ba{B}/` sharded, or `ep{E}-ba{B}-rank0.pt` full). Loading needs no process
group and never reads the optimizer state.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dbrx_train.checkpoint import CONFIG_FILE, read_config
from dbrx_train.errors import CheckpointError
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


def load_composer_checkpoint(path: str | Path, device='cpu', dtype: torch.dtype | None = None) -> DbrxLM:
    checkpoint = resolve(path)
    if not (checkpoint.parent / CONFIG_FILE).is_file():
        raise CheckpointError(f'{checkpoint.parent / CONFIG_FILE} is missing: the model config that train.py '
                              'writes into save_folder')
    config = read_config(checkpoint.parent)
    model = DbrxLM(config, device='meta').to_empty(device='cpu')
    if checkpoint.is_dir():
        _load_sharded(checkpoint, model)
    else:
        _load_full(checkpoint, model)
    return model.to(device=device, dtype=dtype).eval()


def _load_sharded(checkpoint: Path, model: DbrxLM) -> None:
    import torch.distributed.checkpoint as dcp

    stored = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    targets = {}
    for name, tensor in model.state_dict().items():
        key = MODEL_PREFIX + name
        if key not in stored:
            raise CheckpointError(f'{checkpoint}: tensor {name} is missing')
        if tuple(stored[key].size) != tuple(tensor.shape):
            raise CheckpointError(f'{checkpoint}: tensor {name} has shape {tuple(stored[key].size)}, '
                                  f'the config needs {tuple(tensor.shape)}')
        targets[key] = tensor
    dcp.load(targets, checkpoint_id=str(checkpoint), no_dist=True)  # fills the model's tensors in place


def _load_full(checkpoint: Path, model: DbrxLM) -> None:
    state = torch.load(checkpoint, map_location='cpu', weights_only=False)  # Composer pickles its state
    weights = {k.removeprefix('model.'): v for k, v in state['state']['model'].items()}
    for name, tensor in model.state_dict().items():
        if name not in weights:
            raise CheckpointError(f'{checkpoint}: tensor {name} is missing')
        if weights[name].shape != tensor.shape:
            raise CheckpointError(f'{checkpoint}: tensor {name} has shape {tuple(weights[name].shape)}, '
                                  f'the config needs {tuple(tensor.shape)}')
    unexpected = sorted(set(weights) - set(model.state_dict()))
    if unexpected:
        raise CheckpointError(f'{checkpoint}: tensor {unexpected[0]} is not part of the model its config describes')
    model.load_state_dict(weights, strict=True)
