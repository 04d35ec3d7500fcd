"""What this machine can do: the measured dense matmul peak that MFU is reported against."""

from __future__ import annotations

import time

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
