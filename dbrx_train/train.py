"""Pretrain DBRX from a YAML, under the Composer launcher.

    composer dbrx_train/train.py yamls/pretrain/dbrx-tiny.yaml [dotted.key=value ...]
    composer -n 2 dbrx_train/train.py ...          # several processes (FSDP2)
    python dbrx_train/train.py ...                 # one process
"""

import os
import sys

if __name__ == '__main__' and sys.path and sys.path[0] == os.path.dirname(os.path.abspath(__file__)):
    # Run as a script: keep the package's own directory off sys.path so its modules
    # (data, model, ...) cannot shadow top-level packages of the same name.
    sys.path.pop(0)

from dbrx_train.lifetime import exit_with_launcher  # noqa: E402

# First, before the slow imports: a rank that outlived a killed launcher would train on beside the
# restarted run, writing checkpoints into the same folder.
if __name__ == '__main__':
    exit_with_launcher()

from composer.utils import dist  # noqa: E402

from dbrx_train.checkpoints.autoresume import check_save_folder, finished_at  # noqa: E402
from dbrx_train.data import check_local_data  # noqa: E402
from dbrx_train.errors import UserError, cli_entry  # noqa: E402
from dbrx_train.training.config import TrainConfig  # noqa: E402
from dbrx_train.training.trainer import build_trainer  # noqa: E402
from dbrx_train.typed_config import load_yaml, parse  # noqa: E402


def load_config(argv: list[str]):
    if not argv or argv[0].startswith('-'):
        raise UserError('usage: composer dbrx_train/train.py CONFIG.yaml [dotted.key=value ...]')
    return parse(TrainConfig, load_yaml(argv[0], argv[1:]))


@cli_entry
def main(argv: list[str] | None = None) -> None:
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    check_local_data(cfg.train_loader.dataset, 'train_loader.dataset')  # before the slow start-up
    if cfg.eval_loader is not None:
        check_local_data(cfg.eval_loader.dataset, 'eval_loader.dataset')
    check_save_folder(cfg.save_folder, cfg.run_name)
    trainer = build_trainer(cfg)
    done = finished_at(trainer.state)  # the checkpoint autoresume loaded may be the last one
    if done is None:
        trainer.fit()
    elif dist.get_global_rank() == 0:
        print(f'run already complete at {done}: nothing to train', flush=True)
    trainer.close()


if __name__ == '__main__':
    main()
