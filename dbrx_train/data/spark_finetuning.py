"""The fine-tuning converter's `--engine spark`: JSONL chats rendered with DBRX's ChatML on Spark
executors (`data.spark` reads, writes and merges; `finetuning_to_mds` parses, `finetuning` renders)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dbrx_train.data.finetuning import MDS_COLUMNS, render_chat
from dbrx_train.data.finetuning_to_mds import EVAL_SPLIT, TRAIN_SPLIT, PrepStats, parse_record
from dbrx_train.data.spark import BadRecords, OnBadLine, Record, SparkRun, convert, plan_sources
from dbrx_train.data.text_to_mds import BadRecord
from dbrx_train.errors import UserError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


@dataclass(frozen=True)
class RenderChats:
    """Fine-tuning examples: each JSONL record rendered whole with DBRX's ChatML. A record goes to the
    eval split when a hash of `seed` and its bytes falls under `eval_fraction`: the same choice
    however the input is partitioned, and duplicates never straddle the splits."""

    eval_fraction: float = 0.0
    seed: int = 17
    columns: Mapping[str, str] = field(default_factory=lambda: dict(MDS_COLUMNS))

    @property
    def splits(self) -> tuple[str, ...]:
        return (TRAIN_SPLIT, EVAL_SPLIT) if self.eval_fraction else (TRAIN_SPLIT,)

    def samples(self, records: Iterator[Record], bad: BadRecords, counts: Counter) -> Iterator[tuple[str, dict]]:
        for record in records:
            try:
                line = (record.payload or b'').decode('utf-8')
                if not line.strip():
                    continue
                try:
                    chat = parse_record(json.loads(line))
                except json.JSONDecodeError as e:
                    raise BadRecord(f'not valid JSON ({e.msg})') from None
            except UnicodeDecodeError as e:
                bad.report(record, f'not UTF-8 text (byte {e.start}: {e.reason})')
                continue
            except BadRecord as e:
                bad.report(record, str(e))
                continue
            split = EVAL_SPLIT if self.eval_fraction and self._draw(record.payload) < self.eval_fraction else TRAIN_SPLIT
            input_ids, assistant_turn = render_chat(chat)
            counts[f'examples/{split}'] += 1
            counts[f'tokens/{split}'] += len(input_ids)
            counts['max/longest'] = max(counts['max/longest'], len(input_ids))
            yield split, {'input_ids': input_ids, 'assistant_turn': assistant_turn}

    def _draw(self, payload: bytes) -> float:
        digest = hashlib.blake2b(payload, digest_size=8, key=str(self.seed).encode()).digest()
        return int.from_bytes(digest, 'big') / 2**64




def convert_finetuning_with_spark(
    spark: SparkSession,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    eval_fraction: float = 0.0,
    seed: int = 17,
    on_bad_line: OnBadLine = 'error',
    compression: str | None = 'zstd',
    overwrite: bool = False,
) -> tuple[PrepStats, SparkRun]:
    """`finetuning_to_mds.convert_finetuning_to_mds` on Spark, for JSONL inputs."""
    if not 0 <= eval_fraction < 1:
        raise UserError(f'eval fraction must be in [0, 1), got {eval_fraction}')
    task = RenderChats(eval_fraction, seed)
    sources = plan_sources(inputs, ('jsonl',))

    def check(run: SparkRun) -> None:
        empty = [s for s in task.splits if not run.counts[f'examples/{s}']]
        if empty:
            good = sum(run.counts[f'examples/{s}'] for s in task.splits)
            skipped = f' ({run.bad_lines} bad lines skipped)' if run.bad_lines else ''
            raise UserError(f'the {empty[0]} split would be empty: the input has {good} good examples{skipped}')

    def info(run: SparkRun) -> tuple[PrepStats, dict]:
        stats = PrepStats({s: run.counts[f'examples/{s}'] for s in task.splits},
                          {s: run.counts[f'tokens/{s}'] for s in task.splits}, run.counts['max/longest'], run.bad_lines)
        return stats, {**asdict(stats), 'inputs': [str(p) for p in inputs], 'eval_fraction': eval_fraction,
                       'seed': seed, 'engine': 'spark', 'partitions': run.partitions,
                       'bad_line_list': run.bad_line_list}

    return convert(spark, sources, out, task, text_field='', on_bad_line=on_bad_line, compression=compression,
                    overwrite=overwrite, check=check, info=info)
