"""Small Composer callbacks specific to training MoE models."""

from __future__ import annotations

import zlib

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from dbrx_train.model.dbrx import LossOutput
from dbrx_train.model.moe.expert_parallel import ExpertParallel


class MoEMonitor(Callback):
    """Logs how evenly each layer's router spreads tokens over its experts, so router collapse shows.

    Per layer: `moe/layer_{i}/cv`, the coefficient of variation of tokens per expert (0 when
    perfectly balanced), and `moe/layer_{i}/max_load`, the busiest expert's share times the number
    of experts (1 when balanced, E when one expert takes everything). Also the worst layer of each.
    Counts are all ranks' (all-reduced), so every rank logs the same numbers.

    With expert parallelism also, per step: `moe/all_to_all_rows` (rows the forward passes
    dispatched to another rank; activation checkpointing's recomputation dispatches them again)
    and `moe/all_to_all_bytes` (bytes the all-to-alls of forward, recomputation and backward moved
    between ranks), summed over layers and ranks, and `moe/ep_busiest_rank_share`: the largest share of a
    layer's expert rows that one rank of an expert-parallel group computed (1 / moe_world_size when
    balanced), over layers.
    """

    def __init__(self, log_interval: int = 1):
        self.log_interval = log_interval
        self._counts: torch.Tensor | None = None

    def after_forward(self, state: State, logger: Logger) -> None:
        if not state.model.training:
            return
        if not isinstance(state.outputs, LossOutput):  # renamed or replaced: say so, do not go quiet
            raise TypeError(f'moe_monitor reads the LossOutput of DbrxLM.loss; the training forward pass returned '
                            f'{type(state.outputs).__name__}')
        counts = state.outputs.tokens_per_expert.detach().to(torch.float64)
        self._counts = counts if self._counts is None else self._counts + counts

    def batch_start(self, state: State, logger: Logger) -> None:
        for experts in _expert_parallel(state):
            experts.take_traffic()  # drops an evaluation's: the metric is the training step's

    def batch_end(self, state: State, logger: Logger) -> None:
        counts, self._counts = self._counts, None
        experts = _expert_parallel(state)
        traffic = sum((m.take_traffic() for m in experts), torch.zeros(2, dtype=torch.int64))
        if counts is None or int(state.timestamp.batch) % self.log_interval:
            return
        dist.all_reduce(counts)  # every rank's tokens, so all ranks log the same numbers
        mean = counts.mean(dim=-1)
        cv = counts.std(dim=-1, unbiased=False) / mean.clamp(min=1e-9)
        max_load = counts.max(dim=-1).values / mean.clamp(min=1e-9)
        metrics = {}
        for i in range(counts.shape[0]):
            metrics[f'moe/layer_{i}/cv'] = cv[i].item()
            metrics[f'moe/layer_{i}/max_load'] = max_load[i].item()
        metrics['moe/max_cv'] = cv.max().item()
        metrics['moe/max_load'] = max_load.max().item()
        if experts:
            metrics.update(_expert_parallel_metrics(counts, traffic.to(counts.device), experts[0].mesh.size()))
        logger.log_metrics(metrics)


def _expert_parallel(state: State) -> list[ExpertParallel]:
    return [m for m in state.model.modules() if isinstance(m, ExpertParallel)]


def _expert_parallel_metrics(counts: torch.Tensor, traffic: torch.Tensor, ranks: int) -> dict[str, float]:
    """`counts` `(layers, experts)`: all ranks' rows per expert; `traffic`: this rank's `take_traffic`."""
    dist.all_reduce(traffic)
    rows_per_rank = counts.view(counts.shape[0], ranks, -1).sum(dim=-1)  # rank i of a group owns block i of experts
    share = rows_per_rank.max(dim=-1).values / rows_per_rank.sum(dim=-1).clamp(min=1)
    return {'moe/all_to_all_rows': int(traffic[0]), 'moe/all_to_all_bytes': int(traffic[1]),
            'moe/ep_busiest_rank_share': share.max().item()}


class BatchFingerprint(Callback):
    """Logs `data/batch_hash`: a CRC-32 of the token ids every rank trained on this step, in rank order.

    Two runs whose hashes agree step by step trained on the same samples in the same places; this is
    how a resumed run is checked against an uninterrupted one beyond its losses.
    """

    def __init__(self):
        self._hash: int | None = None

    def after_dataloader(self, state: State, logger: Logger) -> None:
        tokens = state.batch['input_ids'] if isinstance(state.batch, dict) else state.batch[0]
        self._hash = zlib.crc32(tokens.detach().to('cpu', torch.int64).contiguous().numpy().tobytes())

    def after_train_batch(self, state: State, logger: Logger) -> None:  # logged at the step of its loss
        hashes = dist.all_gather_object(self._hash)
        logger.log_metrics({'data/batch_hash': zlib.crc32(str(hashes).encode())})
