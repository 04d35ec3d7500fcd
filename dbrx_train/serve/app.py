"""The OpenAI-compatible HTTP API (FastAPI): its routes and what they do.

`create_app(model, tokenizer, config)` serves `/v1/completions`, `/v1/chat/completions`,
`/v1/models` (and `/v1/models/{model}`) and `/health`, plus vLLM's `/tokenize`, `/detokenize` and
`/tokenizer_info`, which lm-eval's `local-completions` uses as its tokenizer when they are there.
Replies follow the official OpenAI OpenAPI spec (tests/serve/openai_openapi_2.3.0.yaml): every
error, FastAPI's own included, is its `ErrorResponse` `{"error": {"message", "type", "param",
"code"}}` (`code` one of OpenAI's strings, or null), with a 4xx status for bad input.

    protocol.py   request schemas and the reply envelope
    errors.py     ApiError, the mapping of validation errors, the body limit
    app.py        the routes, and `OpenAIService`: what they do with the engine and the tokenizer
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import PurePath
from typing import AsyncIterator, Protocol

from fastapi import Depends, FastAPI, Request
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.background import BackgroundTask

from dbrx_train.chat_template import TEMPLATES
from dbrx_train.serve.config import ServeConfig
from dbrx_train.serve.engine import Engine, Output, SamplingParams, TokenLogprob
from dbrx_train.serve.errors import ApiError, BodyLimit, add_error_handlers
from dbrx_train.serve.protocol import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    Reply,
    SamplingFields,
    TokenizeRequest,
)
from dbrx_train.serve.text import TextCodec, chat_prompt
from dbrx_train.tokenizer import EOS_ID, EOS_TOKEN, IM_END_ID, PAD_TOKEN, STOP_TOKEN_IDS

# How often a request waiting on the engine checks that its client is still there.
DISCONNECT_POLL_S = 0.5


def create_app(model, tokenizer, config: ServeConfig = ServeConfig()) -> FastAPI:
    """An app serving `model` (a `DbrxLM` in eval mode) with `tokenizer` (the tiktoken encoding of
    `dbrx_train.tokenizer.get_encoding()`). The engine thread runs while the app does."""
    codec = TextCodec(tokenizer)
    engine = Engine(model, codec, config.max_batch_size, config.prefill_chunk, {} if config.compile else None)
    api = OpenAIService(engine, codec, config, model.config.max_seq_len, model.config.vocab_size)

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

    add_error_handlers(app)

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
                'chat_template': TEMPLATES[config.chat_template], 'model_max_length': api.context}

    return app


@dataclass(frozen=True)
class ChoiceRequest:
    """One choice of a reply to generate: the engine's sequence for it."""

    prompt: list[int]
    params: SamplingParams
    index: int  # its place among the reply's choices


class ChoiceFormat(Protocol):
    """How an endpoint turns the engine's outputs into its reply's choices."""

    def render(self, out: Output, first: bool) -> dict:
        """The choice (or streamed chunk) of one output; `first`: its choice's first output."""

    def merge(self, choices: dict[int, dict], new: dict) -> None:
        """Adds a rendered output to the choices of a whole (non-streamed) reply, by index."""


