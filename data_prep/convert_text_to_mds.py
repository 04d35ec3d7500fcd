"""Tokenize raw text with the DBRX tokenizer and pack it into MDS shards for pretraining.

    python data_prep/convert_text_to_mds.py corpus.jsonl more_docs/ --out data/mycorpus --seq-len 2048
    python data_prep/convert_text_to_mds.py big/ --out s3://bucket/mycorpus --seq-len 2048 --engine spark

Inputs: text files (one document each), JSONL (`--text-field`), parquet, a `datasets` directory
saved with `save_to_disk`, or directories of these; with --engine spark also Delta and parquet
tables and bucket URIs, but not `datasets` directories. See data_prep/README.md.
"""

from __future__ import annotations

import argparse
import logging
import os

from dbrx_train.data.spark import add_spark_arguments, convert_text_with_spark, session_from_args
from dbrx_train.data.text_to_mds import convert_to_mds, iter_documents
from dbrx_train.errors import UserError, cli_entry
from dbrx_train.object_store import local_output


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('inputs', nargs='+', help='files or directories to read, in this order')
    parser.add_argument('--out', required=True, help='output MDS directory')
    parser.add_argument('--seq-len', type=int, required=True, help='tokens per packed sample')
    parser.add_argument('--text-field', default='text', help='JSONL field / column holding the text (default: text)')
    parser.add_argument('--split', default='train', help='split of a saved DatasetDict (default: train)')
    parser.add_argument('--workers', type=int, default=os.cpu_count() or 1, help='tokenizer processes (local engine)')
    parser.add_argument('--max-tokens', type=int, default=None, help='stop after writing this many tokens (local engine)')
    parser.add_argument('--compression', default='zstd', help="shard compression, or 'none' (default: zstd)")
    parser.add_argument('--overwrite', action='store_true', help='replace a non-empty output directory')
    add_spark_arguments(parser)
    return parser.parse_args(argv)


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(format='warning: %(message)s', level=logging.WARNING)
    compression = None if args.compression == 'none' else args.compression
    if args.engine == 'spark':
        if args.max_tokens is not None:
            raise UserError('--max-tokens works with --engine local only: Spark partitions pack independently')
        with session_from_args(args) as spark:
            stats, run = convert_text_with_spark(
                spark, args.inputs, args.out, seq_len=args.seq_len, text_field=args.text_field,
                on_bad_line=args.on_bad_line, compression=compression, overwrite=args.overwrite,
            )
        skipped = f'; {run.bad_lines} bad lines skipped (listed above and in prep_info.json)' if run.bad_lines else ''
        print(
            f'wrote {stats.samples} samples of {stats.seq_len} tokens ({stats.tokens} tokens, {stats.documents} '
            f'documents, {stats.dropped_tokens} tail tokens dropped at the ends of {run.partitions} partitions) '
            f'to {args.out}{skipped}'
        )
        return
    if args.on_bad_line != 'error':
        raise UserError('--on-bad-line skip works with --engine spark only (the local engine stops at a bad line)')
    with local_output(args.out, args.overwrite) as out:  # an object-store --out: written here, then uploaded
        stats = convert_to_mds(
            iter_documents(args.inputs, text_field=args.text_field, split=args.split),
            out,
            seq_len=args.seq_len,
            workers=args.workers,
            max_tokens=args.max_tokens,
            overwrite=args.overwrite,
            compression=compression,
            info={'inputs': [str(p) for p in args.inputs], 'text_field': args.text_field},
        )
    print(
        f'wrote {stats.samples} samples of {stats.seq_len} tokens ({stats.tokens} tokens, {stats.documents} documents, '
        f'{stats.dropped_tokens} tail tokens dropped) to {args.out}'
    )


if __name__ == '__main__':
    main()
