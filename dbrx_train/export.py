"""Export a (fine-tuned) model to a transformers directory, tokenizer and chat template included.

    python -m dbrx_train.export SOURCE OUT [--dtype bfloat16] [--max-shard-size 5GB] [--overwrite]
                                           [--chat-template chatml|dbrx_instruct]

SOURCE and OUT may be object-store URIs (s3://...). SOURCE is a Composer save_folder or checkpoint that train.py wrote (LoRA adapters are merged),
a dbrx_train checkpoint, or a transformers DBRX directory. The work is
`dbrx_train.checkpoints.export`'s; this is its command line.
"""

from __future__ import annotations

import argparse

from dbrx_train.chat_template import TEMPLATES
from dbrx_train.checkpoints.export import DTYPES, export
from dbrx_train.checkpoints.storage import parse_size
from dbrx_train.errors import cli_entry
from dbrx_train.object_store import local_output


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog='python -m dbrx_train.export', description=__doc__.split('\n\n')[0])
    parser.add_argument('source', help='Composer save_folder/checkpoint, dbrx_train checkpoint, or transformers dir')
    parser.add_argument('out', help='the transformers directory to write')
    parser.add_argument('--dtype', default='auto', choices=list(DTYPES), help='weight dtype (default: as stored)')
    parser.add_argument('--max-shard-size', default='5GB', help='largest weight file (default 5GB)')
    parser.add_argument('--overwrite', action='store_true', help='replace an earlier export at OUT')
    parser.add_argument('--chat-template', default='chatml', choices=list(TEMPLATES),
                        help="the tokenizer's chat template: chatml (default) or dbrx_instruct (DBRX Instruct's, "
                             'with its default system prompt)')
    args = parser.parse_args(argv)
    with local_output(args.out, args.overwrite) as out:  # an object-store OUT: written here, then uploaded
        export(args.source, out, args.dtype, parse_size(args.max_shard_size), args.overwrite, args.chat_template)
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
