"""The data_prep converters' `--engine spark`: tokenizing into MDS on Apache Spark, locally or on a cluster.

Spark's own readers read the inputs (lines of JSONL files, parquet files and tables, Delta tables,
whole text files) and cut them into partitions (by default about 128 MB of input each). Each
partition is one task: on an executor, it turns its records into samples with the one-process
converters' code (`text_to_mds`: tokenize, `<|endoftext|>`, pack; `finetuning_to_mds`: parse,
render) and writes its own group of MDS shards with Streaming's `MDSWriter` to `part-NNNNN/`. The
driver then merges the groups' indexes with Streaming's `merge_index` into the root `index.json`,
in partition order, and writes it last: an output without it is unfinished.

The writing is what Streaming's `dataframe_to_mds` does, but its per-record function is called once
per Arrow batch (packing carries a partition's tail across batches), it writes one column set
(fine-tuning writes two splits), and a partition returns nothing to the driver but its index
path; here each partition also returns its counts and its bad records.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import shutil
import sys
import urllib.parse
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from dbrx_train.data.text_to_mds import (
    JSONL_SUFFIXES,
    MDS_COLUMNS,
    PREP_INFO_FILE,
    TOKENS_COLUMN,
    BadRecord,
    ConversionStats,
    Packer,
    check_output_dir,
    checked_text,
    encode_documents,
    expand_inputs,
    staged_output,
    text_batches,
    text_of_json_line,
)
from dbrx_train.errors import UserError
from dbrx_train.uri import is_remote

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

OnBadLine = Literal['error', 'skip']
LOOPBACK = '127.0.0.1'
DEFAULT_MASTER = 'local[*]'
INSTALL_HINT = "pip install -c requirements/constraints.txt -e '.[spark]'"
JAVA_HINT = 'apt-get install openjdk-17-jre-headless, or set JAVA_HOME'
BAD_LINES_KEPT = 1000  # bad records listed in prep_info.json (all are counted)
_BAD_MARKER = 'dbrx-bad-record:'  # how an executor's bad record reaches the driver inside Spark's error
_RESULT_SCHEMA = 'result string'  # one JSON row per partition


# ---------------------------------------------------------------- the session


def require_spark() -> None:
    """One line saying what to install when PySpark or Java is missing."""
    try:
        import pyspark  # noqa: F401
    except ImportError:
        raise UserError(f'--engine spark needs PySpark: {INSTALL_HINT}') from None
    if not (os.environ.get('JAVA_HOME') or shutil.which('java')):
        raise UserError(f'--engine spark needs a Java 17 runtime: {JAVA_HINT}')


def started_by_spark_submit() -> bool:
    return 'PYSPARK_GATEWAY_PORT' in os.environ  # spark-submit hands its JVM to the Python driver this way


@contextlib.contextmanager
def spark_session(master: str | None = None, conf: Mapping[str, str] | None = None) -> Iterator[SparkSession]:
    """A SparkSession on `master`: by default spark-submit's when it started this process, else `local[*]`.

    A local Spark binds 127.0.0.1 only and runs this interpreter in its workers (a bare `python3`
    would lack the packages). The session is stopped at the end unless it was there before.
    """
    require_spark()
    from pyspark.sql import SparkSession

    if master is None and not started_by_spark_submit():
        master = DEFAULT_MASTER
    builder = SparkSession.builder.appName('dbrx_train data prep').config('spark.ui.showConsoleProgress', 'true')
    if master is not None:
        builder = builder.master(master)
    if master is not None and master.startswith('local'):
        os.environ['SPARK_LOCAL_IP'] = LOOPBACK
        os.environ['PYSPARK_PYTHON'] = sys.executable
        builder = builder.config('spark.driver.host', LOOPBACK).config('spark.driver.bindAddress', LOOPBACK)
    for key, value in (conf or {}).items():
        builder = builder.config(key, value)
    existed = SparkSession.getActiveSession() is not None
    spark = builder.getOrCreate()
    _quiet_task_failures(spark)
    try:
        yield spark
    finally:
        if not existed and not started_by_spark_submit():
            spark.stop()


def _quiet_task_failures(spark: SparkSession) -> None:
    """Spark logs a failed task's whole stack trace, and a bad record is a failed task: the driver
    reports it in one line (and any other failure in full, from the exception it receives)."""
    jvm = spark.sparkContext._jvm
    for logger in ('org.apache.spark.executor.Executor', 'org.apache.spark.scheduler.TaskSetManager'):
        jvm.org.apache.logging.log4j.core.config.Configurator.setLevel(logger, jvm.org.apache.logging.log4j.Level.OFF)


def add_spark_arguments(parser: argparse.ArgumentParser) -> None:
    """The converters' `--engine` options, and `--on-bad-line` (the local text engine only stops)."""
    parser.add_argument('--on-bad-line', choices=('error', 'skip'), default='error',
                        help='stop at the first bad record (default), or report each and leave it out')
    parser.add_argument('--engine', choices=('local', 'spark'), default='local',
                        help='local: this machine (default); spark: Apache Spark, locally or on a cluster')
    parser.add_argument('--spark-master', default=None,
                        help=f'Spark master URL (default: spark-submit\'s when run by it, else {DEFAULT_MASTER})')
    parser.add_argument('--spark-conf', action='append', default=[], metavar='KEY=VALUE',
                        help='a Spark setting, e.g. spark.sql.files.maxPartitionBytes=64m (repeatable)')


