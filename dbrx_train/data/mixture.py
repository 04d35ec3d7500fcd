"""The curriculum's training data: one global sample sequence, a pure function of schedule and seed.

- Step t's global batch is split among the streams by systematic sampling at the proportions the
  schedule gives for step t (`interleave`): no sampling noise, every stream stays within a
  sample or two of its running quota, over any span.
- A stream's k-th sample is the k-th of `StreamOrder`: pass after pass over the stream, each a
  fresh seeded shuffle of its shards and of the samples within blocks of shards.
- Rank r of W takes positions [r B/W, (r+1) B/W) of each global batch: every rank plans the
  same sequence and reads only its share; DataLoader worker w of n builds every n-th batch.

So the position is tiny and exact: the step, each stream's samples taken and carried-over
quota (`MixturePlan`). Composer saves it in checkpoints through `MixtureDataset.state_dict`,
along with the phases run so far, which a resumed run may not change.
"""

from __future__ import annotations

import bisect
import math
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dbrx_train.data.curriculum import Schedule
from dbrx_train.data.text_dataset import LoaderConfig, TextDataset, collate_text
from dbrx_train.errors import CheckpointError, ConfigError
from dbrx_train.typed_config import parse

STATE_FORMAT = 'dbrx_train.curriculum/1'
DEFAULT_BLOCK_SIZE = 1 << 18  # samples shuffled together: Streaming's default shuffle block


def interleave(deficits: np.ndarray, proportions: np.ndarray, count: int) -> np.ndarray:
    """The streams of the next `count` samples; updates `deficits` (quota minus samples, per stream).

    Each stream's j-th next sample is due where its running quota `deficit + proportion * i`
    reaches j + 1/2; the `count` earliest due are taken in order, ties to the lower stream.
    """
    due, owner = [], []
    for stream, (deficit, share) in enumerate(zip(deficits, proportions)):
        if share <= 0:
            continue
        # Quotas stay within a sample or two of the counts taken, so this many is always enough.
        candidates = max(0, math.ceil(deficit + count * share)) + 2 * len(deficits) + 2
        due.append((np.arange(candidates) + 0.5 - deficit) / share)
        owner.append(np.full(candidates, stream))
    due_at, owners = np.concatenate(due), np.concatenate(owner)
    chosen = owners[np.lexsort((owners, due_at))[:count]]
    deficits += count * proportions - np.bincount(chosen, minlength=len(deficits))
    return chosen


class StreamOrder:
    """The order one stream's samples are read in: pass after pass, each visiting every sample once.

    A pass shuffles the shards (seeded by seed, stream and pass), groups them into blocks of
    about `block_size` samples, and shuffles the samples within each block: memory for one
    block, reads that stay on a few shards at a time (like Streaming's block shuffles).
    `seed=None` reads the stream in stored order.
    """

    def __init__(self, shard_sizes: np.ndarray, seed: int | None, tag: int, block_size: int = DEFAULT_BLOCK_SIZE):
        self.shard_sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.shard_offsets = np.cumsum(self.shard_sizes) - self.shard_sizes
        self.size = int(self.shard_sizes.sum())
        self.seed, self.tag, self.block_size = seed, tag, block_size
        self._layout: tuple[int, list[int], list[np.ndarray]] | None = None  # pass, block starts, block shards
        self._blocks: dict[tuple[int, int], np.ndarray] = {}

    def __getitem__(self, ordinal: int) -> int:
        """The stream-local sample id read `ordinal`-th (0-based) since training began."""
        pass_, offset = divmod(int(ordinal), self.size)
        if self.seed is None:
            return offset
        starts, shards = self._pass_layout(pass_)
        block = bisect.bisect_right(starts, offset) - 1
        return int(self._block_samples(pass_, block, shards[block])[offset - starts[block]])

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.tag, *key])

    def _pass_layout(self, pass_: int) -> tuple[list[int], list[np.ndarray]]:
        if self._layout is None or self._layout[0] != pass_:
            order = self._rng(pass_, 0).permutation(len(self.shard_sizes))
            ends = np.cumsum(self.shard_sizes[order])
            block_of_shard = (ends - self.shard_sizes[order]) // self.block_size
            cuts = np.flatnonzero(np.diff(block_of_shard)) + 1
            starts = [0] + [int(ends[c - 1]) for c in cuts]
            self._layout = (pass_, starts, np.split(order, cuts))
            self._blocks.clear()
        return self._layout[1], self._layout[2]

    def _block_samples(self, pass_: int, block: int, shards: np.ndarray) -> np.ndarray:
        key = (pass_, block)
        if key not in self._blocks:
            samples = np.concatenate([np.arange(self.shard_offsets[s], self.shard_offsets[s] + self.shard_sizes[s])
                                      for s in shards])
            if len(self._blocks) >= 2:  # reads move forward: the previous block is the only one still needed
                self._blocks.pop(next(iter(self._blocks)))
            self._blocks[key] = self._rng(pass_, 1, block).permutation(samples)
        return self._blocks[key]


