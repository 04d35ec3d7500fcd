"""Initial weights that do not depend on where the tensors live.

A parameter is drawn in fixed blocks of rows, each from its own generator keyed by (seed,
parameter name, block index). The blocks depend only on the parameter's full shape, so a rank that
holds rows `[a, b)` of it (an FSDP shard, an expert-parallel rank's experts, both) draws only the
blocks that overlap them and keeps the overlap: one process, N FSDP ranks and N ranks with any
`moe_world_size` get bit-identical weights for the same seed, from a model built on `cpu` or on
`meta` and materialised shard by shard. A rank draws at most two blocks it does not keep a whole
of per parameter (the ends of its shard).

Values are drawn on the CPU in fp32 (CPU and CUDA generators give different streams) and copied
to the parameter's device and dtype.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

BLOCK_ELEMENTS = 2**20  # about how many elements one generator draws (4 MiB of fp32)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of `tensor`: the local shard of a DTensor (FSDP2, expert parallelism), else
    the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_region(tensor: torch.Tensor) -> tuple[slice, ...]:
    """Where this rank's part of `tensor` lies in the full tensor."""
    if isinstance(tensor, DTensor):
        shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    else:
        shape, offset = tensor.shape, (0,) * tensor.dim()
    return tuple(slice(start, start + size) for start, size in zip(offset, shape))


def block_generator(seed: int, name: str, block: int) -> torch.Generator:
    """The CPU generator of one block of rows of parameter `name`."""
    digest = hashlib.blake2b(f'{seed}/{name}/{block}'.encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, 'little') >> 1)


def rows_per_block(shape: tuple[int, ...], block_elements: int = BLOCK_ELEMENTS) -> int:
    return max(1, block_elements // max(1, math.prod(shape[1:])))


def draw_normal(seed: int, name: str, shape: tuple[int, ...], region: tuple[slice, ...], std: float,
                block_elements: int = BLOCK_ELEMENTS) -> torch.Tensor:
    """`region` of the full `shape` tensor Normal(0, std) that parameter `name` gets from `seed`,
    drawing only the blocks of rows that overlap it."""
    start, stop = region[0].start, region[0].stop
    per_block = rows_per_block(shape, block_elements)
    out = torch.empty((stop - start, *shape[1:]))
    if stop > start:
        for block in range(start // per_block, (stop - 1) // per_block + 1):
            first = block * per_block
            values = torch.empty((min(shape[0], first + per_block) - first, *shape[1:]))
            values.normal_(0.0, std, generator=block_generator(seed, name, block))
            lo, hi = max(start, first), min(stop, first + per_block)
            out[lo - start : hi - start] = values[lo - first : hi - first]
    return out[(slice(None), *region[1:])]


@torch.no_grad()
def init_normal_(param: torch.Tensor, seed: int, name: str, std: float) -> None:
    """Fills this rank's part of `param` (plain or DTensor) with its rows of `name`'s initial values."""
    local = local_part(param)
    if local.numel():
        local.copy_(draw_normal(seed, name, tuple(param.shape), local_region(param), std))