def session_from_args(args: argparse.Namespace) -> contextlib.AbstractContextManager[SparkSession]:
    return spark_session(args.spark_master, parse_spark_conf(args.spark_conf))


def parse_spark_conf(pairs: Sequence[str]) -> dict[str, str]:
    """`--spark-conf key=value` options as a dict."""
    conf = {}
    for pair in pairs:
        key, sep, value = pair.partition('=')
        if not sep or not key.strip():
            raise UserError(f'--spark-conf {pair!r}: expected key=value, e.g. spark.sql.files.maxPartitionBytes=64m')
        conf[key.strip()] = value
    return conf


# ---------------------------------------------------------------- reading inputs


@dataclass(frozen=True)
class Source:
    """Inputs of one kind that Spark reads together: 'jsonl' (one record per line), 'text' (one
    document per file), 'parquet' (files or a table directory), 'delta' (a table directory) or
    'table' (a bucket URI without a suffix: Delta or parquet, whichever it holds)."""

    kind: str
    paths: tuple[str, ...]


def _kind_by_suffix(path: str) -> str:
    suffix = Path(urllib.parse.urlparse(path).path).suffix.lower()
    return 'jsonl' if suffix in JSONL_SUFFIXES else 'parquet' if suffix == '.parquet' else 'text'


def plan_sources(inputs: Sequence[str | Path], kinds: Sequence[str]) -> list[Source]:
    """The inputs as Spark reads, in order: runs of files of one kind are read together.

    Local paths are expanded as the one-process converter expands them (directories sorted, hidden
    files left out); a directory holding `_delta_log` is a Delta table. A bucket URI is passed to
    Spark as it is: by its suffix a JSONL, parquet or text file (globs allowed), without one a
    table directory (Delta when it holds `_delta_log`, else parquet).
    """
    sources: list[Source] = []

    def add(kind: str, path: str) -> None:
        if kind not in kinds:
            raise UserError(f'{path}: {kind} input is not read by this converter (it reads {", ".join(kinds)})')
        if sources and sources[-1].kind == kind and kind in ('jsonl', 'text', 'parquet'):
            sources[-1] = Source(kind, (*sources[-1].paths, path))
        else:
            sources.append(Source(kind, (path,)))

    if not inputs:
        raise UserError('no input given')
    for given in inputs:
        given = str(given)
        if is_remote(given):
            suffix_kind = _kind_by_suffix(given)
            has_suffix = Path(urllib.parse.urlparse(given).path).suffix != ''
            add(suffix_kind if has_suffix else 'table', given)
        elif (Path(given) / '_delta_log').is_dir():
            add('delta', str(Path(given).resolve()))
        else:
            for path, saved_dataset in expand_inputs([given]):
                if saved_dataset:
                    raise UserError(f'{path}: a `datasets` directory is not read by --engine spark; save it as '
                                    f'parquet (dataset.to_parquet) or JSONL (dataset.to_json) first')
                add(_kind_by_suffix(str(path)), str(path.resolve()))
    return sources


def read_sources(spark: SparkSession, sources: Sequence[Source], text_field: str) -> DataFrame:
    """One DataFrame of every source's records, in order, as (kind, payload: the raw bytes, file, block:
    the byte where Spark's block of a JSONL file starts, row: a table's row number)."""
    frames = [_read_source(spark, source, text_field) for source in sources]
    return functools.reduce(lambda a, b: a.union(b), frames)


