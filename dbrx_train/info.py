"""Size and cost of a model config, without allocating its weights.

    python -m dbrx_train.info yamls/models/dbrx-132b.yaml
    python -m dbrx_train.info yamls/pretrain/dbrx-tiny.yaml model.n_layers=4 --seq-len 1024

The YAML is either a model preset (the keys of `ModelConfig` at the top level, as in
`yamls/models/`) or a training YAML whose `model:` section is one; `key=value` overrides use
the same paths as the file (`n_layers=4` in a preset, `model.n_layers=4` in a training YAML).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

from dbrx_train.errors import cli_entry
from dbrx_train.model.config import ModelConfig
from dbrx_train.model.dbrx import DbrxLM
from dbrx_train.model.flops import count_parameters, train_flops_per_token
from dbrx_train.typed_config import load_yaml, parse


def load_model_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ModelConfig:
    """The `ModelConfig` of a model preset or of a training YAML's `model:` section."""
    data = load_yaml(path, overrides)
    if isinstance(data.get('model'), Mapping):
        return parse(ModelConfig, data['model'], 'model')
    return parse(ModelConfig, data)


def describe(config: ModelConfig, seq_len: int | None = None) -> str:
    """Total and active parameters and training FLOPs per token, counted on a `meta`-device model."""
    counts = count_parameters(DbrxLM(config, device='meta'))
    ffn = config.ffn_config
    seq_len = config.max_seq_len if seq_len is None else seq_len
    return '\n'.join([
        f'parameters:        {counts.total:,} total ({_short(counts.total)})',
        f'active per token:  {counts.active:,} ({_short(counts.active)}; {ffn.moe_top_k} of '
        f'{ffn.moe_num_experts} experts)',
        f'experts:           {counts.experts:,} ({_short(counts.experts)})',
        f'embedding table:   {counts.embedding:,} ({_short(counts.embedding)})',
        f'train FLOPs/token: {train_flops_per_token(config, seq_len):.4g} (seq_len {seq_len})',
    ])


def _short(n: int) -> str:
    for size, suffix in ((10**12, 'T'), (10**9, 'B'), (10**6, 'M'), (10**3, 'K')):
        if n >= size:
            return f'{n / size:.2f}{suffix}'
    return str(n)


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog='python -m dbrx_train.info', description=__doc__.split('\n\n')[0])
    parser.add_argument('yaml', help='a model preset or a training YAML with a model: section')
    parser.add_argument('overrides', nargs='*', help='dotted.key=value')
    parser.add_argument('--seq-len', type=int, default=None, help='sequence length for the attention FLOPs '
                        '(default: the model max_seq_len)')
    args = parser.parse_args(argv)
    print(describe(load_model_config(args.yaml, args.overrides), args.seq_len))


if __name__ == '__main__':
    main()
