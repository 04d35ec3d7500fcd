"""Expert parallelism: each rank of an expert-parallel group owns `num_experts / group size` whole
experts, and the (token, slot) rows travel to them.

Per layer, on every rank of the group: route locally, exchange the rows-per-expert counts,
`all_to_all` each row to the rank owning its expert (uneven splits: no capacity factor, no
padding, no dropped row), run the local experts with the dropless grouped GLU of the `torch`
backend, `all_to_all` the results back and combine them with the router weights. Autograd runs
back through both all-to-alls. A token's output depends only on that token, as in one process.

The parameters keep their names and full shapes: each is a DTensor `Shard(0)` over the group's
mesh (experts are contiguous blocks of rows of `w1`, `v1`, `w2`), so a distributed checkpoint
records the layout and reshards on load. A weight's parametrizations (LoRA's `LowRankUpdate`) move
with it, their tensors sharded the same way (`shard_expert_tensors`: every tensor of an `Experts`
module is laid out by expert along its first dimension), so each rank trains the adapters of the
experts it owns and reading `self.w1` gives its experts' adapted weight.

The exchange, the gradient scaling and the traffic count are `ExpertParallel`'s: the float experts
here and the quantized ones of a QLoRA base (`model.quantize.ExpertParallelQuantizedExperts`) share it.

Gradients: the rows of every rank of the group reach the local experts, so their weight gradient
sums over the group's micro-batches; it is divided by the group size here, which makes it the
group's mean, as data-parallel gradients are averaged over their ranks. Data parallelism over
the replicas of the group (FSDP2 on the other mesh dimension) then averages across replicas.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.nn.functional import all_to_all_single
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.nn.utils import parametrize

from dbrx_train.model.moe.base import GLUExperts
from dbrx_train.model.moe.torch_dropless import ExpertFFN, combine, glu_ffn, run_grouped, sort_by_expert

WEIGHTS = ('w1', 'v1', 'w2')


class ExpertParallel:
    """What the expert-parallel experts share (a mixin before an `Experts` class): the mesh, the
    exchange of rows with the ranks owning their experts, and the count of that traffic."""

    mesh: DeviceMesh
    num_experts: int

    @staticmethod
    def check_split(num_experts: int, mesh: DeviceMesh) -> None:
        if num_experts % mesh.size():
            raise ValueError(f'{num_experts} experts cannot be split over {mesh.size()} ranks')

    def _place_on(self, mesh: DeviceMesh) -> None:
        self.mesh = mesh
        self.traffic = torch.zeros(2, dtype=torch.int64)  # rows and bytes sent to other ranks, since take_traffic

    @property
    def local_experts(self) -> int:
        return self.num_experts // self.mesh.size()

    def local_gradient(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's experts of `tensor` (a DTensor by expert, gathered by FSDP2, or a plain one),
        its gradient scaled to the group's mean (see the module's docstring)."""
        return _ScaleGrad.apply(_local(tensor), 1.0 / self.mesh.size())

    def dispatch(self, x: torch.Tensor, top_weights: torch.Tensor, top_experts: torch.Tensor,
                 local_ffn: ExpertFFN) -> torch.Tensor:
        """What `dropless_moe` computes, each row run by the rank that owns its expert: `local_ffn(e,
        rows)` is this rank's local expert `e` (whatever stores its weights). The gradient it gives
        its weights sums over the group's rows: `forward` scales it to the group's mean."""
        group, ranks, local = self.mesh.get_group(), self.mesh.size(), self.local_experts
        order, token_of_row, rows_per_expert = sort_by_expert(top_experts, self.num_experts)
        # received[src * local + e]: the rows rank `src` sends to this rank's expert e.
        received_per_expert = torch.empty_like(rows_per_expert)
        dist.all_to_all_single(received_per_expert, rows_per_expert, group=group)
        sent, received = torch.stack([rows_per_expert, received_per_expert]).view(2, ranks, local).tolist()
        send_splits, recv_splits = [sum(r) for r in sent], [sum(r) for r in received]

        rows = _all_to_all(x.index_select(0, token_of_row), recv_splits, send_splits, group)
        # Arrived grouped by source rank, then expert: regroup by expert for the grouped GLU.
        expert_of_row = torch.arange(local, device=x.device).repeat(ranks).repeat_interleave(
            received_per_expert, output_size=sum(recv_splits))
        by_expert = torch.argsort(expert_of_row, stable=True)
        out = run_grouped(rows.index_select(0, by_expert), [sum(col) for col in zip(*received)], local_ffn)
        out = out.index_select(0, torch.argsort(by_expert))
        expert_out = _all_to_all(out, send_splits, recv_splits, group)
        self._count_traffic(send_splits, recv_splits, rows, expert_out)
        return combine(x, expert_out, top_weights, order, token_of_row)

    def _count_traffic(self, send_splits: list[int], recv_splits: list[int], rows: torch.Tensor,
                       expert_out: torch.Tensor) -> None:
        me = self.mesh.get_local_rank()
        dispatched, returned = sum(send_splits) - send_splits[me], sum(recv_splits) - recv_splits[me]
        d, in_bytes, out_bytes = rows.shape[-1], rows.element_size(), expert_out.element_size()
        self.traffic += torch.tensor([dispatched, d * (dispatched * in_bytes + returned * out_bytes)])
        if expert_out.requires_grad:
            # Counted when the backward pass runs (each all-to-all the other way): once, even when
            # activation checkpointing runs the forward pass (and its all-to-alls) twice.
            backward = torch.tensor([0, d * (dispatched * out_bytes + returned * in_bytes)])

            def count_backward(grad: torch.Tensor) -> None:
                self.traffic += backward

            expert_out.register_hook(count_backward)

    def take_traffic(self) -> torch.Tensor:
        """`[rows dispatched to other ranks, bytes this rank sent to others]` since the last call: the
        forward passes' all-to-alls (activation checkpointing's recomputation included) and the
        backward pass's."""
        traffic, self.traffic = self.traffic, torch.zeros_like(self.traffic)
        return traffic

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, expert_parallel={self.mesh.size()} (local experts {self.local_experts})'