def _read_source(spark: SparkSession, source: Source, text_field: str) -> DataFrame:
    from pyspark.sql import functions as F
    from pyspark.sql.utils import AnalysisException

    paths = list(source.paths)
    try:
        if source.kind == 'jsonl':  # lines; the executor numbers them within each block of a file
            frame = spark.read.text(paths)
            payload, row = F.col('value').cast('binary'), F.lit(None)
            block = F.col('_metadata.file_block_start')
        elif source.kind == 'text':  # bytes, decoded by the executor as strictly as the one-process reader
            frame = spark.read.format('binaryFile').load(paths)
            payload, row, block = F.col('content'), F.lit(None), F.lit(0)
        else:
            frame = _read_table(spark, source)
            if text_field not in frame.columns:
                raise UserError(f'{_shown(paths)}: no {text_field!r} column (columns: {", ".join(frame.columns)})')
            kind = frame.schema[text_field].dataType.simpleString()
            if kind != 'string':
                raise UserError(f'{_shown(paths)}: column {text_field!r} holds {kind}, not strings')
            payload, row, block = F.col(text_field).cast('binary'), F.col('_metadata.row_index'), F.lit(0)
        return frame.select(
            F.lit(source.kind).alias('kind'),
            payload.alias('payload'),
            F.col('_metadata.file_path').alias('file'),
            block.cast('long').alias('block'),
            row.cast('long').alias('row'),
        )
    except AnalysisException as e:
        raise UserError(f'{_shown(paths)}: Spark cannot read it ({_first_line(str(e))})') from None


def _read_table(spark: SparkSession, source: Source) -> DataFrame:
    kind = source.kind
    if kind == 'table':
        kind = 'delta' if _exists(spark, source.paths[0].rstrip('/') + '/_delta_log') else 'parquet'
    if kind == 'parquet':
        return spark.read.option('mergeSchema', 'true').parquet(*source.paths)
    try:
        return spark.read.format('delta').load(source.paths[0])
    except Exception as e:  # the JVM's ClassNotFoundException arrives as one of several Py4J errors
        if 'delta' in str(e).lower() and ('not find' in str(e) or 'ClassNotFound' in str(e)):
            raise UserError(f'{source.paths[0]}: a Delta table needs Spark with Delta Lake (Databricks, or '
                            f'pip install delta-spark and its spark.sql.extensions settings)') from None
        raise


def _exists(spark: SparkSession, uri: str) -> bool:
    """Whether `uri` exists, asked through Spark's own (Hadoop) filesystems."""
    jvm = spark.sparkContext._jvm
    path = jvm.org.apache.hadoop.fs.Path(uri)
    return path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()).exists(path)


def _shown(paths: Sequence[str]) -> str:
    return paths[0] if len(paths) == 1 else f'{paths[0]} (and {len(paths) - 1} more)'


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def shown_file(file_uri: str) -> str:
    """A file as the user named it: Spark's `file:/a%20b` is `/a b`."""
    parsed = urllib.parse.urlparse(file_uri)
    return urllib.parse.unquote(parsed.path) if parsed.scheme in ('', 'file') else file_uri


# ---------------------------------------------------------------- inside an executor


@dataclass
class Record:
    """One input record and where it is: `where` when known, else the JSONL line `index` (0-based) of
    the file's Spark block that starts at byte `block` (the driver turns that into a line number)."""

    kind: str
    payload: bytes | None
    where: str | None = None
    file: str | None = None
    block: int = 0
    index: int = 0

    def location(self) -> str | list:
        return self.where if self.where is not None else [self.file, self.block, self.index]


def _records(batches: Iterable[Any], block_lines: Counter) -> Iterator[Record]:
    """A partition's rows as `Record`s; counts the JSONL lines of each (file, block) in `block_lines`."""
    for batch in batches:
        columns = [batch.column(name).to_pylist() for name in ('kind', 'payload', 'file', 'block', 'row')]
        for kind, payload, file, block, row in zip(*columns):
            if kind == 'jsonl':
                index = block_lines[(file, block)]
                block_lines[(file, block)] += 1
                if block == 0:
                    yield Record(kind, payload, where=f'{shown_file(file)}:{index + 1}')
                else:
                    yield Record(kind, payload, file=file, block=block, index=index)
            elif kind == 'text':
                yield Record(kind, payload, where=shown_file(file))
            else:
                yield Record(kind, payload, where=f'{shown_file(file)}: row {row}')


