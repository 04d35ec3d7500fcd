"""Conversion between transformers' `DbrxForCausalLM` directories and this project's checkpoints.

    python -m dbrx_train.convert from-hf HF_DIR OUT        # transformers -> dbrx_train
    python -m dbrx_train.convert to-hf CHECKPOINT HF_DIR   # dbrx_train -> transformers

The work is `dbrx_train.checkpoints.hf`'s; this is its command line.
"""

from __future__ import annotations

import argparse

from dbrx_train.checkpoints.hf import convert_from_hf, convert_to_hf
from dbrx_train.checkpoints.storage import parse_size
from dbrx_train.errors import cli_entry
from dbrx_train.object_store import local_copy, local_output


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog='python -m dbrx_train.convert', description=__doc__.split('\n\n')[0])
    commands = parser.add_subparsers(dest='command', required=True)
    for name, source, target, help_text in (
        ('from-hf', 'hf_dir', 'out', 'transformers DBRX directory -> dbrx_train checkpoint'),
        ('to-hf', 'checkpoint', 'hf_dir', 'dbrx_train checkpoint -> transformers DBRX directory'),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument(source)
        command.add_argument(target)
        command.add_argument('--max-shard-size', default='5GB', help='largest weight file (default 5GB)')
        command.add_argument('--overwrite', action='store_true', help='replace an existing checkpoint at the target')
    args = parser.parse_args(argv)
    max_shard_bytes = parse_size(args.max_shard_size)
    source, target = (args.hf_dir, args.out) if args.command == 'from-hf' else (args.checkpoint, args.hf_dir)
    convert = convert_from_hf if args.command == 'from-hf' else convert_to_hf
    # Either side may be an object-store URI: downloaded first, or written here and then uploaded.
    with local_output(target, args.overwrite) as out:
        convert(local_copy(source), out, max_shard_bytes, args.overwrite)
    print(f'wrote {target}')


if __name__ == '__main__':
    main()
