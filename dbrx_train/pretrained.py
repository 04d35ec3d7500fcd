"""`load_pretrained(path)`: a ready-to-run `DbrxLM` from any saved form of the model.

The format is told by the files present; each format is one loader in `LOADERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from dbrx_train.checkpoint import load_checkpoint
from dbrx_train.composer_checkpoint import is_composer_checkpoint, load_composer_checkpoint
from dbrx_train.convert import load_hf
from dbrx_train.errors import CheckpointError
from dbrx_train.model.dbrx import DbrxLM


def _has(marker: str) -> Callable[[Path], bool]:
    return lambda path: (path / marker).is_file()


# format name -> (what it looks like, what marks it, loader); the first match wins.
LOADERS: dict[str, tuple[str, Callable[[Path], bool], Callable[[Path, object, torch.dtype | None], DbrxLM]]] = {
    'Composer training checkpoint': ('a save_folder, ep*-ba*/ or *.pt', is_composer_checkpoint,
                                     load_composer_checkpoint),
    'dbrx_train checkpoint': ('config.yaml', _has('config.yaml'), load_checkpoint),
    'transformers DBRX directory': ('config.json', _has('config.json'), load_hf),
}


def detect_format(path: str | Path) -> str:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f'{path} does not exist')
    for name, (_, matches, _) in LOADERS.items():
        if matches(path):
            return name
    expected = ', '.join(f'a {name} ({looks})' for name, (looks, _, _) in LOADERS.items())
    raise CheckpointError(f'{path} is not a model checkpoint: expected {expected}')


def load_pretrained(path: str | Path, device='cpu', dtype: torch.dtype | None = None) -> DbrxLM:
    """The model saved at `path`, on `device`, in eval mode. `dtype` None keeps the stored dtype."""
    *_, loader = LOADERS[detect_format(path)]
    return loader(Path(path), device, dtype).eval()
