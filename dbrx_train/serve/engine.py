"""The generation engine: one thread owns the model and advances every running sequence at once.

Sequences wait in a queue. Each step admits as many as there are free rows (their prompts are
prefilled together, left-padded), then feeds every running row its last token (continuous
batching: a row joins or leaves between any two steps). Requests that arrive together (within
`ARRIVAL_WINDOW_S` of each other while the engine is idle) are admitted together, so their
prompts share one prefill; a prompt longer than `prefill_chunk` tokens is prefilled in chunks
with a decoding step of the running rows after each, so a long prompt does not stall them. All rows share one `KVCache`, right-aligned:
a row's padding sits on its left and the attention mask hides it, so rows of any length decode
together. Finished rows leave and the cache is repacked, so its width stays the longest live row.

Results go to each sequence's `sink` (called on the engine thread) as `Output`s, one per token.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import nn

from dbrx_train.model.config import ModelConfig
from dbrx_train.model.decode import DecodeStep, bucket_length
from dbrx_train.model.generation import KVCache, adjust_logits, sample_next
from dbrx_train.serve.text import TextCodec, TextStream

log = logging.getLogger(__name__)

# Positions scored per LM-head call when a prompt's own tokens are scored: bounds the
# (positions, vocab) float32 logits that exist at once.
PROMPT_SCORE_CHUNK = 256
# How long an idle engine waits for the next of a burst of requests before it prefills them:
# clients that send at the same moment reach the engine a few milliseconds apart.
ARRIVAL_WINDOW_S = 0.005


@runtime_checkable
class ServableModel(Protocol):
    """What the engine uses of a model. `DbrxLM`, float or quantized (int8, int4), is one; another
    backend (Megablocks) fits if it has these."""

    config: ModelConfig  # layers, heads and context: the KV cache's shape
    wte: nn.Embedding  # its weight's dtype and device are the KV cache's
    lm_head: nn.Module  # hidden states -> logits; `lm_head.weight` `(vocab, d_model)`

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      kv_cache: KVCache | None = None) -> tuple[torch.Tensor, list]:
        """Final-norm hidden states `(batch, seq, d_model)` (and per-layer router stats)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int  # 0 only scores the prompt
    temperature: float = 1.0  # 0 is greedy
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # None: no logprobs; k: each token's logprob and the k likeliest
    prompt_logprobs: bool = False  # also score the prompt's own tokens (OpenAI's echo)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, bias) pairs added to the logits before choosing
    presence_penalty: float = 0.0  # OpenAI's penalties on tokens already generated
    frequency_penalty: float = 0.0


@dataclass
class TokenLogprob:
    token: int
    logprob: float | None  # None for a prompt's first token: nothing comes before it
    top: list[tuple[int, float]]  # the likeliest tokens at this position, best first


@dataclass
class Output:
    """What one step produced for one sequence."""

    index: int  # the caller's label for the sequence (choice index)
    text: str = ''  # text that became final this step
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # on the first output, with prompt_logprobs
    finish_reason: str | None = None  # 'stop', 'length' or 'error' on the last output
    error: str | None = None


@dataclass(eq=False)
class _Sequence:
    id: int
    index: int
    prompt: list[int]
    params: SamplingParams
    sink: Callable[[Output], None]
    stream: TextStream
    generator: torch.Generator | None
    generated: int = 0
    last_token: int = -1
    finished: bool = False
    bias: torch.Tensor | None = None  # (vocab,) logit_bias, when given
    counts: torch.Tensor | None = None  # (vocab,) times each token was generated, when penalized


@dataclass
class _BatchPart:
    """Rows on their way into the running batch: a prefill's (or the running batch's) cache and
    mask, the sequences of its rows, and which of them keep running."""

    cache: KVCache
    mask: torch.Tensor  # (rows, cache.length) bool: real tokens
    keep: list[int]
    seqs: list[_Sequence]


