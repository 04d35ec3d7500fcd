"""Weight-only int8 quantization for inference: fewer bytes per weight read per decoded token.

`quantize(model, 'int8')` replaces, in place, every matrix a token multiplies by — attention's
`Wqkv` and `out_proj`, each expert's `w1`/`v1`/`w2` slice and the LM head — with int8 weights and
one scale per output channel (symmetric, `w ≈ q * scale`, `|q| <= 127`). Activations, the
embedding table, norms and the router stay in the model's float dtype, which is also the dtype
of the scales and of every output. The matmuls are torch's `_weight_int8pack_mm` (int8 weight,
float activations) where the device has that kernel, else a dequantizing `F.linear`.

The quantized modules keep their tensors as buffers (`weight`/`scales`, and `w1`, `w1_scales`,
...) and `model.config.quantization` records the method, so `save_checkpoint` writes a quantized
checkpoint as it is (int8 tensors, scales, the marker in config.yaml) and loading one builds the
quantized layout (`DbrxLM` calls `quantize(..., empty=True)`) and fills it: no re-quantizing.
"""

from __future__ import annotations

from dataclasses import replace
from typing import get_args

import torch
import torch.nn.functional as F
from torch import nn

from dbrx_train.errors import ConfigError
from dbrx_train.model.config import Quantization
from dbrx_train.model.moe import Experts, GLUExperts, replace_experts
from dbrx_train.model.moe.torch_dropless import ExpertFFN, dropless_moe

QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)
_INT8_MAX = 127
_KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def check_quantization(value: str | None, key: str = 'quantize') -> None:
    """One line naming `key` when `value` is not a known quantization (None is none)."""
    if value is not None and value not in QUANTIZATIONS:
        raise ConfigError(key, f'unknown quantization {value!r}; choose from {", ".join(QUANTIZATIONS)}')


def quantize_rows(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`(int8 weight, scales)` of a `(out, in)` matrix, one `dtype` scale per row (output channel).
    The int8 values are rounded against the scales as stored in `dtype`, so `q * scale` is the
    nearest grid point to each weight of the model that runs."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / _INT8_MAX).clamp(min=torch.finfo(torch.float32).tiny).to(dtype)
    q = (w / scales.float()[:, None]).round().clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return q, scales


def _has_int8pack_kernel(device: torch.device) -> bool:
    key = {'cpu': 'CPU', 'cuda': 'CUDA', 'mps': 'MPS'}.get(device.type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key('aten::_weight_int8pack_mm', key)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`x @ (weight * scales[:, None]).T` for int8 `weight` `(out, in)`: torch's int8 kernel where it
    runs well, else a dequantizing `F.linear`. Torch 2.7's CPU kernel is fast only for 16-bit
    activations (fp32 ones take a scalar loop, 2x slower than an fp32 `F.linear`) and needs the
    input width to be a multiple of 8 (other widths read out of bounds)."""
    if x.dtype not in _KERNEL_DTYPES or weight.shape[1] % 8 or not _has_int8pack_kernel(x.device):
        return F.linear(x, weight.to(x.dtype)) * scales
    out = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), weight, scales)
    return out.view(*x.shape[:-1], weight.shape[0])


class Int8Linear(nn.Module):
    """A bias-free `nn.Linear` with int8 weights and per-output-channel scales."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer('weight', torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer('scales', torch.empty(out_features, dtype=dtype, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, empty: bool = False) -> 'Int8Linear':
        w = linear.weight
        module = cls(linear.in_features, linear.out_features, w.dtype, w.device)
        if not empty:
            module.weight, module.scales = quantize_rows(w, w.dtype)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.scales)

    def extra_repr(self) -> str:
        return f'in_features={self.in_features}, out_features={self.out_features}, int8'


class Int8Experts(Experts):
    """The dropless GLU experts with int8 weights. `w1`/`v1` keep the float layout `(E * ffn, d)`
    (a row is an output channel); `w2` is stored per expert transposed, `(E * d, ffn)`, so that its
    output channels are rows too and every expert multiplies by a contiguous `(out, in)` block."""

    def __init__(self, d_model: int, ffn_hidden_size: int, num_experts: int, dtype: torch.dtype, device=None):
        super().__init__(d_model, ffn_hidden_size, num_experts)
        for name, rows, cols in (('w1', ffn_hidden_size, d_model), ('v1', ffn_hidden_size, d_model),
                                 ('w2', d_model, ffn_hidden_size)):
            self.register_buffer(name, torch.empty(num_experts * rows, cols, dtype=torch.int8, device=device))
            self.register_buffer(f'{name}_scales', torch.empty(num_experts * rows, dtype=dtype, device=device))

    @classmethod
    def from_experts(cls, experts: GLUExperts, empty: bool = False) -> 'Int8Experts':
        e, ffn, d = experts.num_experts, experts.ffn_hidden_size, experts.d_model
        module = cls(d, ffn, e, experts.w1.dtype, experts.w1.device)
        if not empty:
            w2_t = experts.w2.detach().view(e, ffn, d).transpose(1, 2).reshape(e * d, ffn)
            for name, weight in (('w1', experts.w1), ('v1', experts.v1), ('w2', w2_t)):
                q, scales = quantize_rows(weight, experts.w1.dtype)
                setattr(module, name, q)
                setattr(module, f'{name}_scales', scales)
        return module

    def forward(self, x: torch.Tensor, top_weights: torch.Tensor, top_experts: torch.Tensor) -> torch.Tensor:
        return dropless_moe(x, top_weights, top_experts, self.num_experts, self.expert_ffn())

    def expert_ffn(self) -> ExpertFFN:
        ffn, d = self.ffn_hidden_size, self.d_model

        def ffn_of(e: int, rows: torch.Tensor) -> torch.Tensor:
            up, down = slice(e * ffn, (e + 1) * ffn), slice(e * d, (e + 1) * d)
            h = int8_linear(rows, self.w1[up], self.w1_scales[up])
            gated = F.silu(h).mul_(int8_linear(rows, self.v1[up], self.v1_scales[up]))
            return int8_linear(gated, self.w2[down], self.w2_scales[down])

        return ffn_of

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, int8'


@torch.no_grad()
def quantize(model, method: str | None, empty: bool = False):
    """Quantizes `model` (a `DbrxLM`) in place and returns it; `method` None, or the method the model
    is already quantized with, leaves it as it is. `empty` builds the quantized modules with
    uninitialised tensors (to load a quantized checkpoint into)."""
    check_quantization(method)
    if method is None or method == model.config.quantization and not empty:
        return model
    if model.config.quantization is not None and not empty:
        raise ConfigError('quantize', f'the model is already quantized ({model.config.quantization}); '
                                      f'load its float checkpoint to quantize it as {method}')
    for block in model.blocks:
        block.attn.Wqkv = Int8Linear.from_linear(block.attn.Wqkv, empty)
        block.attn.out_proj = Int8Linear.from_linear(block.attn.out_proj, empty)
    replace_experts(model, lambda experts: Int8Experts.from_experts(experts, empty))
    model.lm_head = Int8Linear.from_linear(model.lm_head, empty)
    model.config = replace(model.config, quantization=method)
    return model
