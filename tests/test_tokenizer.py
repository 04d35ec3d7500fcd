import hashlib
import socket

import pytest
import requests
import tiktoken
import tiktoken.registry

from dbrx_train import tokenizer as dbrx_tokenizer
from dbrx_train.tokenizer import (
    CL100K_SHA256,
    CL100K_URL,
    EOS_ID,
    IM_END_ID,
    IM_START_ID,
    PAD_ID,
    STOP_TOKEN_IDS,
    VOCAB_SIZE,
    build_hf_tokenizer,
    get_encoding,
)

TEXT = 'Hello, DBRX! Fine-grained experts: 16 choose 4.\n\tdef f(x):\n        return x ** 2  # é ☃ 日本語'


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network at all, an empty tiktoken cache and no encoding already loaded in this process."""

    def no_network(*args, **kwargs):
        raise OSError('network disabled in this test')

    monkeypatch.setattr(socket.socket, 'connect', no_network)
    monkeypatch.setattr(requests, 'get', no_network)
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', str(tmp_path / 'tiktoken-cache'))
    monkeypatch.setattr(tiktoken.registry, 'ENCODINGS', {})
    get_encoding.cache_clear()
    yield tmp_path / 'tiktoken-cache'
    get_encoding.cache_clear()


@pytest.fixture(scope='module')
def hf_tokenizer():
    return build_hf_tokenizer()


def test_plain_tiktoken_cl100k_loads_offline_after_seeding(offline):
    with pytest.raises(OSError):  # the test really is offline: an unseeded cache needs the network
        tiktoken.get_encoding('cl100k_base')
    dbrx_tokenizer.ensure_cl100k_cached()
    cached = offline / hashlib.sha1(CL100K_URL.encode()).hexdigest()
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == CL100K_SHA256
    assert [p.name for p in offline.iterdir()] == [cached.name]  # no temp file left behind
    enc = tiktoken.get_encoding('cl100k_base')
    assert enc.encode('hello world') == [15339, 1917]


def test_corrupt_cache_entry_is_replaced(offline):
    offline.mkdir()
    cached = offline / hashlib.sha1(CL100K_URL.encode()).hexdigest()
    cached.write_bytes(b'truncated download')
    dbrx_tokenizer.ensure_cl100k_cached()
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == CL100K_SHA256


def test_dbrx_encoding_offline_has_dbrx_special_tokens(offline):
    enc = get_encoding()
    assert enc.eot_token == EOS_ID
    specials = '<|endoftext|><|pad|><|im_start|><|im_end|>'
    assert enc.encode(specials, allowed_special='all') == [EOS_ID, PAD_ID, IM_START_ID, IM_END_ID]
    assert STOP_TOKEN_IDS == (EOS_ID, IM_END_ID)
    assert enc.n_vocab == IM_END_ID + 1 <= VOCAB_SIZE
    assert VOCAB_SIZE % 128 == 0
    # Ordinary text tokenizes exactly as cl100k_base.
    assert enc.encode_ordinary(TEXT) == tiktoken.get_encoding('cl100k_base').encode_ordinary(TEXT)


def test_dbrx_encoding_pickles_for_worker_processes():
    import pickle

    text = '<|im_start|>user\nhi<|im_end|>'
    enc = pickle.loads(pickle.dumps(get_encoding()))
    assert enc.encode(text, allowed_special='all') == get_encoding().encode(text, allowed_special='all')


def test_hf_tokenizer_special_token_ids(hf_tokenizer):
    assert hf_tokenizer.eos_token == hf_tokenizer.bos_token == '<|endoftext|>'
    assert hf_tokenizer.eos_token_id == hf_tokenizer.bos_token_id == EOS_ID
    assert hf_tokenizer.pad_token == '<|pad|>' and hf_tokenizer.pad_token_id == PAD_ID
    assert hf_tokenizer.convert_tokens_to_ids(['<|im_start|>', '<|im_end|>']) == [IM_START_ID, IM_END_ID]
    assert len(hf_tokenizer) == IM_END_ID + 1 <= VOCAB_SIZE


def test_hf_tokenizer_matches_tiktoken(hf_tokenizer):
    ids = hf_tokenizer(TEXT)['input_ids']
    assert ids == get_encoding().encode_ordinary(TEXT)  # no bos/eos added
    assert hf_tokenizer.decode(ids) == TEXT
    with_specials = '<|im_start|>user\nhi<|im_end|>'
    assert hf_tokenizer(with_specials)['input_ids'] == get_encoding().encode(with_specials, allowed_special='all')


def test_chat_template_is_chatml(hf_tokenizer):
    messages = [
        {'role': 'system', 'content': 'Be brief.'},
        {'role': 'user', 'content': 'Hi?'},
        {'role': 'assistant', 'content': 'Hello.'},
        {'role': 'user', 'content': 'Bye?'},
    ]
    expected = (
        '<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n'
        '<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye?<|im_end|>\n'
    )
    assert hf_tokenizer.apply_chat_template(messages, tokenize=False) == expected
    prompt = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == expected + '<|im_start|>assistant\n'
    ids = hf_tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True)
    assert ids[0] == IM_START_ID and ids.count(IM_END_ID) == 2
    assert ids == get_encoding().encode(
        '<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n',
        allowed_special='all',
    )


def test_hf_tokenizer_save_and_load_back(hf_tokenizer, tmp_path):
    from llmfoundry.tokenizers import TiktokenTokenizerWrapper
    from transformers import AutoTokenizer

    hf_tokenizer.save_pretrained(tmp_path)
    for loaded in (
        TiktokenTokenizerWrapper.from_pretrained(tmp_path),
        AutoTokenizer.from_pretrained(tmp_path, trust_remote_code=True),
    ):
        assert loaded.pad_token_id == PAD_ID and loaded.eos_token_id == EOS_ID
        assert loaded.convert_tokens_to_ids(['<|im_start|>', '<|im_end|>']) == [IM_START_ID, IM_END_ID]
        assert loaded(TEXT)['input_ids'] == hf_tokenizer(TEXT)['input_ids']
        assert loaded.chat_template == hf_tokenizer.chat_template