class Engine:
    """`compile`: torch.compile's options (`{}`: its defaults) for the decoding steps
    (`dbrx_train.model.decode`: static-shape cache, compiled once per shape bucket), or None (eager)."""

    def __init__(self, model: ServableModel, codec: TextCodec, max_batch_size: int = 16, prefill_chunk: int = 512,
                 compile: dict | None = None):
        if not isinstance(model, ServableModel):
            raise TypeError(f'{type(model).__name__} cannot be served: it lacks what ServableModel names')
        self.model = model
        self.decode_step = DecodeStep(model, compile) if compile is not None else None
        self.codec = codec
        self.max_batch_size = max_batch_size
        self.prefill_chunk = prefill_chunk
        self.device = model.lm_head.weight.device
        self._inbox: queue.Queue[_Sequence | None] = queue.Queue()
        self._waiting: list[_Sequence] = []
        self._rows: list[_Sequence] = []
        self._cache: KVCache | None = None
        self._mask: torch.Tensor | None = None  # (rows, cache.length) bool: real tokens
        self._cancelled: set[int] = set()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self.peak_batch = 0  # the most rows one decoding step has run

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> dict[str, int]:
        return {'running': len(self._rows), 'waiting': len(self._waiting) + self._inbox.qsize(),
                'peak_batch': self.peak_batch}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name='dbrx-serve-engine', daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._inbox.put(None)
            self._thread.join()
            self._thread = None

    def submit(self, prompt: list[int], params: SamplingParams, sink: Callable[[Output], None], index: int = 0) -> int:
        """Queues one sequence; returns its id (for `cancel`). `prompt` must fit the context."""
        if not prompt:
            raise ValueError('a prompt needs at least one token')
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device=self.device)
            if params.seed is None:
                generator.seed()
            else:
                generator.manual_seed(params.seed + index)
        bias, counts = self._logit_adjustments(params)
        seq = _Sequence(next(self._ids), index, list(prompt), params, sink, TextStream(self.codec, params.stop),
                        generator, bias=bias, counts=counts)
        self._inbox.put(seq)
        return seq.id

    def _logit_adjustments(self, params: SamplingParams):
        """The sequence's dense logit bias and token counts, each only when it needs one."""
        vocab = self.model.lm_head.weight.shape[0]
        bias = counts = None
        if params.logit_bias:
            tokens, values = zip(*params.logit_bias)
            bias = torch.zeros(vocab, device=self.device)
            bias[list(tokens)] = torch.tensor(values, device=self.device)
        if params.presence_penalty or params.frequency_penalty:
            counts = torch.zeros(vocab, device=self.device)
        return bias, counts

    def cancel(self, ids) -> None:
        """Drops sequences (a client went away); unknown or finished ids are ignored."""
        with self._lock:
            self._cancelled.update(ids)

    # The engine thread.

    def _run(self) -> None:
        with torch.inference_mode():
            while self._take_inbox(block=not self._rows and not self._waiting):
                self._drop_cancelled()
                free = self.max_batch_size - len(self._rows)
                admitted, self._waiting = self._waiting[:free], self._waiting[free:]
                if admitted:
                    self._step(self._prefill, admitted)
                if self._rows:
                    self._step(self._decode, self._rows)

    def _step(self, step, seqs: list[_Sequence]) -> None:
        try:
            step(seqs)
        except Exception as e:  # keep serving: fail these sequences, not the server
            log.exception('generation step failed')
            self._fail(seqs, f'{type(e).__name__}: {e}')

    def _take_inbox(self, block: bool) -> bool:
        """Moves submitted sequences to the waiting list; False once `stop()` was called. When
        idle (`block`), it also takes whatever arrives within `ARRIVAL_WINDOW_S` of the last one."""
        try:
            item = self._inbox.get(block=block)
            while True:
                if item is None:
                    return False
                self._waiting.append(item)
                item = self._inbox.get(timeout=ARRIVAL_WINDOW_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True

    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
        if not cancelled:
            return
        self._waiting = [s for s in self._waiting if s.id not in cancelled]
        if any(s.id in cancelled for s in self._rows):
            for s in self._rows:
                s.finished = s.finished or s.id in cancelled
            self._repack([])

    def _prefill(self, seqs: list[_Sequence]) -> None:
        """Runs the new prompts, emits each one's first token and moves the rows still running
        into the batch. Prompts are prefilled in groups of similar length (the longest at most
        twice the shortest), so a long prompt does not pad many short ones to its length."""
        parts, group = [], []
        for s in sorted(seqs, key=lambda s: len(s.prompt)):
            if group and len(s.prompt) > 2 * len(group[0].prompt):
                parts.append(self._prefill_group(group))
                group = []
            group.append(s)
        parts.append(self._prefill_group(group))
        self._repack(parts)

    def _prefill_group(self, seqs: list[_Sequence]) -> _BatchPart:
        """One left-padded forward pass over `seqs`' prompts; returns the batch part to repack."""
        width = max(len(s.prompt) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.bool)
        for row, s in enumerate(seqs):
            ids[row, width - len(s.prompt) :] = torch.tensor(s.prompt)
            mask[row, width - len(s.prompt) :] = True
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = KVCache.for_model(self.model, len(seqs), width)
        padded = not bool(mask.all())
        scoring = any(s.params.prompt_logprobs for s in seqs)
        parts = []
        for start in range(0, width, self.prefill_chunk):
            end = min(start + self.prefill_chunk, width)
            hidden, _ = self.model.hidden_states(ids[:, start:end], mask[:, :end] if padded else None, cache)
            parts.append(hidden if scoring or end == width else None)
            if end < width and self._rows:  # the running rows take a step between chunks
                self._step(self._decode, self._rows)
        hidden = torch.cat(parts, dim=1) if scoring else parts[-1]
        prompt_scores = {row: self._score_prompt(hidden[row, width - len(s.prompt) :], s)
                         for row, s in enumerate(seqs) if s.params.prompt_logprobs}
        scoring_only = [row for row, s in enumerate(seqs) if s.params.max_tokens == 0]
        for row in scoring_only:
            self._finish_scoring(seqs[row], prompt_scores.get(row))
        generating = [row for row in range(len(seqs)) if row not in scoring_only]
        if generating:
            logits = self.model.lm_head(hidden[generating, -1])
            self._advance([seqs[row] for row in generating], logits,
                          [prompt_scores.get(row) for row in generating])
        return _BatchPart(cache, mask, [row for row in generating if not seqs[row].finished], seqs)

    def _decode(self, rows: list[_Sequence]) -> None:
        self.peak_batch = max(self.peak_batch, len(rows))
        ids = torch.tensor([[s.last_token] for s in rows], device=self.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
        if self.decode_step is not None:
            logits = self.decode_step(ids, self._cache, self._mask)
        else:
            hidden, _ = self.model.hidden_states(ids, self._mask, self._cache)
            logits = self.model.lm_head(hidden[:, -1])
        self._advance(rows, logits)
        if any(s.finished for s in rows):
            self._repack([])

    def _advance(self, seqs: list[_Sequence], logits: torch.Tensor, prompt_scores=None) -> None:
        """Picks each sequence's next token from its logits `(len(seqs), vocab)` and emits it."""
        tokens = self._choose(seqs, logits)
        for row, s in enumerate(seqs):
            token = tokens[row]
            s.generated += 1
            s.last_token = token
            if s.counts is not None:
                s.counts[token] += 1
            if token in s.params.stop_token_ids:
                reason = 'stop'
            elif s.stream.push(token):
                reason = 'stop'
            elif s.generated >= s.params.max_tokens:
                reason = 'length'
            else:
                reason = None
            s.finished = reason is not None
            logprobs = None
            if s.params.logprobs is not None:
                logprobs = self._logprobs(logits[row : row + 1], [token], s.params.logprobs)
            s.sink(Output(s.index, s.stream.pending(final=s.finished), [token], logprobs,
                          prompt_scores[row] if prompt_scores else None, reason))

    def _choose(self, seqs: list[_Sequence], logits: torch.Tensor) -> list[int]:
        logits = self._adjusted(seqs, logits)
        chosen = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
        greedy = [row for row, s in enumerate(seqs) if s.params.temperature <= 0]
        if greedy:
            chosen[greedy] = logits[greedy].argmax(dim=-1)
        for row, s in enumerate(seqs):
            if s.params.temperature > 0:
                p = s.params
                chosen[row] = sample_next(logits[row : row + 1], p.temperature, p.top_k, p.top_p, s.generator)[0]
        return chosen.tolist()

    @staticmethod
    def _adjusted(seqs: list[_Sequence], logits: torch.Tensor) -> torch.Tensor:
        """The logits tokens are chosen from: each sequence's logit_bias and penalties applied (the
        logprobs reported stay the model's own)."""
        rows = [row for row, s in enumerate(seqs) if s.bias is not None or s.counts is not None]
        if not rows:
            return logits
        adjusted = logits.float().clone()
        for row in rows:
            p = seqs[row].params
            adjusted[row] = adjust_logits(logits[row], seqs[row].bias, seqs[row].counts, p.presence_penalty,
                                          p.frequency_penalty)
        return adjusted

    @staticmethod
    def _logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
        """Each token's logprob under its row of `logits` `(len(tokens), vocab)`, with the `top` likeliest."""
        logprobs = logits.float().log_softmax(dim=-1)
        picked = logprobs.gather(1, torch.tensor(tokens, device=logprobs.device)[:, None])[:, 0].tolist()
        best = logprobs.topk(top, dim=-1) if top else None
        return [TokenLogprob(token, logprob, list(zip(best.indices[i].tolist(), best.values[i].tolist())) if top else [])
                for i, (token, logprob) in enumerate(zip(tokens, picked))]

    def _score_prompt(self, hidden: torch.Tensor, s: _Sequence) -> list[TokenLogprob]:
        """Logprob of every prompt token given the ones before it (none for the first)."""
        scores = [TokenLogprob(s.prompt[0], None, [])]
        for start in range(0, len(s.prompt) - 1, PROMPT_SCORE_CHUNK):
            end = min(start + PROMPT_SCORE_CHUNK, len(s.prompt) - 1)
            scores += self._logprobs(self.model.lm_head(hidden[start:end]), s.prompt[start + 1 : end + 1],
                                     s.params.logprobs or 0)
        return scores

    def _finish_scoring(self, s: _Sequence, prompt_scores) -> None:
        s.finished = True
        s.sink(Output(s.index, prompt_logprobs=prompt_scores, finish_reason='length'))

    def _fail(self, seqs: list[_Sequence], message: str) -> None:
        for s in seqs:
            if not s.finished:
                s.finished = True
                s.sink(Output(s.index, finish_reason='error', error=message))
        self._repack([])

    def _repack(self, new_parts: list[_BatchPart]) -> None:
        """Rebuilds the batch from the unfinished running rows plus `new_parts` (prefills' rows):
        one cache, rows right-aligned, no all-padding columns."""
        parts = []
        if self._rows:
            keep = [row for row, s in enumerate(self._rows) if not s.finished]
            parts.append(_BatchPart(self._cache, self._mask, keep, self._rows))
        parts = [part for part in parts + new_parts if part.keep]
        rows = [part.seqs[row] for part in parts for row in part.keep]
        if not rows:
            self._rows, self._cache, self._mask = [], None, None
            return
        spans = [int(part.mask[part.keep].sum(dim=1).max()) for part in parts]
        width = max(spans)
        room = max(s.params.max_tokens - s.generated for s in rows)
        length = width + room
        if self.decode_step is not None:  # a static shape per bucket: steps do not recompile per request
            length = bucket_length(length, self.model.config.max_seq_len)
        cache = KVCache.for_model(self.model, len(rows), length)
        cache.keys.zero_()  # padding slots are masked, but NaN garbage would still poison attention
        cache.values.zero_()
        cache.length = width
        mask = torch.zeros(len(rows), width, dtype=torch.bool, device=self.device)
        first = 0
        for part, span in zip(parts, spans):
            old = part.cache
            rows_here = slice(first, first + len(part.keep))
            index = torch.tensor(part.keep, device=self.device)
            for new_kv, old_kv in ((cache.keys, old.keys), (cache.values, old.values)):
                new_kv[:, rows_here, :, width - span : width] = old_kv[:, index, :, old.length - span : old.length]
            mask[rows_here, width - span :] = part.mask[index, part.mask.shape[1] - span :]
            first += len(part.keep)
        self._rows, self._cache, self._mask = rows, cache, mask