@dataclass
class BadRecords:
    """A partition's bad records: the first stops the job (`error`), or each is counted and kept (`skip`)."""

    policy: OnBadLine
    count: int = 0
    found: list[tuple[Any, str]] = field(default_factory=list)  # (location, problem), the first BAD_LINES_KEPT

    def report(self, record: Record, problem: str) -> None:
        if self.policy == 'error':
            raise UserError(_BAD_MARKER + json.dumps({'location': record.location(), 'problem': problem}))
        self.count += 1
        if len(self.found) < BAD_LINES_KEPT:
            self.found.append((record.location(), problem))


def _text_of(record: Record, text_field: str) -> str | None:
    """The document in a record (None for a blank JSONL line), or `BadRecord`, as the one-process
    reader decides."""
    if record.payload is None:
        return checked_text(None, text_field)
    try:
        text = record.payload.decode('utf-8')
    except UnicodeDecodeError as e:
        raise BadRecord(f'not UTF-8 text (byte {e.start}: {e.reason})') from None
    if record.kind != 'jsonl':
        return text
    return text_of_json_line(text, text_field) if text.strip() else None


class PartitionTask(Protocol):
    """What a partition makes of its records: samples of `columns`, each for one of `splits` ('' when
    there is one), with `counts` summed over partitions (`max/...` keys: the largest)."""

    @property
    def splits(self) -> tuple[str, ...]: ...

    @property
    def columns(self) -> Mapping[str, str]: ...

    def samples(self, records: Iterator[Record], bad: BadRecords, counts: Counter) -> Iterator[tuple[str, dict]]: ...


@dataclass(frozen=True)
class PackTexts:
    """Pretraining text: each partition tokenizes its documents and packs them, in order, into rows of
    `seq_len`; the partition's tail (fewer than `seq_len` tokens) is dropped and counted."""

    seq_len: int
    text_field: str = 'text'
    splits: tuple[str, ...] = ('',)
    columns: Mapping[str, str] = field(default_factory=lambda: dict(MDS_COLUMNS))

    def samples(self, records: Iterator[Record], bad: BadRecords, counts: Counter) -> Iterator[tuple[str, dict]]:
        packer = Packer(self.seq_len)
        for batch in text_batches(self._documents(records, bad)):
            tokens = encode_documents(batch)
            counts['documents'] += len(batch)
            counts['tokens_read'] += len(tokens)
            for row in packer.add(tokens):
                counts['samples'] += 1
                yield '', {TOKENS_COLUMN: row}
        counts['tail_tokens'] += len(packer.pending)

    def _documents(self, records: Iterator[Record], bad: BadRecords) -> Iterator[str]:
        for record in records:
            try:
                text = _text_of(record, self.text_field)
            except BadRecord as e:
                bad.report(record, str(e))
                continue
            if text is not None:
                yield text


@dataclass(frozen=True)
class PartitionWriter:
    """What each Spark task runs (`mapInArrow`): its partition's records to one group of shards per
    split, `<out>/<split>/part-NNNNN`; it yields one JSON row of counts and bad records."""

    task: PartitionTask
    out: str
    on_bad_line: OnBadLine
    compression: str | None

    def __call__(self, batches: Iterable[Any]) -> Iterator[Any]:
        import pyarrow as pa
        from pyspark import TaskContext
        from streaming import MDSWriter

        context = TaskContext.get()
        group = f'part-{context.partitionId():05d}'
        if context.attemptNumber():  # a retry never writes into a failed attempt's files
            group += f'-attempt{context.attemptNumber()}'
        writers = {
            split: MDSWriter(out=_join(self.out, split, group), columns=dict(self.task.columns),
                             compression=self.compression)
            for split in self.task.splits
        }
        counts: Counter = Counter()
        block_lines: Counter = Counter()
        bad = BadRecords(self.on_bad_line)
        for split, sample in self.task.samples(_records(batches, block_lines), bad, counts):
            writers[split].write(sample)
        for writer in writers.values():
            writer.finish()
        result = {
            'group': group,
            'counts': dict(counts),
            'bad_count': bad.count,
            'bad': bad.found,
            'block_lines': [[file, block, n] for (file, block), n in block_lines.items()],
        }
        yield pa.RecordBatch.from_pylist([{'result': json.dumps(result)}])


