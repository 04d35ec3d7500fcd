"""What this machine can do: the measured dense matmul peak that MFU is reported against, and the
memory a layout must fit in."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch


def matmul_peak_flops(dtype: torch.dtype = torch.float32, size: int = 2048, seconds: float = 1.0,
                      device: str = 'cpu') -> float:
    """Best FLOP/s of square `size` matmuls over about `seconds`, on this process's threads."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    torch.mm(a, b)  # warm-up: thread pool and kernel selection
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b)
        if device != 'cpu':
            torch.cuda.synchronize()
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def host_memory_bytes() -> int:
    """This host's memory for the processes of this job: the physical memory, or the cgroup's limit
    when that is lower (a container)."""
    total = os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    for limit_file in ('/sys/fs/cgroup/memory.max', '/sys/fs/cgroup/memory/memory.limit_in_bytes'):
        try:
            limit = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit():
            total = min(total, int(limit))
    return total


def gpu_memory_bytes() -> int:
    """The memory of this process's GPU."""
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
