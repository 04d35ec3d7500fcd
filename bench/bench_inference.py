"""Inference in fp32, bf16, weight-only int8 and int4 (groups of 128) against transformers' fp32 and bf16
`generate`, with the memory-bandwidth ceiling of batch-1 decoding (what quantization costs in quality:
bench/bench_quality.py).

    .venv/bin/python bench/bench_inference.py [--quick] [--only peak decode] [--configs bench small]
        [--variants 'ours int4' ...] [--new-tokens N] [--json PATH]

- peak: the fp32 and bf16 matmul rates of this CPU, and the bandwidth a large matrix-vector product reaches.
- decode: batch-1 greedy tokens/s, same weights, all variants in turns (medians), on the bench config and on a
  d_model 256 / 4-layer config; each with the bytes one step reads and the share of the ceiling it reaches.
  "compiled" variants decode with the static-shape cache and the torch.compile'd step
  (`dbrx_train.model.decode`); their compile time is the first run minus the median.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bench_model import log, write_json
from common import alternate, bench_config, hf_twin, timed
from dbrx_train.model import DbrxLM
from dbrx_train.model.quantize import quantize
from dbrx_train.precision import cpu_bf16_support
from dbrx_train.training.hardware import matmul_peak_flops

THREADS = 2
SECTIONS = ('peak', 'decode')
PROMPT_LEN = 16
# (name, dtype, quantization) of our variants; transformers runs the first two dtypes.
OURS = (('fp32', torch.float32, None), ('bf16', torch.bfloat16, None), ('int8', torch.bfloat16, 'int8'),
        ('int4', torch.bfloat16, 'int4'))
COMPILED = ('fp32', 'bf16')  # also decoded with the compiled step
HF = (('fp32', torch.float32), ('bf16', torch.bfloat16))


@dataclass
class Settings:
    new_tokens: int
    repeats: int


FULL = Settings(new_tokens=32, repeats=3)
QUICK = Settings(new_tokens=8, repeats=1)


def ours_variant(model: DbrxLM, dtype: torch.dtype, method: str | None) -> DbrxLM:
    return quantize(copy.deepcopy(model).to(dtype), method).eval()


def step_bytes(model: DbrxLM) -> int:
    """Weight bytes one batch-1 decoding step reads: every tensor but the embedding table (looked up,
    not read whole), the experts' at top_k / num_experts (only the routed ones are read)."""
    ffn = model.config.ffn_config
    total = 0.0
    for name, tensor in model.state_dict().items():
        size = tensor.numel() * tensor.element_size()
        if name.startswith('wte.'):
            continue
        total += size * ffn.moe_top_k / ffn.moe_num_experts if '.experts.' in name else size
    return int(total)


@torch.inference_mode()
def matvec_bandwidth(rows: int = 100352, cols: int = 512) -> float:
    """Bytes/s a large fp32 matrix-vector product reads (the LM head's shape): the ceiling's bandwidth."""
    weight, x = torch.randn(rows, cols), torch.randn(1, cols)
    seconds = min(timed(lambda: torch.nn.functional.linear(x, weight)) for _ in range(20))
    return weight.numel() * 4 / seconds


def bench_peak() -> tuple[list[str], dict]:
    fp32 = matmul_peak_flops(torch.float32, size=2048, seconds=2.0) / 1e9
    bf16 = matmul_peak_flops(torch.bfloat16, size=512, seconds=2.0) / 1e9
    bandwidth = matvec_bandwidth()
    notes = [f'matmul peak: fp32 {fp32:.1f} GFLOP/s (2048^2), bf16 {bf16:.2f} GFLOP/s (512^2) = {bf16 / fp32:.2f}x fp32; '
             f'a 100352x512 fp32 matvec reads {bandwidth / 1e9:.1f} GB/s']
    return notes, {'fp32_gflops': fp32, 'bf16_gflops': bf16, 'matvec_gbps': bandwidth / 1e9}


def variant_names() -> list[str]:
    """Every decode variant: ours in each of OURS (and compiled for COMPILED), then transformers."""
    ours = [f'ours {name}{suffix}' for name, _, _ in OURS for suffix in ('', ' compiled')
            if not suffix or name in COMPILED]
    return ours + [f'transformers {name}' for name, _ in HF]


REFERENCES = ('ours fp32', 'transformers fp32')  # always measured: the tables' ratios are to them


