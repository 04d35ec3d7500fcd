"""Stale Streaming shared memory: what killed runs leave in /dev/shm is removed, whatever its prefix
number, and what a live process holds is kept."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

from dbrx_train.data import TextDataset, TextDatasetConfig
from dbrx_train.data.shared_memory import BLOCK, SHARED_MEMORY, remove_stale_shared_memory

pytestmark = pytest.mark.skipif(not SHARED_MEMORY.is_dir(), reason='needs /dev/shm')
NAMES = ('locals', 'barrier', 'next_epoch', 'cache_usage', 'shard_states', 'shard_access_times', 'resume',
         'epoch_shape', 'epoch_data')  # the blocks of one Streaming dataset


def _free_prefixes(count: int) -> list[int]:
    taken = {int(p.name[:6]) for p in SHARED_MEMORY.iterdir() if BLOCK.fullmatch(p.name)}
    return [n for n in range(1_000_000) if n not in taken][:count]


def _leave_blocks(prefix: int) -> list[Path]:
    """A dead run's blocks: files in /dev/shm are POSIX shared memory, and nothing holds these."""
    blocks = [SHARED_MEMORY / f'{prefix:06}_{name}' for name in NAMES]
    for block in blocks:
        block.write_bytes(bytes(64))
    return blocks


def _held_by_this_process(identities: set[tuple[int, int]]) -> int:
    """How many of this process's descriptors point at those files."""
    count = 0
    for fd in os.listdir('/proc/self/fd'):
        try:
            info = os.stat(f'/proc/self/fd/{fd}')
        except OSError:
            continue
        count += (info.st_dev, info.st_ino) in identities
    return count


def test_stale_prefixes_with_gaps_are_removed_and_held_blocks_kept(write_mds, caplog):
    # As killed runs leave them: the lowest free prefixes, with gaps (Streaming's own cleaner stops at
    # the first gap), and one block a live process (this one) holds open.
    first, second, _gap, third, held_prefix = _free_prefixes(5)
    stale = [*_leave_blocks(first), *_leave_blocks(second), *_leave_blocks(third)]
    stale_files = {(block.stat().st_dev, block.stat().st_ino) for block in stale}
    held = SHARED_MEMORY / f'{held_prefix:06}_locals'
    with open(held, 'wb') as holder:
        holder.write(bytes(64))
        holder.flush()
        try:
            with caplog.at_level('WARNING', logger='dbrx_train'):
                removed = remove_stale_shared_memory()
            assert not [block for block in stale if block.exists()]
            assert held.exists()
        finally:
            held.unlink()
    assert removed >= len(stale)  # and whatever else dead runs on this machine left
    [line] = [r.getMessage() for r in caplog.records if 'shared-memory' in r.getMessage()]
    assert line.startswith(f'removed {removed} stale Streaming shared-memory blocks')

    # Datasets built afterwards open none of them. (Left there, every dataset built in this process
    # opened them while looking for a free prefix, and kept those descriptors: each of them, per dataset.)
    local, _ = write_mds([f'document {i} ' * 20 for i in range(20)], 'mds', 32)
    datasets = [TextDataset(TextDatasetConfig(local=str(local), max_seq_len=32)) for _ in range(2)]
    assert _held_by_this_process(stale_files) == 0
    del datasets


def test_descriptors_stay_flat_as_datasets_come_and_go_after_killed_runs(write_mds):
    """A killed run's prefixes, with a gap, then datasets built one after another in this long-lived
    process: once the stale blocks are removed, the open descriptors do not grow with each dataset."""
    first, _gap, second = _free_prefixes(3)
    stale = [*_leave_blocks(first), *_leave_blocks(second)]
    stale_files = {(block.stat().st_dev, block.stat().st_ino) for block in stale}
    remove_stale_shared_memory()
    local, _ = write_mds([f'document {i} ' * 20 for i in range(20)], 'mds', 32)
    counts = []
    for _ in range(3):
        dataset = TextDataset(TextDatasetConfig(local=str(local), max_seq_len=32))
        assert dataset[0]['input_ids'].numel() == 32
        assert _held_by_this_process(stale_files) == 0
        del dataset
        gc.collect()
        counts.append(len(os.listdir('/proc/self/fd')))
    assert counts[1:] == counts[:-1], counts
