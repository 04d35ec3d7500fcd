"""Fine-tuning data: chats rendered with DBRX's ChatML, loss masks, truncation, packing, the loader.

A chat is rendered exactly as its chat template (`chat_template.py`: plain ChatML, or DBRX Instruct's
with its default system prompt) renders it, e.g. ChatML turn by turn:

    <|im_start|>{role}\\n{content}<|im_end|>\\n

An assistant turn is tokenized as its header `<|im_start|>assistant\\n` (what the template's
generation prompt ends with) followed by its content, so training sees the tokens the model is
prompted with at inference. Prepared examples (`data_prep/convert_finetuning_to_mds.py`) are
stored whole, one MDS sample each: `input_ids` and `assistant_turn` (per token: n inside the n-th
assistant response, its content and closing `<|im_end|>`; 0 elsewhere). What is trained on,
truncation and packing are chosen in the YAML when the loader opens the data:

    train_loader:
      name: finetuning
      dataset:
        local: data/my_chats      # the prepared directory
        split: train
        target_prompts: none      # none: loss on responses only; all: on every token
        target_responses: all     # all assistant turns, or only the last
        too_long: drop            # or truncate_left / truncate_right, counted and reported
        packing: false            # true: several examples per row, attention kept apart

Labels are `-100` on every token not trained on, and on each example's first token (nothing
inside the example precedes it), so no loss ever crosses from one packed example into the next.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dbrx_train.chat_template import ChatTemplateName, chat_ids
from dbrx_train.constants import IGNORE_INDEX
from dbrx_train.data.text_dataset import LoaderConfig, StreamConfig, check_local_data, resolve_max_seq_len
from dbrx_train.errors import ConfigError, check_local_path
from dbrx_train.tokenizer import EOS_ID, PAD_ID, get_encoding
from dbrx_train.typed_config import parse

log = logging.getLogger(__name__)

ROLES = ('system', 'user', 'assistant')
MDS_COLUMNS = {'input_ids': 'ndarray:int32', 'assistant_turn': 'ndarray:int16'}
PAD_VALUES = {'input_ids': PAD_ID, 'labels': IGNORE_INDEX, 'sequence_id': -1}


# ---------------------------------------------------------------- rendering


def render_chat(messages: list[tuple[str, str]], template: ChatTemplateName = 'chatml') -> tuple[np.ndarray, np.ndarray]:
    """Token ids of a chat `[(role, content), ...]` rendered with `template` and, per token, its assistant
    turn (1-based; 0 outside responses). Special tokens are placed by id: message text cannot forge them."""
    ids, turns = chat_ids(messages, template, get_encoding().encode_ordinary)
    return np.array(ids, dtype=np.int32), np.array(turns, dtype=np.int16)


# ---------------------------------------------------------------- the YAML


@dataclass(frozen=True)
class FinetuningDatasetConfig:
    """`train_loader.dataset` / `eval_loader.dataset` of a `finetuning` loader."""

    # Several prepared sets are read one after the other; every example is used once per epoch.
    streams: dict[str, StreamConfig] = field(default_factory=dict)
    local: str | None = None
    remote: str | None = None
    split: str | None = None
    max_seq_len: int | None = None  # defaults to the trainer's max_seq_len
    shuffle: bool = True
    shuffle_seed: int = 9176
    target_prompts: Literal['none', 'all'] = 'none'
    target_responses: Literal['all', 'last'] = 'all'
    too_long: Literal['drop', 'truncate_left', 'truncate_right'] = 'drop'
    packing: bool = False
    # llm-foundry's keys. hf_name: a local directory of split files ({split}.jsonl, {split}/*.jsonl, ...) or
    # one saved by `datasets`, converted to MDS beside it on first use (data/finetuning_source.py).
    hf_name: str | None = None
    packing_ratio: float | Literal['auto'] | None = None  # 'auto' or > 1: packing (rows planned whole-dataset)
    decoder_only_format: bool = True  # DBRX is decoder-only
    allow_pad_trimming: bool | None = None
    eos_token_id: int | None = None  # checked against the tokenizer's (llm-foundry does not use it either)

    def check(self) -> None:
        if self.hf_name is not None:
            for key in ('streams', 'local', 'remote'):
                if getattr(self, key):
                    raise ConfigError(key, 'give hf_name (a directory of split files) or prepared MDS data, not both')
            if not check_local_path('hf_name', self.hf_name, 'dataset').is_dir():
                raise ConfigError('hf_name', f'{self.hf_name} is not a directory (of split files, or saved by datasets)')
        if not self.decoder_only_format:
            raise ConfigError('decoder_only_format', 'DBRX is a decoder-only model: set it true')
        if self.packing_ratio is not None:
            if self.packing:
                raise ConfigError('packing_ratio', 'give packing_ratio (llm-foundry) or packing, not both')
            if self.packing_ratio != 'auto' and self.packing_ratio < 1:
                raise ConfigError('packing_ratio', f'must be at least 1 (or auto, or null), got {self.packing_ratio}')
        if self.streams:
            for key in ('local', 'remote', 'split'):
                if getattr(self, key) is not None:
                    raise ConfigError(key, 'give either streams or a single local/remote, not both')
            for name, stream in self.streams.items():
                weighted = [k for k in ('proportion', 'repeat', 'choose') if getattr(stream, k) is not None]
                if weighted:
                    raise ConfigError(f'streams.{name}.{weighted[0]}',
                                      'not supported for fine-tuning data: every example is used once per epoch')
        elif self.local is None and self.remote is None and self.hf_name is None:
            raise ConfigError('local', 'no data: give local (a prepared directory) / remote, streams, or hf_name')
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ConfigError('max_seq_len', f'must be at least 2, got {self.max_seq_len}')

    @property
    def packs(self) -> bool:
        """Several examples per row: `packing`, or llm-foundry's packing_ratio 'auto' or above 1."""
        return self.packing or (self.packing_ratio is not None and (self.packing_ratio == 'auto'
                                                                     or self.packing_ratio > 1))

    def notes(self) -> list[str]:
        found = []
        if self.eos_token_id is not None and self.eos_token_id != EOS_ID:
            found.append(f'eos_token_id: {self.eos_token_id} is not the tokenizer\'s <|endoftext|> ({EOS_ID}); '
                         'examples end with the tokenizer\'s own (llm-foundry only checks it when replicating data)')
        if isinstance(self.packing_ratio, float) and self.packing_ratio > 1:
            found.append(f'packing_ratio: {self.packing_ratio:g} turns packing on; rows are planned from the whole '
                         'dataset (best fit), not a fixed number of examples per row')
        if self.allow_pad_trimming is False:
            found.append('allow_pad_trimming: false; rows are padded to the longest of their batch, as trimming '
                         'does (padding to max_seq_len would change no result, only cost compute)')
        return found

    def stream_locations(self) -> list[dict[str, str | None]]:
        if self.streams:
            return [{'local': s.local, 'remote': s.remote, 'split': s.split} for s in self.streams.values()]
        return [{'local': self.local, 'remote': self.remote, 'split': self.split}]


