"""Peak memory of a QLoRA training step per base weight, above the activations, side by side with LoRA
on the float (fp32) base, each variant in a fresh process, in one run.

The model (`BENCH` below) is one DBRX-132B block with every width divided by 4 (d_model 1536, 12 heads
of 128, 2 kv heads, 16 experts of 2688 x 1536), LoRA rank 16 / 4 = 4 on Wqkv, out_proj and every
expert's w1, v1, w2: so adapters per base weight, r (in + out) / (in * out), are DBRX-132B's at rank 16
exactly, and a vocabulary of 640 gives the embedding and LM head their share of DBRX-132B (0.47% each);
206M base weights, 96% in the experts. It trains its adapters with `decoupled_adamw` (train.py's
optimizer) on one process, as `train.py` runs a QLoRA YAML: the base frozen, int4 in groups of 128 with
bf16 scales and zeros, each matrix dequantized in blocks just in time for its matmul, in the forward
pass and again in the backward pass; the adapters and the float rest of the base in fp32 (the default)
or in bf16 (`lora.dtype: bf16`).

Measured in the process: the bytes the model holds between steps, counted from its tensors (the
stored base; the adapters' factors and AdamW's two moments), and how far a training step's
peak resident memory (Linux VmHWM, reset just before the step, after `malloc_trim`) rises above the
resident memory just before it, at T and at 2T tokens, after two steps have created AdamW's state and
warmed both shapes. The activations of T tokens are the rise's growth from T to 2T; what remains of
the rise at T is the step's own (adapter gradients, dequantized matrices, temporaries). Per base
weight, in bytes: held + the step's own = the peak above the activations. Goal: at most 0.6.
(Counting the held bytes from tensors, not from the resident size, keeps the shared libraries'
pages, which a loaded machine evicts and reloads, out of the numbers.)
Random weights: memory does not depend on the values. Every variant runs with glibc's mmap threshold
fixed (`MALLOC_ENV`).

Run: `.venv/bin/python bench/bench_qlora_memory.py` (a few minutes on 2 cores: dequantizing every
expert matrix twice per step is CPU work).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import mem_available_bytes, peak_resident_mib, reset_peak_resident, resident_mib, run_header  # noqa: E402
from dbrx_train.model.config import AttentionConfig, FFNConfig, ModelConfig  # noqa: E402
from dbrx_train.model.dbrx import DbrxLM  # noqa: E402
from dbrx_train.model.lora import LoraConfig, adapters, apply_lora  # noqa: E402
from dbrx_train.model.quantize import QuantizedModule, store_scales_in  # noqa: E402
from dbrx_train.training.optimizer import DecoupledAdamW  # noqa: E402

BENCH = ModelConfig(d_model=1536, n_heads=12, n_layers=1, max_seq_len=512, vocab_size=640,
                    attn_config=AttentionConfig(kv_n_heads=2),
                    ffn_config=FFNConfig(ffn_hidden_size=2688, moe_num_experts=16, moe_top_k=4))
LORA = LoraConfig(r=4, alpha=8)  # as many adapter parameters per base weight as rank 16 on DBRX-132B
TOKENS = 32  # T: one row of 32 tokens; 2T: two rows (few tokens: the base dominates)
# name -> (quantization, lora.dtype)
VARIANTS = {'QLoRA int4 (group 128), fp32 adapters': ('int4', None),
            'QLoRA int4 (group 128), `lora.dtype: bf16`': ('int4', 'bf16'),
            'LoRA, fp32 base': (None, None)}
MIB = 2**20
# glibc serves freed blocks of up to 32 MiB from its heap once one was freed (its mmap threshold
# rises): dequantizing matrix after matrix would then measure heap fragmentation, not tensors. Fixed
# at 128 KiB, large tensors are mapped and unmapped (on GPUs the caching allocator plays this part).
MALLOC_ENV = {'MALLOC_MMAP_THRESHOLD_': str(128 * 1024)}


def build(quantization: str | None, lora: LoraConfig) -> DbrxLM:
    if quantization is None:
        model = DbrxLM(BENCH, seed=0)
    else:
        model = DbrxLM(dataclasses.replace(BENCH, quantization=quantization), device='cpu')  # empty stored tensors
        store_scales_in(model, torch.bfloat16)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, QuantizedModule):
                    for buffer in module.buffers(recurse=False):
                        if buffer.is_floating_point():
                            buffer.uniform_(-0.01, 0.01, generator=generator)
                        else:
                            buffer.copy_(torch.randint(0, 256 if buffer.dtype == torch.uint8 else 127, buffer.shape,
                                                       generator=generator, dtype=torch.int16))
    apply_lora(model, lora)
    with torch.no_grad():  # trained adapters: B nonzero
        for _, adapter in adapters(model):
            adapter.lora_B.normal_(0, 0.01)
    return model.train()


def base_weights(model: DbrxLM) -> int:
    """Frozen weights of the float model this one stands for."""
    float_model = DbrxLM(BENCH, device='meta')
    return sum(p.numel() for p in float_model.parameters())


def measure(quantization: str | None, dtype: str | None) -> dict:
    torch.manual_seed(0)
    ids = torch.randint(0, BENCH.vocab_size, (2, TOKENS))
    model = build(quantization, dataclasses.replace(LORA, dtype=dtype))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = DecoupledAdamW(trainable, lr=1e-4)

    def rise(rows: int) -> float:
        """How far a training step's peak rises above the resident memory just before it, MiB."""
        start = resident_mib()  # after malloc_trim
        reset_peak_resident()
        model(ids[:rows], labels=ids[:rows]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return peak_resident_mib() - start

    rise(1), rise(2)  # AdamW's state exists from here on, and the kernels' buffers of both shapes
    rises = {rows: rise(rows) for rows in (1, 2)}
    return {'rise': rises[1], 'rise2': rises[2], 'base_weights': base_weights(model),
            'adapter_numel': sum(p.numel() for p in trainable),
            'adapter_state_bytes': sum(p.nbytes for p in trainable) + sum(
                t.nbytes for state in optimizer.state.values() for t in state.values() if t.dim()),
            'stored_bytes': sum(b.nbytes for name, b in model.named_buffers() if '.lora.' not in name)
            + sum(p.nbytes for p in model.parameters() if not p.requires_grad)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--variant', help=argparse.SUPPRESS)  # one measurement, in this process
    parser.add_argument('--json', help='keep the numbers in this file')
    args = parser.parse_args()
    if args.variant is not None:
        print(json.dumps(measure(*VARIANTS[args.variant])))
        return
    print(f'{run_header()}; one process; '
          f'{BENCH.n_layers} layers, d_model {BENCH.d_model}, {BENCH.ffn_config.moe_num_experts} experts of '
          f'{BENCH.ffn_config.ffn_hidden_size}, vocab {BENCH.vocab_size}; LoRA rank {LORA.r} on every target; '
          f'T = {TOKENS} tokens\n')
    print('| variant | base weights | stored base | adapters + AdamW moments | step rise above activations | '
          '**peak above activations** | activations of T, MiB |')
    print('|---|---:|---:|---:|---:|---:|---:|')
    results = {}
    for name in VARIANTS:
        if VARIANTS[name][0] is None and mem_available_bytes() < 6 * 2**30:
            print(f'| {name} | not run: MemAvailable {mem_available_bytes() / 2**30:.1f} GiB < 6 GiB | | | | | |')
            continue
        out = subprocess.run([sys.executable, __file__, '--variant', name], capture_output=True, text=True, check=True,
                             env={**os.environ, **MALLOC_ENV})
        r = results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        n = r['base_weights']
        activations = max(0.0, r['rise2'] - r['rise'])
        held = [r['stored_bytes'] / n, r['adapter_state_bytes'] / n]  # the factors and AdamW's two moments
        transient = (r['rise'] - activations) * MIB / n  # gradients, dequantized matrices, temporaries
        print(f'| {name} | {n / 1e6:,.0f}M | {held[0]:.3f} | {held[1]:.3f} | {transient:.3f} | '
              f'**{sum(held) + transient:.3f}** | {activations:,.0f} |', flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == '__main__':
    main()
