"""The DBRX model section of a YAML, as a typed config.

Key names and nesting follow transformers' `DbrxConfig` (`attn_config`, `ffn_config`), so a
`config.json` of a transformers checkpoint maps onto it one to one. Defaults are DBRX's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from dbrx_train.errors import ConfigError

# The backends that exist (dbrx_train/model/moe); 'auto' picks the best one that runs here.
MoEBackendName = Literal['auto', 'torch']
# Weight-only quantizations (dbrx_train/model/quantize.py).
Quantization = Literal['int8', 'int4']
# int4's group sizes: those torch's CPU int4 kernel takes.
INT4_GROUP_SIZES = (32, 64, 128, 256)


@dataclass(frozen=True)
class AttentionConfig:
    kv_n_heads: int = 8
    clip_qkv: float | None = 8.0
    rope_theta: float = 500000.0

    def check(self) -> None:
        if self.kv_n_heads < 1:
            raise ConfigError('kv_n_heads', f'must be at least 1, got {self.kv_n_heads}')
        if self.clip_qkv is not None and self.clip_qkv <= 0:
            raise ConfigError('clip_qkv', f'must be positive or null, got {self.clip_qkv}')
        if self.rope_theta <= 0:
            raise ConfigError('rope_theta', f'must be positive, got {self.rope_theta}')


@dataclass(frozen=True)
class FFNConfig:
    ffn_hidden_size: int = 10752
    moe_num_experts: int = 16
    moe_top_k: int = 4
    moe_jitter_eps: float | None = None
    moe_loss_weight: float = 0.05
    # Router z-loss (ST-MoE; Megablocks' key): the mean squared logsumexp of the router logits, this
    # much of it added to the loss. 0 turns it off; Megatron recommends 1e-3.
    moe_zloss_weight: float = 0.0
    moe_normalize_expert_weights: float | None = 1.0
    # Expert parallelism (llm-foundry's name): ranks that split each layer's experts between them.
    moe_world_size: int = 1

    def check(self) -> None:
        for name in ('ffn_hidden_size', 'moe_num_experts', 'moe_top_k', 'moe_world_size'):
            if getattr(self, name) < 1:
                raise ConfigError(name, f'must be at least 1, got {getattr(self, name)}')
        if self.moe_top_k > self.moe_num_experts:
            raise ConfigError(
                'moe_top_k',
                f'top_k ({self.moe_top_k}) cannot exceed the number of experts ({self.moe_num_experts})',
            )
        if self.moe_jitter_eps is not None and not 0 <= self.moe_jitter_eps < 1:
            raise ConfigError('moe_jitter_eps', f'must be in [0, 1), got {self.moe_jitter_eps}')
        for name in ('moe_loss_weight', 'moe_zloss_weight'):
            if getattr(self, name) < 0:
                raise ConfigError(name, f'must be non-negative, got {getattr(self, name)}')
        if self.moe_normalize_expert_weights is not None and self.moe_normalize_expert_weights <= 0:
            raise ConfigError('moe_normalize_expert_weights', 'must be positive or null')
        if self.moe_num_experts % self.moe_world_size:
            raise ConfigError('moe_world_size', f'moe_num_experts ({self.moe_num_experts}) is not divisible by '
                                                f'{self.moe_world_size}')


@dataclass(frozen=True)
class ModelConfig:
    d_model: int
    n_heads: int
    n_layers: int
    max_seq_len: int
    vocab_size: int = 100352
    attn_config: AttentionConfig = field(default_factory=AttentionConfig)
    ffn_config: FFNConfig = field(default_factory=FFNConfig)
    init_std: float = 0.02
    # Which dropless MoE implementation runs the experts; the weights are the same for all.
    moe_backend: MoEBackendName = 'auto'
    # How the matrices are stored: None in float; 'int8' per-channel int8, 'int4' group-wise int4
    # (a quantized checkpoint, written by saving a model `dbrx_train.model.quantize` quantized), for
    # inference or as the frozen base of LoRA adapters (QLoRA; a float init_from is quantized as it
    # is read). int4 groups this many input weights per scale and zero point.
    quantization: Quantization | None = None
    quantization_group_size: int = 128

    def check(self) -> None:
        for name in ('d_model', 'n_heads', 'n_layers', 'max_seq_len', 'vocab_size'):
            if getattr(self, name) < 1:
                raise ConfigError(name, f'must be at least 1, got {getattr(self, name)}')
        if self.d_model % self.n_heads:
            raise ConfigError('n_heads', f'd_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})')
        if self.head_dim % 2:
            raise ConfigError('n_heads', f'head dimension d_model/n_heads ({self.head_dim}) must be even for rotary')
        if self.n_heads % self.attn_config.kv_n_heads:
            raise ConfigError(
                'attn_config.kv_n_heads',
                f'n_heads ({self.n_heads}) must be divisible by kv_n_heads ({self.attn_config.kv_n_heads})',
            )
        if self.init_std <= 0:
            raise ConfigError('init_std', f'must be positive, got {self.init_std}')
        if self.quantization_group_size not in INT4_GROUP_SIZES:
            raise ConfigError('quantization_group_size', f'must be one of {", ".join(map(str, INT4_GROUP_SIZES))}, '
                                                         f'got {self.quantization_group_size}')

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def without_layout(self) -> ModelConfig:
        """The model alone: `ffn_config.moe_world_size` says where the experts live, not what they
        are, so a checkpoint's config leaves it at 1 (a run may resume with another degree)."""
        return replace(self, ffn_config=replace(self.ffn_config, moe_world_size=1))
