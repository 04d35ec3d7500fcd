"""Weight-only quantization for inference: fewer bytes per weight read per decoded token.

`quantize(model, method)` replaces, in place, every matrix a token multiplies by — attention's
`Wqkv` and `out_proj`, each expert's `w1`/`v1`/`w2` slice and the LM head — with quantized weights.
Activations, the embedding table, norms and the router stay in the model's float dtype, which is
also the dtype of the scales and zero points and of every output. Two weight formats:

- `int8`: one scale per output channel, symmetric (`w ≈ q * scale`, `|q| <= 127`), 8 bits per
  weight. Matmuls: torch's `_weight_int8pack_mm` where it runs well, else a dequantizing `F.linear`.
- `int4`: groups of `group_size` (default 128) consecutive input weights of a row share one scale
  and one zero point (asymmetric, `w ≈ (q - 8) * scale + zero`, `0 <= q <= 15`), 4 + 32/128 = 4.25
  bits per weight with 16-bit scales. Matmuls: torch's `_weight_int4pack_mm_for_cpu` (any float
  activations on CPU, groups of 32/64/128/256, output widths that are multiples of 16), else a
  dequantizing `F.linear`. `zero` is the value of the grid's midpoint `q = 8`: the kernel's convention.

The quantized modules keep their tensors as buffers (`weight`/`scales`[/`zeros`], and `w1`,
`w1_scales`, ...) and `model.config.quantization` (with `quantization_group_size`) records the
format, so `save_checkpoint` writes a quantized checkpoint as it is and loading one builds the
quantized layout (`DbrxLM` calls `quantize(..., empty=True)`) and fills it: no re-quantizing.

int4 weights are stored as two 4-bit values per byte along the input dimension (`(out, in // 2)`
uint8, the even column in the low nibble): a layout that does not depend on the machine. The CPU
kernel wants another one, which torch chooses by CPU capability (AVX-512, AVX2 or scalar blocks
differ), so it cannot be what a checkpoint holds; each module repacks a matrix for the kernel on
its first use and keeps that copy (rebuilt if the stored weights change). The price is a second
copy of the 4-bit weights in memory while the model serves (8.5 bits per weight resident).

torchao (0.11.0 is the release for torch 2.7 and installs here) was not adopted: its int4 CPU
layout runs the same aten kernel, but as a tensor subclass of `nn.Linear` weights it covers neither
the fused `(E * ffn, d)` expert weights nor a machine-independent checkpoint, and it would add a
dependency pinned to one torch release; the two aten ops are all it would contribute.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import get_args

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from dbrx_train.errors import ConfigError
from dbrx_train.model.config import INT4_GROUP_SIZES, Quantization
from dbrx_train.model.init import local_part, local_region
from dbrx_train.model.moe import Experts, GLUExperts, replace_experts
from dbrx_train.model.moe.expert_parallel import ExpertParallel, shard_by_expert, shard_expert_tensors
from dbrx_train.model.moe.torch_dropless import ExpertFFN, dropless_moe

QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)
_INT8_MAX = 127
_INT4_MAX, _INT4_MID = 15, 8
_KERNEL_DTYPES = (torch.bfloat16, torch.float16)
_TINY = torch.finfo(torch.float32).tiny


def check_quantization(value: str | None, key: str = 'quantize') -> None:
    """One line naming `key` when `value` is not a known quantization (None is none)."""
    if value is not None and value not in QUANTIZATIONS:
        raise ConfigError(key, f'unknown quantization {value!r}; choose from {", ".join(QUANTIZATIONS)}')


def _has_kernel(op: str, device: torch.device, keys=('cpu', 'cuda', 'mps')) -> bool:
    key = {'cpu': 'CPU', 'cuda': 'CUDA', 'mps': 'MPS'}.get(device.type)
    return device.type in keys and torch._C._dispatch_has_kernel_for_dispatch_key(f'aten::{op}', key)


# ---------------------------------------------------------------- int8


def quantize_rows(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`(int8 weight, scales)` of a `(out, in)` matrix, one `dtype` scale per row (output channel).
    The int8 values are rounded against the scales as stored in `dtype`, so `q * scale` is the
    nearest grid point to each weight of the model that runs."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / _INT8_MAX).clamp(min=_TINY).to(dtype)
    q = (w / scales.float()[:, None]).round().clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return q, scales


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`x @ (weight * scales[:, None]).T` for int8 `weight` `(out, in)`: torch's int8 kernel where it
    runs well, else a dequantizing `F.linear`. Torch 2.7's CPU kernel is fast only for 16-bit
    activations (fp32 ones take a scalar loop, 2x slower than an fp32 `F.linear`) and needs the
    input width to be a multiple of 8 (other widths read out of bounds)."""
    if x.dtype not in _KERNEL_DTYPES or weight.shape[1] % 8 or not _has_kernel('_weight_int8pack_mm', x.device):
        return F.linear(x, weight.to(x.dtype)) * scales
    out = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), weight, scales)
    return out.view(*x.shape[:-1], weight.shape[0])


