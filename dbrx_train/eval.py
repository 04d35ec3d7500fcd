"""Evaluate a saved DBRX from a YAML, under the Composer launcher: perplexity on held-out MDS
streams and llm-foundry's ICL tasks (multiple choice, schema, language modelling, generation).

    composer dbrx_train/eval.py yamls/eval/dbrx-tiny.yaml [dotted.key=value ...]
    python dbrx_train/eval.py yamls/eval/dbrx-tiny.yaml checkpoint=path/to/model
"""

import os
import sys

if __name__ == '__main__' and sys.path and sys.path[0] == os.path.dirname(os.path.abspath(__file__)):
    # Run as a script: keep the package's own directory off sys.path so its modules
    # (data, model, ...) cannot shadow top-level packages of the same name.
    sys.path.pop(0)

from composer.utils import dist  # noqa: E402

from dbrx_train.errors import UserError, cli_entry  # noqa: E402
from dbrx_train.evaluation.config import EvalConfig  # noqa: E402
from dbrx_train.evaluation.report import metrics_table  # noqa: E402
from dbrx_train.evaluation.runner import evaluate  # noqa: E402
from dbrx_train.typed_config import load_yaml, parse  # noqa: E402


def load_config(argv: list[str]):
    if not argv or argv[0].startswith('-'):
        raise UserError('usage: composer dbrx_train/eval.py CONFIG.yaml [dotted.key=value ...]')
    return parse(EvalConfig, load_yaml(argv[0], argv[1:]))


@cli_entry
def main(argv: list[str] | None = None) -> None:
    cfg = load_config(sys.argv[1:] if argv is None else argv)  # also checks every ICL task
    metrics = evaluate(cfg)
    if dist.get_global_rank() == 0:
        print(metrics_table(metrics, f'{cfg.run_name}: {cfg.checkpoint}'), flush=True)


if __name__ == '__main__':
    main()
