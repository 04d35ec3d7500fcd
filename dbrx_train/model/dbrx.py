"""DBRX: a decoder-only transformer whose feed-forward layers are fine-grained mixtures of experts.

Each block is

    x = x + Attention(LayerNorm(x))      # fused Wqkv clipped to ±clip_qkv, GQA, RoPE, SDPA (model/attention.py)
    x = x + MoE(LayerNorm(x))            # softmax router, top-k, p-norm weights, dropless GLU experts

with LayerNorms without bias, no biases anywhere, and an untied LM head. Parameter names follow
llm-foundry/transformers (`Wqkv`, `out_proj`, `norm_1`, `norm_2`, `norm_f`, `w1`, `v1`, `w2`) so
the converter in `dbrx_train.checkpoints.hf` is a renaming.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from dbrx_train.constants import IGNORE_INDEX, next_token_targets
from dbrx_train.model.attention import AttentionMask, Causal, Dense, Documents, LeftPadded
from dbrx_train.model.config import ModelConfig
from dbrx_train.model.generation import generate
from dbrx_train.model.loss import blockwise_linear_cross_entropy, linear_cross_entropy, load_balancing_loss
from dbrx_train.model.init import init_normal_, local_part
from dbrx_train.model.moe import build_experts, run_experts, traced_experts
from dbrx_train.model.quantize import QuantizedLinear, quantize

NORM_EPS = 1e-5
RESIDUAL_EXPERT_WEIGHTS = ('w2',)  # the experts' projection into the residual stream


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin `(batch, 1, seq, head_dim)` in fp32: long contexts need the precision."""
    exponents = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    angles = position_ids.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Non-interleaved RoPE: the two halves of each head are rotated as pairs (`rotate_half`)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


