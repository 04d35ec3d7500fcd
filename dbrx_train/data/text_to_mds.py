"""Raw text to tokenized, packed MDS shards that Streaming (ours and llm-foundry's) reads.

Each document is tokenized with the DBRX tokenizer and followed by `<|endoftext|>`; the token
stream is cut into samples of exactly `seq_len` tokens (the tail shorter than one sample is
dropped). Shards use llm-foundry's layout, one `tokens` column of `ndarray:int32`, and are
written into a temporary directory beside the output that is renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing
import os
import shutil
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dbrx_train.errors import UserError
from dbrx_train.tokenizer import EOS_ID, get_encoding

TOKENS_COLUMN = 'tokens'
MDS_COLUMNS = {TOKENS_COLUMN: 'ndarray:int32'}  # what llm-foundry's converters write
PREP_INFO_FILE = 'prep_info.json'  # how the shards were made; Streaming ignores it
JSONL_SUFFIXES = ('.jsonl', '.json')
_BATCH_CHARS = 1 << 16  # text per worker task: big enough to amortise the inter-process hop


@dataclass(frozen=True)
class ConversionStats:
    documents: int
    samples: int
    seq_len: int
    dropped_tokens: int  # the tail shorter than one sample, or past max_tokens

    @property
    def tokens(self) -> int:
        return self.samples * self.seq_len


# --- reading documents -------------------------------------------------------------------------


def iter_documents(inputs: Sequence[str | Path], text_field: str = 'text', split: str = 'train') -> Iterator[str]:
    """Texts of every document in `inputs`, in order.

    An input is a text file (one document), a JSONL file (`.jsonl`/`.json`, one JSON object per
    line with the text in `text_field`), a parquet file, a directory saved by `datasets`'
    `save_to_disk` (`split` picks from a DatasetDict), or a directory of such files (sorted).
    """
    for path, saved_dataset in expand_inputs(inputs):
        yield from _read_hf_dataset(path, text_field, split) if saved_dataset else _read_file(path, text_field)


def expand_inputs(inputs: Sequence[str | Path], suffixes: Sequence[str] | None = None) -> Iterator[tuple[Path, bool]]:
    """(path, is a `datasets` directory) per input: a directory saved by `datasets`' `save_to_disk`
    stays whole, another directory gives its files (sorted; hidden ones, and with `suffixes` files
    of other types, left out)."""
    if not inputs:
        raise UserError('no input given')
    for given in inputs:
        path = Path(given)
        if not path.exists():
            raise UserError(f'input not found: {path}')
        if path.is_dir() and any((path / f).is_file() for f in ('state.json', 'dataset_dict.json')):
            yield path, True
        elif path.is_dir():
            files = sorted(p for p in path.rglob('*') if p.is_file() and not _is_hidden(p.relative_to(path))
                           and (suffixes is None or p.suffix.lower() in suffixes))
            if not files:
                kind = f'{"/".join(suffixes)} files' if suffixes else 'files'
                raise UserError(f'input directory has no {kind}: {path}')
            yield from ((file, False) for file in files)
        else:
            yield path, False


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith('.') for part in relative.parts)


def _read_file(path: Path, text_field: str) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        yield from _read_jsonl(path, text_field)
    elif suffix == '.parquet':
        yield from _read_parquet(path, text_field)
    else:
        try:
            yield path.read_text(encoding='utf-8')
        except UnicodeDecodeError as e:
            raise UserError(f'{path}: not UTF-8 text (byte {e.start}: {e.reason})') from None


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding='utf-8', errors='strict') as f:
        try:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield text_of_json_line(line, text_field)
                except BadRecord as e:
                    raise UserError(f'{path}:{line_number}: {e}') from None
        except UnicodeDecodeError as e:
            raise UserError(f'{path}: not UTF-8 text (byte {e.start}: {e.reason})') from None


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise UserError(f'{path}: not a readable parquet file ({e})') from None
    if text_field not in table.schema_arrow.names:
        raise UserError(f'{path}: no {text_field!r} column (columns: {", ".join(table.schema_arrow.names)})')
    row = 0
    for batch in table.iter_batches(columns=[text_field]):
        for value in batch.column(0).to_pylist():
            yield _checked_text(value, f'{path}: row {row}', text_field)
            row += 1


def _read_hf_dataset(path: Path, text_field: str, split: str) -> Iterator[str]:
    import datasets

    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise UserError(f'{path}: no split {split!r} (splits: {", ".join(dataset)}); choose one with --split')
        dataset = dataset[split]
    if text_field not in dataset.column_names:
        raise UserError(f'{path}: no {text_field!r} column (columns: {", ".join(dataset.column_names)})')
    row = 0
    for batch in dataset.select_columns([text_field]).iter(batch_size=1000):
        for value in batch[text_field]:
            yield _checked_text(value, f'{path}: row {row}', text_field)
            row += 1


class BadRecord(ValueError):
    """A record that is not a usable document or example; the message says why (the caller adds where)."""


def text_of_json_line(line: str, text_field: str) -> str:
    """The text in `text_field` of one JSONL line, or `BadRecord`."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadRecord(f'not valid JSON ({e.msg})') from None
    if not isinstance(record, dict) or text_field not in record:
        raise BadRecord(f'no {text_field!r} field (choose the field with --text-field)')
    return checked_text(record[text_field], text_field)


def checked_text(value: Any, text_field: str) -> str:
    """`value` if it is a string, or `BadRecord`."""
    if not isinstance(value, str):
        raise BadRecord(f'{text_field!r} is {type(value).__name__}, not a string')
    return value


def _checked_text(value: Any, where: str, text_field: str) -> str:
    try:
        return checked_text(value, text_field)
    except BadRecord as e:
        raise UserError(f'{where}: {e}') from None


