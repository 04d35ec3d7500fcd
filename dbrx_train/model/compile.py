"""torch.compile for DBRX: each transformer block compiled on its own, the dropless experts eager.

As torchtitan does, each block is compiled rather than the whole model: the blocks share one
code object and their parameters are graph inputs, so one compilation serves every block and
compile time does not grow with depth; FSDP2 units and activation checkpointing still wrap blocks
(`nn.Module.compile` keeps each block a `DbrxBlock`). Inside a block, the norms, attention and the
router compile without a graph break; the experts (`run_experts`) run eagerly between two graphs,
because their row counts per expert decide their matmul shapes and change every step.

The training YAML's `compile_config` (Composer's and llm-foundry's key) is `CompileConfig`;
`{}` compiles with torch.compile's defaults, and leaving the key out does not compile.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from dbrx_train.errors import ConfigError
from dbrx_train.model.dbrx import DbrxLM


@dataclass(frozen=True)
class CompileConfig:
    """torch.compile's options."""

    backend: str = 'inductor'  # 'inductor' generates C++ (CPU) or Triton (CUDA) kernels
    mode: str | None = None  # e.g. 'max-autotune'; None: torch's default
    dynamic: bool | None = None  # None: static shapes first, dynamic for a dimension once it changes
    options: dict[str, Any] | None = None  # the backend's own options (inductor's config keys)

    def check(self) -> None:
        if not self.backend:
            raise ConfigError('backend', 'must name a torch.compile backend, e.g. inductor')

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `torch.compile` / `nn.Module.compile`."""
        return {name: value for name, value in asdict(self).items() if value is not None}


def compile_blocks(model: DbrxLM, config: CompileConfig | None = None) -> None:
    """Compiles each of `model`'s transformer blocks in place. For `training.parallelize`: after
    activation checkpointing and before FSDP, as torchtitan orders them."""
    kwargs = (config or CompileConfig()).kwargs()
    for block in model.blocks:
        block.compile(**kwargs)
