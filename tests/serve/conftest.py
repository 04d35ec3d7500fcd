"""A tiny random DBRX, its tokenizer, and a real server of it (uvicorn on a free loopback port, in a thread)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import openai
import pytest
import torch
from fastapi import FastAPI

from dbrx_train.model import DbrxLM, ModelConfig
from dbrx_train.model.config import AttentionConfig, FFNConfig
from dbrx_train.serve import Engine, ServeConfig, create_app
from dbrx_train.serve.background import serve_in_background
from dbrx_train.serve.text import TextCodec
from dbrx_train.tokenizer import VOCAB_SIZE, get_encoding

TINY = ModelConfig(
    d_model=64,
    n_heads=4,
    n_layers=2,
    max_seq_len=128,
    vocab_size=VOCAB_SIZE,
    attn_config=AttentionConfig(kv_n_heads=2),
    ffn_config=FFNConfig(ffn_hidden_size=64, moe_num_experts=4, moe_top_k=2),
    # Wider logits than the default 0.02: greedy choices then do not hinge on float rounding,
    # so the server's batched decoding and a one-prompt reference pick the same tokens.
    init_std=0.1,
)


class ControlledModel:
    """A model the tests steer: it counts its forward passes (`passes`), each `delay` seconds slower,
    says when one starts (`entered`), waits while `hold` is clear and raises while `fail` is set."""

    def __init__(self, model, delay: float = 0.0):
        self.model, self.delay, self.passes, self.fail = model, delay, 0, False
        self.entered, self.hold = threading.Event(), threading.Event()
        self.hold.set()

    def __getattr__(self, name):
        return getattr(self.model, name)

    def hidden_states(self, *args, **kwargs):
        self.passes += 1
        self.entered.set()
        assert self.hold.wait(timeout=60)
        if self.fail:
            raise RuntimeError('the model broke')
        time.sleep(self.delay)
        return self.model.hidden_states(*args, **kwargs)


@pytest.fixture(scope='session')
def tiny_model() -> DbrxLM:
    torch.manual_seed(0)
    return DbrxLM(TINY).eval()


@pytest.fixture(scope='session')
def encoding():
    return get_encoding()


@pytest.fixture(scope='session')
def codec(encoding) -> TextCodec:
    return TextCodec(encoding)


KEY = 'test-key'  # the `strict` server's API key


@dataclass
class Served:
    url: str
    app: FastAPI

    @property
    def engine(self) -> Engine:
        return self.app.state.engine


@pytest.fixture(scope='session')
def server(tiny_model, encoding) -> Served:
    """A server with default limits, shared by the tests that need no special ones."""
    app = create_app(tiny_model, encoding, ServeConfig(model_name='tiny', max_batch_size=4))
    with serve_in_background(app) as url:
        yield Served(url, app)


@pytest.fixture(scope='session')
def strict(tiny_model, encoding):
    """A server with an API key, one request in flight at most and a 2000-byte body limit, whose
    model the tests steer; yields its URL and the `ControlledModel`."""
    model = ControlledModel(tiny_model, delay=0.02)  # requests stay in flight
    config = ServeConfig(model_name='tiny', api_key=KEY, max_concurrent_requests=1, max_request_bytes=2000)
    with serve_in_background(create_app(model, encoding, config)) as url:
        yield url, model


@pytest.fixture(scope='session')
def greedy(tiny_model):
    """The tiny model's greedy tokens for one prompt, computed directly: what the server must match."""

    def generate(prompt: list[int], max_tokens: int, stop_token_ids=()) -> list[int]:
        out = tiny_model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, stop_token_ids=stop_token_ids)
        return out[0, len(prompt):].tolist()

    return generate


def client(url: str, key: str = 'unused') -> openai.OpenAI:
    return openai.OpenAI(base_url=url + '/v1', api_key=key, max_retries=0, timeout=60)