def linear(layer: nn.Module, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`layer(x)`. In a traced decoding step of one token with 16-bit float weights, the same products
    summed in fp32 (returned in `dtype`, default x's), which inductor turns into one reduction over
    the weight rows: it reads bf16 at the bandwidth of an fp32 matrix-vector product (38 GB/s here)
    where oneDNN's bf16 one reaches 4-16 GB/s (bench/bench_inference.py)."""
    if (torch.compiler.is_compiling() and isinstance(layer, nn.Linear) and x.shape[:-1].numel() == 1
            and layer.weight.dtype in (torch.bfloat16, torch.float16) and not torch.is_grad_enabled()):
        products = layer.weight * x.reshape(1, 1, -1)
        return products.sum(-1, dtype=torch.float32).reshape(*x.shape[:-1], -1).to(dtype or x.dtype)
    return layer(x)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, device=None):
        super().__init__()
        self.n_heads = config.n_heads
        self.kv_n_heads = config.attn_config.kv_n_heads
        self.head_dim = config.head_dim
        self.clip_qkv = config.attn_config.clip_qkv
        kv_dim = self.kv_n_heads * self.head_dim
        self.split_sizes = (config.d_model, kv_dim, kv_dim)
        self.Wqkv = nn.Linear(config.d_model, config.d_model + 2 * kv_dim, bias=False, device=device)
        self.out_proj = nn.Linear(config.d_model, config.d_model, bias=False, device=device)
        self.out_proj.writes_residual = True

    def forward(self, x, cos, sin, mask: AttentionMask, kv_cache=None, layer_idx: int = 0):
        batch, seq, d_model = x.shape
        qkv = linear(self.Wqkv, x)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        q, k, v = qkv.split(self.split_sizes, dim=-1)
        q = q.view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.kv_n_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.kv_n_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, k, v)
        # Each kv head serves n_heads / kv_n_heads query heads. Repeated here rather than with
        # SDPA's enable_gqa, which sends CPU attention to the slow unfused kernel.
        k = k.repeat_interleave(self.n_heads // self.kv_n_heads, dim=1)
        v = v.repeat_interleave(self.n_heads // self.kv_n_heads, dim=1)
        y = mask.attend(q, k, v)
        return linear(self.out_proj, y.transpose(1, 2).reshape(batch, seq, d_model))


def packed_positions_and_mask(sequence_id: torch.Tensor) -> tuple[torch.Tensor, Documents]:
    """Positions that restart at 0 where `sequence_id` changes, and the `Documents` mask that keeps
    attention inside each example."""
    idx = torch.arange(sequence_id.shape[-1], device=sequence_id.device)
    starts = torch.ones_like(sequence_id, dtype=torch.bool)
    starts[:, 1:] = sequence_id[:, 1:] != sequence_id[:, :-1]
    first_of_example = torch.where(starts, idx, 0).cummax(dim=-1).values
    return idx - first_of_example, Documents.starting_at(starts)


@dataclass
class RouterStats:
    """Per-layer routing summary: what the load-balancing loss and the expert-load logs need."""

    mean_probs: torch.Tensor  # (E,) router probability per expert, averaged over tokens (carries grad)
    tokens_per_expert: torch.Tensor  # (E,) how many (token, slot) assignments each expert received
    z_loss: torch.Tensor  # mean over tokens of logsumexp(router logits)^2 (carries grad)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, device=None):
        super().__init__()
        ffn = config.ffn_config
        self.top_k = ffn.moe_top_k
        self.jitter_eps = ffn.moe_jitter_eps
        self.normalize_p = ffn.moe_normalize_expert_weights
        self.router = nn.Linear(config.d_model, ffn.moe_num_experts, bias=False, device=device)
        self.experts = build_experts(
            config.moe_backend, config.d_model, ffn.ffn_hidden_size, ffn.moe_num_experts, device=device
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        tokens = x.reshape(-1, x.shape[-1])
        router_in = tokens
        if self.training and self.jitter_eps:
            # Jitter only what the router sees (as Megablocks does); the experts get the clean input.
            router_in = tokens * torch.empty_like(tokens).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        logits = linear(self.router, router_in).float()
        probs = logits.softmax(dim=-1)
        top_weights, top_experts = probs.topk(self.top_k, dim=-1)
        if self.normalize_p is not None:
            top_weights = top_weights / top_weights.norm(p=self.normalize_p, dim=-1, keepdim=True)
        out = traced_experts(self.experts, tokens, top_weights, top_experts)
        if out is None:
            out = run_experts(self.experts, tokens, top_weights, top_experts)
        flat_experts = top_experts.reshape(-1)
        stats = RouterStats(
            mean_probs=probs.mean(dim=0),
            # Not bincount: its output size depends on the data, which breaks a compiled graph.
            tokens_per_expert=torch.zeros(probs.shape[-1], dtype=torch.long, device=x.device).index_add_(
                0, flat_experts, torch.ones_like(flat_experts)),
            z_loss=torch.logsumexp(logits, dim=-1).square().mean(),
        )
        return out.view_as(x), stats


class DbrxBlock(nn.Module):
    def __init__(self, config: ModelConfig, device=None):
        super().__init__()
        self.norm_1 = nn.LayerNorm(config.d_model, eps=NORM_EPS, bias=False, device=device)
        self.attn = Attention(config, device=device)
        self.norm_2 = nn.LayerNorm(config.d_model, eps=NORM_EPS, bias=False, device=device)
        self.ffn = MoE(config, device=device)

    def forward(self, x, cos, sin, mask: AttentionMask, kv_cache=None, layer_idx: int = 0):
        x = x + self.attn(self.norm_1(x), cos, sin, mask, kv_cache, layer_idx)
        ffn_out, stats = self.ffn(self.norm_2(x))
        return x + ffn_out, stats


@dataclass
class LossOutput:
    loss: torch.Tensor  # what to backpropagate: lm_loss + moe_loss_weight * aux_loss + moe_zloss_weight * z_loss
    lm_loss: torch.Tensor
    aux_loss: torch.Tensor  # load-balancing loss, unweighted (1.0 when perfectly balanced)
    tokens_per_expert: torch.Tensor  # (n_layers, E)
    z_loss: torch.Tensor = field(default_factory=lambda: torch.zeros(()))  # router z-loss, unweighted, layer mean


class DbrxLM(nn.Module):
    """The DBRX causal language model. `model(input_ids)` returns logits `(batch, seq, vocab)`."""

    def __init__(self, config: ModelConfig, device=None, seed: int | None = None):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model, device=device)
        self.blocks = nn.ModuleList(DbrxBlock(config, device=device) for _ in range(config.n_layers))
        self.norm_f = nn.LayerNorm(config.d_model, eps=NORM_EPS, bias=False, device=device)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False, device=device)
        if config.quantization is not None:  # the layout of a quantized checkpoint, to load one into
            quantize(self, config.quantization, empty=True)
        elif device is None or torch.device(device).type != 'meta':
            self.init_weights(seed)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initialises every base parameter, or this rank's part of each in a sharded model built on
        `meta` and materialised with `to_empty`: Normal(0, init_std), with projections into the
        residual stream scaled down by sqrt(2 * n_layers) (GPT-2) and LayerNorm scales at 1.

        Drawn by `dbrx_train.model.init`, so the values depend on `seed` and the parameter's name
        only, not on how the model is sharded. `seed` None: one drawn from torch's global generator
        (`torch.manual_seed` decides, as for any torch module). LoRA adapters are not touched."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for module_name, module in self.named_modules():
            if {'parametrizations', 'lora'} & set(module_name.split('.')):
                continue  # LoRA: a parametrization's original is its owner's; adapters are not drawn here
            for name, param in _base_parameters(module):
                if isinstance(module, nn.LayerNorm):
                    local_part(param).fill_(1.0)
                else:
                    residual = getattr(module, 'writes_residual', False) or name in RESIDUAL_EXPERT_WEIGHTS
                    init_normal_(param, seed, f'{module_name}.{name}', out_std if residual else std)

    def hidden_states(self, input_ids, attention_mask=None, kv_cache=None, sequence_id=None):
        """Final-norm hidden states `(batch, seq, d_model)` and each layer's `RouterStats`.

        `attention_mask` `(batch, past + seq)` marks real tokens with 1 and (left) padding with 0;
        `kv_cache` holds the keys and values of the `past` tokens and receives the new ones.
        `sequence_id` `(batch, seq)` packs several examples into a row (instead of `attention_mask`,
        without a cache): each example's tokens share one id and lie side by side.
        """
        batch, seq = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if sequence_id is not None:
            if attention_mask is not None or past:
                raise ValueError('sequence_id (packed examples) cannot be combined with attention_mask or a KV cache')
            position_ids, mask = packed_positions_and_mask(sequence_id.to(input_ids.device))
        else:
            position_ids, mask = self._positions_and_mask(batch, seq, past, attention_mask, input_ids.device)
        cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.attn_config.rope_theta)
        x = self.wte(input_ids)
        all_stats = []
        for i, block in enumerate(self.blocks):
            x, stats = block(x, cos, sin, mask, kv_cache, i)
            all_stats.append(stats)
        if kv_cache is not None:
            kv_cache.advance(seq)
        return self.norm_f(x), all_stats

    @staticmethod
    def _positions_and_mask(batch, seq, past, attention_mask, device) -> tuple[torch.Tensor, AttentionMask]:
        """Positions of the `seq` new tokens and their mask. A left-padded `attention_mask` (each
        row: zeros, then ones) becomes `LeftPadded`, a per-row count; any other pattern `Dense`.
        One new token (decoding) takes `Dense` too: its `(batch, 1, 1, keys)` mask is the key mask
        alone, and needs no look at the pattern (no host sync)."""
        if attention_mask is None:
            return torch.arange(past, past + seq, device=device).expand(batch, seq), Causal()
        key_is_real = attention_mask.to(device=device, dtype=torch.bool)
        position_ids = (key_is_real.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        keys = past + seq
        padding = (~key_is_real).sum(dim=-1)
        key_idx = torch.arange(keys, device=device)
        if seq > 1 and torch.equal(key_is_real, key_idx[None, :] >= padding[:, None]):
            padding = tuple(padding.tolist())
            return position_ids, LeftPadded(padding) if any(padding) else Causal()
        query_idx = torch.arange(past, keys, device=device)
        allowed = (key_idx[None, :] <= query_idx[:, None])[None] & key_is_real[:, None, :]
        # A padding query would otherwise see no key at all (NaN); let it see itself.
        allowed |= (key_idx[None, :] == query_idx[:, None])[None]
        return position_ids, Dense(allowed[:, None])

    def step_logits(self, input_ids, position_ids, key_mask, layer_caches) -> torch.Tensor:
        """Last-position logits `(batch, vocab)` with positions and the attention mask given whole: the
        static-shape decoding step of `dbrx_train.model.decode`. `key_mask` `(batch, 1, 1, keys)` marks
        the keys each row sees; `layer_caches` holds one cache per block (each block sees layer 0 of its
        own: under torch.compile, one graph serves every block)."""
        cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.attn_config.rope_theta)
        x = self.wte(input_ids)
        mask = Dense(key_mask)
        for block, cache in zip(self.blocks, layer_caches):
            x, _ = block(x, cos, sin, mask, cache, 0)
        return linear(self.lm_head, self.norm_f(x)[:, -1], torch.float32)

    def forward(self, input_ids, attention_mask=None, kv_cache=None, labels=None, sequence_id=None):
        """Logits `(batch, seq, vocab)`; with `labels`, the training `LossOutput` instead (no logits
        are materialised). Training goes through here so FSDP's forward hooks gather the weights."""
        if labels is not None:
            return self.loss(input_ids, labels, attention_mask, sequence_id)
        hidden, _ = self.hidden_states(input_ids, attention_mask, kv_cache, sequence_id)
        return self.lm_head(hidden)

    def loss(self, input_ids, labels=None, attention_mask=None, sequence_id=None) -> LossOutput:
        """Next-token cross-entropy plus the weighted load-balancing loss, without materialising
        the `(tokens, vocab)` logits. `labels` default to `input_ids`; `IGNORE_INDEX` is skipped."""
        hidden, stats = self.hidden_states(input_ids, attention_mask, sequence_id=sequence_id)
        labels = input_ids if labels is None else labels
        targets = next_token_targets(labels)
        hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        if isinstance(self.lm_head, QuantizedLinear):  # frozen (QLoRA): dequantized block by block
            lm_loss = blockwise_linear_cross_entropy(hidden, self.lm_head.stored_matrix().blocks,
                                                     self.config.vocab_size, targets, IGNORE_INDEX)
        else:
            lm_loss = linear_cross_entropy(hidden, self.lm_head.weight, targets, IGNORE_INDEX)
        aux_loss = load_balancing_loss(
            torch.stack([s.mean_probs for s in stats]),
            torch.stack([s.tokens_per_expert for s in stats]),
            self.config.ffn_config.moe_top_k,
        )
        z_loss = torch.stack([s.z_loss for s in stats]).mean()
        ffn = self.config.ffn_config
        return LossOutput(
            loss=lm_loss + ffn.moe_loss_weight * aux_loss + ffn.moe_zloss_weight * z_loss,
            lm_loss=lm_loss,
            aux_loss=aux_loss,
            z_loss=z_loss,
            tokens_per_expert=torch.stack([s.tokens_per_expert for s in stats]),
        )

    def generate(self, input_ids, **kwargs) -> torch.Tensor:
        """Prompt plus new tokens; see `dbrx_train.model.generation.generate` for the options."""
        return generate(self, input_ids, **kwargs)


def _base_parameters(module: nn.Module):
    """(name, parameter) of `module`'s own base parameters, the original of a parametrized (LoRA)
    one included, under the name it has in a plain model."""
    for name, param in module.named_parameters(recurse=False):
        yield name, param
    if parametrize.is_parametrized(module):
        for name, parametrization in module.parametrizations.items():
            yield name, parametrization.original
