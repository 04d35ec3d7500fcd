"""Removes the Streaming shared memory that runs which are gone left in /dev/shm.

Every `StreamingDataset` keeps its state in shared-memory blocks named `{prefix:06}_{name}` (and
two lock files `{prefix:06}_*_filelock` in the temporary folder); a run killed with -9 cannot
unlink them. Left there, every later dataset on the machine opens them while it looks for a free
prefix and holds the descriptors to the end of its process, until a long-lived process (a test
session, an evaluation, the server) runs out of open files. Streaming's own
`clean_stale_shared_memory()` stops at the first prefix number without leftovers, which a killed
run's gaps defeat, and removes blocks whether or not a live run uses them.

`remove_stale_shared_memory()` removes, whatever their prefix number, exactly the blocks (and lock
files) of this user that no live process holds open or mapped. Call it before any dataset is built,
once per machine (local rank 0).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path

from composer.utils import dist

log = logging.getLogger(__name__)

SHARED_MEMORY = Path('/dev/shm')
# Streaming 0.12's names (streaming.base.constant.SHM_TO_CLEAN and the two file locks).
BLOCK = re.compile(r'\d{6}_(locals|barrier|next_epoch|cache_usage|shard_states|shard_access_times|resume'
                   r'|epoch_shape|epoch_data)')
LOCK_FILE = re.compile(r'(\d{6})_(barrier|cache)_filelock')


def remove_stale_shared_memory(shared_memory: Path = SHARED_MEMORY, lock_folder: Path | None = None) -> int:
    """Removes Streaming's blocks that no live process holds, and the lock files of prefixes left
    without blocks; logs one line with the count and returns the number of blocks removed."""
    if not shared_memory.is_dir():
        return 0
    lock_folder = Path(lock_folder or tempfile.gettempdir())
    uid = os.getuid()
    blocks = [p for p in _entries(shared_memory) if BLOCK.fullmatch(p.name) and _owned_by(p, uid)]
    locks = [p for p in _entries(lock_folder) if LOCK_FILE.fullmatch(p.name) and _owned_by(p, uid)]
    if not blocks and not locks:
        return 0
    held = files_held_open()
    removed = 0
    for block in blocks:
        if file_identity(block) not in held:
            block.unlink(missing_ok=True)
            removed += 1
    live_prefixes = {p.name[:6] for p in _entries(shared_memory) if BLOCK.fullmatch(p.name)}
    for lock in locks:
        if lock.name[:6] not in live_prefixes and file_identity(lock) not in held:
            lock.unlink(missing_ok=True)
    if removed:
        log.warning('removed %d stale Streaming shared-memory blocks of runs that are gone from %s', removed,
                    shared_memory)
    return removed


def remove_stale_shared_memory_on_each_node() -> None:
    """`remove_stale_shared_memory` on local rank 0 while the node's other ranks wait: before any
    rank builds a dataset (the process group, if any, is initialized)."""
    if dist.get_local_rank() == 0:
        remove_stale_shared_memory()
    dist.barrier()


def _entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def file_identity(path: Path) -> tuple[int, int] | None:
    try:
        info = path.lstat()
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _owned_by(path: Path, uid: int) -> bool:
    try:
        return path.lstat().st_uid == uid
    except OSError:
        return False


def files_held_open() -> set[tuple[int, int]]:
    """(device, inode) of every file a process holds open or mapped, as far as /proc shows this user
    (a block of this user, created mode 0600, can only be held by processes of this user). By inode,
    not name: a process may hold an unlinked block whose name a later one reuses."""
    held = set()
    for pid in os.listdir('/proc'):
        if not pid.isdigit():
            continue
        fd_folder = f'/proc/{pid}/fd'
        try:
            for fd in os.listdir(fd_folder):
                try:
                    info = os.stat(f'{fd_folder}/{fd}')
                    held.add((info.st_dev, info.st_ino))
                except OSError:
                    pass
            with open(f'/proc/{pid}/maps') as maps:
                for line in maps:
                    fields = line.split(None, 5)  # address perms offset major:minor inode path
                    if len(fields) == 6 and fields[4] != '0':
                        major, minor = (int(n, 16) for n in fields[3].split(':'))
                        held.add((os.makedev(major, minor), int(fields[4])))
        except OSError:  # gone meanwhile, or another user's
            continue
    return held
