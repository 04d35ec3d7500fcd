"""The OpenAI API's request schemas (pydantic) and the envelope of its replies.

Requests follow the official OpenAI OpenAPI spec (tests/serve/openai_openapi_2.3.0.yaml) plus
vLLM's extensions that lm-eval and benchmarks send (`top_k`, `ignore_eos`, `/tokenize`,
`/detokenize`). Unknown fields are errors: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dbrx_train.serve.engine import Output


class _Strict(BaseModel):
    model_config = ConfigDict(extra='forbid', strict=True)

    @model_validator(mode='before')
    @classmethod
    def _null_is_default(cls, data):
        """OpenAI's optional parameters are nullable, null meaning the default."""
        if not isinstance(data, dict):
            return data
        optional = {name for name, field in cls.model_fields.items() if not field.is_required()}
        return {key: value for key, value in data.items() if value is not None or key not in optional}


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingFields(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)  # 0: only the likeliest token (greedy)
    top_k: int | None = None  # vLLM's extension; null or -1: off
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=-2**63, lt=2**63)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None  # token id (a string) -> bias
    user: str | None = None  # OpenAI's end-user id for abuse monitoring; nothing here uses it
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)

    @field_validator('logit_bias')
    @classmethod
    def _logit_bias(cls, value):
        if value is not None and not all(key.isdigit() for key in value):
            raise ValueError('keys must be token ids, such as "50256"')
        return value

    @field_validator('top_k')
    @classmethod
    def _top_k(cls, value):
        if value is not None and value != -1 and value < 1:
            raise ValueError('must be at least 1, or -1 or null to disable')
        return None if value == -1 else value

    @field_validator('stop')
    @classmethod
    def _stop(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if any(not s for s in stops):
            raise ValueError('stop strings must not be empty')
        return tuple(stops)

    def unsupported(self) -> Iterator[tuple[str, str]]:
        """(param, why) for each spec parameter used beyond its no-op value, a feature this server lacks."""
        yield from ()


class CompletionRequest(SamplingFields):
    prompt: Any
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    best_of: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None

    def unsupported(self) -> Iterator[tuple[str, str]]:
        if self.best_of is not None and self.best_of != self.n:
            yield 'best_of', f'best_of other than n ({self.n}) is not supported: this server ranks no candidates'
        if self.suffix:
            yield 'suffix', 'suffix is not supported: this server does not insert text'

    @field_validator('prompt')
    @classmethod
    def _prompt(cls, value) -> list[str | list[int]]:
        def token_ids(v):
            return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)

        if value is None:  # the spec's default, <|endoftext|>: the start of a new document
            return ['']
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and value:
            if all(isinstance(v, str) for v in value):
                return value
            if token_ids(value):
                return [value]
            if all(token_ids(v) for v in value):
                return value
        raise ValueError('must be a string, a list of strings, a list of token ids or a list of lists of token ids')


class TextPart(_Strict):
    type: Literal['text']
    text: str


class RefusalPart(_Strict):  # in an assistant's message: its earlier refusal, read as text
    type: Literal['refusal']
    refusal: str


class ChatMessage(_Strict):
    role: Literal['system', 'developer', 'user', 'assistant']
    content: str | list[TextPart | RefusalPart] | None = None  # null only in an assistant's message
    name: str | None = None  # accepted; DBRX's ChatML template has no place for it
    refusal: str | None = None  # an assistant's earlier refusal: its text when it has no content
    # An earlier reply appended as it came back carries these, null (audio and annotations are newer
    # API versions' fields, which the openai client sends too); tool calls and audio are unsupported.
    tool_calls: list | None = None
    function_call: dict | None = None
    audio: dict | None = None
    annotations: list | None = None  # a reply's citations: nothing for the prompt

    @model_validator(mode='after')
    def _content_required(self):
        if self.content is None and self.role != 'assistant':
            raise ValueError(f'a {self.role} message needs content')
        return self

    @field_validator('content', mode='before')
    @classmethod
    def _text_only(cls, value):
        for part in value if isinstance(value, list) else []:
            kind = part.get('type') if isinstance(part, dict) else None
            if isinstance(kind, str) and kind not in ('text', 'refusal'):
                raise ValueError(f'content parts of type {kind!r} are not supported: this model reads text only')
        return value

    def chatml(self) -> tuple[str, str]:
        """(role, text) for the ChatML prompt; OpenAI's `developer` messages are system messages."""
        if self.content is None:
            text = self.refusal or ''
        else:
            text = self.content if isinstance(self.content, str) else ''.join(
                p.text if isinstance(p, TextPart) else p.refusal for p in self.content)
        return ('system' if self.role == 'developer' else self.role), text


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    service_tier: str | None = None  # one tier here
    # Features this server lacks, accepted at their no-op values.
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    functions: list | None = None
    function_call: str | dict | None = None

    def unsupported(self) -> Iterator[tuple[str, str]]:
        tools = 'tool calls are not supported: this server generates text only'
        for param in ('tools', 'functions'):
            if getattr(self, param):
                yield param, tools
        for param in ('tool_choice', 'function_call'):
            if getattr(self, param) not in (None, 'none', 'auto'):
                yield param, tools
        if (self.response_format or {}).get('type', 'text') != 'text':
            yield 'response_format', "response formats but {'type': 'text'} are not supported: the output is free text"
        for i, message in enumerate(self.messages):
            if message.tool_calls or message.function_call:
                yield f'messages.{i}.tool_calls', tools
            if message.audio:
                yield f'messages.{i}.audio', 'audio is not supported: this model reads text only'


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True  # DBRX adds no special tokens either way


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


class Reply:
    """The envelope of a completion: id, timestamps, usage."""

    def __init__(self, id_prefix: str, kind: str, model: str, prompt_tokens: int):
        self.id = f'{id_prefix}-{uuid.uuid4().hex}'
        self.kind, self.model, self.created = kind, model, int(time.time())
        self.prompt_tokens, self.completion_tokens = prompt_tokens, 0

    def count(self, out: Output) -> None:
        self.completion_tokens += len(out.token_ids)

    def usage(self) -> dict:
        return {'prompt_tokens': self.prompt_tokens, 'completion_tokens': self.completion_tokens,
                'total_tokens': self.prompt_tokens + self.completion_tokens}

    def body(self, choices: list[dict]) -> dict:
        return {'id': self.id, 'object': self.kind, 'created': self.created, 'model': self.model,
                'choices': choices, 'usage': self.usage()}

    def chunk(self, choices: list[dict], usage: bool = False) -> dict:
        kind = 'chat.completion.chunk' if self.kind == 'chat.completion' else self.kind
        return {'id': self.id, 'object': kind, 'created': self.created, 'model': self.model, 'choices': choices,
                **({'usage': self.usage()} if usage else {})}
