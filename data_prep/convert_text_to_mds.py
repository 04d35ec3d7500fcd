"""Tokenize raw text with the DBRX tokenizer and pack it into MDS shards for pretraining.

    python data_prep/convert_text_to_mds.py corpus.jsonl more_docs/ --out data/mycorpus --seq-len 2048

Inputs: text files (one document each), JSONL (`--text-field`), parquet, a `datasets` directory
saved with `save_to_disk`, or directories of these. See data_prep/README.md.
"""

from __future__ import annotations

import argparse
import os

from dbrx_train.data.text_to_mds import convert_to_mds, iter_documents
from dbrx_train.errors import cli_entry


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('inputs', nargs='+', help='files or directories to read, in this order')
    parser.add_argument('--out', required=True, help='output MDS directory')
    parser.add_argument('--seq-len', type=int, required=True, help='tokens per packed sample')
    parser.add_argument('--text-field', default='text', help='JSONL field / column holding the text (default: text)')
    parser.add_argument('--split', default='train', help='split of a saved DatasetDict (default: train)')
    parser.add_argument('--workers', type=int, default=os.cpu_count() or 1, help='tokenizer processes')
    parser.add_argument('--max-tokens', type=int, default=None, help='stop after writing this many tokens')
    parser.add_argument('--compression', default='zstd', help="shard compression, or 'none' (default: zstd)")
    parser.add_argument('--overwrite', action='store_true', help='replace a non-empty output directory')
    return parser.parse_args(argv)


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    stats = convert_to_mds(
        iter_documents(args.inputs, text_field=args.text_field, split=args.split),
        args.out,
        seq_len=args.seq_len,
        workers=args.workers,
        max_tokens=args.max_tokens,
        overwrite=args.overwrite,
        compression=None if args.compression == 'none' else args.compression,
        info={'inputs': [str(p) for p in args.inputs], 'text_field': args.text_field},
    )
    print(
        f'wrote {stats.samples} samples of {stats.seq_len} tokens ({stats.tokens} tokens, {stats.documents} documents, '
        f'{stats.dropped_tokens} tail tokens dropped) to {args.out}'
    )


if __name__ == '__main__':
    main()
