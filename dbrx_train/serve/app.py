"""The OpenAI-compatible HTTP API (FastAPI): request schemas, routes, errors.

`create_app(model, tokenizer, config)` serves `/v1/completions`, `/v1/chat/completions`,
`/v1/models` (and `/v1/models/{model}`) and `/health`, plus vLLM's `/tokenize`, `/detokenize` and
`/tokenizer_info`, which lm-eval's `local-completions` uses as its tokenizer when they are there.
Replies follow the official OpenAI OpenAPI spec (tests/serve/openai_openapi_2.3.0.yaml): every
error, FastAPI's own included, is its `ErrorResponse` `{"error": {"message", "type", "param",
"code"}}` (`code` one of OpenAI's strings, or null), with a 4xx status for bad input."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from pathlib import PurePath
from typing import Annotated, Any, AsyncIterator, Iterator, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.background import BackgroundTask
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from dbrx_train.serve.config import ServeConfig
from dbrx_train.serve.engine import Engine, Output, SamplingParams, TokenLogprob
from dbrx_train.serve.text import TextCodec, chatml_prompt
from dbrx_train.tokenizer import CHATML_TEMPLATE, EOS_ID, EOS_TOKEN, IM_END_ID, PAD_TOKEN, STOP_TOKEN_IDS

# How often a request waiting on the engine checks that its client is still there.
DISCONNECT_POLL_S = 0.5


class ApiError(Exception):
    """An error reply: `kind` is OpenAI's error `type`, `code` one of OpenAI's error codes or None."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = 'invalid_request_error',
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    @classmethod
    def invalid(cls, message: str, param: str) -> 'ApiError':
        """A 400 for a bad value of request parameter `param`."""
        return cls(400, message, param, code='invalid_value')

    def body(self) -> dict:
        return {'error': {'message': self.message, 'type': self.kind, 'param': self.param, 'code': self.code}}

    def response(self, headers=None) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers)


def _validation_code(error_type: str) -> str:
    """OpenAI's error code for a pydantic error type."""
    if error_type == 'missing':
        return 'missing_required_parameter'
    if error_type == 'extra_forbidden':
        return 'unknown_parameter'
    return 'invalid_type' if error_type.endswith('_type') else 'invalid_value'


class BodyLimit:
    """Refuses a request body over `max_bytes` with 413, whether it declares its length or not.
    (FastAPI's own `max_body_size` answers a declared oversize body in plain text, not JSON.)"""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope['type'] != 'http':
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get('content-length', '')
        too_large = HTTPException(413, f'the request body is over the limit of {self.max_bytes} bytes')
        received = 0

        async def limited_receive():
            nonlocal received
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise too_large  # unread
            message = await receive()
            received += len(message.get('body', b''))
            if received > self.max_bytes:
                raise too_large
            return message

        await self.app(scope, limited_receive, send)


# Request schemas. Unknown fields are errors: a typo must not silently fall back to a default.


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


class _SamplingFields(_Strict):
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


class CompletionRequest(_SamplingFields):
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


class ChatRequest(_SamplingFields):
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


# The app.


