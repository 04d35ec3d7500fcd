"""What this machine can do: the measured dense matmul peak that MFU is reported against, and the
memory a layout must fit in."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from dbrx_train.errors import ConfigError

log = logging.getLogger(__name__)


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


def cpu_bf16_support() -> str | None:
    """What makes bf16 fast on this CPU ('AMX', 'AVX512_BF16'), or None where it is not: the
    cpuinfo flags, as oneDNN dispatches on them. Without them bf16 matmuls are emulated and
    several times slower than fp32."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = next((line.split(':', 1)[1].split() for line in f if line.startswith('flags')), [])
    except OSError:
        flags = []
    if 'amx_bf16' in flags:
        return 'AMX'
    if 'avx512_bf16' in flags:
        return 'AVX512_BF16'
    return None


def resolve_precision(precision: str, device: str) -> str:
    """The precision to run in: `amp_bf16` on a CPU only where bf16 is native (AVX512_BF16 or AMX;
    elsewhere bf16 matmuls are emulated, slower than fp32). The choice is logged."""
    if device != 'cpu' or precision == 'fp32':
        return precision
    if precision == 'amp_fp16':
        raise ConfigError('precision', 'amp_fp16 needs a GPU; on a CPU use amp_bf16 (where bf16 is native) or fp32')
    capability = torch.backends.cpu.get_cpu_capability()
    native = cpu_bf16_support()
    if native is None:
        log.warning('precision amp_bf16: this CPU (%s) has no native bf16 (AVX512_BF16 or AMX); running in fp32',
                    capability)
        return 'fp32'
    log.info('precision amp_bf16: bf16 autocast on this CPU (%s, %s)', native, capability)
    return precision


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