class MixturePlan:
    """Where the global sequence stands: the next step, and per stream the samples taken and its deficit."""

    def __init__(self, schedule: Schedule):
        self.schedule = schedule
        self.step = 0
        self.taken = np.zeros(len(schedule.streams), dtype=np.int64)
        self.deficits = np.zeros(len(schedule.streams), dtype=np.float64)

    def clone(self) -> MixturePlan:
        other = MixturePlan(self.schedule)
        other.step, other.taken, other.deficits = self.step, self.taken.copy(), self.deficits.copy()
        return other

    def advance(self) -> tuple[np.ndarray, np.ndarray]:
        """Plans the global batch of `step` and moves past it: each position's stream and that stream's ordinal."""
        size = self.schedule.global_batch_size
        streams = interleave(self.deficits, self.schedule.proportions(self.step), size)
        ordinals = np.empty(size, dtype=np.int64)
        for stream in np.unique(streams):
            where = np.flatnonzero(streams == stream)
            ordinals[where] = self.taken[stream] + np.arange(len(where))
        self.taken += np.bincount(streams, minlength=len(self.taken))
        self.step += 1
        return streams, ordinals


class MixtureDataset(IterableDataset):
    """Yields this rank's collated batches of the curriculum, step after step (it never runs out).

    Composer saves `state_dict(num_samples)` in checkpoints and calls `load_state_dict` on resume.
    """

    def __init__(self, text: TextDataset, schedule: Schedule, rank: int = 0, world_size: int = 1):
        if schedule.global_batch_size % world_size:
            raise ConfigError('global_train_batch_size', f'{schedule.global_batch_size} is not divisible by the '
                                                         f'world size ({world_size})')
        if text.num_streams != len(schedule.streams):  # both come from train_loader.dataset.streams, in order
            raise ValueError(f'the dataset has {text.num_streams} streams, the schedule {len(schedule.streams)}')
        self.text, self.schedule, self.rank = text, schedule, rank
        self.batch_per_rank = schedule.global_batch_size // world_size
        seed = text.shuffle_seed if text.shuffle else None
        block_size = text.shuffle_block_size or DEFAULT_BLOCK_SIZE
        self.orders, self.stream_offsets = [], []
        for index, name in enumerate(schedule.streams):
            first = text.shard_offset_per_stream[index]
            shard_sizes = text.samples_per_shard[first:first + text.shards_per_stream[index]]
            self.orders.append(StreamOrder(shard_sizes, seed, zlib.crc32(name.encode()), block_size))
            self.stream_offsets.append(int(text.sample_offset_per_stream[index]))
        self.resume = MixturePlan(schedule)  # where iteration starts
        self._ledger = self.resume.clone()  # where the trainer is: advanced on demand, never reads data
        self._ledger_counts: dict[int, np.ndarray] = {}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        plan = self.resume.clone()
        mine = slice(self.rank * self.batch_per_rank, (self.rank + 1) * self.batch_per_rank)
        while True:
            turn = (plan.step - self.resume.step) % workers  # the DataLoader takes batches from its workers in turn
            streams, ordinals = plan.advance()
            if turn == worker_id:
                yield collate_text([self.text[self.stream_offsets[s] + self.orders[s][o]]
                                    for s, o in zip(streams[mine], ordinals[mine])])

    # --- where the trainer is ------------------------------------------------------------------

    def plan_at(self, step: int) -> MixturePlan:
        """The position before `step` (no data read): replayed from the resume point when behind."""
        if step < self._ledger.step:
            self._ledger, self._ledger_counts = self.resume.clone(), {}
        if step < self._ledger.step:
            raise ValueError(f'step {step} is before the resumed position (step {self.resume.step})')
        while self._ledger.step < step:
            self._advance_ledger()
        return self._ledger

    def batch_counts(self, step: int) -> np.ndarray:
        """How many samples of each stream the global batch of `step` holds."""
        if step not in self._ledger_counts:
            self.plan_at(step)
            self._advance_ledger()
        return self._ledger_counts[step]

    def _advance_ledger(self) -> None:
        step = self._ledger.step
        streams, _ = self._ledger.advance()
        self._ledger_counts = {step: np.bincount(streams, minlength=len(self.schedule.streams))}

    # --- checkpoints -----------------------------------------------------------------------------

    def state_dict(self, num_samples: int, from_beginning: bool = True) -> dict[str, Any]:
        """The position after `num_samples` samples (all ranks) since training began (`from_beginning`)
        or since this run resumed."""
        size = self.schedule.global_batch_size
        if not from_beginning:
            num_samples += self.resume.step * size
        step, partial = divmod(int(num_samples), size)
        if partial:
            raise ValueError(f'{num_samples} samples is not a whole number of global batches of {size}')
        plan = self.plan_at(step)
        return {
            'format': STATE_FORMAT,
            'step': step,
            'global_batch_size': size,
            'shuffle': self._shuffle(),
            'streams': {name: {'samples': order.size, 'taken': int(taken), 'deficit': float(deficit)}
                        for name, order, taken, deficit in zip(self.schedule.streams, self.orders, plan.taken,
                                                                plan.deficits)},
            'phases': [phase.to_state(self.schedule.streams) for phase in self.schedule.phases],
        }

    def _shuffle(self) -> dict[str, Any]:
        """What the streams' reading order depends on besides their sizes."""
        return {'shuffle_seed': self.orders[0].seed, 'shuffle_block_size': self.orders[0].block_size}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continues from a checkpoint's position; refuses what would break the sequence it began."""
        if not isinstance(state, Mapping) or state.get('format') != STATE_FORMAT:
            raise CheckpointError('the checkpoint holds no curriculum position (it was written by a run without '
                                  'a curriculum, or by another loader); start a new save_folder')
        step = state['step']
        if state['global_batch_size'] != self.schedule.global_batch_size:
            raise ConfigError('global_train_batch_size', f'is {self.schedule.global_batch_size} but the checkpoint '
                                                         f'was trained with {state["global_batch_size"]}; a curriculum '
                                                         'resumes only with the same global batch')
        if state['shuffle'] != self._shuffle():
            raise ConfigError('train_loader.dataset', f'the checkpoint read its streams in the order of '
                                                      f'{state["shuffle"]}, this run would use {self._shuffle()}; '
                                                      'keep the shuffle settings')
        self.schedule.check_resumable(state['phases'], step)
        plan = MixturePlan(self.schedule)
        plan.step = step
        saved = state['streams']
        for index, (name, order) in enumerate(zip(self.schedule.streams, self.orders)):
            if name not in saved:
                continue  # a stream new to this run: nothing read from it yet
            if saved[name]['taken'] and saved[name]['samples'] != order.size:
                raise ConfigError(f'train_loader.dataset.streams.{name}',
                                  f'holds {order.size} samples but {saved[name]["samples"]} when the checkpoint was '
                                  'written; its reading order would change')
            plan.taken[index] = saved[name]['taken']
            plan.deficits[index] = saved[name]['deficit']
        for name, stream in saved.items():
            if name not in self.schedule.streams and stream['taken']:
                raise ConfigError('train_loader.dataset.streams', f'stream {name!r}, read before the checkpoint, '
                                                                  'is missing')
        self.resume, self._ledger, self._ledger_counts = plan, plan.clone(), {}


def build_mixture_dataloader(loader_cfg: LoaderConfig | Mapping[str, Any], schedule: Schedule, max_seq_len: int,
                             rank: int | None = None, world_size: int | None = None) -> DataLoader:
    """The curriculum's train loader: batches of `global_batch_size / world_size` samples per rank."""
    if rank is None or world_size is None:
        from composer.utils import dist

        rank, world_size = dist.get_global_rank(), dist.get_world_size()
    cfg = loader_cfg if isinstance(loader_cfg, LoaderConfig) else parse(LoaderConfig, loader_cfg, 'train_loader')
    text = TextDataset(cfg.dataset, max_seq_len=max_seq_len)
    dataset = MixtureDataset(text, schedule, rank, world_size)
    # batch_size=None: the dataset yields whole batches, so workers never split one.
    return DataLoader(dataset, batch_size=None, **cfg.worker_options())
