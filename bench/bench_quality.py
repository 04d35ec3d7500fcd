"""Held-out perplexity of fp32, bf16, int8 and int4 weights of a model trained long enough for it to mean something.

    .venv/bin/python bench/bench_quality.py [--steps 400] [--quick] [--json PATH]

1. Trains `yamls/pretrain/dbrx-tiny.yaml` with the Composer launcher, widened so that int4's groups of
   128 divide every matrix (ffn 256), at batch 16 x 256 tokens for `--steps` steps (much longer than
   `make demo`'s 120 x 8). The run autoresumes: an interrupted one continues, a finished one is reused.
2. Scores each weight variant, teacher-forced, on held-out code: the embedded corpus's documents past
   its token cap, which training never sees. Top-1 agreement is the share of positions whose argmax
   equals fp32's.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench_model import log, write_json
from dbrx_train.checkpoints import load_pretrained
from dbrx_train.data import make_embedded_corpus
from dbrx_train.data.embedded_corpus import DEFAULT_MAX_TOKENS, EMBEDDED_STREAMS
from dbrx_train.model import DbrxLM
from dbrx_train.model.quantize import quantize
from dbrx_train.tokenizer import get_encoding
from dbrx_train.precision import cpu_bf16_support

THREADS = 2
YAML = 'yamls/pretrain/dbrx-tiny.yaml'
RUN = Path('runs/dbrx-quality')
BATCH = 16
# The tiny model with an ffn that groups of 128 divide; every other width (128) already is.
OVERRIDES = ('model.ffn_config.ffn_hidden_size=256', f'global_train_batch_size={BATCH}',
             f'device_train_microbatch_size={BATCH}', 'save_interval=100ba', 'progress_bar=false')
# (name, weights dtype, quantization, int4 group size): int8 and int4 compute in bf16, as served.
VARIANTS = (
    ('fp32', torch.float32, None, None),
    ('bf16', torch.bfloat16, None, None),
    ('int8', torch.bfloat16, 'int8', None),
    ('int4, groups of 128', torch.bfloat16, 'int4', 128),
    ('int4, groups of 128, fp32 activations', torch.float32, 'int4', 128),
    ('int4, groups of 64', torch.bfloat16, 'int4', 64),
    ('int4, groups of 32', torch.bfloat16, 'int4', 32),
)


def train(run: Path, steps: int) -> float:
    """Trains (or finishes, or reuses) the run; returns the seconds it took this time."""
    make_embedded_corpus('data/embedded', seq_len=256)
    composer = Path(sys.executable).with_name('composer')
    command = [str(composer), '-n', '1', 'dbrx_train/train.py', YAML, f'run_name={run.name}', *OVERRIDES,
               f'max_duration={steps}ba']
    log('$ ' + ' '.join(command))
    start = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    return time.perf_counter() - start


def held_out_windows(seq_len: int, count: int, stream: str = 'code') -> torch.Tensor:
    """`count` windows of `seq_len` tokens from the stream's documents past the corpus's token cap."""
    encoding = get_encoding()
    seen, tokens = 0, []
    for document in EMBEDDED_STREAMS[stream]():
        ids = encoding.encode_ordinary(document) + [encoding.eot_token]
        if seen >= DEFAULT_MAX_TOKENS:
            tokens += ids
            if len(tokens) >= count * seq_len:
                break
        seen += len(ids)
    if len(tokens) < count * seq_len:
        raise RuntimeError(f'the {stream} stream has only {len(tokens)} held-out tokens')
    return torch.tensor(tokens[: count * seq_len]).view(count, seq_len)


@torch.inference_mode()
def score(model: DbrxLM, windows: torch.Tensor, batch: int = 8) -> tuple[float, torch.Tensor]:
    """Perplexity over all windows and the argmax at each position."""
    nll, count, top1 = 0.0, 0, []
    for ids in windows.split(batch):
        logits = model(ids)[:, :-1].float()
        targets = ids[:, 1:]
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction='sum').item()
        count += targets.numel()
        top1.append(logits.argmax(dim=-1))
    return math.exp(nll / count), torch.cat(top1)


def quality_table(checkpoint: Path, windows: torch.Tensor) -> tuple[str, dict]:
    base = load_pretrained(checkpoint).eval()
    lines = ['| weights | perplexity | change vs fp32 | top-1 agreement with fp32 |', '|---|--:|--:|--:|']
    result, reference = {}, None
    for name, dtype, method, group_size in VARIANTS:
        log(f'scoring {name}')
        model = quantize(copy.deepcopy(base).to(dtype), method, group_size=group_size).eval()
        ppl, top1 = score(model, windows)
        reference = reference or (ppl, top1)
        agreement = float((top1 == reference[1]).float().mean())
        lines.append(f'| {name} | {ppl:.3f} | {100 * (ppl / reference[0] - 1):+.2f}% | {100 * agreement:.1f}% |')
        result[name] = {'perplexity': ppl, 'top1_agreement': agreement}
    return '\n'.join(lines), result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--steps', type=int, default=400, help='training steps of batch 16 x 256 tokens')
    parser.add_argument('--windows', type=int, default=64, help='held-out windows of 256 tokens')
    parser.add_argument('--quick', action='store_true', help='smoke run: 4 steps, 2 windows, another run folder')
    parser.add_argument('--json', type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    run = RUN.with_name(RUN.name + '-quick') if args.quick else RUN
    steps, count = (4, 2) if args.quick else (args.steps, args.windows)

    seconds = train(run, steps)
    windows = held_out_windows(256, count)
    table, result = quality_table(run / 'checkpoints', windows)
    print(f'\n**Held-out perplexity by weight format** ({run}: {steps} steps of {BATCH} x 256 tokens, '
          f'{steps * BATCH * 256 / 1e6:.1f}M tokens; scored on {windows.numel():,} held-out tokens)\n')
    print(table)
    print(f'\n- training (or resuming a finished run) took {seconds:.0f} s in this call; CPU capability '
          f'{torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_bf16_support() or "none"}; '
          f'load average {os.getloadavg()[0]:.1f}')
    if args.json:
        write_json(args.json, {'steps': steps, 'batch': BATCH, 'tokens_scored': windows.numel(), 'variants': result})


if __name__ == '__main__':
    sys.exit(main())
