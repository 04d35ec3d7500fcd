"""Expert-parallel dispatch against the one-process grouped experts, on 2 and 4 gloo ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from dbrx_train.model.moe import TorchDroplessExperts
from dbrx_train.model.moe.expert_parallel import ExpertParallelExperts

from tests.spawn import SpawnedOnce

D_MODEL, FFN, EXPERTS, TOKENS = 32, 24, 8, 13  # tokens per rank


def routing(kind: str, world: int, top_k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rank's tokens `(world, TOKENS, D_MODEL)`, router weights and experts `(world, TOKENS, top_k)`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(world, TOKENS, D_MODEL, generator=g)
    weights = torch.rand(world, TOKENS, top_k, generator=g)
    experts = torch.rand(world, TOKENS, EXPERTS, generator=g).argsort(dim=-1)[..., :top_k]  # distinct per token
    local = EXPERTS // world
    if kind == 'stay_home':  # each rank's tokens go only to its own experts: nothing crosses ranks
        experts = experts % local + torch.arange(world)[:, None, None] * local
        experts = experts[..., :1].expand(-1, -1, top_k) if local < top_k else experts
    elif kind == 'one_owner':  # every token of every rank goes to rank 0's experts: the others get no row
        experts = experts % local
    return x, weights, experts


CASES = {2: [('random', 1), ('random', 4), ('stay_home', 2), ('one_owner', 4)]}  # 4 ranks: tests/training


def all_cases_on_rank():
    return {case: dispatch_on_rank(*case) for case in CASES[dist.get_world_size()]}


def dispatch_on_rank(kind: str, top_k: int):
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    full = TorchDroplessExperts(D_MODEL, FFN, EXPERTS)
    for weight in (full.w1, full.v1, full.w2):
        torch.nn.init.normal_(weight, std=0.2)
    ep = ExpertParallelExperts(full, init_device_mesh('cpu', (world,)))
    x, weights, experts = routing(kind, world, top_k)
    x = x[rank].requires_grad_()
    out = ep(x, weights[rank], experts[rank])
    out.backward(torch.ones_like(out) * (rank + 1))
    params = {n: getattr(ep, n) for n in ('w1', 'v1', 'w2')}
    return {'out': out.detach(), 'x_grad': x.grad, 'w': {n: p.to_local().detach() for n, p in params.items()},
            'grad': {n: p.grad.to_local() for n, p in params.items()}}


def one_process(kind: str, world: int, top_k: int):
    torch.manual_seed(0)
    full = TorchDroplessExperts(D_MODEL, FFN, EXPERTS)
    for weight in (full.w1, full.v1, full.w2):
        torch.nn.init.normal_(weight, std=0.2)
    x, weights, experts = routing(kind, world, top_k)
    x = x.reshape(world * TOKENS, D_MODEL).requires_grad_()
    out = full(x, weights.reshape(-1, top_k), experts.reshape(-1, top_k))
    upstream = torch.arange(1, world + 1).repeat_interleave(TOKENS)[:, None].float()
    out.backward(upstream.expand_as(out))
    return full, out.detach().view(world, TOKENS, D_MODEL), x.grad.view(world, TOKENS, D_MODEL)


@pytest.fixture(scope='module')
def spawned():
    return SpawnedOnce(all_cases_on_rank)


@pytest.mark.parametrize('world,kind,top_k', [(w, *case) for w, cases in CASES.items() for case in cases])
def test_expert_parallel_dispatch_matches_one_process(spawned, world, kind, top_k):
    ranks = [cases[kind, top_k] for cases in spawned(world)]
    full, out, x_grad = one_process(kind, world, top_k)
    rows = EXPERTS * FFN // world
    for rank, got in enumerate(ranks):
        torch.testing.assert_close(got['out'], out[rank], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got['x_grad'], x_grad[rank], atol=1e-5, rtol=1e-5)
        for name in ('w1', 'v1', 'w2'):
            mine = slice(rank * rows, (rank + 1) * rows)
            assert got['w'][name].shape == (rows, D_MODEL)  # whole experts: 1/world of the expert weights
            torch.testing.assert_close(got['w'][name], getattr(full, name).detach()[mine])
            # The group's mean: the sum over every rank's tokens, divided by the group size.
            torch.testing.assert_close(got['grad'][name] * world, getattr(full, name).grad[mine], atol=1e-5, rtol=1e-5)