def bench_decode(config, s: Settings, bandwidth: float, variants=None) -> tuple[str, dict]:
    """Batch-1 greedy generation of each of `variants` (None: all), in turns, on random weights of `config`."""
    wanted = set(variant_names() if variants is None else (*REFERENCES, *variants))
    torch.manual_seed(0)
    base = DbrxLM(config).eval()
    hf_base = hf_twin(base).eval()
    prompt = torch.randint(0, config.vocab_size, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(2))
    runs, models, outputs = {}, {}, {}
    for name, dtype, method in OURS:
        model = models[f'ours {name}'] = ours_variant(base, dtype, method)
        for variant, options in ((name, None), (f'{name} compiled', {})):
            if f'ours {variant}' in wanted:
                models[f'ours {variant}'] = model
                runs[f'ours {variant}'] = (lambda m=model, v=variant, o=options: outputs.__setitem__(
                    f'ours {v}', m.generate(prompt, max_new_tokens=s.new_tokens, stop_token_ids=(), compile=o)))
    for name, dtype in HF:
        if f'transformers {name}' not in wanted:
            continue
        model = copy.deepcopy(hf_base).to(dtype)

        @torch.inference_mode()
        def run(m=model):
            m.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                       min_new_tokens=s.new_tokens, max_new_tokens=s.new_tokens, pad_token_id=0)

        runs[f'transformers {name}'] = run
    del hf_base
    first = {name: timed(run) for name, run in runs.items() if name.endswith('compiled')}  # compiles
    seconds = alternate(runs, warmup=1, repeats=s.repeats)
    tps = {name: s.new_tokens / t for name, t in seconds.items()}
    hf32, hf16 = tps['transformers fp32'], tps.get('transformers bf16')
    lines = ['| variant | tokens/s | x transformers fp32 | x transformers same dtype | MiB read per step '
             '| ceiling tokens/s | share of ceiling |', '|---|--:|--:|--:|--:|--:|--:|']
    result = {}
    for name, rate in tps.items():
        dtype_name = 'fp32' if 'fp32' in name.split() else 'bf16'
        same = hf32 if dtype_name == 'fp32' else hf16
        weights = models.get(name) or models[f'ours {dtype_name}']  # transformers reads as many bytes as ours
        nbytes = step_bytes(weights)
        ceiling = bandwidth / nbytes
        same = f'{rate / same:.2f}x' if same else 'not run'
        lines.append(f'| {name} | {rate:.1f} | {rate / hf32:.2f}x | {same} | {nbytes / 2**20:.0f} '
                     f'| {ceiling:.0f} | {100 * rate / ceiling:.0f}% |')
        result[name] = {'tokens_per_s': rate, 'step_mib': nbytes / 2**20, 'ceiling_tokens_per_s': ceiling}
    agree = {n: float((outputs[n][0, PROMPT_LEN:] == outputs['ours fp32'][0, PROMPT_LEN:]).float().mean())
             for n in outputs}
    lines.append('')
    lines.append('- greedy tokens equal to ours fp32 (random weights, so a weak check): '
                 + ', '.join(f'{n} {100 * a:.0f}%' for n, a in agree.items()))
    lines.append('- compile time of the decoding step (first run minus the median): '
                 + ', '.join(f'{n} {t - seconds[n]:.1f} s' for n, t in first.items()))
    result['compile_s'] = {n: t - seconds[n] for n, t in first.items()}
    return '\n'.join(lines), result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='short runs (smoke test)')
    parser.add_argument('--only', nargs='+', choices=SECTIONS, default=SECTIONS)
    parser.add_argument('--configs', nargs='+', choices=('bench', 'small'), default=('bench', 'small'),
                        help='decode on the bench config, the d_model 256 one, or both')
    parser.add_argument('--variants', nargs='+', choices=variant_names(),
                        help=f'decode only these (and always {" and ".join(REFERENCES)})')
    parser.add_argument('--new-tokens', type=int, help=f'tokens each decode run generates (default {FULL.new_tokens})')
    parser.add_argument('--json', type=Path)
    args = parser.parse_args(argv)
    s = QUICK if args.quick else FULL
    if args.new_tokens:
        s = replace(s, new_tokens=args.new_tokens)

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    payload: dict = {'threads': THREADS, 'quick': args.quick}
    if 'peak' in args.only or 'decode' in args.only:
        log('measuring the matmul peaks and the matvec bandwidth')
        notes, payload['peak'] = bench_peak()
        print('\n'.join(f'- {n}' for n in notes))
    if 'decode' in args.only:
        bench, source = bench_config()
        small = replace(bench, d_model=256, n_heads=4)
        chosen = {'bench': (source, bench), 'small': ('d_model 256, 4 layers', small)}
        for label, config in (chosen[name] for name in args.configs):
            log(f'measuring batch-1 decoding on {label} ({time.perf_counter() - start:.0f}s so far)')
            table, payload[f'decode {label}'] = bench_decode(config, s, payload['peak']['matvec_gbps'] * 1e9,
                                                                   args.variants)
            ffn = config.ffn_config
            print(f'\n**Batch-1 greedy decoding**, {label}: d_model {config.d_model}, {config.n_layers} layers, '
                  f'{ffn.moe_num_experts} experts top-{ffn.moe_top_k}, ffn {ffn.ffn_hidden_size}, vocab '
                  f'{config.vocab_size}; {PROMPT_LEN}+{s.new_tokens} tokens, medians of {s.repeats} runs in turns\n')
            print(table)
    print(f'\n- CPU: torch.backends.cpu.get_cpu_capability() {torch.backends.cpu.get_cpu_capability()}, native bf16: '
          f'{cpu_bf16_support() or "none"}; load average {os.getloadavg()[0]:.1f} at the end')
    print(f'\n- {THREADS} threads; ceiling = matvec bandwidth / bytes a step reads; timings on a shared machine are '
          'noisy, so compare the ratios (measured side by side, in turns)')
    log(f'done in {time.perf_counter() - start:.0f}s')
    if args.json:
        write_json(args.json, payload)


if __name__ == '__main__':
    sys.exit(main())
