"""Evaluates a saved model with Composer: perplexity per held-out stream, then each ICL task, then the
ICL tasks' aggregate (`eval_gauntlet`)."""

from __future__ import annotations

import dataclasses
import warnings

import torch
from composer import Trainer
from composer.core import Evaluator
from composer.loggers import InMemoryLogger
from composer.utils import dist, reproducibility

from dbrx_train.builders import build_from_registry, register_ours, resolve_device
from dbrx_train.checkpoints import load_pretrained, open_saved
from dbrx_train.composer_model import LM_METRICS, ComposerDbrx
from dbrx_train.data import LoaderConfig, build_text_dataloader, check_local_data
from dbrx_train.data.shared_memory import remove_stale_shared_memory_on_each_node
from dbrx_train.evaluation.config import EvalConfig
from dbrx_train.evaluation.gauntlet import gauntlet_scores
from dbrx_train.evaluation.icl import build_icl_evaluators
from dbrx_train.precision import composer_precision, resolve_precision


def stream_evaluators(loader: LoaderConfig, batch_size: int, seq_len: int, subset_num_batches: int = -1
                      ) -> list[Evaluator]:
    """Cross-entropy and perplexity of each stream on its own, labelled `eval/<stream>`
    (llm-foundry's label for several eval loaders); a loader without streams is `eval`."""
    dataset = loader.dataset
    parts = {f'eval/{name}': dataclasses.replace(loader, dataset=dataclasses.replace(dataset, streams={name: stream}))
             for name, stream in dataset.streams.items()} or {'eval': loader}
    return [Evaluator(label=label, dataloader=build_text_dataloader(part, batch_size, seq_len, section='eval_loader'),
                      metric_names=list(LM_METRICS), subset_num_batches=subset_num_batches)
            for label, part in parts.items()]


def evaluate(cfg: EvalConfig) -> dict[str, float]:
    """Every metric as logged (`metrics/<evaluator>/<metric>` -> value), also to `cfg.loggers`."""
    model_config = open_saved(cfg.checkpoint).config  # its format and config, before anything slow
    cfg.check_model(model_config)
    if cfg.eval_loader is not None:
        check_local_data(cfg.eval_loader.dataset, 'eval_loader.dataset')
    # llmfoundry on use, as everywhere here: its import warns on stderr and takes seconds.
    from llmfoundry.utils.builders import build_logger

    register_ours()
    device = resolve_device(cfg.device)
    dist.initialize_dist(device)
    remove_stale_shared_memory_on_each_node()  # before any dataset: what killed runs left
    reproducibility.seed_all(cfg.seed)
    seq_len = cfg.max_seq_len or model_config.max_seq_len
    evaluators = []  # the data first: its errors come before the weights are read
    if cfg.eval_loader is not None:
        evaluators += stream_evaluators(cfg.eval_loader, cfg.device_eval_batch_size, seq_len, cfg.eval_subset_num_batches)
    icl_evaluators = []
    if cfg.icl_tasks is not None:
        icl_evaluators = build_icl_evaluators(cfg.icl_tasks, cfg.icl_seq_len or seq_len, cfg.device_eval_batch_size,
                                              cfg.icl_subset_num_batches)
        evaluators += icl_evaluators
    model = load_pretrained(cfg.checkpoint, dtype=cfg.dtype and getattr(torch, cfg.dtype), quantize=cfg.quantize,
                            group_size=cfg.quantize_group_size)
    recorder = InMemoryLogger()
    loggers = [build_from_registry('loggers', n, kw or {}, build_logger) for n, kw in cfg.loggers.items()]
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='No optimizer was specified')  # none is needed to evaluate
        precision, cpu_autocast = composer_precision(resolve_precision(cfg.precision, device), device)
        trainer = Trainer(run_name=cfg.run_name, seed=cfg.seed, model=ComposerDbrx(model, cpu_autocast=cpu_autocast),
                          eval_dataloader=evaluators, device=device, precision=precision, loggers=[*loggers, recorder],
                          progress_bar=cfg.progress_bar, log_to_console=False, python_log_level=cfg.python_log_level)
    trainer.eval()
    metrics = {key: float(value) for key, value in recorder.most_recent_values.items() if key.startswith('metrics/')}
    if cfg.eval_gauntlet is not None:
        metrics.update(gauntlet_scores(cfg.eval_gauntlet, trainer, icl_evaluators))
    trainer.close()
    return metrics
