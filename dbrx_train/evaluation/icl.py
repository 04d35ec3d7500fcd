"""Composer evaluators for llm-foundry's ICL tasks, built by llm-foundry from its task list."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence

from composer.core import Evaluator
from composer.utils import dist

from dbrx_train.composer_model import hf_tokenizer
from dbrx_train.evaluation.config import ICLTaskConfig


def build_icl_evaluators(tasks: Sequence[ICLTaskConfig], seq_len: int, batch_size: int,
                         subset_num_batches: int | None = None) -> list[Evaluator]:
    """One evaluator per task and few-shot count, labelled `<label>/<n>-shot` (per category with
    `has_categories`), each naming the metrics it reports. Needs the process group initialised."""
    import datasets
    from llmfoundry.utils.builders import build_icl_evaluators as build

    datasets.disable_progress_bars()  # llm-foundry's dataset preparation, inside Composer's eval progress bars
    with _node_scratch_dir() as scratch:  # llm-foundry copies each task file there before reading it
        evaluators, _ = build([task.options() for task in tasks], hf_tokenizer(), seq_len, batch_size,
                              destination_dir=scratch, icl_subset_num_batches=subset_num_batches)
    return evaluators


@contextlib.contextmanager
def _node_scratch_dir() -> Iterator[str]:
    """A fresh directory that every rank knows by the same name (rank 0 picks it), made on each node
    and removed once every rank has read its tasks."""
    picked = [tempfile.mkdtemp(prefix='dbrx_train-icl-') if dist.get_global_rank() == 0 else None]
    dist.broadcast_object_list(picked)
    path = picked[0]
    if dist.get_local_rank() == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    try:
        yield path
    finally:
        dist.barrier()
        if dist.get_local_rank() == 0:
            shutil.rmtree(path, ignore_errors=True)
