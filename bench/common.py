"""What the benchmarks share: the `bench` model config, a transformers twin with the same weights,
the measured matmul peak, timing in turns, and a process's resident memory."""

from __future__ import annotations

import ctypes
import datetime
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from dbrx_train.checkpoints.hf import hf_config, hf_names
from dbrx_train.model import DbrxLM, ModelConfig
from dbrx_train.training.hardware import matmul_peak_flops
from dbrx_train.typed_config import load_yaml, parse

BENCH_YAML = Path(__file__).resolve().parent.parent / 'yamls' / 'models' / 'dbrx-bench.yaml'


def bench_config() -> tuple[ModelConfig, str]:
    """The benchmark model config and where it came from."""
    data = load_yaml(BENCH_YAML)
    return parse(ModelConfig, data.get('model', data), 'model'), str(BENCH_YAML.relative_to(BENCH_YAML.parents[2]))


def hf_twin(model: DbrxLM):
    """A transformers `DbrxForCausalLM` (SDPA attention) holding copies of `model`'s weights."""
    from transformers import DbrxForCausalLM

    twin = DbrxForCausalLM._from_config(hf_config(model.config), attn_implementation='sdpa')
    names = hf_names(model.config.n_layers)
    missing, unexpected = twin.load_state_dict(
        {names[name]: tensor for name, tensor in model.state_dict().items()}, strict=False
    )
    # Only the rotary buffers are transformers' own.
    if unexpected or any('rotary_emb' not in name for name in missing):
        raise RuntimeError(f'weight map is incomplete: missing {missing}, unexpected {unexpected}')
    return twin


def model_pair(config: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    ours = DbrxLM(config)
    return ours, hf_twin(ours)


def matmul_peak_gflops() -> float:
    """The fp32 matmul rate MFU is measured against: the same measurement the trainer logs MFU with."""
    return matmul_peak_flops(torch.float32, size=3072, seconds=2.0) / 1e9


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(fns: dict, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds of each function, running them in turns (order flipped every round) so that
    a noisy neighbour slows all of them alike."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else reversed(names):
            times[name].append(timed(fns[name]))
    return {name: statistics.median(t) for name, t in times.items()}


def _status_kib(key: str) -> int:
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(key + ':'):
            return int(line.split()[1])
    raise RuntimeError(f'{key} not in /proc/self/status')


def resident_mib() -> float:
    """Resident memory now, after handing freed heap pages back to the OS."""
    ctypes.CDLL('libc.so.6').malloc_trim(0)
    return _status_kib('VmRSS') / 1024


def reset_peak_resident() -> None:
    """Restarts the kernel's peak-RSS counter (VmHWM) at the current RSS."""
    Path('/proc/self/clear_refs').write_text('5')


def peak_resident_mib() -> float:
    return _status_kib('VmHWM') / 1024


def mem_available_bytes() -> int:
    """MemAvailable of /proc/meminfo: what can be allocated without swapping."""
    for line in Path('/proc/meminfo').read_text().splitlines():
        if line.startswith('MemAvailable:'):
            return int(line.split()[1]) * 1024
    return 0


def run_header() -> str:
    """What every memory table starts with: date, commit, machine, CPU capability and load."""
    repo = Path(__file__).resolve().parents[1]
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=repo, capture_output=True,
                            text=True).stdout.strip()
    load = ' '.join(Path('/proc/loadavg').read_text().split()[:3])
    return (f'{datetime.date.today()}, commit {commit}, {platform.machine()}, capability '
            f'{torch.backends.cpu.get_cpu_capability()}, load average {load}')
