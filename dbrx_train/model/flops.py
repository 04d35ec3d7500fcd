"""Parameter counts and training FLOPs of a DBRX config, without allocating any weights.

`parameter_counts(config)` is the closed form; `count_parameters(model)` reads the same numbers
off a built model (a `meta`-device one costs nothing), so each checks the other.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from dbrx_train.model.config import ModelConfig
from dbrx_train.model.moe import Experts


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    active: int  # what one token uses: every weight but the experts it was not routed to (top_k of E)
    embedding: int  # the input embedding table: looked up, never multiplied
    experts: int  # all experts of all layers


def parameter_counts(config: ModelConfig) -> ParameterCounts:
    d, layers, vocab = config.d_model, config.n_layers, config.vocab_size
    ffn = config.ffn_config
    kv_dim = config.attn_config.kv_n_heads * config.head_dim
    attention = d * (d + 2 * kv_dim) + d * d  # Wqkv, out_proj
    router = d * ffn.moe_num_experts
    experts_per_layer = 3 * ffn.moe_num_experts * ffn.ffn_hidden_size * d  # w1, v1, w2
    norms = 2 * d
    embedding = vocab * d
    experts = layers * experts_per_layer
    total = embedding + layers * (attention + router + norms) + experts + d + vocab * d  # + norm_f, lm_head
    return ParameterCounts(total, _active(total, experts, config), embedding, experts)


def count_parameters(model: nn.Module) -> ParameterCounts:
    """The same counts from a built `DbrxLM` (any device, `meta` included)."""
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for m in model.modules() if isinstance(m, Experts) for p in m.parameters())
    return ParameterCounts(total, _active(total, experts, model.config), model.wte.weight.numel(), experts)


def _active(total: int, experts: int, config: ModelConfig) -> int:
    ffn = config.ffn_config
    return total - experts + experts * ffn.moe_top_k // ffn.moe_num_experts


def train_flops_per_token(config: ModelConfig, seq_len: int | None = None) -> int:
    """Training (forward + backward) FLOPs per token, PaLM style (Chowdhery et al. 2022, app. B):

        6 * (active parameters - embedding table) + 12 * n_layers * d_model * seq_len

    The first term counts a multiply-add as 2 FLOPs and the backward pass as twice the forward,
    for every weight a token passes through: attention projections, router, its top_k experts,
    norms (negligible) and the LM head; the embedding lookup is free. The second is attention's
    scores and weighted sum over the whole `seq_len` (default `max_seq_len`), not halved for the
    causal mask, as PaLM counts it. Softmax, rotary and elementwise work are not counted.
    """
    counts = parameter_counts(config)
    return 6 * (counts.active - counts.embedding) + attention_flops_per_token(config, seq_len)


def attention_flops_per_token(config: ModelConfig, seq_len: int | None = None) -> int:
    """The attention term of `train_flops_per_token`: scores and weighted sum over `seq_len`
    (default `max_seq_len`) keys, forward and backward, `12 * n_layers * d_model * seq_len`."""
    seq_len = config.max_seq_len if seq_len is None else seq_len
    return 12 * config.n_layers * config.d_model * seq_len