class ExpertParallelExperts(ExpertParallel, GLUExperts):
    def __init__(self, experts: GLUExperts, mesh: DeviceMesh):
        """This rank's experts of `experts` (whose parameters every rank holds in full, with the same
        values) over the 1-D expert-parallel `mesh`."""
        self.check_split(experts.num_experts, mesh)
        GLUExperts.__init__(self, experts.d_model, experts.ffn_hidden_size, experts.num_experts, device='meta')
        self._place_on(mesh)
        for name in WEIGHTS:
            adapted = parametrize.is_parametrized(experts, name)
            full = experts.parametrizations[name].original if adapted else getattr(experts, name)
            setattr(self, name, nn.Parameter(shard_by_expert(full, mesh), requires_grad=full.requires_grad))
            for parametrization in experts.parametrizations[name] if adapted else ():
                shard_expert_tensors(parametrization, mesh)
                # unsafe: no trial forward (on a CPU-built model, a full-size temporary per weight).
                parametrize.register_parametrization(self, name, parametrization, unsafe=True)

    def forward(self, x: torch.Tensor, top_weights: torch.Tensor, top_experts: torch.Tensor) -> torch.Tensor:
        # Read through the parametrizations (the adapted weight, under LoRA): this rank's experts.
        weights = [self.local_gradient(getattr(self, name)) for name in WEIGHTS]
        return self.dispatch(x, top_weights, top_experts, glu_ffn(*weights, self.local_experts))


def shard_by_expert(tensor: torch.Tensor, mesh: DeviceMesh) -> DTensor:
    """`tensor` (laid out by expert along its first dimension) as this rank's experts: `Shard(0)` over
    `mesh`. Every rank holds the same values (or none, on meta): each keeps its rows, nothing is sent."""
    return distribute_tensor(tensor.detach(), mesh, [Shard(0)], src_data_rank=None)


def shard_expert_tensors(module: nn.Module, mesh: DeviceMesh) -> None:
    """Every parameter and buffer of `module` (one that belongs to an `Experts` module: laid out by
    expert along its first dimension) becomes this rank's experts, in place; a 0-d one (a scale) is
    the same for every expert and stays whole."""
    for owner in module.modules():
        for name, param in list(owner.named_parameters(recurse=False)):
            if param.dim():
                setattr(owner, name, nn.Parameter(shard_by_expert(param, mesh), requires_grad=param.requires_grad))
        for name, buffer in list(owner.named_buffers(recurse=False)):
            if buffer.dim():
                setattr(owner, name, shard_by_expert(buffer, mesh))


def _all_to_all(rows: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Differentiable all-to-all of `rows` with uneven splits: the backward pass sends the
    gradients the opposite way."""
    out = rows.new_empty((sum(out_splits), rows.shape[-1]))
    return all_to_all_single(out, rows.contiguous(), out_splits, in_splits, group=group)


def _local(param: torch.Tensor) -> torch.Tensor:
    # Gathered by FSDP2 (or without it), an expert weight is a DTensor over the expert mesh.
    return param.to_local() if isinstance(param, DTensor) else param


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale` in the backward pass."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None
