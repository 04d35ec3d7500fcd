"""Packed rows vs plain causal rows at long context: one training step (loss, backward) of one row.

    .venv/bin/python bench/bench_long_context.py [--quick] [--seqs 4096 8192 16384 32768] [--variants causal packed ...]
        [--candidates] [--json PATH]

Each measurement runs in a fresh process: one step, timed, with the peak-RSS counter reset after
the model is built (a warm-up step would double a run that takes minutes on a shared machine). Variants, on the same weights and tokens:

    causal            one sequence per row: SDPA's causal kernel (the reference)
    packed            examples of about 1K tokens side by side (683, 1024, 1365, ...): `Documents`
    packed, dense     the same row with the (seq, seq) block-diagonal mask main built before (up to 16K)
    transformers      `DbrxForCausalLM` (SDPA) on the causal row; it has no packed-row path on CPU

`--candidates` also times the document-masked attention kernels alone (8 heads of 64, 4K tokens,
forward and backward): the per-example slices kept, the dense mask, flex_attention (compiled)
and SDPA on nested (jagged) tensors; a candidate that fails says why.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from transformers.utils import logging as hf_logging

from common import hf_twin, peak_resident_mib, reset_peak_resident
from dbrx_train.model import dbrx
from dbrx_train.model.attention import Dense, Documents
from dbrx_train.model.config import ModelConfig
from dbrx_train.model.dbrx import DbrxLM
from dbrx_train.typed_config import load_yaml, parse

THREADS = 2
TINY_YAML = Path(__file__).resolve().parent.parent / 'yamls' / 'models' / 'dbrx-tiny.yaml'
SEQS = (4096, 8192, 16384, 32768)
DENSE_UP_TO = 16384  # a (32K, 32K) mask is 1 GiB of bools before SDPA widens it
HF_UP_TO = 16384
VARIANTS = ('causal', 'packed', 'packed, dense', 'transformers')
EXAMPLE = 1024


def example_lengths(seq: int) -> list[int]:
    """About EXAMPLE tokens each, uneven (2/3, 1, 4/3 of it in turn), filling the row exactly."""
    lengths, left = [], seq
    while left:
        n = min(left, EXAMPLE + (len(lengths) % 3 - 1) * EXAMPLE // 3)
        lengths.append(n)
        left -= n
    return lengths


def tiny_config(seq: int) -> ModelConfig:
    data = load_yaml(TINY_YAML, [f'max_seq_len={seq}'])
    return parse(ModelConfig, data)


def child(variant: str, seq: int) -> dict:
    """One variant at one length in this (fresh) process: seconds and peak RSS of a training step."""
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = DbrxLM(tiny_config(seq))
    ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(1))
    sequence_id = torch.repeat_interleave(torch.arange(len(example_lengths(seq))),
                                          torch.tensor(example_lengths(seq)))[None]
    if variant == 'causal':
        def step():
            model.loss(ids).loss.backward()
    elif variant == 'packed':
        def step():
            model.loss(ids, sequence_id=sequence_id).loss.backward()
    elif variant == 'packed, dense':
        packed_positions = dbrx.packed_positions_and_mask

        def dense_block_diagonal(sequence_id):  # main's mask, built in each forward pass as main built it
            idx = torch.arange(sequence_id.shape[1])
            allowed = (sequence_id[:, :, None] == sequence_id[:, None, :]) & (idx[None, :] <= idx[:, None])
            return packed_positions(sequence_id)[0], Dense(allowed[:, None])

        dbrx.packed_positions_and_mask = dense_block_diagonal

        def step():
            model.loss(ids, sequence_id=sequence_id).loss.backward()
    else:
        twin = hf_twin(model)
        del model

        def step():
            twin(ids, labels=ids, output_router_logits=True, use_cache=False).loss.backward()
    reset_peak_resident()  # the weights are in; the step's own memory is what differs
    start = time.perf_counter()
    step()
    return {'seconds': time.perf_counter() - start, 'peak_mib': peak_resident_mib()}


def candidate(name: str) -> dict:
    """One attention kernel alone: 8 heads of 64, 4K tokens of ~1K-token examples, forward + backward."""
    torch.set_num_threads(THREADS)
    seq, lengths = 4096, example_lengths(4096)
    q, k, v = (torch.randn(1, 8, seq, 64, requires_grad=True) for _ in range(3))
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    if name == 'causal (no packing)':
        def run():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    elif name == 'per-example SDPA slices (kept)':
        def run():
            return Documents((tuple(lengths),)).attend(q, k, v)
    elif name == 'dense (seq, seq) mask':
        idx = torch.arange(seq)
        mask = ((doc[:, None] == doc[None, :]) & (idx[None, :] <= idx[:, None]))[None, None]

        def run():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    elif name == 'flex_attention, compiled':
        block_mask = create_block_mask(lambda b, h, qi, ki: (doc[qi] == doc[ki]) & (ki <= qi), None, None, seq, seq,
                                       device='cpu')
        flex = torch.compile(flex_attention, dynamic=False)

        def run():
            return flex(q, k, v, block_mask=block_mask)
    else:
        offsets = torch.tensor([0, *lengths]).cumsum(0)

        def jagged(x):
            return torch.nested.nested_tensor_from_jagged(x[0].transpose(0, 1), offsets).transpose(1, 2)

        def run():
            out = F.scaled_dot_product_attention(jagged(q), jagged(k), jagged(v), is_causal=True)
            return out.transpose(1, 2).values().transpose(0, 1)[None]
    try:
        run().sum().backward()
        reset_peak_resident()
        start = time.perf_counter()
        run().sum().backward()
        return {'seconds': time.perf_counter() - start, 'peak_mib': peak_resident_mib()}
    except Exception as e:  # report the failure in the table
        return {'error': f'{type(e).__name__}: {str(e).strip().splitlines()[0][:120]}'}


CANDIDATES = ('causal (no packing)', 'per-example SDPA slices (kept)', 'dense (seq, seq) mask',
              'flex_attention, compiled', 'nested (jagged) SDPA')


def in_fresh_process(*args: str, timeout: float = 1800) -> dict:
    try:
        out = subprocess.run([sys.executable, __file__, '--child', *args], capture_output=True, text=True,
                             timeout=timeout, cwd=Path(__file__).parent,
                             env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
    except subprocess.TimeoutExpired:
        return {'error': f'no result within {timeout:.0f}s'}
    if out.returncode:
        return {'error': (out.stderr.strip().splitlines() or ['no output'])[-1][:120]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_average() -> str:
    return ' '.join(Path('/proc/loadavg').read_text().split()[:3])


def commit() -> str:
    return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                          cwd=Path(__file__).parent).stdout.strip() or 'unknown'


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='4K and 8K only (smoke run)')
    parser.add_argument('--seqs', type=int, nargs='+', default=SEQS)
    parser.add_argument('--variants', nargs='+', choices=VARIANTS, default=VARIANTS, help='measure only these')
    parser.add_argument('--candidates', action='store_true', help='also time the attention kernels alone')
    parser.add_argument('--json', type=Path, help='also write the results here')
    parser.add_argument('--child', nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        hf_logging.set_verbosity_error()
        kind, what = args.child
        print(json.dumps(candidate(what) if kind == 'candidate' else child(kind, int(what))))
        return
    seqs = (4096, 8192) if args.quick else args.seqs
    started, loads = time.perf_counter(), [load_average()]
    results = {}
    for seq in seqs:
        for variant in args.variants:
            if (variant == 'packed, dense' and seq > DENSE_UP_TO) or (variant == 'transformers' and seq > HF_UP_TO):
                continue
            results[(variant, seq)] = in_fresh_process(variant, str(seq))
            print(f'{variant} at {seq}: {results[(variant, seq)]} ({time.perf_counter() - started:.0f}s so far, '
                  f'load {load_average()})', file=sys.stderr, flush=True)
        loads.append(load_average())

    def cell(variant, seq, key, fmt):
        r = results.get((variant, seq))
        return '' if r is None else ('failed' if 'error' in r else fmt.format(r[key]))

    def ratio(variant, seq, key):
        r, c = results.get((variant, seq)), results.get(('causal', seq))
        return '' if not r or not c or 'error' in r or 'error' in c else f'{r[key] / c[key]:.2f}x'

    print('| seq | causal s | packed s | packed / causal time | packed, dense s | dense / causal time | transformers s '
          '| causal MiB | packed MiB | packed / causal memory | packed, dense MiB | dense / causal memory '
          '| transformers MiB |')
    print('|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|')
    for seq in sorted(seqs):
        print(f'| {seq:,} | ' + ' | '.join([
            cell('causal', seq, 'seconds', '{:.2f}'), cell('packed', seq, 'seconds', '{:.2f}'),
            ratio('packed', seq, 'seconds'), cell('packed, dense', seq, 'seconds', '{:.2f}'),
            ratio('packed, dense', seq, 'seconds'), cell('transformers', seq, 'seconds', '{:.2f}'),
            cell('causal', seq, 'peak_mib', '{:,.0f}'), cell('packed', seq, 'peak_mib', '{:,.0f}'),
            ratio('packed', seq, 'peak_mib'), cell('packed, dense', seq, 'peak_mib', '{:,.0f}'),
            ratio('packed, dense', seq, 'peak_mib'), cell('transformers', seq, 'peak_mib', '{:,.0f}')]) + ' |')
    errors = {f'{v} at {s}': r['error'] for (v, s), r in results.items() if 'error' in r}
    notes = [f'model: yamls/models/dbrx-tiny.yaml (d_model 128, 2 layers, 16 experts top-4, vocab 100352) at '
             f'max_seq_len = seq; fp32; one row; loss (LM + load balancing) and backward; {THREADS} threads',
             f'packed rows: {len(example_lengths(16384))} examples at 16K (lengths 683, 1024, 1365, ... in turn); '
             'positions restart per example',
             'time: one step, each variant in its own process, lengths run in the order given; memory: peak RSS '
             '(VmHWM reset once the model is built) of that process',
             f'{time.strftime("%Y-%m-%d")}, commit {commit()}, torch {torch.__version__}, CPU capability '
             f'{torch.backends.cpu.get_cpu_capability()} ({platform.machine()}); load average (1/5/15 min) before '
             f'and after each length: {" -> ".join(loads)}']
    if errors:
        notes.append(f'failed: {errors}')
    candidates = {}
    if args.candidates:
        for name in CANDIDATES:
            print(f'candidate {name}', file=sys.stderr, flush=True)
            candidates[name] = in_fresh_process('candidate', name)
        print('\n| attention kernel (4K tokens, 8 heads of 64, fwd + bwd) | s | peak MiB |\n|---|--:|--:|')
        for name, r in candidates.items():
            print(f'| {name} | ' + (f'{r["error"]} | |' if 'error' in r else
                                    f'{r["seconds"]:.3f} | {r["peak_mib"]:,.0f} |'))
    for note in notes:
        print(f'- {note}')
    if args.json:
        args.json.write_text(json.dumps({'rows': {f'{v}@{s}': r for (v, s), r in results.items()},
                                         'candidates': candidates, 'notes': notes}, indent=2))


if __name__ == '__main__':
    main()