@dataclass(frozen=True)
class FinetuningLoaderConfig(LoaderConfig):
    """A `finetuning` loader: the DataLoader options of a `text` loader over prepared chats."""

    dataset: FinetuningDatasetConfig
    name: Literal['finetuning'] = 'finetuning'


# ---------------------------------------------------------------- the dataset


@dataclass(frozen=True)
class Window:
    """Tokens `start:stop` of example `example`."""

    example: int
    start: int
    stop: int


@dataclass(frozen=True)
class FinetuningStats:
    """What opening the data did to it; reported once, so nothing is dropped silently."""

    examples: int
    truncated: int  # cut to max_seq_len (too_long: truncate_*) and kept
    dropped_too_long: int  # too_long: drop
    dropped_no_target: int  # nothing left to train on after truncation
    sequences: int  # rows of at most max_seq_len tokens (fewer than examples when packing)
    tokens: int  # real tokens in those rows

    def summary(self, section: str, config: FinetuningDatasetConfig, max_seq_len: int) -> str:
        text = (f'{section}: {self.examples} examples -> {self.sequences} sequences of at most {max_seq_len} tokens '
                f'({self.tokens / max(1, self.sequences * max_seq_len):.0%} filled'
                f'{", packed" if config.packs else ""})')
        side = config.too_long.removeprefix('truncate_')
        if self.truncated:
            text += f'; {self.truncated} longer than max_seq_len truncated on the {side}'
        if self.dropped_too_long:
            text += f'; {self.dropped_too_long} longer than max_seq_len dropped'
        if self.dropped_no_target:
            text += f'; {self.dropped_no_target} dropped with no response token left after truncation'
        return text