def create_app(model, tokenizer, config: ServeConfig = ServeConfig()) -> FastAPI:
    """An app serving `model` (a `DbrxLM` in eval mode) with `tokenizer` (the tiktoken encoding of
    `dbrx_train.tokenizer.get_encoding()`). The engine thread runs while the app does."""
    codec = TextCodec(tokenizer)
    engine = Engine(model, codec, config.max_batch_size, config.prefill_chunk)
    api = _Api(engine, codec, config, model.config.max_seq_len, model.config.vocab_size)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title='dbrx_train', lifespan=lifespan, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=config.max_request_bytes)
    app.state.engine = engine
    bearer = HTTPBearer(auto_error=False)

    def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if config.api_key is None:
            return
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), config.api_key.encode()):
            raise ApiError(401, 'missing or wrong API key (send Authorization: Bearer <key>)',
                           kind='authentication_error', code='invalid_api_key')

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, e: RequestValidationError):
        first = e.errors()[0]
        if first['type'] == 'json_invalid':
            return ApiError(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}").response()
        where = '.'.join(str(part) for part in first['loc'][1:])
        if not where:
            return ApiError(400, 'the request body must be a JSON object (Content-Type: application/json)',
                            code='invalid_type').response()
        message = 'unknown field' if first['type'] == 'extra_forbidden' else first['msg'].removeprefix('Value error, ')
        return ApiError(400, f'{where}: {message}', where, code=_validation_code(first['type'])).response()

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):  # Starlette's own: 404 and 405 routes, 413
        return ApiError(e.status_code, str(e.detail)).response(e.headers)

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        return ApiError(500, f'internal error: {type(e).__name__}: {e}', kind='server_error').response()

    @app.get('/health')
    async def health():
        if not engine.alive:
            return ApiError(503, 'the generation engine is not running', kind='server_error').response()
        return {'status': 'ok', **engine.status()}

    @app.get('/v1/models', dependencies=[Depends(authorized)])
    async def models():
        return {'object': 'list', 'data': [api.model_card()]}

    @app.get('/v1/models/{name:path}', dependencies=[Depends(authorized)])
    async def model(name: str):
        api.check_model(name)
        return api.model_card()

    @app.post('/v1/completions', dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request):
        return await api.completions(body, request)

    @app.post('/v1/chat/completions', dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatRequest, request: Request):
        return await api.chat(body, request)

    @app.post('/tokenize', dependencies=[Depends(authorized)])
    async def tokenize(body: TokenizeRequest):
        api.check_model(body.model)
        tokens = codec.encode(body.prompt)
        return {'tokens': tokens, 'count': len(tokens), 'max_model_len': api.context}

    @app.post('/detokenize', dependencies=[Depends(authorized)])
    async def detokenize(body: DetokenizeRequest):
        api.check_model(body.model)
        api.check_token_ids(body.tokens, 'tokens')
        return {'prompt': codec.decode(body.tokens)}

    @app.get('/tokenizer_info', dependencies=[Depends(authorized)])
    async def tokenizer_info():
        return {'tokenizer_class': 'tiktoken', 'eos_token': EOS_TOKEN, 'bos_token': None, 'pad_token': PAD_TOKEN,
                'chat_template': CHATML_TEMPLATE, 'model_max_length': api.context}

    return app