class OpenAIService:
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
        choices, format = [], CompletionChoices(self.codec, body)
        for i, (text, ids) in enumerate(prompts):
            params = self._params(body, ids, body.max_tokens, STOP_TOKEN_IDS, logprobs=body.logprobs,
                                  prompt_logprobs=body.echo and body.logprobs is not None)
            for c in range(body.n):
                index = i * body.n + c  # OpenAI's order: the n choices of prompt 0, then of prompt 1...
                choices.append(ChoiceRequest(ids, params, index))
                format.add_prompt(index, text)
        reply = Reply('cmpl', 'text_completion', self.name, sum(len(ids) for _, ids in prompts))
        return await self._respond(request, body, choices, reply, format)

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
        ids = chat_prompt(self.codec, [m.chatml() for m in body.messages], self.config.chat_template)
        # Without a limit an answer may run to the end of the context, as with OpenAI.
        limit = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
        params = self._params(body, ids, limit, (IM_END_ID, EOS_ID), logprobs=(body.top_logprobs or 0)
                              if body.logprobs else None, default_max_tokens=self.context - len(ids))
        choices = [ChoiceRequest(ids, params, c) for c in range(body.n)]
        reply = Reply('chatcmpl', 'chat.completion', self.name, len(ids))
        return await self._respond(request, body, choices, reply, ChatChoices(self.codec, body))

    # Shared by both.

    def _check_common(self, body: SamplingFields) -> None:
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

    def _params(self, body: SamplingFields, ids: list[int], max_tokens: int | None, stops: tuple[int, ...],
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

    async def _respond(self, request: Request, body: SamplingFields, choices: list[ChoiceRequest], reply: Reply,
                       format: ChoiceFormat):
        """Generates the choices; the reply is one JSON body, or server-sent events when streaming."""
        slot = self._take_slot()
        outputs = self._outputs(request, choices)
        if not body.stream:
            try:
                merged: dict[int, dict] = {}
                async for out in outputs:
                    reply.count(out)
                    format.merge(merged, format.render(out, out.index not in merged))
                return reply.body([merged[i] for i in sorted(merged)])
            finally:
                slot()
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        async def events() -> AsyncIterator[str]:
            started: set[int] = set()
            try:
                async for out in outputs:
                    reply.count(out)
                    yield _sse(reply.chunk([format.render(out, out.index not in started)]))
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

    async def _outputs(self, request: Request, choices: list[ChoiceRequest]) -> AsyncIterator[Output]:
        """Submits the choices and yields their outputs until all have finished. Leaving early
        (the client went away, the stream was closed) cancels what is still running."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[Output] = asyncio.Queue()

        def sink(out: Output) -> None:
            loop.call_soon_threadsafe(outputs.put_nowait, out)

        ids = [self.engine.submit(c.prompt, c.params, sink, c.index) for c in choices]
        running = len(choices)
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


class CompletionChoices:
    """`/v1/completions` choices: text (after the echoed prompt) and the legacy logprobs object."""

    def __init__(self, codec: TextCodec, body: CompletionRequest):
        self.codec, self.body = codec, body
        self.echo: dict[int, str] = {}  # choice index -> the prompt text its first output starts with
        self.offsets: dict[int, int] = {}  # choice index -> text offset of its next token

    def add_prompt(self, index: int, text: str) -> None:
        self.echo[index] = text if self.body.echo else ''
        self.offsets[index] = 0 if self.body.echo else len(text)

    def render(self, out: Output, first: bool) -> dict:
        logprobs = None
        if self.body.logprobs is not None:
            scored = (out.prompt_logprobs or []) if first else []
            logprobs = self._logprobs(scored + (out.logprobs or []), out.index)
        return {'index': out.index, 'text': (self.echo[out.index] if first else '') + out.text, 'logprobs': logprobs,
                'finish_reason': out.finish_reason}

    def _logprobs(self, entries: list[TokenLogprob], index: int) -> dict:
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
            text_offset.append(self.offsets[index])
            self.offsets[index] += len(tokens[-1])
        return {'tokens': tokens, 'token_logprobs': token_logprobs, 'top_logprobs': top_logprobs,
                'text_offset': text_offset}

    def merge(self, choices: dict[int, dict], new: dict) -> None:
        old = choices.setdefault(new['index'], new)
        if old is new:
            return
        old['text'] += new['text']
        old['finish_reason'] = new['finish_reason']
        if new['logprobs'] is not None:
            for key, values in new['logprobs'].items():
                old['logprobs'][key] += values


class ChatChoices:
    """`/v1/chat/completions` choices: an assistant message (a delta when streaming) and its logprobs."""

    def __init__(self, codec: TextCodec, body: ChatRequest):
        self.codec, self.body = codec, body

    def render(self, out: Output, first: bool) -> dict:
        logprobs = None
        if self.body.logprobs:
            logprobs = {'content': [self._logprob(e) for e in out.logprobs], 'refusal': None}
        if self.body.stream:
            delta = {'role': 'assistant', 'content': out.text} if first else {'content': out.text}
            return {'index': out.index, 'delta': delta, 'logprobs': logprobs, 'finish_reason': out.finish_reason}
        return {'index': out.index, 'message': {'role': 'assistant', 'content': out.text, 'refusal': None},
                'logprobs': logprobs, 'finish_reason': out.finish_reason}

    def _logprob(self, entry: TokenLogprob) -> dict:
        def item(token: int, logprob: float) -> dict:
            raw = self.codec.token_bytes(token)
            return {'token': raw.decode('utf-8', errors='replace'), 'logprob': logprob, 'bytes': list(raw)}

        return {**item(entry.token, entry.logprob), 'top_logprobs': [item(t, lp) for t, lp in entry.top]}

    def merge(self, choices: dict[int, dict], new: dict) -> None:
        old = choices.setdefault(new['index'], new)
        if old is new:
            return
        old['message']['content'] += new['message']['content']
        old['finish_reason'] = new['finish_reason']
        if new['logprobs'] is not None:
            old['logprobs']['content'] += new['logprobs']['content']


def _sse(payload: dict) -> str:
    return f'data: {json.dumps(payload, ensure_ascii=False)}\n\n'

