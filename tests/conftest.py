"""Fixtures shared across test folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

CORPUS_SEQ_LEN = 32  # tokens per sample of the `tiny_corpus` fixture


def _packed_tokens(documents: list[str], seq_len: int) -> np.ndarray:
    import tiktoken

    from dbrx_train.tokenizer import EOS_ID, ensure_cl100k_cached

    ensure_cl100k_cached()
    cl100k = tiktoken.get_encoding('cl100k_base')
    stream = [t for doc in documents if doc for t in [*cl100k.encode_ordinary(doc), EOS_ID]]
    n = len(stream) // seq_len
    return np.array(stream[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


@pytest.fixture
def packed_tokens():
    """`packed_tokens(documents, seq_len)`: the samples packing must produce, computed straight from
    tiktoken (cl100k_base, `<|endoftext|>` after each document, the short tail dropped)."""
    return _packed_tokens


@pytest.fixture
def write_mds(tmp_path):
    """`write_mds(documents, name, seq_len)` -> (MDS directory, the samples it must hold)."""
    from dbrx_train.data.text_to_mds import convert_to_mds

    def write(documents: list[str], name: str, seq_len: int) -> tuple[Path, np.ndarray]:
        out = tmp_path / name
        convert_to_mds(documents, out, seq_len=seq_len)
        return out, _packed_tokens(documents, seq_len)

    return write


@pytest.fixture
def streaming_shm():
    """Streaming keeps per-dataset state in shared memory: clear stale entries around a test."""
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    yield
    clean_stale_shared_memory()


@pytest.fixture(autouse=True, scope='session')
def _one_torch_thread():
    """Tiny test models gain nothing from intra-op threads, and the suite shares 2 cores."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope='session')
def tiny_corpus(tmp_path_factory) -> Path:
    """The embedded corpus (text and code streams), 32-token samples, built once per test session."""
    from dbrx_train.data import make_embedded_corpus

    out = tmp_path_factory.mktemp('corpus')
    make_embedded_corpus(out, seq_len=CORPUS_SEQ_LEN, max_tokens=40_000)
    return out