def _join(out: str, *parts: str) -> str:
    return '/'.join([out.rstrip('/'), *(p for p in parts if p)])


# ---------------------------------------------------------------- on the driver


def _run_partitions(spark: SparkSession, frame: DataFrame, writer: PartitionWriter) -> list[dict]:
    """Runs `writer` on every partition of `frame` (one Spark job); the partitions' results, in order."""
    partitions = frame.rdd.getNumPartitions()
    print(f'spark: {partitions} partition{"s" if partitions != 1 else ""} on {spark.sparkContext.master}'
          + (f', progress at {spark.sparkContext.uiWebUrl}' if spark.sparkContext.uiWebUrl else ''), file=sys.stderr)
    try:
        rows = frame.mapInArrow(writer, _RESULT_SCHEMA).collect()
    except Exception as e:  # Spark wraps an executor's exception in its own (Py4JJavaError, PythonException)
        raise _user_error_from(str(e)) or e from None
    return [json.loads(row.result) for row in rows]


def _user_error_from(text: str) -> UserError | None:
    """The `UserError` an executor raised, read back from the text of Spark's error; None if there is none."""
    if _BAD_MARKER in text:
        payload, _ = json.JSONDecoder().raw_decode(text[text.index(_BAD_MARKER) + len(_BAD_MARKER):])
        where = LineResolver().where(payload['location'])
        return UserError(f'{where}: {payload["problem"]} (pass --on-bad-line skip to leave such lines out)')
    marker = 'dbrx_train.errors.UserError: '
    if marker in text:
        return UserError(text[text.rindex(marker) + len(marker):].splitlines()[0])
    return None


class LineResolver:
    """Line numbers of JSONL records that Spark read from a later block of a file (it splits big files
    into blocks): the lines of the blocks before, as the partitions counted them, or else counted by
    reading the file up to the block."""

    def __init__(self, block_lines: Iterable[Sequence] = ()):
        self.blocks: dict[str, dict[int, int]] = {}
        for file, block, lines in block_lines:
            self.blocks.setdefault(file, {})[block] = lines

    def where(self, location: str | Sequence) -> str:
        if isinstance(location, str):
            return location
        file, block, index = location
        blocks = self.blocks.get(file, {})
        before = sum(n for start, n in blocks.items() if start < block) if block in blocks else lines_before(file, block)
        if before is None:
            return f'{shown_file(file)}: line {index + 1} of the part from byte {block}'
        return f'{shown_file(file)}:{before + index + 1}'


def lines_before(file_uri: str, offset: int) -> int | None:
    """The lines a Spark block starting at byte `offset` > 0 does not read: Hadoop's line reader gives a
    block the lines that start after its first byte, up to and including one starting at its end."""
    import pyarrow.fs

    try:
        if urllib.parse.urlparse(file_uri).scheme in ('', 'file'):
            stream = open(shown_file(file_uri), 'rb')
        else:
            filesystem, path = pyarrow.fs.FileSystem.from_uri(file_uri)
            stream = filesystem.open_input_stream(path)
        newlines, left = 0, offset
        with stream:
            while left > 0:
                chunk = stream.read(min(left, 1 << 24))
                if not chunk:
                    break
                newlines += chunk.count(b'\n')
                left -= len(chunk)
        return newlines + 1
    except Exception:  # a filesystem pyarrow cannot open (s3a://, ...): the location stays a byte offset
        return None


@dataclass(frozen=True)
class SparkRun:
    """What one conversion on Spark read and wrote, summed over its partitions."""

    partitions: int
    counts: Counter
    bad_lines: int
    bad_line_list: list[dict[str, str]]


