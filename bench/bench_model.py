"""Our DbrxLM against transformers' DbrxForCausalLM: same config, same weights, same batch, one table.

    .venv/bin/python bench/bench_model.py [--quick] [--only train forward moe generate memory] [--json PATH]

Speeds are medians of steps run in turns (ours, transformers, transformers, ours, ...) after a warm-up;
memory is measured in a fresh process per model. The training step runs at batch 2 and 4, in fp32 and
under bf16 autocast, ours with its blocks compiled (`dbrx_train.model.compile`) and eager, each variant
in a fresh process holding its one model (in one process with both, transformers' step ran 20-40%
slower than alone, which inflated the ratio), each model with its trainer's default optimizer. See
bench/README.md for what each row means.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import multiprocessing
import os
import sys
import tempfile
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from common import (
    alternate,
    bench_config,
    matmul_peak_gflops,
    model_pair,
    peak_resident_mib,
    reset_peak_resident,
    resident_mib,
    timed,
)
from dbrx_train.model.compile import CompileConfig, compile_blocks
from dbrx_train.model.dbrx import DbrxLM
from dbrx_train.model.flops import train_flops_per_token
from dbrx_train.precision import cpu_bf16_support
from dbrx_train.training.optimizer import DecoupledAdamW

THREADS = 2
SECTIONS = ('train', 'forward', 'moe', 'generate', 'memory')
PROMPT_LEN = 16
TRAIN_BATCHES = (2, 4)
# Training shapes are fixed, so each (batch, precision) gets its own static graph.
BENCH_COMPILE = CompileConfig(dynamic=False)


@dataclass
class Settings:
    batch: int
    warmup: int
    repeats: int
    new_tokens: int
    memory_steps: int
    train_steps: int  # timed training steps per process, after its first


FULL = Settings(batch=4, warmup=1, repeats=3, new_tokens=64, memory_steps=2, train_steps=3)
QUICK = Settings(batch=4, warmup=1, repeats=1, new_tokens=16, memory_steps=1, train_steps=1)


@dataclass
class Row:
    metric: str
    unit: str
    ours: float
    transformers: float

    @property
    def ratio(self) -> float:
        return self.ours / self.transformers


def training_step(model, optimizer, ids, bf16: bool = False):
    """One optimizer step of `model` (ours or transformers') on its full objective (LM loss + weighted
    load-balancing loss); with `bf16`, the forward pass under CPU bf16 autocast (as Composer's amp_bf16)."""
    autocast = (lambda: torch.autocast('cpu', dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def run():
        with autocast():
            if isinstance(model, DbrxLM):
                loss = model.loss(ids).loss
            else:
                loss = model(ids, labels=ids, output_router_logits=True, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def default_optimizer(model):
    """The optimizer each trainer uses by default: ours `decoupled_adamw` (every YAML of train.py: torch's
    fused AdamW kernel, `training/optimizer.py`), transformers torch's AdamW (its Trainer's default
    `optim: adamw_torch`, the foreach implementation)."""
    return (DecoupledAdamW if isinstance(model, DbrxLM) else torch.optim.AdamW)(model.parameters(), lr=1e-5)


# The training-step variants, each measured in a process of its own: (model, optimizer, compiled).
TRAIN_VARIANTS = {
    'ours': ('ours', 'decoupled_adamw', True),
    'hf': ('hf', 'adamw_torch', False),
    'ours eager': ('ours', 'decoupled_adamw', False),
    'hf fused': ('hf', 'adamw_torch_fused', False),
    'ours torch AdamW': ('ours', 'adamw_torch', True),  # the models alone: one optimizer for both
}
BF16_TRAIN_VARIANTS = ('ours', 'hf')
OPTIMIZERS = {'decoupled_adamw': DecoupledAdamW, 'adamw_torch': torch.optim.AdamW,
              'adamw_torch_fused': functools.partial(torch.optim.AdamW, fused=True)}


def train_worker(variant: str, batch: int, bf16: bool, steps: int, check_compiled_loss: bool) -> dict:
    """In a fresh process, as a user runs one framework: the variant's model alone with its optimizer
    (compiled or not), the seconds of its first step (compiling, first touch of the optimizer state)
    and of `steps` more. With `check_compiled_loss`, also |compiled loss - eager loss| on the batch."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(THREADS)
    config, _ = bench_config()
    ours, hf = model_pair(config)
    which, optimizer, compiled = TRAIN_VARIANTS[variant]
    model = ours if which == 'ours' else hf
    del ours, hf
    model.train()
    ids = batch_ids(config, batch)
    loss_gap = None
    if compiled:
        with torch.no_grad():
            eager_loss = model.loss(ids).loss if check_compiled_loss else None
            compile_blocks(model, BENCH_COMPILE)
            if check_compiled_loss:
                loss_gap = abs(model.loss(ids).loss - eager_loss).item()
    step = training_step(model, OPTIMIZERS[optimizer](model.parameters(), lr=1e-5), ids, bf16)
    first = timed(step)
    return {'first': first, 'steps': [timed(step) for _ in range(steps)], 'loss_gap': loss_gap}


def bench_train(config, s: Settings, flops_per_token, peak_gflops,
                batches=TRAIN_BATCHES) -> tuple[list[Row], list[str]]:
    """Training steps at each of `batches`, fp32 and bf16 autocast: ours compiled (and eager) vs transformers,
    each variant in a fresh process, the variants in turns (order flipped every round); per variant the
    median over rounds of each process's median step."""
    spawn = multiprocessing.get_context('spawn')
    rows, compile_notes, loss_gap = [], [], None
    mfu = lambda tps: 100 * tps * flops_per_token / (peak_gflops * 1e9)  # noqa: E731
    for batch in batches:
        ids_numel = batch * config.max_seq_len
        for precision in ('fp32', 'bf16'):
            variants = list(TRAIN_VARIANTS) if precision == 'fp32' else list(BF16_TRAIN_VARIANTS)
            medians, first = {v: [] for v in variants}, {}
            for round_ in range(s.repeats):
                for variant in variants if round_ % 2 == 0 else reversed(variants):
                    check = loss_gap is None and variant == 'ours' and precision == 'fp32'
                    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
                        result = pool.submit(train_worker, variant, batch, precision == 'bf16', s.train_steps,
                                             check).result()
                    loss_gap = result['loss_gap'] if check else loss_gap
                    medians[variant].append(statistics.median(result['steps']))
                    first.setdefault(variant, result['first'])
            t = {v: statistics.median(m) for v, m in medians.items()}
            compile_notes.append(f'batch {batch} {precision}: {first["ours"] - t["ours"]:.0f} s')
            tps = {name: ids_numel / seconds for name, seconds in t.items()}
            label = f'training step, batch {batch}, {precision}'
            rows.append(Row(f'{label}, compiled', 'tokens/s', tps['ours'], tps['hf']))
            log(f'{label}: ' + ', '.join(f'{name} {rate:.1f} tokens/s' for name, rate in tps.items())
                + f'; compile {first["ours"] - t["ours"]:.0f} s; load average {os.getloadavg()[0]:.1f}')
            if precision == 'fp32':
                rows.append(Row(f'{label}, compiled MFU', '% of peak', mfu(tps['ours']), mfu(tps['hf'])))
                rows.append(Row(f'{label}, eager', 'tokens/s', tps['ours eager'], tps['hf']))
                rows.append(Row(f'{label}, compiled vs transformers with adamw_torch_fused', 'tokens/s', tps['ours'],
                                tps['hf fused']))
                rows.append(Row(f'{label}, models alone (both torch AdamW), compiled', 'tokens/s',
                                tps['ours torch AdamW'], tps['hf']))
    notes = [f'compiled loss - eager loss (fp32, batch {batches[0]}, same weights): {loss_gap:.1e}',
             'compile time (a compiled process\'s first training step minus its median step; the inductor cache '
             'is warm after the first round): ' + ', '.join(compile_notes)]
    return rows, notes


def bench_forward(ours, hf, ids, s: Settings, flops_per_token, peak_gflops) -> list[Row]:
    ours.eval(), hf.eval()

    @torch.inference_mode()
    def fwd_ours():
        ours(ids)

    @torch.inference_mode()
    def fwd_hf():
        hf(ids, use_cache=False)

    t = alternate({'ours': fwd_ours, 'hf': fwd_hf}, s.warmup, s.repeats)
    tokens = ids.numel()
    ours_tps, hf_tps = tokens / t['ours'], tokens / t['hf']
    mfu = lambda tps: 100 * tps * flops_per_token / 3 / (peak_gflops * 1e9)  # noqa: E731
    return [
        Row('forward only', 'tokens/s', ours_tps, hf_tps),
        Row('forward only MFU', '% of peak', mfu(ours_tps), mfu(hf_tps)),
    ]


def bench_moe(ours, hf, ids, s: Settings) -> list[Row]:
    """Layer 0's MoE (router + experts) alone, forward + backward, on normalised random activations."""
    moe_ours, moe_hf = ours.blocks[0].ffn.train(), hf.transformer.blocks[0].ffn.train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*ids.shape, ours.config.d_model, generator=gen)
    grad_out = torch.randn(x.shape, generator=gen)

    def run(moe):
        def step():
            inp = x.clone().requires_grad_()
            out, _ = moe(inp)
            out.backward(grad_out)
            moe.zero_grad(set_to_none=True)

        return step

    t = alternate({'ours': run(moe_ours), 'hf': run(moe_hf)}, s.warmup, max(3, s.repeats))
    return [Row('MoE layer fwd+bwd', 'tokens/s', x.shape[0] * x.shape[1] / t['ours'], x.shape[0] * x.shape[1] / t['hf'])]


def bench_generate(ours, hf, s: Settings) -> tuple[list[Row], bool]:
    """Greedy decoding with the KV cache at batch 1; never stops early. Also says whether the tokens agree."""
    ours.eval(), hf.eval()
    prompt = torch.randint(0, ours.config.vocab_size, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(2))
    outputs = {}

    def gen_ours():
        outputs['ours'] = ours.generate(prompt, max_new_tokens=s.new_tokens, stop_token_ids=())

    @torch.inference_mode()
    def gen_hf():
        outputs['hf'] = hf.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
            min_new_tokens=s.new_tokens, max_new_tokens=s.new_tokens, pad_token_id=0,
        )

    t = alternate({'ours': gen_ours, 'hf': gen_hf}, s.warmup, max(3, s.repeats))
    row = Row(f'greedy generate (batch 1, {PROMPT_LEN}+{s.new_tokens})', 'tokens/s',
              s.new_tokens / t['ours'], s.new_tokens / t['hf'])
    return [row], torch.equal(outputs['ours'], outputs['hf'])


@torch.inference_mode()
def decode_ceiling(model) -> tuple[float, float]:
    """(weight bytes one greedy step reads at batch 1, the steps/s that memory bandwidth allows).

    A step reads every active weight once (the LM head, attention, the router and top_k experts
    per layer); at batch 1 that traffic, not arithmetic, sets the pace. The bandwidth is measured
    on the largest of them, the LM head's matrix-vector product.
    """
    from dbrx_train.model.flops import parameter_counts

    counts = parameter_counts(model.config)
    step_bytes = (counts.active - counts.embedding) * model.lm_head.weight.element_size()
    hidden, weight = torch.randn(1, model.config.d_model), model.lm_head.weight
    seconds = statistics.median(timed(lambda: torch.nn.functional.linear(hidden, weight)) for _ in range(50))
    bandwidth = weight.numel() * weight.element_size() / seconds
    return step_bytes, bandwidth / step_bytes


def memory_worker(which: str, batch: int, steps: int) -> tuple[float, float]:
    """In a fresh process: resident MiB before a training step (weights + AdamW state) and the
    peak resident MiB over `steps` steps (adds activations, gradients, temporaries), each model with its
    trainer's default optimizer."""
    torch.set_num_threads(THREADS)
    config, _ = bench_config()
    ours, hf = model_pair(config)
    model = ours if which == 'ours' else hf
    del ours, hf
    ids = batch_ids(config, batch)
    step = training_step(model, default_optimizer(model), ids)
    model.train()
    step()  # allocates the optimizer state
    gc.collect()
    before = resident_mib()
    reset_peak_resident()
    for _ in range(steps):
        step()
    return before, peak_resident_mib()


def bench_memory(s: Settings) -> list[Row]:
    spawn = multiprocessing.get_context('spawn')
    result = {}
    for which in ('ours', 'hf'):
        with ProcessPoolExecutor(1, mp_context=spawn) as pool:
            result[which] = pool.submit(memory_worker, which, s.batch, s.memory_steps).result()
    (ours_before, ours_peak), (hf_before, hf_peak) = result['ours'], result['hf']
    return [
        Row('training step peak RSS', 'MiB', ours_peak, hf_peak),
        Row('  of which above weights + AdamW', 'MiB', ours_peak - ours_before, hf_peak - hf_before),
    ]


def batch_ids(config, batch: int) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (batch, config.max_seq_len), generator=torch.Generator().manual_seed(0))


def format_table(rows: list[Row]) -> str:
    cells = [('metric', 'unit', 'ours', 'transformers', 'ratio')]
    cells += [(r.metric, r.unit, f'{r.ours:,.1f}', f'{r.transformers:,.1f}', f'{r.ratio:.2f}x') for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(5)]
    align = ['<', '<', '>', '>', '>']
    lines = ['| ' + ' | '.join(f'{c:{a}{w}}' for c, a, w in zip(row, align, widths)) + ' |' for row in cells]
    rule = '|' + '|'.join('-' * (w + 1) + (':' if a == '>' else '-') for a, w in zip(align, widths)) + '|'
    return '\n'.join([lines[0], rule, *lines[1:]])


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix='.tmp')
    with os.fdopen(fd, 'w') as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='one timed step per measurement (smoke run)')
    parser.add_argument('--only', nargs='+', choices=SECTIONS, default=SECTIONS, help='measure only these')
    parser.add_argument('--json', type=Path, help='also write the results here')
    parser.add_argument('--batches', nargs='+', type=int, default=TRAIN_BATCHES, help='training-step batch sizes')
    args = parser.parse_args(argv)
    s = QUICK if args.quick else FULL

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(THREADS)
    config, source = bench_config()
    flops = train_flops_per_token(config)
    start = time.perf_counter()
    log('measuring the fp32 matmul peak')
    peak = matmul_peak_gflops()
    ours, hf = model_pair(config)
    ids = batch_ids(config, s.batch)
    rows, notes = [], []
    load_before = os.getloadavg()
    same_tokens = None
    for section in SECTIONS:
        if section not in args.only:
            continue
        log(f'measuring {section} ({time.perf_counter() - start:.0f}s so far)')
        if section == 'train':
            train_rows, train_notes = bench_train(config, s, flops, peak, args.batches)
            rows += train_rows
            notes += train_notes
        elif section == 'forward':
            rows += bench_forward(ours, hf, ids, s, flops, peak)
        elif section == 'moe':
            rows += bench_moe(ours, hf, ids, s)
        elif section == 'generate':
            generate_rows, same_tokens = bench_generate(ours, hf, s)
            rows += generate_rows
            step_bytes, ceiling = decode_ceiling(ours)
            notes.append(f'batch-1 decoding is memory-bound: each step reads {step_bytes / 2**20:.0f} MiB of active '
                         f'weights; at the bandwidth the LM head matvec reaches that allows {ceiling:.0f} tokens/s, '
                         f'of which ours reaches {100 * generate_rows[0].ours / ceiling:.0f}% and transformers '
                         f'{100 * generate_rows[0].transformers / ceiling:.0f}%')
        elif section == 'memory':
            rows += bench_memory(s)

    notes.append(f'config: {source}; d_model {config.d_model}, {config.n_layers} layers, '
                 f'{config.ffn_config.moe_num_experts} experts top-{config.ffn_config.moe_top_k}, '
                 f'ffn {config.ffn_config.ffn_hidden_size}, vocab {config.vocab_size}; fp32 unless a row says bf16; '
                 f'batch {s.batch} x seq {config.max_seq_len} unless a row says otherwise; {THREADS} threads')
    notes.append(f'CPU: torch.backends.cpu.get_cpu_capability() {torch.backends.cpu.get_cpu_capability()}, '
                 f'native bf16: {cpu_bf16_support() or "none"}; load average {load_before[0]:.1f} at the start, '
                 f'{os.getloadavg()[0]:.1f} at the end')
    notes.append(f'measured fp32 matmul peak: {peak:.1f} GFLOP/s (3072^2 torch.mm); model FLOPs/token: '
                 f'train {flops / 1e6:.0f} M, forward {flops / 3e6:.0f} M')
    notes.append('training step: loss.backward() + optimizer step, each with its trainer\'s default optimizer: '
                 'ours decoupled_adamw (fused AdamW kernel), transformers torch AdamW (Trainer optim adamw_torch, '
                 'foreach) unless the row says otherwise; transformers with labels and '
                 'output_router_logits=True so both objectives include the load-balancing loss; compiled: each of '
                 'our blocks torch.compile\'d (inductor, experts eager), eager: the same model not compiled; '
                 'transformers runs eager; bf16: CPU autocast; each training variant runs in a process of its own '
                 '(one model, as a user runs it), the variants in turns')
    notes.append('ratio = ours / transformers (memory: lower is better); speeds are medians of '
                 f'{s.repeats} alternating runs after {s.warmup} warm-up')
    if 'memory' in args.only:
        notes.append('memory: Linux peak RSS (VmHWM, reset after a warm-up step) of a fresh process per model')
    if same_tokens is not None:
        notes.append(f'greedy tokens identical to transformers: {"yes" if same_tokens else "NO"}')
    print(format_table(rows))
    for note in notes:
        print(f'- {note}')
    log(f'done in {time.perf_counter() - start:.0f}s')
    if args.json:
        write_json(args.json, {
            'config_source': source, 'batch': s.batch, 'seq': config.max_seq_len, 'threads': THREADS,
            'quick': args.quick, 'matmul_peak_gflops': peak, 'train_flops_per_token': flops,
            'greedy_tokens_identical': same_tokens,
            'rows': [{'metric': r.metric, 'unit': r.unit, 'ours': r.ours, 'transformers': r.transformers,
                      'ratio': r.ratio} for r in rows],
        })


if __name__ == '__main__':
    main()
