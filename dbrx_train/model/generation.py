"""Incremental decoding: a preallocated KV cache and `generate` with greedy or sampled decoding."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from dbrx_train.model.decode import DecodeStep, bucket_length

# DBRX stops on <|endoftext|> (base models) and <|im_end|> (ChatML instruct models).
DEFAULT_STOP_TOKENS = (100257, 100279)


class KVCache:
    """Keys and values of every layer, preallocated to `max_len` positions; `length` are filled."""

    def __init__(self, n_layers: int, batch: int, kv_n_heads: int, head_dim: int, max_len: int, dtype, device):
        shape = (n_layers, batch, kv_n_heads, max_len, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0
        self.max_len = max_len

    @classmethod
    def for_model(cls, model, batch: int, max_len: int) -> 'KVCache':
        cfg = model.config
        param = model.wte.weight
        return cls(cfg.n_layers, batch, cfg.attn_config.kv_n_heads, cfg.head_dim, max_len, param.dtype, param.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f'KV cache holds {self.max_len} positions; {end} were asked for')
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids `(batch,)` from last-position logits `(batch, vocab)`; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float('-inf'))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def adjust_logits(logits: torch.Tensor, bias: torch.Tensor | None = None, counts: torch.Tensor | None = None,
                  presence_penalty: float = 0.0, frequency_penalty: float = 0.0) -> torch.Tensor:
    """OpenAI's logit adjustments on logits `(vocab,)`: `bias` is added, and each token already
    generated `counts[token]` times loses `counts * frequency_penalty + presence_penalty`."""
    logits = logits.float()
    if bias is not None:
        logits = logits + bias
    if counts is not None:
        logits = logits - counts * frequency_penalty - (counts > 0).float() * presence_penalty
    return logits


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, stop_token_ids=DEFAULT_STOP_TOKENS,
             attention_mask: torch.Tensor | None = None, pad_token_id: int = 100257,
             generator: torch.Generator | None = None, compile: dict[str, Any] | None = None) -> torch.Tensor:
    """Returns `(batch, prompt + new)` ids. Rows may be left-padded (`attention_mask` 0 on padding).

    A row that emits a stop token keeps it and is padded with `pad_token_id` afterwards;
    decoding ends when every row has stopped or `max_new_tokens` were generated.
    `compile`: torch.compile's options (`{}`: its defaults) for the one-token steps after the
    prompt (`dbrx_train.model.decode`: a static-shape cache, compiled once per shape bucket).
    """
    if max_new_tokens <= 0:
        return input_ids
    batch, prompt_len = input_ids.shape
    total = prompt_len + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f'prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len '
                         f'({model.config.max_seq_len})')
    step = DecodeStep(model, compile) if compile is not None else None
    if step is None:
        cache = KVCache.for_model(model, batch, total)
    else:
        cache = KVCache.for_model(model, batch, bucket_length(total, model.config.max_seq_len))
        # The step attends over every slot, masked; garbage NaNs in unwritten ones would still poison it.
        cache.keys.zero_()
        cache.values.zero_()
    if attention_mask is not None:
        attention_mask = torch.cat(
            [attention_mask.to(torch.long), attention_mask.new_ones(batch, max_new_tokens, dtype=torch.long)], dim=1
        )
    stops = torch.tensor(list(stop_token_ids or ()), device=input_ids.device, dtype=input_ids.dtype)
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    out = [input_ids]
    step_input = input_ids
    # Blocks compiled for training (compile_config) run their eager code in eager decoding: the
    # cache's growing length would recompile them every token. (Set once: a switch costs milliseconds.)
    with torch.compiler.set_stance('force_eager') if step is None else contextlib.nullcontext():
        for _ in range(max_new_tokens):
            mask = attention_mask[:, : cache.length + step_input.shape[1]] if attention_mask is not None else None
            if step is not None and cache.length:
                logits = step(step_input, cache, mask)
            else:
                hidden, _ = model.hidden_states(step_input, mask, cache)
                logits = model.lm_head(hidden[:, -1])
            next_ids = sample_next(logits, temperature, top_k, top_p, generator)
            next_ids = torch.where(done, torch.full_like(next_ids, pad_token_id), next_ids)
            out.append(next_ids[:, None])
            done |= torch.isin(next_ids, stops)
            if bool(done.all()):
                break
            step_input = next_ids[:, None]
    return torch.cat(out, dim=1)
