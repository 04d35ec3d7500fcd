"""The pretraining data: tokenized MDS streams read with Streaming, mixed, shuffled, resumable.

The YAML section is llm-foundry's `train_loader` (same key names), validated into `LoaderConfig`.
`StreamingDataset` gives deterministic shuffling and mixing across streams and a `state_dict`
that Composer saves in checkpoints, so a resumed run continues with the very next sample.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from streaming import Stream, StreamingDataset
from torch.utils.data import DataLoader

from dbrx_train.constants import IGNORE_INDEX
from dbrx_train.data.text_to_mds import TOKENS_COLUMN
from dbrx_train.errors import ConfigError
from dbrx_train.lifetime import dataloader_worker_init
from dbrx_train.object_store import CHECKED_SCHEMES, RemoteFolder
from dbrx_train.tokenizer import PAD_ID
from dbrx_train.typed_config import parse
from dbrx_train.uri import scheme

TokenEncoding = Literal['int8', 'int16', 'int32', 'int64', 'uint8', 'uint16', 'uint32', 'uint64']


@dataclass(frozen=True)
class StreamConfig:
    """One named stream of `dataset.streams` (Streaming's `Stream`)."""

    local: str | None = None  # the MDS directory; with `remote`, where its shards are cached
    remote: str | None = None  # s3://, gs://, oci://, hf://... or another directory
    split: str | None = None
    proportion: float | None = None  # share of each epoch drawn from this stream
    repeat: float | None = None  # or: how many times to see the stream per epoch
    choose: int | None = None  # or: samples to take from it per epoch
    download_retry: int | None = None
    download_timeout: float | None = None
    validate_hash: str | None = None
    keep_zip: bool | None = None

    def check(self) -> None:
        if self.local is None and self.remote is None:
            raise ConfigError('local', 'a stream needs local (an MDS directory) or remote')
        weights = [name for name in ('proportion', 'repeat', 'choose') if getattr(self, name) is not None]
        if len(weights) > 1:
            raise ConfigError(weights[1], f'give at most one of proportion, repeat and choose (got {weights})')
        if weights and getattr(self, weights[0]) <= 0:
            raise ConfigError(weights[0], f'must be positive, got {getattr(self, weights[0])}')


@dataclass(frozen=True)
class TextDatasetConfig:
    """`train_loader.dataset`: `streams`, or a single `local`/`remote`, plus Streaming's options."""

    # Not Optional: typed_config reports errors inside an Optional field under the field's own key.
    streams: dict[str, StreamConfig] = field(default_factory=dict)
    local: str | None = None
    remote: str | None = None
    split: str | None = None
    max_seq_len: int | None = None  # defaults to the trainer's max_seq_len
    shuffle: bool = False
    shuffle_seed: int = 9176
    shuffle_algo: Literal['py1e', 'py1br', 'py1s', 'py2s', 'naive'] = 'py1e'
    shuffle_block_size: int | None = None
    num_canonical_nodes: int | None = None
    partition_algo: Literal['relaxed', 'orig'] = 'relaxed'
    sampling_method: Literal['balanced', 'fixed'] = 'balanced'
    sampling_granularity: int = 1
    batching_method: Literal['random', 'stratified', 'per_stream', 'device_per_stream'] = 'random'
    epoch_size: int | str | None = None
    predownload: int | None = None
    cache_limit: int | str | None = None
    download_retry: int = 2
    download_timeout: float = 60.0
    validate_hash: str | None = None
    keep_zip: bool = False
    token_encoding_type: TokenEncoding = 'int64'  # only for llm-foundry's legacy `bytes` token columns

    def check(self) -> None:
        if self.streams:
            for key in ('local', 'remote', 'split'):
                if getattr(self, key) is not None:
                    raise ConfigError(key, 'give either streams or a single local/remote, not both')
        elif self.local is None and self.remote is None:
            raise ConfigError('streams', 'no data: give streams, or local (an MDS directory) / remote')
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise ConfigError('max_seq_len', f'must be at least 1, got {self.max_seq_len}')

    def streaming_kwargs(self) -> dict[str, Any]:
        """Everything StreamingDataset takes under the same name."""
        ours = {'streams', 'max_seq_len', 'token_encoding_type'}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ours}


@dataclass(frozen=True)
class LoaderConfig:
    """`train_loader` / `eval_loader` (llm-foundry's keys)."""

    dataset: TextDatasetConfig
    name: Literal['text'] = 'text'
    drop_last: bool = True
    num_workers: int = 0
    pin_memory: bool = False
    prefetch_factor: int | None = None  # only with num_workers > 0
    persistent_workers: bool = False
    timeout: float = 0.0

    def check(self) -> None:
        if self.num_workers < 0:
            raise ConfigError('num_workers', f'must be non-negative, got {self.num_workers}')
        if self.num_workers == 0 and (self.prefetch_factor is not None or self.persistent_workers):
            raise ConfigError('num_workers', 'prefetch_factor and persistent_workers need num_workers > 0')

    def worker_options(self) -> dict[str, Any]:
        """The DataLoader's worker and memory options (the ones that only exist with workers, when set)."""
        options = {'num_workers': self.num_workers, 'pin_memory': self.pin_memory, 'timeout': self.timeout}
        if self.num_workers > 0:
            options.update(prefetch_factor=self.prefetch_factor, persistent_workers=self.persistent_workers,
                           worker_init_fn=dataloader_worker_init)
        return options


