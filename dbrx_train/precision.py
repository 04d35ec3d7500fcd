"""The precision a run computes in on this machine: `amp_bf16` on a CPU only where bf16 is native,
and how Composer's Trainer and `ComposerDbrx` share the autocast (Composer sets none up on a CPU)."""

from __future__ import annotations

import logging

import torch

from dbrx_train.errors import ConfigError

log = logging.getLogger(__name__)


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


def composer_precision(precision: str, device: str) -> tuple[str, bool]:
    """The precision to give Composer's Trainer for `precision` (resolved) on `device`, and whether
    `ComposerDbrx` must autocast itself: Composer refuses any autocast on a CPU ("... is not supported
    for CPU training"), so there the model runs its bf16 autocast and the Trainer runs fp32."""
    if device == 'cpu' and precision == 'amp_bf16':
        return 'fp32', True
    return precision, False
