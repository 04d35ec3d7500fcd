"""Render and tokenize fine-tuning examples (DBRX ChatML) into MDS for the `finetuning` loader.

    python data_prep/convert_finetuning_to_mds.py chats.jsonl more/ --out data/my_chats --eval-fraction 0.05
    python data_prep/convert_finetuning_to_mds.py chats/ --out s3://bucket/my_chats --engine spark

Inputs: JSONL files of {"prompt", "response"} pairs or {"messages": [{"role", "content"}, ...]}
chats, directories of them, or a `datasets` directory saved with `save_to_disk`. Writes
OUT/train (and OUT/eval with --eval-fraction) and OUT/prep_info.json. A bad record stops the
conversion with its file and line, or with --on-bad-line skip is reported and left out.
With --engine spark, JSONL inputs only, and the eval split is drawn by a seeded hash of each record.
"""

from __future__ import annotations

import argparse
import logging

from dbrx_train.data.finetuning_to_mds import convert_finetuning_to_mds
from dbrx_train.data.spark import add_spark_arguments, session_from_args
from dbrx_train.data.spark_finetuning import convert_finetuning_with_spark
from dbrx_train.errors import cli_entry
from dbrx_train.object_store import local_output


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('inputs', nargs='+', help='files or directories to read, in this order')
    parser.add_argument('--out', required=True, help='output directory (gets train/ and eval/ splits)')
    parser.add_argument('--eval-fraction', type=float, default=0.0,
                        help='share of examples held out in the eval split (default 0: no eval split)')
    parser.add_argument('--seed', type=int, default=17, help='seed of the train/eval split (default 17)')
    parser.add_argument('--hf-split', default='train', help='split of a saved DatasetDict (default: train)')
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
        with session_from_args(args) as spark:
            stats, _ = convert_finetuning_with_spark(
                spark, args.inputs, args.out, eval_fraction=args.eval_fraction, seed=args.seed,
                on_bad_line=args.on_bad_line, overwrite=args.overwrite, compression=compression,
            )
    else:
        with local_output(args.out, args.overwrite) as out:  # an object-store --out: written here, then uploaded
            stats = convert_finetuning_to_mds(
                args.inputs, out, eval_fraction=args.eval_fraction, seed=args.seed, on_bad_line=args.on_bad_line,
                hf_split=args.hf_split, overwrite=args.overwrite, compression=compression,
            )
    splits = ', '.join(f'{split}: {n} examples, {stats.tokens[split]} tokens' for split, n in stats.examples.items())
    skipped = f'; {stats.bad_lines} bad lines skipped (listed above and in prep_info.json)' if stats.bad_lines else ''
    print(f'wrote {args.out} ({splits}; longest {stats.longest} tokens){skipped}')


if __name__ == '__main__':
    main()
