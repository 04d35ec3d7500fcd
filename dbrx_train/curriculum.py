"""Print (and plot) the curriculum a training YAML describes, before a long run.

    python -m dbrx_train.curriculum yamls/pretrain/dbrx-tiny.yaml [key=value ...] [--png mix.png]

It reads the whole training config (the schedule's length is `max_duration` of
`global_train_batch_size` samples), so it sits above both `data` and `training`.
"""

from __future__ import annotations

import argparse

from dbrx_train.data.curriculum import plot_schedule, schedule_table
from dbrx_train.errors import ConfigError, cli_entry
from dbrx_train.training.config import TrainConfig
from dbrx_train.typed_config import load_yaml, parse


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog='python -m dbrx_train.curriculum',
                                     description='Print (and plot) the curriculum a training YAML describes.')
    parser.add_argument('yaml', help='the training YAML')
    parser.add_argument('overrides', nargs='*', help='dotted.key=value overrides, as for training')
    parser.add_argument('--png', help='also draw the proportions per step into this PNG')
    args = parser.parse_args(argv)

    cfg = parse(TrainConfig, load_yaml(args.yaml, args.overrides))
    if cfg.curriculum is None:
        raise ConfigError('curriculum', f'{args.yaml} has no curriculum section (its mix is fixed)')
    schedule = cfg.schedule
    tokens = schedule.total_steps * schedule.global_batch_size * schedule.seq_len
    print(f'{args.yaml}: {schedule.total_steps} steps of {schedule.global_batch_size} samples x {schedule.seq_len} '
          f'tokens ({tokens:,} tokens); streams: {", ".join(schedule.streams)}')
    print(schedule_table(schedule))
    if args.png:
        plot_schedule(schedule, args.png, title=f'{args.yaml} ({cfg.max_duration})')
        print(f'wrote {args.png}')


if __name__ == '__main__':
    main()
