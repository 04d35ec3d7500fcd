"""The server against transformers' `generate` on the same weights: generation tokens/s for one
client and for concurrent clients, and time to first token.

    .venv/bin/python bench/bench_serve.py [--quick] [--clients 8] [--new-tokens 64] [--dtype bfloat16]
                                          [--quantize int8|int4] [--json PATH]

The server is the real one (`python -m dbrx_train.serve`, its own process, on a checkpoint of the
same weights), driven over HTTP by the official `openai` client: streaming, greedy, `ignore_eos` so
every request makes exactly --new-tokens tokens. transformers runs `generate` in this process, at
batch 1 and at batch --clients (one static batch). Measurements alternate between the two, round
after round; medians are reported. (In one process the two would share, and slow, the CPU threads.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import subprocess
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from bench_model import Row, format_table, log, write_json
from common import bench_config, model_pair

PROMPT_LEN = 16


@dataclass
class Settings:
    rounds: int
    new_tokens: int
    clients: int


FULL = Settings(rounds=3, new_tokens=64, clients=8)
QUICK = Settings(rounds=1, new_tokens=16, clients=8)


@dataclass
class Run:
    seconds: float  # first request sent to last token received
    tokens: int
    ttft: float  # median time to first token over the requests

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def prompts(count: int) -> list[list[int]]:
    ids = torch.randint(0, 100256, (count, PROMPT_LEN), generator=torch.Generator().manual_seed(3))  # real tokens
    return ids.tolist()


class ServerClients:
    """`count` clients that each stream one completion at the same moment."""

    def __init__(self, url: str, count: int, new_tokens: int):
        import openai

        self.client = openai.OpenAI(base_url=url + '/v1', api_key='bench', max_retries=0)
        self.pool = ThreadPoolExecutor(count)
        self.count, self.new_tokens = count, new_tokens

    def one(self, prompt: list[int], start: threading.Barrier) -> tuple[float, float, float, int]:
        start.wait()
        sent = time.perf_counter()
        first, tokens = None, 0
        stream = self.client.completions.create(
            model='bench', prompt=prompt, max_tokens=self.new_tokens, temperature=0, stream=True,
            stream_options={'include_usage': True}, extra_body={'ignore_eos': True})
        for chunk in stream:
            if chunk.choices and first is None:
                first = time.perf_counter()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return sent, first, time.perf_counter(), tokens

    def run(self, batch_prompts: list[list[int]]) -> Run:
        start = threading.Barrier(len(batch_prompts))
        results = list(self.pool.map(lambda p: self.one(p, start), batch_prompts))
        sent = min(r[0] for r in results)
        return Run(max(r[2] for r in results) - sent, sum(r[3] for r in results),
                   statistics.median(r[1] - r[0] for r in results))


def hf_run(hf, batch_prompts: list[list[int]], new_tokens: int) -> Run:
    """One static batch through `generate`; its time to first token is a 1-token `generate`."""
    ids = torch.tensor(batch_prompts)

    def generate(n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, min_new_tokens=n,
                              max_new_tokens=n, pad_token_id=0)
        assert out.shape[1] == PROMPT_LEN + n
        return time.perf_counter() - start

    ttft = generate(1)
    return Run(generate(new_tokens), len(batch_prompts) * new_tokens, ttft)


@contextlib.contextmanager
def server_process(model, workdir: Path, max_batch_size: int, dtype: str, quantize: str | None = None):
    """`python -m dbrx_train.serve` on a checkpoint of `model`; yields its URL once /health answers."""
    from dbrx_train.checkpoints import save_checkpoint

    save_checkpoint(model, workdir / 'model')
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    config = workdir / 'serve.yaml'
    config.write_text(f'checkpoint: {workdir / "model"}\nport: {port}\nmodel_name: bench\n'
                      f'max_batch_size: {max_batch_size}\n'
                      # int8 computes in its own default dtype (bfloat16)
                      + (f'quantize: {quantize}\n' if quantize else f'dtype: {dtype}\n'))
    server = subprocess.Popen([sys.executable, '-m', 'dbrx_train.serve', '--config', str(config)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f'http://127.0.0.1:{port}'
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError('the server did not start')
            try:
                health(url)
                break
            except OSError:  # not listening yet
                pass
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=60)


def health(url: str) -> dict:
    with urllib.request.urlopen(url + '/health', timeout=10) as response:
        return json.load(response)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='one round of 16 tokens (smoke run)')
    parser.add_argument('--clients', type=int, help='concurrent clients (default 8)')
    parser.add_argument('--new-tokens', type=int, help='tokens per request (default 64)')
    parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32', help='of both models')
    parser.add_argument('--quantize', choices=('int8', 'int4'), help="the server's weights (transformers keeps --dtype)")
    parser.add_argument('--json', help='also write the results here')
    args = parser.parse_args(argv)
    s = QUICK if args.quick else FULL
    s = Settings(s.rounds, args.new_tokens or s.new_tokens, args.clients or s.clients)

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config, source = bench_config()
    ours, hf = model_pair(config)
    dtype = getattr(torch, args.dtype)
    ours.to(dtype).eval(), hf.to(dtype).eval()
    batch = prompts(s.clients)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix='bench-serve-') as tmp, \
            server_process(ours, Path(tmp), s.clients, args.dtype, args.quantize) as url:
        del ours  # the server process holds its own copy
        clients = ServerClients(url, s.clients, s.new_tokens)
        measure = {
            'server, 1 client': lambda: clients.run(batch[:1]),
            f'server, {s.clients} clients': lambda: clients.run(batch),
            'transformers, batch 1': lambda: hf_run(hf, batch[:1], s.new_tokens),
            f'transformers, batch {s.clients}': lambda: hf_run(hf, batch, s.new_tokens),
        }
        for name, fn in measure.items():  # warm-up
            log(f'warming up: {name}')
            fn()
        runs: dict[str, list[Run]] = {name: [] for name in measure}
        for round_ in range(s.rounds):
            log(f'round {round_ + 1}/{s.rounds} ({time.perf_counter() - started:.0f}s so far)')
            for name in measure if round_ % 2 == 0 else reversed(measure):
                runs[name].append(measure[name]())
        peak_batch = health(url)['peak_batch']

    def median(name: str, field: str) -> float:
        return statistics.median(getattr(r, field) for r in runs[name])

    ours1, ours_n = 'server, 1 client', f'server, {s.clients} clients'
    hf1, hf_n = 'transformers, batch 1', f'transformers, batch {s.clients}'
    rows = [
        Row('generation, 1 client (batch 1)', 'tokens/s', median(ours1, 'tokens_per_s'), median(hf1, 'tokens_per_s')),
        Row(f'generation, {s.clients} concurrent clients', 'tokens/s', median(ours_n, 'tokens_per_s'),
            median(hf_n, 'tokens_per_s')),
        Row('time to first token, 1 client (lower is better)', 'ms', 1e3 * median(ours1, 'ttft'),
            1e3 * median(hf1, 'ttft')),
        Row(f'time to first token, {s.clients} clients (lower is better)', 'ms', 1e3 * median(ours_n, 'ttft'),
            1e3 * median(hf_n, 'ttft')),
    ]
    gain = median(ours_n, 'tokens_per_s') / median(ours1, 'tokens_per_s')
    print(format_table(rows))
    notes = [
        f'config: {source}; d_model {config.d_model}, {config.n_layers} layers, {config.ffn_config.moe_num_experts} '
        f'experts top-{config.ffn_config.moe_top_k}, vocab {config.vocab_size}; {args.dtype}'
        f'{f", server weights {args.quantize}" if args.quantize else ""}; '
        f'{torch.get_num_threads()} threads',
        f'each request: {PROMPT_LEN} prompt tokens + {s.new_tokens} generated, greedy; medians of {s.rounds} rounds',
        'server: `python -m dbrx_train.serve` in its own process, HTTP streaming through the openai client; '
        'transformers: `generate` in the benchmark process (the concurrent column is one static batch of the same '
        'prompts)',
        f'server throughput with {s.clients} concurrent clients = {gain:.1f}x one client, '
        f'{median(ours_n, "tokens_per_s") / median(hf1, "tokens_per_s"):.1f}x transformers serving them one after '
        f'another (the engine decoded up to {peak_batch} sequences per step)',
        'ratio = ours / transformers; timings on a shared machine are noisy',
    ]
    for note in notes:
        print(f'- {note}')
    if args.json:

        write_json(Path(args.json), {'config_source': source, 'settings': s.__dict__, 'peak_batch': peak_batch,
                                     'rows': [{**r.__dict__, 'ratio': r.ratio} for r in rows]})


if __name__ == '__main__':
    main()