# --- tokenizing ----------------------------------------------------------------------------------


def encode_documents(texts: list[str]) -> np.ndarray:
    """Tokens of `texts` with `<|endoftext|>` after each non-empty document."""
    encoded = get_encoding().encode_ordinary_batch(texts, num_threads=1)
    with_eos = itertools.chain.from_iterable((ids, (EOS_ID,)) for ids in encoded if ids)
    return np.fromiter(itertools.chain.from_iterable(with_eos), dtype=np.int32)


def text_batches(documents: Iterable[str]) -> Iterator[list[str]]:
    """`documents` in lists of about `_BATCH_CHARS` characters: the unit of tokenizing work."""
    batch: list[str] = []
    chars = 0
    for text in documents:
        batch.append(text)
        chars += len(text)
        if chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encoded_batches(batches: Iterable[list[str]], workers: int) -> Iterator[tuple[int, np.ndarray]]:
    """(documents, tokens) of each batch, in input order whatever the number of workers."""
    if workers <= 1:
        for batch in batches:
            yield len(batch), encode_documents(batch)
        return
    # In-order results with a bounded queue: Pool.imap would read the whole input ahead into memory.
    with multiprocessing.Pool(workers) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append((len(batch), pool.apply_async(encode_documents, (batch,))))
            if len(pending) >= 2 * workers:
                count, result = pending.popleft()
                yield count, result.get()
        while pending:
            count, result = pending.popleft()
            yield count, result.get()


# --- packing and writing -------------------------------------------------------------------------


class Packer:
    """Cuts a stream of tokens into rows of exactly `seq_len`; what is left over waits in `pending`."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.pending = np.empty(0, dtype=np.int32)

    def add(self, tokens: np.ndarray, max_rows: int | None = None) -> np.ndarray:
        """The `(n, seq_len)` rows complete after `tokens` (at most `max_rows`)."""
        self.pending = np.concatenate([self.pending, tokens])
        n = len(self.pending) // self.seq_len
        if max_rows is not None:
            n = min(n, max_rows)
        rows = self.pending[: n * self.seq_len].reshape(n, self.seq_len)
        self.pending = self.pending[n * self.seq_len :]
        return rows



def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Fails early when `out` holds something we must not replace."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f'output {out} exists and is not a directory')
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f'output {out} is not empty (pass --overwrite to replace it)')
    return out


def convert_to_mds(
    documents: Iterable[str],
    out: str | Path,
    *,
    seq_len: int,
    workers: int = 1,
    max_tokens: int | None = None,
    overwrite: bool = False,
    compression: str | None = 'zstd',
    info: dict[str, Any] | None = None,
    desc: str = 'tokenizing',
) -> ConversionStats:
    """Tokenizes and packs `documents` into MDS shards at `out`; `info` is saved in prep_info.json."""
    from streaming import MDSWriter

    if seq_len < 1:
        raise UserError(f'seq_len must be at least 1, got {seq_len}')
    if max_tokens is not None and max_tokens < seq_len:
        raise UserError(f'max_tokens ({max_tokens}) is less than one sample of seq_len {seq_len}')
    out = check_output_dir(out, overwrite)  # before any input is read
    out.parent.mkdir(parents=True, exist_ok=True)
    max_samples = None if max_tokens is None else max_tokens // seq_len
    with staged_output(out) as tmp:
        writer = MDSWriter(out=str(tmp), columns=MDS_COLUMNS, compression=compression)
        documents_read = samples = tokens_read = 0
        packer = Packer(seq_len)
        with tqdm(total=max_tokens, unit='tok', unit_scale=True, desc=desc, dynamic_ncols=True) as bar:
            for count, tokens in _encoded_batches(text_batches(documents), workers):
                documents_read += count
                tokens_read += len(tokens)
                rows = packer.add(tokens, None if max_samples is None else max_samples - samples)
                for row in rows:
                    writer.write({TOKENS_COLUMN: row})
                samples += len(rows)
                bar.update(rows.size)
                if samples == max_samples:
                    break
        if samples == 0:
            what = 'no tokens at all' if tokens_read == 0 else f'only {tokens_read} tokens'
            raise UserError(f'input has {what}: fewer than one sample of seq_len {seq_len}')
        writer.finish()
        stats = ConversionStats(documents_read, samples, seq_len, tokens_read - samples * seq_len)
        prep_info = {**asdict(stats), 'tokens': stats.tokens, **(info or {})}
        (tmp / PREP_INFO_FILE).write_text(json.dumps(prep_info, indent=2) + '\n')
    return stats


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A new directory beside `out` to write into: it replaces `out` when the block completes and is
    removed when the block fails, so `out` only ever holds a finished output."""
    tmp = _sibling_dir(out, 'tmp')
    try:
        yield tmp
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(new: Path, out: Path) -> None:
    """Moves `new` to `out`; an old `out` is only deleted once the new one is in place."""
    old = None
    if out.exists():
        old = _sibling_dir(out, 'old')
        os.replace(out, old / out.name)
    os.replace(new, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _sibling_dir(out: Path, tag: str) -> Path:
    """A new hidden directory beside `out` (same filesystem, so renames are atomic)."""
    path = out.parent / f'.{out.name}.{tag}-{uuid.uuid4().hex[:12]}'
    path.mkdir()  # unlike mkdtemp's 0700, the umask's usual permissions
    return path


def read_prep_info(out: str | Path) -> dict[str, Any] | None:
    """What `convert_to_mds` recorded in `out`, or None when `out` is not a finished conversion."""
    out = Path(out)
    try:
        if (out / 'index.json').is_file():
            return json.loads((out / PREP_INFO_FILE).read_text())
    except (OSError, ValueError):
        pass
    return None