class TextDataset(StreamingDataset):
    """Samples `{'input_ids': LongTensor}` of at most `max_seq_len` tokens from tokenized MDS.

    Reads our layout and llm-foundry's: a `tokens` column of `ndarray:*`, or legacy `bytes`
    decoded as `dataset.token_encoding_type`.
    """

    def __init__(self, config: TextDatasetConfig, batch_size: int | None = None, max_seq_len: int | None = None,
                 key: str = 'train_loader.dataset'):
        self.max_seq_len = resolve_max_seq_len(config, max_seq_len, key)
        self.token_dtype = np.dtype(config.token_encoding_type)
        names = list(config.streams)
        check_local_data(config, key)
        streams = [Stream(**dataclasses.asdict(s)) for s in config.streams.values()] if config.streams else None
        try:
            super().__init__(streams=streams, batch_size=batch_size, **config.streaming_kwargs())
        except ValueError as e:  # Streaming's own validation of the mix: one line, naming the section
            raise ConfigError(key, str(e).strip().splitlines()[0]) from None
        for shard, stream_id in zip(self.shards, self.stream_per_shard):
            if TOKENS_COLUMN not in shard.column_names:
                where = f'{key}.streams.{names[stream_id]}' if names else key
                raise ConfigError(where, f'shards have no {TOKENS_COLUMN!r} column (columns: {shard.column_names}); '
                                         'tokenize the text with data_prep/convert_text_to_mds.py')

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tokens = super().__getitem__(index)[TOKENS_COLUMN]
        if not isinstance(tokens, np.ndarray):
            tokens = np.frombuffer(tokens, dtype=self.token_dtype)
        return {'input_ids': torch.from_numpy(tokens[: self.max_seq_len].astype(np.int64))}


def resolve_max_seq_len(config: TextDatasetConfig, model_max_seq_len: int | None, key: str) -> int:
    if config.max_seq_len is None:
        if model_max_seq_len is None:
            raise ConfigError(f'{key}.max_seq_len', 'required key is missing')
        return model_max_seq_len
    if model_max_seq_len is not None and config.max_seq_len > model_max_seq_len:
        raise ConfigError(f'{key}.max_seq_len',
                          f'{config.max_seq_len} exceeds the max_seq_len trained ({model_max_seq_len})')
    return config.max_seq_len


def check_local_data(config: TextDatasetConfig, key: str = 'train_loader.dataset') -> None:
    """Fails with one line naming the stream when its data is not an MDS directory: locally, or in
    an object store it cannot read (wrong key, missing bucket, unreachable endpoint, no index.json),
    before the slow start-up."""
    if getattr(config, 'hf_name', None) is not None:
        return  # llm-foundry's hf_name: converted to MDS when the loader opens it (data/finetuning_source.py)
    if config.streams:
        located = {f'{key}.streams.{name}': (s.local, s.remote, s.split) for name, s in config.streams.items()}
    else:
        located = {key: (config.local, config.remote, config.split)}
    for where, (local, remote, split) in located.items():
        if remote is not None:
            if scheme(remote) in CHECKED_SCHEMES:
                folder = f'{remote.rstrip("/")}/{split}' if split else remote
                RemoteFolder(folder).check_file('index.json', f'{where}.remote:')
            continue  # downloaded into `local` (a cache) when needed
        directory = Path(local) / split if split else Path(local)
        if not directory.is_dir():
            raise ConfigError(f'{where}.local', f'data directory not found: {directory}')
        if not (directory / 'index.json').is_file():
            raise ConfigError(f'{where}.local', f'{directory} is not an MDS dataset (no index.json)')


def collate_text(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pads with `<|pad|>` to the longest sample; `labels` ignore every pad position."""
    longest = max(len(s['input_ids']) for s in samples)
    input_ids = torch.full((len(samples), longest), PAD_ID, dtype=torch.long)
    for row, sample in zip(input_ids, samples):
        row[: len(sample['input_ids'])] = sample['input_ids']
    labels = input_ids.masked_fill(input_ids == PAD_ID, IGNORE_INDEX)
    return {'input_ids': input_ids, 'labels': labels}


def build_text_dataloader(loader_cfg: LoaderConfig | Mapping[str, Any], device_batch_size: int,
                          max_seq_len: int | None = None, section: str = 'train_loader') -> DataLoader:
    """A DataLoader over a `TextDataset`; Composer checkpoints its position through the dataset.

    `max_seq_len` is the trainer's: the default for `dataset.max_seq_len` and its upper bound.
    `section` names the YAML section in errors (`train_loader`, `eval_loader`).
    """
    cfg = loader_cfg if isinstance(loader_cfg, LoaderConfig) else parse(LoaderConfig, loader_cfg, section)
    dataset = TextDataset(cfg.dataset, batch_size=device_batch_size, max_seq_len=max_seq_len, key=f'{section}.dataset')
    return DataLoader(dataset, batch_size=device_batch_size, collate_fn=collate_text, drop_last=cfg.drop_last,
                      **cfg.worker_options())