class FinetuningDataset(Dataset):
    """Rows `{'input_ids', 'labels'[, 'sequence_id']}` of at most `max_seq_len` tokens, planned once
    from every example's length (so epochs, shuffling and resumption are those of a map-style dataset)."""

    def __init__(self, config: FinetuningDatasetConfig, max_seq_len: int | None = None,
                 key: str = 'train_loader.dataset'):
        from streaming import Stream, StreamingDataset

        self.config = config
        self.max_seq_len = resolve_max_seq_len(config, max_seq_len, key)
        check_local_data(config, key)
        streams = [Stream(**location) for location in config.stream_locations()]
        # Streaming here is random-access storage (local cache of remote shards); order comes from the sampler.
        self.source = StreamingDataset(streams=streams, shuffle=False)
        columns = set(self.source.shards[0].column_names) if self.source.shards else set()
        if not set(MDS_COLUMNS) <= columns:
            raise ConfigError(key, f'not prepared fine-tuning data (columns: {sorted(columns)}); '
                                   'prepare it with data_prep/convert_finetuning_to_mds.py')
        self.plan, self.stats = self._plan(key)
        if not self.plan:
            raise ConfigError(key, f'no example left to train on: {self.stats.summary(key, config, self.max_seq_len)}')
        report = log.warning if self.stats.truncated or self.stats.dropped_too_long or self.stats.dropped_no_target \
            else log.info
        report(self.stats.summary(key, config, self.max_seq_len))

    def _targets(self, turns: np.ndarray) -> np.ndarray:
        if self.config.target_prompts == 'all':
            return np.ones(len(turns), dtype=bool)
        if self.config.target_responses == 'last':
            return (turns == turns.max()) & (turns > 0)
        return turns > 0

    def _window(self, length: int) -> tuple[int, int] | None:
        if length <= self.max_seq_len:
            return 0, length
        if self.config.too_long == 'drop':
            return None
        if self.config.too_long == 'truncate_left':
            return length - self.max_seq_len, length
        return 0, self.max_seq_len

    def _plan(self, key: str) -> tuple[list[list[Window]], FinetuningStats]:
        from tqdm import tqdm

        windows: list[Window] = []
        truncated = dropped_too_long = dropped_no_target = 0
        for index in tqdm(range(self.source.num_samples), desc=f'planning {key}', unit='example', disable=None):
            turns = self.source[index]['assistant_turn']
            window = self._window(len(turns))
            if window is None:
                dropped_too_long += 1
                continue
            start, stop = window
            # The first token's label is never used: nothing in the example precedes it.
            if not self._targets(turns)[start + 1 : stop].any():
                dropped_no_target += 1
                continue
            truncated += stop - start < len(turns)
            windows.append(Window(index, start, stop))
        rows = pack(windows, self.max_seq_len) if self.config.packs else [[w] for w in windows]
        stats = FinetuningStats(self.source.num_samples, truncated, dropped_too_long, dropped_no_target, len(rows),
                                sum(w.stop - w.start for w in windows))
        return rows, stats

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        input_ids, labels, sequence_id = [], [], []
        for number, window in enumerate(self.plan[index]):
            sample = self.source[window.example]
            tokens = sample['input_ids'][window.start : window.stop].astype(np.int64)
            targets = self._targets(sample['assistant_turn'])[window.start : window.stop]
            targets[0] = False
            input_ids.append(tokens)
            labels.append(np.where(targets, tokens, IGNORE_INDEX))
            sequence_id.append(np.full(len(tokens), number))
        row = {'input_ids': input_ids, 'labels': labels}
        if self.config.packs:
            row['sequence_id'] = sequence_id
        return {name: torch.from_numpy(np.concatenate(parts)) for name, parts in row.items()}


def pack(windows: list[Window], capacity: int) -> list[list[Window]]:
    """Best-fit decreasing: each example, longest first, goes into the fullest row it still fits."""
    rows: list[list[Window]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row), sorted
    for window in sorted(windows, key=lambda w: (-(w.stop - w.start), w.example)):
        length = window.stop - window.start
        at = bisect.bisect_left(free, (length, -1))
        if at == len(free):
            rows.append([])
            row, room = len(rows) - 1, capacity
        else:
            room, row = free.pop(at)
        rows[row].append(window)
        if room - length > 0:
            bisect.insort(free, (room - length, row))
    for row in rows:
        row.sort(key=lambda w: w.example)
    return rows


def collate_finetuning(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pads every field to the longest row: `<|pad|>` tokens, ignored labels, sequence id -1."""
    longest = max(len(s['input_ids']) for s in samples)
    batch = {}
    for name in samples[0]:
        batch[name] = torch.full((len(samples), longest), PAD_VALUES[name], dtype=torch.long)
        for row, sample in zip(batch[name], samples):
            row[: len(sample[name])] = sample[name]
    return batch


def build_finetuning_dataloader(loader_cfg: FinetuningLoaderConfig | Mapping[str, Any], device_batch_size: int,
                                max_seq_len: int | None = None, section: str = 'train_loader') -> DataLoader:
    """A DataLoader over a `FinetuningDataset`, each rank reading its share through a
    `DistributedSampler` that Composer re-seeds every epoch and fast-forwards on resumption."""
    from composer.utils import dist

    cfg = loader_cfg if isinstance(loader_cfg, FinetuningLoaderConfig) else parse(FinetuningLoaderConfig, loader_cfg,
                                                                                   section)
    dataset = FinetuningDataset(cfg.dataset, max_seq_len, key=f'{section}.dataset')
    batch = device_batch_size * dist.get_world_size()
    if cfg.drop_last and len(dataset) < batch:  # else every epoch is empty and training never ends
        raise ConfigError(f'{section}.drop_last', f'the data makes {len(dataset)} rows, fewer than one batch of {batch}: '
                                                  'add data, use a smaller batch, or set drop_last false')
    sampler = DistributedSampler(dataset, num_replicas=dist.get_world_size(), rank=dist.get_global_rank(),
                                 shuffle=cfg.dataset.shuffle, seed=cfg.dataset.shuffle_seed, drop_last=cfg.drop_last)
    return DataLoader(dataset, batch_size=device_batch_size, sampler=sampler, collate_fn=collate_finetuning,
                      drop_last=cfg.drop_last, **cfg.worker_options())

