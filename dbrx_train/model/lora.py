"""LoRA adapters on the attention projections and, per expert, on the fused MoE experts.

An adapted weight `W` becomes `W + (alpha / r) * B @ A`, block by block: the attention
projections `Wqkv` and `out_proj` are one block `(out, in)`; each fused expert tensor `w1`, `v1`,
`w2` `(E * ffn, d_model)` is E blocks `(ffn, d_model)`, so every expert gets its own factors
`A (E, r, d_model)` and `B (E, ffn, r)`. `A` starts random and `B` at zero: training starts from
the pretrained model exactly.

The update is a `torch.nn.utils.parametrize` parametrization: reading `experts.w1` returns the
effective weight, computed once per forward. Every MoE backend reads its weights through the
`Experts` seam (`self.w1`, ...), so the experts stay dropless and grouped with no backend change,
and the result is exact. The price is one full-size temporary per adapted tensor per layer that
autograd keeps for the backward pass: train large models with activation checkpointing, which
recomputes it block by block. A backend that wants to avoid the temporary can apply the factors
itself (`(x @ A[e].T) @ B[e].T` next to `x @ w1[e].T`) from the same parameters.

The base tensor stays in the module as `parametrizations.<name>.original` (frozen), the factors
as `parametrizations.<name>.0.lora_A` / `lora_B`, and the scale as the buffer `...0.scale`, so a
training checkpoint describes its adapters completely. `merge_lora` folds them into the weights.

QLoRA: on a quantized model (`dbrx_train.model.quantize`, int4 or int8) the base stays frozen in its
stored form and the same adapters (same shapes, same initial values) live in the quantized module as
`lora.<name>` (`blocks.0.ffn.experts.lora.w1.lora_A`, `blocks.0.attn.Wqkv.lora.weight.lora_B`): the
module dequantizes each matrix just in time for its matmul and adds the update computed on the
inputs, `scale * (x @ A.T) @ B.T`, so no float copy of a base matrix outlives its matmul. Such a
model merges by dequantizing (`export`, `checkpoints.composer.ComposerTensors`).

`dtype: bf16` keeps the adapters (so their gradients and AdamW's moments) and the frozen float tensors
beside them in bf16, as torchtune's QLoRA recipes train: half the adapter state of fp32 (6 bytes per
adapter parameter held, not 12), and with an int4 base what brings a step under 0.6 bytes per base
weight (bench/bench_qlora_memory.py). The whole float model changes dtype, not the adapters alone:
FSDP2 shards one dtype per block. The price is bf16's rounding in the adapters' updates.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX
from torch.nn.utils import parametrize

from dbrx_train.errors import ConfigError
from dbrx_train.model.dbrx import DbrxLM
from dbrx_train.model.moe import Experts, replace_experts
from dbrx_train.model.quantize import QuantizedModule

log = logging.getLogger(__name__)

LoraTarget = Literal['Wqkv', 'out_proj', 'w1', 'v1', 'w2']
LORA_DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16}
ATTENTION_TARGETS = ('Wqkv', 'out_proj')
EXPERT_TARGETS = ('w1', 'v1', 'w2')
# A parameter or buffer name of an adapted model -> (the tensor's name in a plain model, part).
_ADAPTED_NAME = re.compile(
    r'^(?P<owner>.*)\.parametrizations\.(?P<tensor>[^.]+)\.(?:original|0\.(?P<part>lora_A|lora_B|scale))$')
_QLORA_NAME = re.compile(r'^(?P<owner>.*)\.lora\.(?P<tensor>[^.]+)\.(?P<part>lora_A|lora_B|scale)$')


@dataclass(frozen=True)
class LoraConfig:
    """The `lora` section of a fine-tuning YAML."""

    r: int = 8
    alpha: float = 16.0
    targets: list[LoraTarget] = field(default_factory=lambda: ['Wqkv', 'out_proj', 'w1', 'v1', 'w2'])
    layers: list[int] | None = None  # transformer blocks to adapt; default every one
    seed: int = 0  # draws the initial A factors, the same on every rank
    # PEFT's lora_dropout: in training, the attention adapters read their inputs through dropout (the
    # fused experts' adapters have no input of their own here: they train without it, as the log says).
    dropout: float = 0.0
    # The float tensors of the adapted model (adapters, frozen float weights); None: as the model was built.
    dtype: Literal['fp32', 'bf16'] | None = None

    def check(self) -> None:
        if self.r < 1:
            raise ConfigError('r', f'must be at least 1, got {self.r}')
        if self.alpha <= 0:
            raise ConfigError('alpha', f'must be positive, got {self.alpha}')
        if not self.targets:
            raise ConfigError('targets', f'name at least one of {", ".join(ATTENTION_TARGETS + EXPERT_TARGETS)}')
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError('targets', f'lists a target twice: {self.targets}')
        if not 0 <= self.dropout < 1:
            raise ConfigError('dropout', f'must be in [0, 1), got {self.dropout}')


def check_layers(layers: list[int] | None, n_layers: int, key: str) -> None:
    """`ConfigError` unless every index names one of the model's `n_layers` blocks."""
    bad = [i for i in layers or () if not 0 <= i < n_layers]
    if bad:
        raise ConfigError(key, f'layer {bad[0]} does not exist; the model has layers 0..{n_layers - 1}')


