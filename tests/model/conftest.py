"""Tiny DBRX models for the model tests."""

import torch

from dbrx_train.model.config import AttentionConfig, FFNConfig, ModelConfig
from dbrx_train.model.dbrx import DbrxLM


def tiny_dbrx(d_model: int, vocab: int, ffn: int, experts: int, top_k: int, seed: int = 0) -> DbrxLM:
    """A random 2-layer DBRX (4 heads, 2 KV heads) in eval mode, with weights large enough to route unevenly."""
    torch.manual_seed(seed)
    config = ModelConfig(d_model=d_model, n_heads=4, n_layers=2, max_seq_len=d_model, vocab_size=vocab, init_std=0.1,
                         attn_config=AttentionConfig(kv_n_heads=2),
                         ffn_config=FFNConfig(ffn_hidden_size=ffn, moe_num_experts=experts, moe_top_k=top_k))
    return DbrxLM(config).eval()
