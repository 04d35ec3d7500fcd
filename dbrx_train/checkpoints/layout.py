"""A Composer checkpoint in the other layout: sharded (a DCP folder, what FSDP2 runs write) <-> full
(one `torch.save` file, what a single process writes).

A run loads its checkpoint in the layout it trains in: one process trains without FSDP and reads a
full file; several FSDP2 ranks read a DCP folder and reshard it to their own number. So resuming a
2-rank run with one process (or the other way round) converts the checkpoint first, with
torch.distributed.checkpoint's own converters: same nested state (model, optimizer keyed by
parameter names, scheduler, timestamp, data position, RNG of every rank that saved it), other layout.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from composer.utils import dist

log = logging.getLogger(__name__)

CONVERTED = '.converted'  # in save_folder: the last checkpoint converted to the other layout


def in_layout(path: str, sharded: bool) -> str:
    """`path`, or a copy of it converted to the layout this run loads (sharded or full), written
    beside it under `.converted/` by local rank 0. Every rank calls this."""
    source = Path(path)
    if source.is_dir() == sharded:
        return path
    stem = source.name.removesuffix('-rank0.pt')
    target = source.parent / CONVERTED / (stem if sharded else f'{stem}-rank0.pt')
    if dist.get_local_rank() == 0:
        _convert(source, target, sharded)
    dist.barrier()
    return str(target)


def _convert(source: Path, target: Path, sharded: bool) -> None:
    # torch's converters, imported on use: torch.distributed.checkpoint takes a while to import.
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp

    if target.exists():
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + '.partial')
    if partial.exists():
        shutil.rmtree(partial) if partial.is_dir() else partial.unlink()
    log.warning('checkpoint %s is %s; this run loads %s checkpoints: converting it to %s', source,
                'full' if sharded else 'sharded', 'sharded' if sharded else 'full', target)
    if sharded:
        torch_save_to_dcp(source, partial)
    else:
        dcp_to_torch_save(source, partial)
    os.replace(partial, target)