class LowRankUpdate(nn.Module):
    """The parametrization `W -> W + scale * B @ A`, blockwise over the first dimension of `W`.

    With `input_dropout` (a `Linear`'s adapter, lora_dropout > 0), training computes the update on the
    inputs instead, `y = x W^T + scale * dropout(x) A^T B^T` (PEFT's LoRA dropout), through the forward
    hook `apply_lora` adds: the weight is then the base weight. Evaluation uses the merged weight."""

    def __init__(self, blocks: int, out_features: int, in_features: int, r: int, alpha: float, device=None,
                 dtype=None, input_dropout: float = 0.0):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(blocks, r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(blocks, out_features, r, device=device, dtype=dtype))
        self.alpha_over_r = alpha / r
        self.input_dropout = input_dropout
        # Also a persistent buffer: a checkpoint must say how to merge its factors.
        self.register_buffer('scale', torch.tensor(self.alpha_over_r, device=device, dtype=torch.float32))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.input_dropout and self.training:
            return weight  # the update goes through `dropout_update` instead
        return merged_weight(weight, self.lora_A, self.lora_B, self.scale)

    def dropout_update(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """A forward hook of the adapted `Linear`: adds the update computed on dropped-out inputs."""
        if not (self.input_dropout and self.training):
            return output
        return output + self.input_update(args[0])

    def input_update(self, x: torch.Tensor) -> torch.Tensor:
        """A one-block adapter's update computed on the inputs, `scale * dropout(x) @ A.T @ B.T`
        (dropout in training only): what a `Linear` adds to `x @ W.T`."""
        x = F.dropout(x, self.input_dropout, training=self.training) if self.input_dropout else x
        low_rank = F.linear(F.linear(x, self.lora_A[0].to(x.dtype)), self.lora_B[0].to(x.dtype))
        return low_rank * self.scale.to(x.dtype)


def merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                  scale: torch.Tensor) -> torch.Tensor:
    """`weight + scale * B @ A` per block: what the adapted model computes with and what export writes."""
    delta = torch.bmm(lora_B, lora_A.to(lora_B.dtype)) * scale.to(lora_B.dtype)
    return weight + delta.reshape(weight.shape).to(weight.dtype)


def apply_lora(model: DbrxLM, config: LoraConfig) -> None:
    """Freezes every parameter of `model` and adds trainable adapters where `config` says, with the
    model's float parameters in `config.dtype` first when it names one."""
    n_layers = model.config.n_layers
    check_layers(config.layers, n_layers, 'lora.layers')
    model.requires_grad_(False)
    if config.dtype is not None:
        for param in model.parameters():  # not the buffers: a quantized base's parts keep their dtypes
            param.data = param.data.to(LORA_DTYPES[config.dtype])
    if config.dropout and set(config.targets) & set(EXPERT_TARGETS):
        log.warning('lora dropout %.3g applies to the attention adapters; the fused experts\' adapters (%s) '
                    'train without it', config.dropout, ', '.join(t for t in config.targets if t in EXPERT_TARGETS))
    layers = range(n_layers) if config.layers is None else sorted(set(config.layers))
    for i in layers:
        for target in config.targets:
            if target in ATTENTION_TARGETS:
                _adapt(getattr(model.blocks[i].attn, target), 'weight', 1, config, model.wte.weight.dtype,
                       config.dropout)

    def adapt_experts(experts: Experts) -> Experts:
        for target in config.targets:
            if target in EXPERT_TARGETS:
                _adapt(experts, target, experts.num_experts, config, model.wte.weight.dtype)
        return experts  # adapted in place: the parametrization is registered on the module

    replace_experts(model, adapt_experts, layers)
    if model.wte.weight.device.type != 'meta':
        with torch.no_grad():
            for tensor, value in initial_adapter_values(model, config.seed):
                tensor.copy_(value)