# ---------------------------------------------------------------- int4


def quantize_groups(weight: torch.Tensor, group_size: int,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(packed int4 weight, scales, zeros)` of a `(out, in)` matrix: `(out, in // 2)` uint8 and
    `(out, in // group_size)` `dtype`. Each group's range [min, max] maps onto the 16 levels; the
    values are rounded against the scales and zeros as stored in `dtype`."""
    out_features, in_features = weight.shape
    w = weight.detach().float().view(out_features, -1, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scales = ((high - low) / _INT4_MAX).clamp(min=_TINY).to(dtype)
    zeros = (low + _INT4_MID * scales.float()).to(dtype)
    q = ((w - zeros.float()[..., None]) / scales.float()[..., None] + _INT4_MID).round().clamp(0, _INT4_MAX)
    return pack_int4(q.to(torch.uint8).view(out_features, in_features)), scales, zeros


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Values 0..15 `(out, in)` as bytes `(out, in // 2)`, the even column in the low nibble."""
    return q[:, ::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4`: uint8 values 0..15, `(out, 2 * packed.shape[1])`."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).view(packed.shape[0], -1)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """The `(out, in)` matrix in `dtype` that `quantize_groups` stored."""
    q = unpack_int4(packed).view(*scales.shape, -1).to(dtype)
    # In place: one float temporary the size of the block asked for (QLoRA: `StoredMatrix.blocks`).
    return q.sub_(_INT4_MID).mul_(scales[..., None].to(dtype)).add_(zeros[..., None].to(dtype)).flatten(1)


def int4_kernel_runs(x: torch.Tensor, out_features: int, group_size: int) -> bool:
    """Whether torch's int4 CPU kernel takes this matmul: groups and output width it supports."""
    return (group_size in INT4_GROUP_SIZES and out_features % 16 == 0
            and _has_kernel('_weight_int4pack_mm_for_cpu', x.device, keys=('cpu',)))


class Int4KernelCache:
    """The kernel's copies of a module's int4 matrices, made on first use: the weight in torch's
    CPU-specific packing and the scales and zeros as one `(in // group, out, 2)` tensor in the
    activations' dtype. An entry is remade when its stored weight changed (loaded, or copied into)."""

    def __init__(self):
        self.entries: dict[object, tuple[tuple[int, int], torch.Tensor, torch.Tensor]] = {}

    def get(self, key, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
        stamp = (packed._version, packed.data_ptr(), x.dtype)
        entry = self.entries.get(key)
        if entry is None or entry[0] != stamp:
            weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(packed).to(torch.int32), 1)
            scales_and_zeros = torch.stack((scales, zeros), dim=-1).transpose(0, 1).to(x.dtype).contiguous()
            entry = self.entries[key] = (stamp, weight, scales_and_zeros)
        return entry[1], entry[2]


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                cache: Int4KernelCache, key) -> torch.Tensor:
    """`x @ W.T` for the int4 matrix `W` (`quantize_groups`' three tensors), with torch's CPU kernel
    (its repacked weight kept in `cache` under `key`) where it runs, else a dequantizing `F.linear`."""
    out_features, in_features = packed.shape[0], 2 * packed.shape[1]
    group_size = in_features // scales.shape[1]
    if not int4_kernel_runs(x, out_features, group_size):
        return F.linear(x, dequantize_int4(packed, scales, zeros, x.dtype))
    weight, scales_and_zeros = cache.get(key, x, packed, scales, zeros)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, in_features), weight, group_size,
                                                      scales_and_zeros)
    return out.view(*x.shape[:-1], out_features)


# ---------------------------------------------------------------- formats and modules


class WeightFormat:
    """How a quantized `(out, in)` matrix is stored and multiplied by. `parts` names its tensors:
    the weight itself ('') and the others by suffix ('scales', ...); None as dtype is the model's."""

    name: str
    suffixes: tuple[str, ...]
    column_unit = 1  # a block of `columns` holds a multiple of this many

    def parts(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
        raise NotImplementedError

    def check_width(self, in_features: int, what: str) -> None:
        """One clear line when a matrix `what` of this input width cannot be stored this way."""

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def linear(self, x: torch.Tensor, parts: dict[str, torch.Tensor], cache: Int4KernelCache, key) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The `(out, in)` matrix in `dtype` that `parts` store."""
        raise NotImplementedError

    def in_features(self, weight: torch.Tensor) -> int:
        """The float matrix's input width, from its stored weight."""
        return weight.shape[1]

    def columns(self, parts: dict[str, torch.Tensor], cols: slice) -> dict[str, torch.Tensor]:
        """The stored parts of the float matrix's columns `cols` (multiples of `column_unit`)."""
        raise NotImplementedError


class Int8Format(WeightFormat):
    name, suffixes = 'int8', ('', 'scales')

    def parts(self, out_features, in_features):
        return {'': ((out_features, in_features), torch.int8), 'scales': ((out_features,), None)}

    def quantize(self, weight):
        q, scales = quantize_rows(weight, weight.dtype)
        return {'': q, 'scales': scales}

    def linear(self, x, parts, cache, key):
        return int8_linear(x, parts[''], parts['scales'])

    def dequantize(self, parts, dtype):
        return parts[''].to(dtype).mul_(parts['scales'].to(dtype)[:, None])

    def columns(self, parts, cols):
        return {'': parts[''][:, cols], 'scales': parts['scales']}  # a scale per row


class Int4Format(WeightFormat):
    name, suffixes = 'int4', ('', 'scales', 'zeros')

    def __init__(self, group_size: int):
        self.group_size = group_size

    def parts(self, out_features, in_features):
        groups = (out_features, in_features // self.group_size)
        return {'': ((out_features, in_features // 2), torch.uint8), 'scales': (groups, None), 'zeros': (groups, None)}

    def check_width(self, in_features, what):
        if in_features % self.group_size:
            raise ConfigError('quantize', f'int4 groups of {self.group_size} weights do not divide the width '
                                          f'{in_features} of {what}; choose a group_size that divides it')

    def quantize(self, weight):
        packed, scales, zeros = quantize_groups(weight, self.group_size, weight.dtype)
        return {'': packed, 'scales': scales, 'zeros': zeros}

    def linear(self, x, parts, cache, key):
        return int4_linear(x, parts[''], parts['scales'], parts['zeros'], cache, key)

    def dequantize(self, parts, dtype):
        return dequantize_int4(parts[''], parts['scales'], parts['zeros'], dtype)

    def in_features(self, weight):
        return 2 * weight.shape[1]  # two 4-bit values a byte

    @property
    def column_unit(self):
        return self.group_size

    def columns(self, parts, cols):
        groups = slice(cols.start // self.group_size, cols.stop // self.group_size)
        return {'': parts[''][:, cols.start // 2:cols.stop // 2], 'scales': parts['scales'][:, groups],
                'zeros': parts['zeros'][:, groups]}


def weight_format(method: str, group_size: int) -> WeightFormat:
    return Int4Format(group_size) if method == 'int4' else Int8Format()


class StoredParts:
    """A quantized module's stored tensors, whole: a sharded one (a DTensor, the frozen base of a QLoRA
    run laid out by `shard_quantized`) is gathered on first use and dropped by `release`. The forward
    pass releases them when the module is done; the backward pass gathers them again and its last
    matmul releases them. Between the passes a rank holds only its shards, as FSDP2 does for weights."""

    def __init__(self, module: nn.Module, local: bool = False):
        """`local`: the module's DTensors are read as this rank's part (its experts, under expert
        parallelism), not gathered."""
        self.module, self.local, self.whole, self.pending = module, local, {}, 0

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.whole:
            stored = getattr(self.module, name)
            if isinstance(stored, DTensor):
                stored = stored.to_local() if self.local else stored.full_tensor()
            self.whole[name] = stored
        return self.whole[name]

    def release(self) -> None:
        self.whole.clear()


# Float bytes of a frozen matrix dequantized at once (QLoRA): its matmuls run block of rows by block of
# rows, so a step's float temporary stays this size where a DBRX-132B expert matrix is 264 MB in fp32;
# each block still multiplies by >= 85 rows of DBRX's widest input (6144) in fp32.
DEQUANTIZED_BLOCK_BYTES = 2 * 2**20


@dataclass(frozen=True)
class StoredMatrix:
    """One frozen quantized matrix: rows `rows` of the tensors `names` (suffix -> buffer) of `parts`."""

    parts: StoredParts
    fmt: WeightFormat
    names: dict[str, str]
    rows: slice = field(default_factory=lambda: slice(None))

    @property
    def shape(self) -> tuple[int, int]:
        weight = self.parts[self.names['']][self.rows]
        return len(weight), self.fmt.in_features(weight)

    def blocks(self, dtype: torch.dtype, dim: int = 0) -> Iterator[tuple[slice, torch.Tensor]]:
        """(part, the matrix's rows (`dim` 0) or columns (1) `part` dequantized in `dtype`), in blocks of
        at most `DEQUANTIZED_BLOCK_BYTES` (columns: whole int4 groups)."""
        shape, unit = self.shape, 1 if dim == 0 else self.fmt.column_unit
        step = max(1, DEQUANTIZED_BLOCK_BYTES // (shape[1 - dim] * dtype.itemsize * unit)) * unit
        for start in range(0, shape[dim], step):
            part = slice(start, min(start + step, shape[dim]))
            stored = self._stored(part) if dim == 0 else self.fmt.columns(self._stored(slice(None)), part)
            yield part, self.fmt.dequantize(stored, dtype)

    def _stored(self, rows: slice) -> dict[str, torch.Tensor]:
        return {suffix: self.parts[name][self.rows][rows] for suffix, name in self.names.items()}


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def frozen_linear(x: torch.Tensor, matrix: StoredMatrix) -> torch.Tensor:
    """`x @ W.T` for the frozen matrix `W`, dequantized block by block just before each block's matmul;
    with autograd through `x`, the backward pass dequantizes `W` again instead of keeping a float copy."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _FrozenLinear.apply(x, matrix)
    return _blockwise_linear(x.to(compute_dtype(x)), matrix)


def _blockwise_linear(x: torch.Tensor, matrix: StoredMatrix) -> torch.Tensor:
    """`x @ W.T`, the output columns of one block of `W`'s rows at a time."""
    x_rows = x.reshape(-1, x.shape[-1])
    out = x_rows.new_empty(len(x_rows), matrix.shape[0])
    for rows, w in matrix.blocks(x.dtype, dim=0):
        torch.mm(x_rows, w.t(), out=out[:, rows])
        del w  # before the next block is dequantized
    return out.view(*x.shape[:-1], -1)


class _FrozenLinear(torch.autograd.Function):
    """Saves no tensor: only where the matrix is stored (its shards, when sharded)."""

    @staticmethod
    def forward(ctx, x, matrix: StoredMatrix):
        ctx.matrix, ctx.x_dtype = matrix, x.dtype
        matrix.parts.pending += 1
        return _blockwise_linear(x.to(compute_dtype(x)), matrix)

    @staticmethod
    def backward(ctx, grad):
        matrix = ctx.matrix
        grad_rows = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_rows.new_empty(len(grad_rows), matrix.shape[1])
        for cols, w in matrix.blocks(grad.dtype, dim=1):  # each column of grad_x written once: no sums
            torch.mm(grad_rows, w, out=grad_x[:, cols])
            del w  # before the next block is dequantized
        matrix.parts.pending -= 1
        if not matrix.parts.pending:
            matrix.parts.release()
        return grad_x.view(*grad.shape[:-1], -1).to(ctx.x_dtype), None


class QuantizedModule(nn.Module):
    """What the quantized modules share: the format, the kernel's cache, and the QLoRA adapters of their
    matrices (`lora[name]`, a `dbrx_train.model.lora.LowRankUpdate` with the float LoRA's factors).
    Adapted, sharded, or with gradients to pass back, a module dequantizes each matrix just in time
    (`frozen_linear`) and adds its adapter's low-rank update computed on the inputs; otherwise it takes
    the inference kernels."""

    def __init__(self, fmt: WeightFormat):
        super().__init__()
        self._set_format(fmt)

    def _set_format(self, fmt: WeightFormat) -> None:
        self.format = fmt
        self.kernel_cache = Int4KernelCache()
        self.lora = nn.ModuleDict()

    def float_shape(self, name: str) -> tuple[int, int]:
        """The shape of matrix `name` in the float model (what its adapter's factors are sized by)."""
        raise NotImplementedError

    def _matrices(self) -> tuple[tuple[str, int, int], ...]:
        """(name, rows, columns) of the matrices as stored (of one expert's, for experts)."""
        raise NotImplementedError

    @staticmethod
    def _buffer(name: str, suffix: str) -> str:
        return f'{name}_{suffix}' if suffix else name

    def _names(self, name: str) -> dict[str, str]:
        return {suffix: self._buffer(name, suffix) for suffix in self.format.suffixes}

    def sharded(self) -> bool:
        return any(isinstance(b, DTensor) for b in self.buffers(recurse=False))

    def _just_in_time(self, x: torch.Tensor) -> bool:
        return bool(self.lora) or self.sharded() or (torch.is_grad_enabled() and x.requires_grad)


class QuantizedLinear(QuantizedModule):
    """A bias-free `nn.Linear` whose weight is stored in a quantized `WeightFormat`: buffers
    `weight` and the format's others (`scales`, ...)."""

    def __init__(self, in_features: int, out_features: int, fmt: WeightFormat, dtype: torch.dtype, device=None):
        super().__init__(fmt)
        self.in_features, self.out_features = in_features, out_features
        for suffix, (shape, part_dtype) in fmt.parts(out_features, in_features).items():
            self.register_buffer(suffix or 'weight', torch.empty(shape, dtype=part_dtype or dtype, device=device))

    @staticmethod
    def _buffer(name: str, suffix: str) -> str:
        return suffix or name

    def _matrices(self):
        return (('weight', self.out_features, self.in_features),)

    def float_shape(self, name):
        return self.out_features, self.in_features

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: WeightFormat, empty: bool = False) -> 'QuantizedLinear':
        w = linear.weight
        module = cls(linear.in_features, linear.out_features, fmt, w.dtype, w.device)
        if not empty:
            for suffix, tensor in fmt.quantize(w).items():
                setattr(module, suffix or 'weight', tensor)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._just_in_time(x):
            parts = {suffix: getattr(self, name) for suffix, name in self._names('weight').items()}
            return self.format.linear(x, parts, self.kernel_cache, None)
        parts = StoredParts(self)
        y = frozen_linear(x, StoredMatrix(parts, self.format, self._names('weight')))
        parts.release()
        if 'weight' in self.lora:
            y = y + self.lora['weight'].input_update(x).to(y.dtype)
        return y

    def stored_matrix(self) -> StoredMatrix:
        """The weight, gathered on first use when sharded and kept until dropped: the LM head's, which the
        training loss reads block by block (`StoredMatrix.blocks`)."""
        return StoredMatrix(StoredParts(self), self.format, self._names('weight'))

    def extra_repr(self) -> str:
        return f'in_features={self.in_features}, out_features={self.out_features}, {self.format.name}'


class QuantizedExperts(QuantizedModule, Experts):
    """The dropless GLU experts with weights in a quantized `WeightFormat`. `w1`/`v1` keep the float
    layout `(E * ffn, d)` (a row is an output channel); `w2` is stored per expert transposed,
    `(E * d, ffn)`, so that its output channels are rows too and every expert multiplies by a
    contiguous `(out, in)` block. Each matrix's other parts are `w1_scales`, ... (a row per row)."""

    def __init__(self, d_model: int, ffn_hidden_size: int, num_experts: int, fmt: WeightFormat, dtype: torch.dtype,
                 device=None):
        Experts.__init__(self, d_model, ffn_hidden_size, num_experts)
        self._set_format(fmt)
        for name, rows, cols in self._matrices():
            for suffix, (shape, part_dtype) in fmt.parts(num_experts * rows, cols).items():
                self.register_buffer(self._buffer(name, suffix),
                                     torch.empty(shape, dtype=part_dtype or dtype, device=device))

    def _matrices(self) -> tuple[tuple[str, int, int], ...]:
        ffn, d = self.ffn_hidden_size, self.d_model
        return ('w1', ffn, d), ('v1', ffn, d), ('w2', d, ffn)

    def float_shape(self, name):
        return self.num_experts * self.ffn_hidden_size, self.d_model

    @classmethod
    def from_experts(cls, experts: GLUExperts, fmt: WeightFormat, empty: bool = False) -> 'QuantizedExperts':
        e, ffn, d = experts.num_experts, experts.ffn_hidden_size, experts.d_model
        module = cls(d, ffn, e, fmt, experts.w1.dtype, experts.w1.device)
        if not empty:
            w2_t = experts.w2.detach().view(e, ffn, d).transpose(1, 2).reshape(e * d, ffn)
            for name, weight in (('w1', experts.w1), ('v1', experts.v1), ('w2', w2_t)):
                for suffix, tensor in fmt.quantize(weight).items():
                    setattr(module, cls._buffer(name, suffix), tensor)
        return module

    def forward(self, x: torch.Tensor, top_weights: torch.Tensor, top_experts: torch.Tensor) -> torch.Tensor:
        if not self._just_in_time(x):
            return dropless_moe(x, top_weights, top_experts, self.num_experts, self.expert_ffn())
        parts = StoredParts(self)
        out = dropless_moe(x, top_weights, top_experts, self.num_experts, self.adapted_ffn(parts))
        parts.release()
        return out

    def expert_ffn(self) -> ExpertFFN:
        def linear(name: str, rows_per_expert: int, e: int, x: torch.Tensor) -> torch.Tensor:
            rows = slice(e * rows_per_expert, (e + 1) * rows_per_expert)
            parts = {suffix: getattr(self, self._buffer(name, suffix))[rows] for suffix in self.format.suffixes}
            return self.format.linear(x, parts, self.kernel_cache, (name, e))

        ffn, d = self.ffn_hidden_size, self.d_model

        def ffn_of(e: int, rows: torch.Tensor) -> torch.Tensor:
            gated = F.silu(linear('w1', ffn, e, rows)).mul_(linear('v1', ffn, e, rows))
            return linear('w2', d, e, gated)

        return ffn_of

    def adapted_ffn(self, parts: StoredParts, read_factor=lambda factor: factor) -> ExpertFFN:
        """Expert `e`'s GLU with each matrix dequantized just in time and its adapter's update
        `scale * (x @ A[e].T) @ B[e].T` added (for `w2`, stored transposed: `scale * (x @ B[e]) @ A[e]`).
        `read_factor(A)` is the factor as multiplied by (expert parallelism: this rank's experts)."""
        ffn, d = self.ffn_hidden_size, self.d_model
        # unbind, not A[e]: each select's backward would write a zero-filled full-size gradient.
        factors = {name: (read_factor(adapter.lora_A).unbind(0), read_factor(adapter.lora_B).unbind(0), adapter.scale)
                   for name, adapter in self.lora.items()}

        def linear(name: str, rows_per_expert: int, e: int, x: torch.Tensor) -> torch.Tensor:
            rows = slice(e * rows_per_expert, (e + 1) * rows_per_expert)
            y = frozen_linear(x, StoredMatrix(parts, self.format, self._names(name), rows))
            if name in factors:
                a, b, scale = factors[name]
                first, second = (b[e].t(), a[e].t()) if name == 'w2' else (a[e], b[e])
                y = y + (F.linear(F.linear(x, first.to(x.dtype)), second.to(x.dtype)) * scale.to(x.dtype)).to(y.dtype)
            return y

        def ffn_of(e: int, rows: torch.Tensor) -> torch.Tensor:
            return linear('w2', d, e, F.silu(linear('w1', ffn, e, rows)) * linear('v1', ffn, e, rows))

        return ffn_of

    def extra_repr(self) -> str:
        return f'{Experts.extra_repr(self)}, {self.format.name}'


class ExpertParallelQuantizedExperts(ExpertParallel, QuantizedExperts):
    """The quantized experts (a QLoRA base) under expert parallelism: each rank stores its experts'
    rows of every buffer (`Shard(0)` over the expert-parallel mesh, as the float experts' weights),
    and their adapters, and runs the rows sent to them."""

    def __init__(self, experts: QuantizedExperts, mesh):
        self.check_split(experts.num_experts, mesh)
        Experts.__init__(self, experts.d_model, experts.ffn_hidden_size, experts.num_experts)
        self._set_format(experts.format)
        self._place_on(mesh)
        for name, buffer in experts.named_buffers(recurse=False):
            self.register_buffer(name, shard_by_expert(buffer, mesh))
        self.lora = experts.lora
        shard_expert_tensors(self.lora, mesh)

    def forward(self, x: torch.Tensor, top_weights: torch.Tensor, top_experts: torch.Tensor) -> torch.Tensor:
        ffn = self.adapted_ffn(StoredParts(self, local=True), self.local_gradient)
        return self.dispatch(x, top_weights, top_experts, ffn)


def shard_quantized(model: nn.Module, mesh) -> None:
    """Shards every stored tensor of the quantized modules of `model` by rows over the 1-D `mesh`
    (a `DTensor` `Shard(0)`, as FSDP2 shards weights): each rank keeps its rows of the values it holds
    (or of nothing, on meta), nothing is sent. The modules gather a matrix when they multiply by it.
    Experts already placed by expert parallelism keep their experts' rows whole."""
    for module in model.modules():
        if isinstance(module, QuantizedModule) and not module.sharded():
            for name, buffer in list(module.named_buffers(recurse=False)):
                module._buffers[name] = distribute_tensor(buffer, mesh, [Shard(0)], src_data_rank=None)


def store_scales_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Casts the scales and zero points of every quantized module of `model` to `dtype`: a QLoRA base
    keeps 16-bit ones in an fp32 model (int4 at 4 + 32 / group_size bits per weight)."""
    for module in model.modules():
        if isinstance(module, QuantizedModule):
            for name, buffer in list(module.named_buffers(recurse=False)):
                if buffer.is_floating_point():
                    module._buffers[name] = buffer.to(dtype)


# ---------------------------------------------------------------- float <-> stored names


@dataclass(frozen=True)
class MatrixLayout:
    """Where a float matrix of the model (`float_name`, as in a float checkpoint) lives in a quantized
    model's state dict: `stored` maps each format suffix to its tensor name. `experts` > 0: an expert
    `w2`, stored per expert transposed (`(E * d, ffn)` for the float `(E * ffn, d)`)."""

    float_name: str
    stored: dict[str, str]
    experts: int = 0

    def float_rows(self, read, rows: slice, shape: tuple[int, int]) -> torch.Tensor:
        """Rows `rows` of the stored layout, in float, from `read(region)` of the float `shape` matrix."""
        if not self.experts:
            return read((rows, slice(None)))
        ffn, d = shape[0] // self.experts, shape[1]
        start, stop = rows.start, rows.stop
        blocks = []
        for e in range(start // d, (stop - 1) // d + 1):
            lo, hi = max(start, e * d) - e * d, min(stop, (e + 1) * d) - e * d
            blocks.append(read((slice(e * ffn, (e + 1) * ffn), slice(lo, hi))).t())
        return torch.cat(blocks)

    def to_float(self, stored: torch.Tensor) -> torch.Tensor:
        """The float layout of the dequantized stored matrix."""
        if not self.experts:
            return stored
        rows, ffn = stored.shape
        return stored.view(self.experts, rows // self.experts, ffn).transpose(1, 2).reshape(-1, rows // self.experts)


def matrix_layouts(config) -> list[MatrixLayout]:
    """The quantized matrices of a model of `config` (quantized), by float name."""
    fmt = weight_format(config.quantization, config.quantization_group_size)

    def stored(module: str, kind: type[QuantizedModule], name: str) -> dict[str, str]:
        return {suffix: f'{module}.{kind._buffer(name, suffix)}' for suffix in fmt.suffixes}

    layouts = []
    for i in range(config.n_layers):
        for attn in ('Wqkv', 'out_proj'):
            module = f'blocks.{i}.attn.{attn}'
            layouts.append(MatrixLayout(f'{module}.weight', stored(module, QuantizedLinear, 'weight')))
        for name in ('w1', 'v1', 'w2'):
            module = f'blocks.{i}.ffn.experts'
            layouts.append(MatrixLayout(f'{module}.{name}', stored(module, QuantizedExperts, name),
                                        config.ffn_config.moe_num_experts if name == 'w2' else 0))
    layouts.append(MatrixLayout('lm_head.weight', stored('lm_head', QuantizedLinear, 'weight')))
    return layouts


def dequantized_config(config):
    """The float model config of a quantized one (what dequantizing its weights gives)."""
    return replace(config, quantization=None)


def dequantize_matrix(config, layout: MatrixLayout, read, dtype: torch.dtype) -> torch.Tensor:
    """The float matrix `layout.float_name` of a quantized model of `config`, in `dtype`, from
    `read(stored name)`."""
    fmt = weight_format(config.quantization, config.quantization_group_size)
    return layout.to_float(fmt.dequantize({suffix: read(name) for suffix, name in layout.stored.items()}, dtype))


@torch.no_grad()
def quantize_into(config, layout: MatrixLayout, targets: dict[str, torch.Tensor], read,
                  shape: tuple[int, int]) -> None:
    """Fills this rank's rows of the stored tensors `targets` (by stored name; DTensors or plain) of
    `layout` with the quantized float rows they hold, read as regions of the float `shape` matrix by
    `read(region)`: a rank reads and quantizes its own rows only."""
    fmt = weight_format(config.quantization, config.quantization_group_size)
    rows = local_region(targets[layout.stored['']])[0]
    if rows.stop <= rows.start:
        return  # FSDP-style chunks leave the last ranks of a short matrix without rows
    quantized = fmt.quantize(layout.float_rows(read, rows, shape).to(targets[layout.stored['scales']].dtype))
    for suffix, name in layout.stored.items():
        local_part(targets[name]).copy_(quantized[suffix])


@torch.no_grad()
def quantize(model, method: str | None, empty: bool = False, group_size: int | None = None):
    """Quantizes `model` (a `DbrxLM`) in place and returns it; `method` None, or the method the model
    is already quantized with, leaves it as it is. `group_size` (int4; None: the config's, 128 by
    default) is how many input weights share a scale and zero point. `empty` builds the quantized
    modules with uninitialised tensors (to load a quantized checkpoint into). A matrix the format
    cannot store is one clear error before anything changes."""
    check_quantization(method)
    if method is None or method == model.config.quantization and not empty:
        if method == 'int4' and group_size not in (None, model.config.quantization_group_size):
            raise ConfigError('quantize', f'the model is already int4 in groups of '
                                          f'{model.config.quantization_group_size}, not {group_size}')
        return model
    if model.config.quantization is not None and not empty:
        raise ConfigError('quantize', f'the model is already quantized ({model.config.quantization}); '
                                      f'load its float checkpoint to quantize it as {method}')
    config = replace(model.config, quantization=method,
                     quantization_group_size=group_size or model.config.quantization_group_size)
    config.check()
    fmt = weight_format(method, config.quantization_group_size)
    fmt.check_width(config.d_model, 'the attention, expert w1/v1 and LM head matrices (d_model)')
    fmt.check_width(config.ffn_config.ffn_hidden_size, 'the expert w2 matrices (ffn_hidden_size)')
    for block in model.blocks:
        block.attn.Wqkv = QuantizedLinear.from_linear(block.attn.Wqkv, fmt, empty)
        block.attn.out_proj = QuantizedLinear.from_linear(block.attn.out_proj, fmt, empty)
    replace_experts(model, lambda experts: QuantizedExperts.from_experts(experts, fmt, empty))
    model.lm_head = QuantizedLinear.from_linear(model.lm_head, fmt, empty)
    model.config = config
    return model