class _Api:
    """What the routes do, with the engine, the tokenizer and the limits."""

    def __init__(self, engine: Engine, codec: TextCodec, config: ServeConfig, context: int, vocab_size: int):
        self.engine, self.codec, self.config = engine, codec, config
        self.context, self.vocab_size = context, vocab_size
        self.name = config.model_name or (config.checkpoint and PurePath(config.checkpoint).name) or 'dbrx'
        self.created = int(time.time())
        self.in_flight = 0

    def model_card(self) -> dict:
        return {'id': self.name, 'object': 'model', 'created': self.created, 'owned_by': 'dbrx_train',
                'max_model_len': self.context}

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.name:
            raise ApiError(404, f'model {name!r} does not exist; this server serves {self.name!r}', 'model',
                           code='model_not_found')

    def check_token_ids(self, ids: list[int], param: str) -> None:
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ApiError.invalid(f'token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})', param)

    # /v1/completions

    async def completions(self, body: CompletionRequest, request: Request):
        self._check_common(body)
        if body.max_tokens == 0 and not body.echo:
            raise ApiError.invalid('max_tokens must be at least 1 (0 only scores the prompt, with echo)', 'max_tokens')
        self._check_logprobs(body.logprobs, 'logprobs')
        prompts = []  # (text, ids)
        for item in body.prompt:
            if isinstance(item, str):
                prompts.append((item, self.codec.encode(item) or [EOS_ID]))  # empty: start a new document
            else:
                self.check_token_ids(item, 'prompt')
                prompts.append((self.codec.decode(item), item))
        seqs, echo, offsets = [], {}, {}
        for i, (text, ids) in enumerate(prompts):
            params = self._params(body, ids, body.max_tokens, STOP_TOKEN_IDS, logprobs=body.logprobs,
                                  prompt_logprobs=body.echo and body.logprobs is not None)
            for c in range(body.n):
                index = i * body.n + c  # OpenAI's order: the n choices of prompt 0, then of prompt 1...
                seqs.append((ids, params, index))
                echo[index] = text if body.echo else ''
                offsets[index] = 0 if body.echo else len(text)
        reply = _Reply('cmpl', 'text_completion', self.name, sum(len(ids) for _, ids in prompts))

        def choice(out: Output, first: bool) -> dict:
            logprobs = None
            if body.logprobs is not None:
                scored = (out.prompt_logprobs or []) if first else []
                logprobs = self._completion_logprobs(scored + (out.logprobs or []), offsets, out.index)
            return {'index': out.index, 'text': (echo[out.index] if first else '') + out.text, 'logprobs': logprobs,
                    'finish_reason': out.finish_reason}

        return await self._respond(request, body, seqs, reply, choice, _merge_completion_choice)

    def _completion_logprobs(self, entries: list[TokenLogprob], offsets: dict[int, int], index: int) -> dict:
        tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
        for entry in entries:
            tokens.append(self.codec.token_str(entry.token))
            token_logprobs.append(entry.logprob)
            top = None
            if entry.logprob is not None:
                # The chosen token first, so a top entry of the same text (a higher logprob) wins.
                top = {tokens[-1]: entry.logprob}
                top.update((self.codec.token_str(t), lp) for t, lp in entry.top)
            top_logprobs.append(top)
            text_offset.append(offsets[index])
            offsets[index] += len(tokens[-1])
        return {'tokens': tokens, 'token_logprobs': token_logprobs, 'top_logprobs': top_logprobs,
                'text_offset': text_offset}

    # /v1/chat/completions

    async def chat(self, body: ChatRequest, request: Request):
        self._check_common(body)
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise ApiError.invalid('give max_tokens or max_completion_tokens, not both', 'max_tokens')
        if body.max_tokens == 0:
            raise ApiError.invalid('max_tokens must be at least 1', 'max_tokens')
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError.invalid('top_logprobs needs logprobs: true', 'top_logprobs')
        self._check_logprobs(body.top_logprobs, 'top_logprobs')
        ids = chatml_prompt(self.codec, [m.chatml() for m in body.messages])
        # Without a limit an answer may run to the end of the context, as with OpenAI.
        limit = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
        params = self._params(body, ids, limit, (IM_END_ID, EOS_ID), logprobs=(body.top_logprobs or 0)
                              if body.logprobs else None, default_max_tokens=self.context - len(ids))
        seqs = [(ids, params, c) for c in range(body.n)]
        reply = _Reply('chatcmpl', 'chat.completion', self.name, len(ids))

        def choice(out: Output, first: bool) -> dict:
            logprobs = None
            if body.logprobs:
                logprobs = {'content': [self._chat_logprob(e) for e in out.logprobs], 'refusal': None}
            if body.stream:
                delta = {'role': 'assistant', 'content': out.text} if first else {'content': out.text}
                return {'index': out.index, 'delta': delta, 'logprobs': logprobs, 'finish_reason': out.finish_reason}
            return {'index': out.index, 'message': {'role': 'assistant', 'content': out.text, 'refusal': None},
                    'logprobs': logprobs, 'finish_reason': out.finish_reason}

        return await self._respond(request, body, seqs, reply, choice, _merge_chat_choice)

    def _chat_logprob(self, entry: TokenLogprob) -> dict:
        def item(token: int, logprob: float) -> dict:
            raw = self.codec.token_bytes(token)
            return {'token': raw.decode('utf-8', errors='replace'), 'logprob': logprob, 'bytes': list(raw)}

        return {**item(entry.token, entry.logprob), 'top_logprobs': [item(t, lp) for t, lp in entry.top]}

    # Shared by both.

    def _check_common(self, body: _SamplingFields) -> None:
        self.check_model(body.model)
        unsupported = next(body.unsupported(), None)
        if unsupported is not None:
            param, why = unsupported
            raise ApiError.invalid(why, param)
        if body.logit_bias:
            self.check_token_ids([int(token) for token in body.logit_bias], 'logit_bias')
        if body.n > self.config.max_n:
            raise ApiError.invalid(f'n is at most {self.config.max_n}, got {body.n}', 'n')
        if len(body.stop) > self.config.max_stop_strings:
            raise ApiError.invalid(f'at most {self.config.max_stop_strings} stop strings, got {len(body.stop)}', 'stop')

    def _check_logprobs(self, value: int | None, param: str) -> None:
        if value is not None and value > self.config.max_logprobs:
            raise ApiError.invalid(f'{param} is at most {self.config.max_logprobs}, got {value}', param)

    def _params(self, body: _SamplingFields, ids: list[int], max_tokens: int | None, stops: tuple[int, ...],
                logprobs: int | None, prompt_logprobs: bool = False,
                default_max_tokens: int | None = None) -> SamplingParams:
        room = self.context - len(ids)
        if room <= 0:
            raise ApiError(400, f'the prompt is {len(ids)} tokens; the context holds {self.context}', 'prompt',
                           code='context_length_exceeded')
        if max_tokens is None:
            max_tokens = min(room, default_max_tokens or self.config.default_max_tokens)
        elif max_tokens > room:
            raise ApiError(400, f'the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the '
                                f'context ({self.context} tokens)', 'max_tokens', code='context_length_exceeded')
        return SamplingParams(max_tokens=max_tokens, temperature=0.0 if body.top_p == 0 else body.temperature,
                              top_p=body.top_p, top_k=body.top_k, seed=body.seed, stop=body.stop,
                              stop_token_ids=() if body.ignore_eos else stops, logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs,
                              logit_bias=tuple((int(t), b) for t, b in (body.logit_bias or {}).items()),
                              presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty)

    async def _respond(self, request: Request, body: _SamplingFields, seqs, reply: _Reply, choice, merge):
        """Runs the sequences; the reply is one JSON body, or server-sent events when streaming."""
        slot = self._take_slot()
        outputs = self._outputs(request, seqs)
        if not body.stream:
            try:
                choices: dict[int, dict] = {}
                async for out in outputs:
                    reply.count(out)
                    merge(choices, choice(out, out.index not in choices))
                return reply.body([choices[i] for i in sorted(choices)])
            finally:
                slot()
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        async def events() -> AsyncIterator[str]:
            started: set[int] = set()
            try:
                async for out in outputs:
                    reply.count(out)
                    yield _sse(reply.chunk([choice(out, out.index not in started)]))
                    started.add(out.index)
                if include_usage:
                    yield _sse(reply.chunk([], usage=True))
            except ApiError as e:  # the status line went out already: say it in the stream
                yield _sse(e.body())
            finally:
                await outputs.aclose()
                slot()
            yield 'data: [DONE]\n\n'

        # The background task frees the slot also when the stream never started (client gone).
        return StreamingResponse(events(), media_type='text/event-stream', headers={'Cache-Control': 'no-cache'},
                                 background=BackgroundTask(slot))

    def _take_slot(self):
        """Counts a request in flight, or refuses it (429); returns the (idempotent) release."""
        if self.in_flight >= self.config.max_concurrent_requests:
            raise ApiError(429, f'the server is busy ({self.config.max_concurrent_requests} requests in flight); '
                                'retry later', kind='rate_limit_error', code='rate_limit_exceeded')
        self.in_flight += 1
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self.in_flight -= 1

        return release

    async def _outputs(self, request: Request, seqs) -> AsyncIterator[Output]:
        """Submits the sequences and yields their outputs until all have finished. Leaving early
        (the client went away, the stream was closed) cancels what is still running."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[Output] = asyncio.Queue()

        def sink(out: Output) -> None:
            loop.call_soon_threadsafe(outputs.put_nowait, out)

        ids = [self.engine.submit(prompt, params, sink, index) for prompt, params, index in seqs]
        running = len(seqs)
        try:
            while running:
                try:
                    out = await asyncio.wait_for(outputs.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if out.error is not None:
                    raise ApiError(500, f'generation failed: {out.error}', kind='server_error')
                running -= out.finish_reason is not None
                yield out
        finally:
            self.engine.cancel(ids)


class _Reply:
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


def _merge_completion_choice(choices: dict[int, dict], new: dict) -> None:
    old = choices.setdefault(new['index'], new)
    if old is new:
        return
    old['text'] += new['text']
    old['finish_reason'] = new['finish_reason']
    if new['logprobs'] is not None:
        for key, values in new['logprobs'].items():
            old['logprobs'][key] += values


def _merge_chat_choice(choices: dict[int, dict], new: dict) -> None:
    old = choices.setdefault(new['index'], new)
    if old is new:
        return
    old['message']['content'] += new['message']['content']
    old['finish_reason'] = new['finish_reason']
    if new['logprobs'] is not None:
        old['logprobs']['content'] += new['logprobs']['content']


def _sse(payload: dict) -> str:
    return f'data: {json.dumps(payload, ensure_ascii=False)}\n\n'

