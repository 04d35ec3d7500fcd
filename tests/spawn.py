"""Runs a test function on N ranks: spawned processes with a gloo process group, one thread each.

Much faster than the Composer launcher for the numeric tests of distributed code. The function
must be importable (defined at module level); what each rank returns comes back as a list.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_ranks(fn, world_size: int, *args) -> list:
    """`fn(*args)` on `world_size` ranks; each rank's return value, in rank order."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_main, args=(world_size, port, tmp, fn, args), nprocs=world_size, join=True)
        return [torch.load(Path(tmp) / f'{rank}.pt', weights_only=False) for rank in range(world_size)]


def _rank_main(rank: int, world_size: int, port: int, tmp: str, fn, args) -> None:
    torch.set_num_threads(1)  # ranks share the machine's cores
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    dist.init_process_group('gloo', rank=rank, world_size=world_size)
    try:
        torch.save(fn(*args), Path(tmp) / f'{rank}.pt')
    finally:
        dist.destroy_process_group()
