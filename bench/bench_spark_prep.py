"""Tokenizing and packing text into MDS: the one-process converter vs `--engine spark` on `local[2]`.

The input is real text: the Python standard library's sources (what the embedded corpus uses),
written as JSONL files and repeated up to `--mb` megabytes. Each run is a fresh process (so its
peak memory is its own); the runs alternate engines. Spark is run at two input sizes to show that
the driver's memory does not grow with the input: the Python driver only plans the job and
receives one small result per partition. In local mode the JVM is driver and executors at once,
so its peak is reported apart.

    python bench/bench_spark_prep.py            # 50 MB and 25 MB, about 3 minutes on 2 cores
    python bench/bench_spark_prep.py --quick    # 4 MB and 2 MB
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SEQ_LEN = 2048
FILE_MB = 8  # JSONL file size: several files, as a real corpus would come


def write_corpus(folder: Path, megabytes: float) -> int:
    """JSONL files of standard-library sources, repeated until `megabytes` of text; the documents written."""
    from dbrx_train.data.embedded_corpus import stdlib_code

    folder.mkdir(parents=True)
    limit, written, documents, part = megabytes * 1e6, 0, 0, 0
    out = None
    while written < limit:
        for source in stdlib_code():
            if out is None or out.tell() > FILE_MB * 1e6:
                if out:
                    out.close()
                out = open(folder / f'part-{part:03d}.jsonl', 'w', encoding='utf-8')
                part += 1
            line = json.dumps({'text': source}) + '\n'
            out.write(line)
            written += len(source.encode())
            documents += 1
            if written >= limit:
                break
    out.close()
    return documents


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class JvmPeak:
    """The largest resident set of this process's Java children (Spark's JVM), sampled until stopped."""

    def __init__(self):
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            for pid in _children(os.getpid()):
                try:
                    status = Path(f'/proc/{pid}/status').read_text()
                    if 'java' in Path(f'/proc/{pid}/comm').read_text():
                        hwm = next(line for line in status.splitlines() if line.startswith('VmHWM'))
                        self.peak_kb = max(self.peak_kb, int(hwm.split()[1]))
                except (OSError, StopIteration):
                    continue

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_kb / 1024


def _children(pid: int) -> list[int]:
    try:
        kids = Path(f'/proc/{pid}/task/{pid}/children').read_text().split()
    except OSError:
        return []
    return [int(k) for k in kids] + [g for k in kids for g in _children(int(k))]


def run_one(engine: str, corpus: Path, out: Path) -> dict:
    """One conversion in this process: seconds, tokens and peak memory."""
    from dbrx_train.data.spark import convert_text_with_spark, spark_session
    from dbrx_train.data.text_to_mds import convert_to_mds, iter_documents

    if engine.startswith('local'):
        import streaming  # noqa: F401  (a fixed cost, as the Spark workers' start is)

        workers = int(engine.split('-')[1])
        start = time.perf_counter()
        stats = convert_to_mds(iter_documents([corpus]), out, seq_len=SEQ_LEN, workers=workers, desc=engine)
        return {'seconds': time.perf_counter() - start, 'tokens': stats.tokens + stats.dropped_tokens,
                'python_peak_mb': peak_rss_mb(), 'jvm_peak_mb': None, 'start_seconds': 0.0}
    jvm = JvmPeak()
    started = time.perf_counter()
    with spark_session('local[2]', {'spark.ui.enabled': 'false'}) as spark:
        spark.sparkContext.setLogLevel('ERROR')
        # A first small job starts the Python workers (each imports Streaming, hence torch): a fixed
        # cost per executor core, reported apart from the conversion's throughput.
        warm = time.perf_counter()
        warmup = _warmup_input(out.parent)
        spark.conf.set('spark.sql.files.maxPartitionBytes', str(warmup.stat().st_size // 2 + 1))  # one task per core
        convert_text_with_spark(spark, [warmup], out.parent / 'warmup', seq_len=8)
        spark.conf.unset('spark.sql.files.maxPartitionBytes')
        start = time.perf_counter()
        stats, run = convert_text_with_spark(spark, [corpus], out, seq_len=SEQ_LEN)
        seconds = time.perf_counter() - start
    shutil.rmtree(out.parent / 'warmup', ignore_errors=True)
    return {'seconds': seconds, 'tokens': stats.tokens + stats.dropped_tokens, 'python_peak_mb': peak_rss_mb(),
            'jvm_peak_mb': jvm.stop(), 'start_seconds': warm - started, 'warmup_seconds': start - warm,
            'partitions': run.partitions, 'dropped': stats.dropped_tokens}


def _warmup_input(folder: Path) -> Path:
    path = folder / 'warmup.jsonl'
    path.write_text(''.join(json.dumps({'text': f'warm-up document {i} ' * 20}) + '\n' for i in range(200)))
    return path


def measure(engine: str, corpus: Path, scratch: Path) -> dict:
    out = scratch / f'out-{engine}'
    try:
        result = subprocess.run([sys.executable, __file__, '--run', engine, '--corpus', str(corpus), '--out', str(out)],
                                capture_output=True, text=True, cwd=REPO)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if result.returncode:
        raise SystemExit(f'{engine} on {corpus.name} failed:\n{result.stderr[-4000:]}')
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--mb', type=float, default=50.0, help='input size of the main comparison (default 50)')
    parser.add_argument('--quick', action='store_true', help='4 MB and 2 MB: a smoke run')
    parser.add_argument('--json', help='also write the numbers here')
    parser.add_argument('--run', help=argparse.SUPPRESS)
    parser.add_argument('--corpus', help=argparse.SUPPRESS)
    parser.add_argument('--out', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run_one(args.run, Path(args.corpus), Path(args.out))))
        return
    big = 4.0 if args.quick else args.mb
    scratch = Path(tempfile.mkdtemp(prefix='bench-spark-'))
    try:
        corpora = {size: scratch / f'corpus-{size:g}mb' for size in (big, big / 2)}
        documents = {size: write_corpus(path, size) for size, path in corpora.items()}
        rows = []
        for engine, size in [('local-1', big), ('spark', big), ('local-2', big), ('spark', big / 2)]:
            result = measure(engine, corpora[size], scratch)
            rows.append({'engine': engine, 'mb': size, 'documents': documents[size], **result})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report(rows, args)


def report(rows: list[dict], args: argparse.Namespace) -> None:
    base = next(r for r in rows if r['engine'] == 'local-1')
    base_rate = base['tokens'] / base['seconds']
    names = {'local-1': 'one process, --workers 1', 'local-2': 'one process, --workers 2',
             'spark': 'Spark local[2]'}
    print(f'\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; '
          f'cpu capability {torch.backends.cpu.get_cpu_capability()}; seq_len {SEQ_LEN}\n')
    print('| converter | input MB | tokens | seconds | tokens/s | vs one process | '
          "Python driver peak MB | JVM peak MB | Spark start s | workers' start s |")
    print('|---|---|---|---|---|---|---|---|---|---|')
    for r in rows:
        rate = r['tokens'] / r['seconds']
        jvm = f"{r['jvm_peak_mb']:.0f}" if r['jvm_peak_mb'] is not None else '-'
        start = f"{r['start_seconds']:.1f}" if r['engine'] == 'spark' else '-'
        warmup = f"{r['warmup_seconds']:.1f}" if r['engine'] == 'spark' else '-'
        print(f"| {names[r['engine']]} | {r['mb']:g} | {r['tokens']:,} | {r['seconds']:.1f} | {rate:,.0f} | "
              f"{rate / base_rate:.2f}x | {r['python_peak_mb']:.0f} | {jvm} | {start} | {warmup} |")
    spark_rows = [r for r in rows if r['engine'] == 'spark']
    print(f"\nSpark partitions: {', '.join(str(r['partitions']) for r in spark_rows)}; tail tokens dropped: "
          f"{', '.join(str(r['dropped']) for r in spark_rows)}. Spark's seconds exclude the session start and the "
          "workers' start (a first small job: each Python worker imports Streaming, hence torch, once).")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + '\n')


if __name__ == '__main__':
    main()
