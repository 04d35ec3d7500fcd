"""Builds a Composer `Trainer` from a validated `TrainConfig`.

Optimizers, schedulers, algorithms, callbacks and loggers come from llm-foundry's registries by
their YAML names, so everything an llm-foundry user already configures works here too; this
project adds `moe_monitor`, `curriculum_monitor`, `save_on_signal` (callbacks) and `metrics_file`
(logger, `dbrx_train.builders`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from pathlib import Path

from composer import Trainer
from composer.core import DataSpec, Evaluator
from composer.utils import dist, format_name_with_dist, reproducibility
from composer.utils.parallelism import FSDP2Config

from dbrx_train.builders import build_from_registry, register_ours, resolve_device
from dbrx_train.checkpoints.autoresume import restore_rng, resume_checkpoint
from dbrx_train.checkpoints.layout import in_layout
from dbrx_train.checkpoints.native import CONFIG_FILE, read_config, write_config
from dbrx_train.checkpoints.remote import RemoteCheckpoints
from dbrx_train.checkpoints.remote import local_folder as remote_local_folder
from dbrx_train.checkpoints.saver import AtomicCheckpointSaver
from dbrx_train.composer_model import LM_METRICS, ComposerDbrx
from dbrx_train.data import build_text_dataloader
from dbrx_train.data.finetuning import build_finetuning_dataloader
from dbrx_train.data.finetuning_source import prepare_hf_name
from dbrx_train.data.mixture import build_mixture_dataloader
from dbrx_train.data.shared_memory import remove_stale_shared_memory_on_each_node
from dbrx_train.errors import ConfigError
from dbrx_train.evaluation.icl import build_icl_evaluators
from dbrx_train.object_store import RemoteFolder
from dbrx_train.precision import composer_precision, resolve_precision
from dbrx_train.training.callbacks import BatchFingerprint, MoEMonitor
from dbrx_train.training.config import TrainConfig
from dbrx_train.training.curriculum_monitor import CurriculumMonitor
from dbrx_train.training.finetune import check_init_from, prepare_model, start_from_pretrained
from dbrx_train.training.gradient_clipping import GradientClipping
from dbrx_train.training.hardware import matmul_peak_flops
from dbrx_train.training.hf_checkpointer import HFCheckpointer
from dbrx_train.training.optimizer import DecoupledAdamW
from dbrx_train.training.parallelize import build_mesh, check_memory, parallelize, uses_fsdp
from dbrx_train.training.preemption import SaveOnSignal
from dbrx_train.uri import is_remote

log = logging.getLogger(__name__)

OUR_CALLBACKS = {'moe_monitor': MoEMonitor, 'curriculum_monitor': CurriculumMonitor, 'save_on_signal': SaveOnSignal,
                 'batch_fingerprint': BatchFingerprint}
# In place of llm-foundry's of the same name, which needs a transformers model in the trainer.
REPLACED_CALLBACKS = {'hf_checkpointer': HFCheckpointer}
OUR_ALGORITHMS = {'gradient_clipping': GradientClipping}  # in place of Composer's
REPLACED_OPTIMIZERS = {'decoupled_adamw': DecoupledAdamW}  # the same update, on torch's fused kernel
DATALOADERS = {'text': build_text_dataloader, 'finetuning': build_finetuning_dataloader}  # by loader name


def device_batch_size(cfg: TrainConfig, world_size: int) -> int:
    if cfg.global_train_batch_size % world_size:
        raise ConfigError('global_train_batch_size',
                          f'{cfg.global_train_batch_size} is not divisible by the world size ({world_size})')
    return cfg.global_train_batch_size // world_size


def _fsdp2(cfg: TrainConfig) -> FSDP2Config | None:
    """What Composer is told of the FSDP2 that `parallelize` applied (its checkpoints and state
    dicts follow it); Composer finds the model sharded and wraps nothing itself."""
    if not uses_fsdp(cfg, dist.get_world_size()):
        return None
    fsdp = cfg.fsdp_config
    return FSDP2Config(reshard_after_forward=fsdp.reshard_after_forward, state_dict_type=fsdp.state_dict_type,
                       mixed_precision=fsdp.mixed_precision, activation_cpu_offload=fsdp.activation_cpu_offload)


def _build_algorithm(name: str, kwargs: dict):
    from llmfoundry.utils.builders import build_algorithm

    return OUR_ALGORITHMS[name](**kwargs) if name in OUR_ALGORITHMS else build_algorithm(name, kwargs)


def _setup_logging(level: str | None) -> None:
    """Composer's Trainer configures logging for `composer` when it is built; this does the same
    for `dbrx_train`, earlier, so that start-up lines (FSDP, init_from, curriculum) show too."""
    if level is None:
        return
    logging.basicConfig(  # the handler and format Composer's Trainer would install
        format=f'%(asctime)s: rank{dist.get_global_rank()}[%(process)d][%(threadName)s]: %(levelname)s: %(name)s: '
               '%(message)s')
    logging.getLogger('dbrx_train').setLevel(level.upper())


def build_trainer(cfg: TrainConfig) -> Trainer:
    from llmfoundry.utils.builders import build_callback, build_logger, build_optimizer, build_scheduler

    register_ours(OUR_CALLBACKS, replacing=REPLACED_CALLBACKS, optimizers=REPLACED_OPTIMIZERS)
    device = resolve_device(cfg.device)
    dist.initialize_dist(device, timeout=cfg.dist_timeout)
    _setup_logging(cfg.python_log_level)
    if dist.get_global_rank() == 0:
        for note in cfg.notes():
            log.warning(note)
    remove_stale_shared_memory_on_each_node()  # before any dataset: what killed runs left
    reproducibility.seed_all(cfg.seed)
    # parallelize's mixed-precision policy and Composer train in the precision this CPU can run.
    cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, device))
    batch_per_device = device_batch_size(cfg, dist.get_world_size())
    if cfg.check_memory:
        check_memory(cfg, dist.get_world_size(), dist.get_local_world_size(), device)
    mesh = build_mesh(cfg, dist.get_world_size(), device)

    check_init_from(cfg.init_from, cfg.model)  # before the model is built: that can take long
    # 'mixed' (llm-foundry's rank 0 builds, the others receive) is 'meta': the weights are the same.
    trainer_precision, cpu_autocast = composer_precision(cfg.precision, device)
    model = ComposerDbrx(cfg.model, device='cpu' if cfg.init_device == 'cpu' else 'meta', seed=cfg.seed,
                         cpu_autocast=cpu_autocast)
    prepare_model(model.model, cfg.freeze, cfg.lora)  # what trains, before the optimizer sees it
    parallelize(model.model, cfg, mesh, device)  # before the optimizer: it sees the sharded parameters
    # Composer's FSDP2 wraps nothing (parallelize did); `_fsdp_wrap` is its only switch for that.
    model.model._fsdp_wrap = False
    if cfg.curriculum is not None:
        train_loader = build_mixture_dataloader(cfg.train_loader, cfg.schedule, cfg.seq_len)
    else:
        train_loader = DATALOADERS[cfg.train_loader.name](_with_data(cfg.train_loader, cfg, 'train_loader'),
                                                          batch_per_device, cfg.seq_len)
    evaluators = []
    eval_batch = cfg.device_eval_batch_size or batch_per_device
    if cfg.eval_loader is not None:
        build_loader = DATALOADERS[cfg.eval_loader.name]
        eval_loader = DataSpec(build_loader(_with_data(cfg.eval_loader, cfg, 'eval_loader'), eval_batch, cfg.seq_len,
                                            section='eval_loader'),
                               get_num_tokens_in_batch=_num_tokens)
        evaluators.append(Evaluator(label='eval', dataloader=eval_loader, metric_names=list(LM_METRICS)))
    if cfg.icl_tasks is not None:
        evaluators += build_icl_evaluators(cfg.icl_tasks, cfg.icl_seq_len or cfg.seq_len, eval_batch,
                                           cfg.icl_subset_num_batches)

    optimizer_kwargs = {k: v for k, v in cfg.optimizer.items() if k != 'name'}
    optimizer = build_from_registry('optimizer', cfg.optimizer['name'], optimizer_kwargs,
                                     lambda n, kw: build_optimizer(model, n, kw))
    scheduler = build_from_registry('scheduler', cfg.scheduler['name'],
                                     {k: v for k, v in cfg.scheduler.items() if k != 'name'}, build_scheduler)
    algorithms = [build_from_registry('algorithms', n, kw or {}, _build_algorithm) for n, kw in cfg.algorithms.items()]
    callbacks = [build_from_registry('callbacks', n, _callback_kwargs(n, kw or {}, device, cfg), build_callback)
                 for n, kw in cfg.callbacks.items()]
    loggers = [build_from_registry('loggers', n, kw or {}, build_logger) for n, kw in cfg.loggers.items()]
    if cfg.curriculum is not None and 'curriculum_monitor' not in cfg.callbacks:
        callbacks.append(CurriculumMonitor())  # the phase and the mix of every step belong in every log

    if cfg.save_folder is not None and dist.get_global_rank() == 0:
        save_model_config(cfg)
    fsdp = _fsdp2(cfg)
    savers, checkpointing = _checkpointing(cfg, sharded=fsdp is not None and fsdp.state_dict_type == 'sharded')
    trainer = Trainer(
        run_name=cfg.run_name,
        seed=cfg.seed,
        model=model,
        train_dataloader=DataSpec(train_loader, get_num_tokens_in_batch=_num_tokens),
        eval_dataloader=evaluators or None,
        eval_interval=cfg.eval_interval if evaluators else 1,  # Composer warns of an interval with nothing to run
        eval_subset_num_batches=cfg.eval_subset_num_batches,
        max_duration=cfg.max_duration,
        optimizers=optimizer,
        schedulers=scheduler,
        algorithms=algorithms,
        precision=trainer_precision,
        device=device,
        device_train_microbatch_size=cfg.device_train_microbatch_size or batch_per_device,
        parallelism_config={'fsdp': fsdp} if fsdp is not None else None,
        **checkpointing,
        loggers=loggers,
        callbacks=callbacks + savers,  # the saver last: save_on_signal must run before it
        progress_bar=cfg.progress_bar,
        log_to_console=cfg.log_to_console,
        console_log_interval=cfg.console_log_interval,
        dist_timeout=cfg.dist_timeout,
        python_log_level=cfg.python_log_level,
    )
    restore_rng(trainer)  # Composer skips it when the loader resumes itself mid-epoch
    start_from_pretrained(trainer, cfg.init_from)  # into the placed (and sharded) model
    return trainer


def _checkpointing(cfg: TrainConfig, sharded: bool) -> tuple[list[AtomicCheckpointSaver], dict]:
    """The checkpoint saver and the Trainer's checkpoint arguments: checkpoints that are complete or
    absent, and autoresume from the last complete one, in a local folder or an object store
    (dbrx_train.checkpoints.saver, .autoresume and .remote), converted to the layout this run loads
    (`sharded` or full: .layout) when another number of processes wrote it."""
    if cfg.save_folder is None:
        return [], dict(load_path=cfg.load_path)
    folder, remote = cfg.save_folder, None
    if is_remote(cfg.save_folder):
        remote = RemoteCheckpoints(format_name_with_dist(cfg.save_folder, cfg.run_name))
        folder = str(remote_local_folder(remote.uri, cfg.run_name))
    saver = AtomicCheckpointSaver(folder, cfg.save_interval, cfg.save_num_checkpoints_to_keep, cfg.save_overwrite,
                                  remote=remote)
    resumed = resume_checkpoint(folder, cfg.run_name, cfg.autoresume, remote)
    return [saver], dict(load_path=in_layout(resumed, sharded) if resumed else cfg.load_path)


def save_model_config(cfg: TrainConfig) -> None:
    """Puts the model config beside the checkpoints, so `load_pretrained(save_folder)` can rebuild the
    model. Without the layout (`ModelConfig.without_layout`): a run may resume with another one. An
    object-store save_folder gets it as an object."""
    remote = RemoteFolder(format_name_with_dist(cfg.save_folder, cfg.run_name)) if is_remote(cfg.save_folder) else None
    folder = Path(tempfile.mkdtemp()) if remote is not None else Path(cfg.save_folder)
    model = cfg.model.without_layout()
    try:
        if remote is not None:
            remote.check_access('save_folder')  # one line, before anything else goes there
        if remote is not None and remote.names_under(CONFIG_FILE) == [CONFIG_FILE]:
            remote.download(CONFIG_FILE, folder / CONFIG_FILE)
        if (folder / CONFIG_FILE).is_file():
            if read_config(folder).without_layout() != model:
                raise ConfigError('save_folder', f'{cfg.save_folder} holds checkpoints of a different model config; '
                                                 'use another save_folder')
            return
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            write_config(Path(tmp), model)
            if remote is not None:
                remote.upload(Path(tmp) / CONFIG_FILE, CONFIG_FILE)
            else:
                os.replace(Path(tmp) / CONFIG_FILE, folder / CONFIG_FILE)
    finally:
        if remote is not None:
            shutil.rmtree(folder, ignore_errors=True)


def _with_data(loader, cfg: TrainConfig, section: str):
    """The loader reading MDS: llm-foundry's `hf_name` data is converted (once, cached beside it) first."""
    if getattr(loader.dataset, 'hf_name', None) is None:
        return loader
    prepared = prepare_hf_name(loader.dataset, cfg.tokenizer.chat_template, f'{section}.dataset')
    return dataclasses.replace(loader, dataset=prepared)


def _num_tokens(batch) -> int:
    return int(batch['input_ids'].numel())


def _callback_kwargs(name: str, kwargs: dict, device: str, cfg: TrainConfig) -> dict:
    if name == 'speed_monitor' and device == 'cpu' and 'gpu_flops_available' not in kwargs:
        # Composer only knows GPU peaks; on CPU report MFU against this process's measured matmul peak.
        peak = matmul_peak_flops(seconds=0.5)
        log.info('measured fp32 matmul peak of this process: %.1f GFLOP/s', peak / 1e9)
        kwargs = {**kwargs, 'gpu_flops_available': peak}
    if name == 'hf_checkpointer':  # the exported tokenizer is the run's
        kwargs = {'chat_template': cfg.tokenizer.chat_template, 'model_max_length': cfg.tokenizer.model_max_length,
                  **kwargs}
    return kwargs

