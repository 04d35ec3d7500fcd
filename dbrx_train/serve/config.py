"""The server's YAML (or command line), as a typed config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dbrx_train.chat_template import ChatTemplateName
from dbrx_train.errors import ConfigError
from dbrx_train.model.config import Quantization

API_KEY_ENV = 'DBRX_SERVE_API_KEY'


@dataclass(frozen=True)
class ServeConfig:
    # A composer checkpoint or a transformers DBRX directory (what `dbrx_train.load_pretrained` reads).
    checkpoint: str | None = None
    host: str = '127.0.0.1'
    port: int = 8000
    # When set, every endpoint but /health wants `Authorization: Bearer <api_key>`. The command line
    # also reads it from $DBRX_SERVE_API_KEY, which keeps it out of `ps`.
    api_key: str | None = None
    # The name /v1/models lists and requests may name; default: the checkpoint's directory name.
    model_name: str | None = None
    device: str = 'auto'  # 'auto' is cuda when available, else cpu
    dtype: Literal['float32', 'bfloat16', 'float16'] | None = None  # None: as stored (bfloat16 with quantize)
    quantize: Quantization | None = None  # 'int8' / 'int4': weight-only (dbrx_train/model/quantize.py)
    quantize_group_size: int | None = None  # int4's weights per scale and zero point (None: 128)
    # torch.compile the decoding step (static-shape cache; dbrx_train/model/decode.py): the first
    # requests of each shape bucket wait for the compilation, later ones decode faster.
    compile: bool = False
    # How /v1/chat/completions renders messages: 'chatml' (plain ChatML, base models) or 'dbrx_instruct'
    # (DBRX Instruct's template, with its default system prompt when the chat has none).
    chat_template: ChatTemplateName = 'chatml'
    # Sequences decoded together in one step; more wait in the engine's queue.
    max_batch_size: int = 16
    # Prompt tokens per prefill step: a longer prompt is prefilled in chunks, with a decoding step
    # of the running sequences after each, so they are not stalled for the whole prompt.
    prefill_chunk: int = 512
    # Completion requests in flight at once (queued or running); one more is refused with 429.
    max_concurrent_requests: int = 64
    max_request_bytes: int = 1 << 20
    default_max_tokens: int = 16  # OpenAI's default for /v1/completions
    max_n: int = 16
    max_logprobs: int = 20
    max_stop_strings: int = 16

    def check(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError('port', f'must be in 0..65535, got {self.port}')
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError('api_key', 'must not be empty (leave it out to disable authentication)')
        for name in ('max_batch_size', 'prefill_chunk', 'max_concurrent_requests', 'max_request_bytes', 'default_max_tokens',
                     'max_n', 'max_stop_strings'):
            if getattr(self, name) < 1:
                raise ConfigError(name, f'must be at least 1, got {getattr(self, name)}')
        if self.max_logprobs < 0:
            raise ConfigError('max_logprobs', f'must be non-negative, got {self.max_logprobs}')
        if self.device != 'auto' and self.device.split(':')[0] not in ('cpu', 'cuda', 'mps'):
            raise ConfigError('device', f"must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {self.device!r}")
