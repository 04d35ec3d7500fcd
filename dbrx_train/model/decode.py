"""A low-overhead one-token decoding step: a KV cache of static shape and a compiled step.

At batch 1 a small model's decoding step is a few dozen small ops per layer (norms, rotary, the
cache write, the mask, the head repeat, the router), each paying Python and dispatcher overhead
that the matmuls do not hide. `DecodeStep` runs the embedding, the blocks and the LM head of one
token as graphs compiled by `torch.compile`, with the dropless experts eager between them (their
row counts are data dependent; see `dbrx_train.model.compile`).

The shapes stay static, so one graph serves every step of every request: the cache holds
`bucket_length(n)` positions (a power of two, at least `MIN_BUCKET`), each step attends over all
of them with a mask that hides the unwritten ones and left padding, and writes its key and value
at a position passed as a tensor. A new `max_new_tokens` or prompt length reuses its bucket's
graph; the first change of batch size (or bucket) makes that dimension dynamic (torch's automatic
dynamic shapes), so later ones do not recompile. Where compiling fails, the step logs why and
runs the same function eagerly.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

MIN_BUCKET = 64


def bucket_length(n: int, cap: int) -> int:
    """Cache positions for `n` tokens: the next power of two from `MIN_BUCKET`, at most `cap` (never below `n`)."""
    bucket = MIN_BUCKET
    while bucket < n:
        bucket *= 2
    return max(n, min(bucket, cap))


class _SlotWriter:
    """What one layer's `Attention` sees as its `kv_cache` inside a step: writes the new keys and
    values at `slot` (a tensor) and returns the layer's whole cache (static shape)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor):
        self.keys, self.values, self.slot = keys, values, slot

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys.index_copy_(2, self.slot, k)
        self.values.index_copy_(2, self.slot, v)
        return self.keys, self.values


def _step(model, ids, position_ids, slot, key_mask, keys, values) -> torch.Tensor:
    """Last-position logits `(batch, vocab)` of one token per row; writes its keys and values at `slot`."""
    writers = [_SlotWriter(keys[i], values[i], slot) for i in range(keys.shape[0])]
    return model.step_logits(ids, position_ids, key_mask, writers)


class DecodeStep:
    """`step(ids, cache, attention_mask)`: the next-token logits `(batch, vocab)` of `ids` `(batch, 1)`,
    whose keys and values go to `cache.length` (then `cache.advance(1)`). `attention_mask`
    `(batch, cache.length + 1)` marks real tokens (left padding 0); None when there is none.

    `compile`: torch.compile's keyword arguments (`{}` for its defaults), or None to run eagerly.
    """

    def __init__(self, model, compile: dict[str, Any] | None = None):
        self.model = model
        self.compiled = compile is not None
        self._fn = torch.compile(_step, **compile) if compile is not None else _step

    def __call__(self, ids: torch.Tensor, cache, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, slot = ids.shape[0], cache.length
        key_mask = torch.zeros(batch, cache.max_len, dtype=torch.bool, device=ids.device)
        if attention_mask is None:
            key_mask[:, : slot + 1] = True
            position_ids = torch.full((batch, 1), slot, dtype=torch.long, device=ids.device)
        else:
            key_mask[:, : slot + 1] = attention_mask.to(device=ids.device, dtype=torch.bool)
            position_ids = (key_mask.sum(dim=1, keepdim=True) - 1).clamp(min=0)
        args = (self.model, ids, position_ids, torch.tensor([slot], device=ids.device), key_mask[:, None, None],
                cache.keys, cache.values)
        try:
            logits = self._fn(*args)
        except Exception as e:  # a backend that cannot compile this model here: decode eagerly from now on
            if self._fn is _step:
                raise
            log.warning('compiled decoding step failed (%s: %s); decoding eagerly', type(e).__name__,
                        str(e).splitlines()[0] if str(e) else '')
            self._fn, self.compiled = _step, False
            logits = _step(*args)
        cache.advance(1)
        return logits