def _adapt(module: nn.Module, name: str, blocks: int, config: LoraConfig, float_dtype: torch.dtype,
           input_dropout: float = 0.0) -> None:
    """Registers a `LowRankUpdate` on `module.<name>`, a `(blocks * out, in)` weight; with `input_dropout`
    (a `Linear`), the forward hook that computes the update on dropped-out inputs in training. A
    quantized module keeps it as `module.lora[name]` and applies it itself (QLoRA)."""
    if isinstance(module, QuantizedModule):  # factors in the dtype of the model's float weights
        (rows, in_features), dtype = module.float_shape(name), float_dtype
        device = getattr(module, module._buffer(name, '')).device
    else:
        base = getattr(module, name)
        (rows, in_features), dtype, device = base.shape, base.dtype, base.device
    update = LowRankUpdate(blocks, rows // blocks, in_features, config.r, config.alpha, device, dtype, input_dropout)
    if isinstance(module, QuantizedModule):
        module.lora[name] = update
        return
    parametrize.register_parametrization(module, name, update)
    if input_dropout:
        update.hook = module.register_forward_hook(update.dropout_update)


def adapters(model: nn.Module) -> Iterator[tuple[str, LowRankUpdate]]:
    """(name, adapter) of every adapter in `model`, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, LowRankUpdate):
            yield name, module


def initial_adapter_values(model: nn.Module, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(adapter tensor, its full initial value): A uniform in ±1/sqrt(in_features) (as PEFT does), B
    zero, the scale alpha / r. Drawn in module order from `seed`, so every rank draws the same."""
    generator = torch.Generator().manual_seed(seed)
    for _, adapter in adapters(model):
        shape = tuple(adapter.lora_A.shape)
        bound = 1.0 / math.sqrt(shape[-1])
        yield adapter.lora_A, torch.empty(shape).uniform_(-bound, bound, generator=generator)
        yield adapter.lora_B, torch.zeros(tuple(adapter.lora_B.shape))
        yield adapter.scale, torch.tensor(adapter.alpha_over_r)


def split_adapted_name(name: str) -> tuple[str, str]:
    """`(plain name, part)` of a state-dict key: part is 'weight' for a base tensor (adapted or not),
    else 'lora_A', 'lora_B' or 'scale'. `blocks.0.ffn.experts.parametrizations.w1.0.lora_A` ->
    (`blocks.0.ffn.experts.w1`, 'lora_A')."""
    match = _ADAPTED_NAME.match(name) or _QLORA_NAME.match(name)
    if match is None:
        return name, 'weight'
    return f'{match["owner"]}.{match["tensor"]}', match['part'] or 'weight'


def base_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every base (non-adapter) parameter of `model` under its name in a plain `DbrxLM` (also when
    activation checkpointing has wrapped its blocks)."""
    found = {}
    for name, param in model.named_parameters():
        plain, part = split_adapted_name(name.replace(_CHECKPOINT_PREFIX, ''))
        if part == 'weight':
            found[plain] = param
    return found


def merge_lora(model: nn.Module) -> None:
    """Folds every adapter into its weight: `model` becomes a plain `DbrxLM` with the same outputs.
    A QLoRA model's adapters fold into the dequantized weights: export it."""
    if any(isinstance(m, QuantizedModule) and m.lora for m in model.modules()):
        raise ValueError('a QLoRA model merges into its dequantized weights: export it (dbrx_train.export)')
    for _, adapter in adapters(model):
        adapter.eval()  # the merged weight, whatever mode the model is in
        if hasattr(adapter, 'hook'):
            adapter.hook.remove()
    for module in [m for m in model.modules() if parametrize.is_parametrized(m)]:
        for name in list(module.parametrizations):
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
