"""Pretraining data: raw text to packed MDS shards, the embedded corpus, the streaming loader, curricula.

Names are imported on first use: Streaming pulls in transformers and takes seconds to import,
which a data-prep command that finds its output already built should not pay.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    'CurriculumConfig': 'curriculum',
    'Schedule': 'curriculum',
    'resolve_schedule': 'curriculum',
    'make_embedded_corpus': 'embedded_corpus',
    'MixtureDataset': 'mixture',
    'build_mixture_dataloader': 'mixture',
    'LoaderConfig': 'text_dataset',
    'StreamConfig': 'text_dataset',
    'TextDataset': 'text_dataset',
    'TextDatasetConfig': 'text_dataset',
    'build_text_dataloader': 'text_dataset',
    'check_local_data': 'text_dataset',
    'collate_text': 'text_dataset',
    'ConversionStats': 'text_to_mds',
    'convert_to_mds': 'text_to_mds',
    'iter_documents': 'text_to_mds',
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from dbrx_train.data.curriculum import CurriculumConfig, Schedule, resolve_schedule
    from dbrx_train.data.embedded_corpus import make_embedded_corpus
    from dbrx_train.data.mixture import MixtureDataset, build_mixture_dataloader
    from dbrx_train.data.text_dataset import (
        LoaderConfig,
        StreamConfig,
        TextDataset,
        TextDatasetConfig,
        build_text_dataloader,
        check_local_data,
        collate_text,
    )
    from dbrx_train.data.text_to_mds import ConversionStats, convert_to_mds, iter_documents


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    return getattr(importlib.import_module(f'{__name__}.{_EXPORTS[name]}'), name)
