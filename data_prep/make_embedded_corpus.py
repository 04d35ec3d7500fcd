"""Build the embedded default corpus (Python's standard library) as two MDS streams.

    python data_prep/make_embedded_corpus.py --out data/embedded --seq-len 256

writes data/embedded/text (docstrings) and data/embedded/code (source files); a stream already
built with the same settings is kept, so reruns are instant.
"""

from __future__ import annotations

import argparse

from dbrx_train.data.embedded_corpus import DEFAULT_MAX_TOKENS, make_embedded_corpus
from dbrx_train.data.text_to_mds import read_prep_info
from dbrx_train.errors import cli_entry


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='data/embedded', help='output directory (default: data/embedded)')
    parser.add_argument('--seq-len', type=int, default=256, help='tokens per packed sample (default: 256)')
    parser.add_argument('--max-tokens', type=int, default=DEFAULT_MAX_TOKENS,
                        help=f'cap per stream (default: {DEFAULT_MAX_TOKENS})')
    parser.add_argument('--workers', type=int, default=1, help='tokenizer processes (default: 1)')
    parser.add_argument('--overwrite', action='store_true', help='rebuild streams even when up to date')
    return parser.parse_args(argv)


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    streams = make_embedded_corpus(args.out, seq_len=args.seq_len, max_tokens=args.max_tokens,
                                   workers=args.workers, overwrite=args.overwrite)
    for name, path in streams.items():
        info = read_prep_info(path)
        print(f'{name}: {info["samples"]} samples of {info["seq_len"]} tokens at {path}')


if __name__ == '__main__':
    main()
