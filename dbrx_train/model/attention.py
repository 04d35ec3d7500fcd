"""Which keys each query sees, and the kernel that computes attention under that rule.

A forward pass describes its mask once and every layer calls `mask.attend(q, k, v)`:

    Causal()                  each row is one sequence (with a KV cache: the queries are its last tokens)
    Documents(lengths)        packed rows: examples side by side, each attending only within itself
    LeftPadded(padding)       rows that start with `padding[row]` padding tokens (batched prompts)
    Dense(allowed)            anything else, and decoding steps: a boolean `(batch, 1, queries, keys)` mask

Only `Dense` holds a `(seq, seq)` mask, and only for patterns no per-row count describes (a
decoding step's is `(1, keys)`; a prompt chunk after a KV cache takes a `(chunk, keys)` one). The others run on SDPA's causal fast path, whose memory grows with the sequence, not with
its square: a packed 32K row costs no more than a plain one. bench/bench_long_context.py measures
them (and the candidates that lost) against plain rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


class ChunkBias:
    """The additive mask of a prompt chunk after a cached part: every cached key visible, the
    chunk's own block triangular. Built once per forward pass and shared by its layers (and, sliced
    from the right, by rows with fewer keys): filling a `(chunk, keys)` tensor costs as much as the
    attention itself on CPU."""

    def __init__(self):
        self._bias: torch.Tensor | None = None

    def __call__(self, q: torch.Tensor, keys: int) -> torch.Tensor:
        queries = q.shape[2]
        bias = self._bias
        if bias is None or bias.shape[0] != queries or bias.shape[1] < keys or bias.dtype != q.dtype:
            bias = torch.zeros(queries, keys, dtype=q.dtype, device=q.device)
            bias[:, keys - queries :] = torch.full((queries, queries), float('-inf'), dtype=q.dtype,
                                                   device=q.device).triu(1)
            self._bias = bias
        return bias[:, bias.shape[1] - keys :]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_bias: ChunkBias) -> torch.Tensor:
    """Causal attention of the last `q.shape[2]` positions over all `k.shape[2]` keys.

    Query i sits at position `keys - queries + i` (a KV cache holds the earlier keys). Prefill and
    one-token decoding take SDPA's fused kernels without a mask; only a prompt chunk after a cached
    part needs one, `(queries, keys)` large, never `(keys, keys)`.
    """
    queries, keys = q.shape[2], k.shape[2]
    if queries == keys:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if queries == 1:
        return F.scaled_dot_product_attention(q, k, v)
    # SDPA's is_causal aligns the mask top-left; a chunk after a cache needs it bottom-right. Additive:
    # CPU SDPA runs 1.8x faster with a float mask than with a boolean one.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=chunk_bias(q, keys))


class AttentionMask:
    """What a forward pass tells every attention layer: `attend(q, k, v)` with q `(batch, heads,
    queries, head_dim)` and k, v `(batch, heads, keys, head_dim)` returns `(batch, heads, queries, head_dim)`."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class Causal(AttentionMask):
    chunk_bias: ChunkBias = field(default_factory=ChunkBias, repr=False)

    def attend(self, q, k, v):
        return causal_attention(q, k, v, self.chunk_bias)


@dataclass(frozen=True)
class Dense(AttentionMask):
    allowed: torch.Tensor  # (batch, 1, queries, keys) bool: True where the query may see the key

    def attend(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.allowed)


@dataclass(frozen=True, eq=False)
class LeftPadded(AttentionMask):
    """Row r's first `padding[r]` key positions are padding: its real tokens attend causally among
    themselves. A padding query's output is zero (nothing reads it)."""

    padding: tuple[int, ...]
    chunk_bias: ChunkBias = field(default_factory=ChunkBias, repr=False)

    # Not traced by torch.compile: a graph specialised on each padding pattern would recompile every batch.
    @torch.compiler.disable
    def attend(self, q, k, v):
        return _rows_sliced(q, k, v, self.padding, self.chunk_bias)


def _rows_sliced(q, k, v, padding, chunk_bias):
    queries, keys = q.shape[2], k.shape[2]
    out = q.new_zeros(q.shape)
    for row, pad in enumerate(padding):
        first_query = max(0, pad - (keys - queries))
        if first_query < queries:
            out[row : row + 1, :, first_query:] = causal_attention(
                q[row : row + 1, :, first_query:], k[row : row + 1, :, pad:], v[row : row + 1, :, pad:], chunk_bias
            )
    return out


@dataclass(frozen=True)
class Documents(AttentionMask):
    """Packed rows: `lengths[r]` are the lengths of row r's examples, side by side from position 0;
    a query sees the keys of its own example up to itself, as if each example ran alone."""

    lengths: tuple[tuple[int, ...], ...]

    @classmethod
    def starting_at(cls, starts: torch.Tensor) -> 'Documents':
        """The documents of `starts` `(batch, seq)` bool: True where an example begins (position 0 always)."""
        seq = starts.shape[1]
        rows = []
        for row_starts in starts.cpu():
            bounds = row_starts.nonzero()[:, 0].tolist() + [seq]
            rows.append(tuple(end - start for start, end in zip(bounds, bounds[1:])))
        return cls(tuple(rows))

    @torch.compiler.disable  # as LeftPadded.attend: each packing would be a new graph
    def attend(self, q, k, v):
        return _documents_sliced(q, k, v, self.lengths)


def _documents_sliced(q, k, v, lengths):
    """One causal SDPA call per example on its slice of the row: the fused kernel, no mask, no work
    between examples. Of the candidates measured on CPU (bench/bench_long_context.py) the only one
    that runs there; on CUDA each call is the flash kernel a plain row takes."""
    rows = []
    # split, not slicing: its backward is one concatenation, not a zero-filled gradient per piece
    for q_row, k_row, v_row, row_lengths in zip(q.split(1), k.split(1), v.split(1), lengths):
        parts = zip(*(t.split(row_lengths, dim=2) for t in (q_row, k_row, v_row)))
        rows.append(torch.cat([F.scaled_dot_product_attention(*qkv, is_causal=True) for qkv in parts], dim=2))
    return torch.cat(rows)