def convert(
    spark: SparkSession,
    sources: list[Source],
    out: str | Path,
    task: PartitionTask,
    *,
    text_field: str,
    on_bad_line: OnBadLine,
    compression: str | None,
    overwrite: bool,
    check: Any,
    info: Any,
) -> tuple[Any, SparkRun]:
    """Runs `task` over `sources` into `out` (staged locally, written in place in a bucket); `check(run)`
    raises when the output would be unusable, `info(run)` gives (stats, prep_info) to return and save."""
    from streaming.base.util import merge_index

    frame = read_sources(spark, sources, text_field)
    with _output(str(out), overwrite) as (target, write_file):
        results = _run_partitions(spark, frame, PartitionWriter(task, target, on_bad_line, compression))
        resolver = LineResolver([entry for r in results for entry in r['block_lines']])
        bad_list = [{'where': resolver.where(loc), 'problem': problem} for r in results for loc, problem in r['bad']]
        for entry in bad_list:
            log.warning('%s: %s; skipped', entry['where'], entry['problem'])
        run = SparkRun(len(results), _total_counts(r['counts'] for r in results),
                       sum(r['bad_count'] for r in results), bad_list)
        check(run)
        for split in task.splits:
            with _quiet_root_logger():  # merge_index announces its temporary folder as a warning
                merge_index([_join(target, split, r['group'], 'index.json') for r in results], _join(target, split),
                            keep_local=not is_remote(target))
            if not is_remote(target):  # the shard group of a task attempt that failed (its retry wrote anew)
                for group in Path(target, split).glob('part-*'):
                    if group.name not in {r['group'] for r in results}:
                        shutil.rmtree(group)
        stats, prep_info = info(run)
        write_file(PREP_INFO_FILE, json.dumps(prep_info, indent=2) + '\n')
    return stats, run


def _total_counts(counts: Iterable[dict[str, int]]) -> Counter:
    """Partitions' counts summed, except `max/...` ones (the largest wins)."""
    total: Counter = Counter()
    for partition in counts:
        for key, value in partition.items():
            total[key] = max(total[key], value) if key.startswith('max/') else total[key] + value
    return total


@contextlib.contextmanager
def _output(out: str, overwrite: bool) -> Iterator[tuple[str, Any]]:
    """(where the executors write, `write_file(name, text)` at its root). A local `out` is staged beside
    it and renamed into place when complete (so on a cluster it must be a folder every node shares);
    a bucket prefix must be new or empty, and only gets its root index.json once complete."""
    if is_remote(out):
        from streaming.base.storage.upload import CloudUploader

        uploader = CloudUploader.get(out, keep_local=False)
        try:
            existing = uploader.list_objects()
        except NotImplementedError:  # Streaming lists s3, gs, oci and local stores; others are not checked
            existing = None
        if existing:
            hint = ' (--overwrite is for local folders)' if overwrite else ''
            raise UserError(f'output {out} is not empty: choose a new prefix{hint}')

        def write_remote(name: str, text: str) -> None:
            Path(uploader.local, name).write_text(text)
            uploader.upload_file(name)

        yield out, write_remote
        shutil.rmtree(uploader.local, ignore_errors=True)
        return
    path = check_output_dir(out, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    with staged_output(path) as tmp:
        yield str(tmp), lambda name, text: (tmp / name).write_text(text)


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


# ---------------------------------------------------------------- the two conversions


def convert_text_with_spark(
    spark: SparkSession,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    seq_len: int,
    text_field: str = 'text',
    on_bad_line: OnBadLine = 'error',
    compression: str | None = 'zstd',
    overwrite: bool = False,
) -> tuple[ConversionStats, SparkRun]:
    """`text_to_mds.convert_to_mds` on Spark: each partition packs its own documents into `seq_len` rows."""
    if seq_len < 1:
        raise UserError(f'seq_len must be at least 1, got {seq_len}')
    sources = plan_sources(inputs, ('jsonl', 'text', 'parquet', 'delta', 'table'))

    def check(run: SparkRun) -> None:
        if not run.counts['samples']:
            read = run.counts['tokens_read']
            what = 'no tokens at all' if read == 0 else f'only {read} tokens in its largest partition or fewer'
            raise UserError(f'input has {what}: fewer than one sample of seq_len {seq_len} per partition')

    def info(run: SparkRun) -> tuple[ConversionStats, dict]:
        stats = ConversionStats(run.counts['documents'], run.counts['samples'], seq_len, run.counts['tail_tokens'])
        return stats, {**asdict(stats), 'tokens': stats.tokens, 'inputs': [str(p) for p in inputs],
                       'text_field': text_field, 'engine': 'spark', 'partitions': run.partitions,
                       'bad_lines': run.bad_lines, 'bad_line_list': run.bad_line_list}

    return convert(spark, sources, out, PackTexts(seq_len, text_field), text_field=text_field,
                    on_bad_line=on_bad_line, compression=compression, overwrite=overwrite, check=check, info=info)
