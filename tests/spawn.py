"""Runs a test function on N ranks: spawned processes with a gloo process group, one thread each.

Much faster than the Composer launcher for the numeric tests of distributed code. The function
must be importable (defined at module level); what each rank returns comes back as a list.
"""

from __future__ import annotations

import os
import socket
import tempfile
from datetime import timedelta
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
        # A gloo worker thread may still be freeing the last collective's tensors, which takes the
        # GIL, while destroying the group joins that thread holding the GIL: a deadlock (torch 2.7;
        # a rank of an expert-parallel test hung so once). A barrier waits with the GIL released,
        # so the thread finishes first; monitored, so a rank whose peer failed does not wait forever.
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=120))
        finally:
            dist.destroy_process_group()


class SpawnedOnce:
    """`fn` run once per world size, when first asked for, and what its ranks returned kept: a test
    module's cases of one world size share one group of ranks (starting processes is the slow part)."""

    def __init__(self, fn, *args):
        self.fn, self.args, self.results = fn, args, {}

    def __call__(self, world_size: int) -> list:
        if world_size not in self.results:
            self.results[world_size] = run_ranks(self.fn, world_size, *self.args)
        return self.results[world_size]
