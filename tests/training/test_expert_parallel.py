"""Expert parallelism under Composer's FSDP2: 2 and 4 gloo ranks train exactly as one process
accumulating the same micro-batches; each rank holds its share of the expert weights."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dbrx_train.model.config import AttentionConfig, FFNConfig, ModelConfig
from dbrx_train.model.dbrx import DbrxLM

from tests.spawn import run_ranks

STEPS, MICRO_BATCH, SEQ, VOCAB, EXPERTS = 3, 2, 16, 64, 8
CASES = {2: [(2, 1), (2, 4)], 4: [(2, 4), (4, 1)]}  # world size: (moe_world_size, top_k)
EXPERT_WEIGHTS = ('w1', 'v1', 'w2')


def tiny(top_k: int) -> DbrxLM:
    torch.manual_seed(0)
    config = ModelConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=SEQ, vocab_size=VOCAB, init_std=0.1,
                         attn_config=AttentionConfig(kv_n_heads=2),
                         ffn_config=FFNConfig(ffn_hidden_size=24, moe_num_experts=EXPERTS, moe_top_k=top_k))
    return DbrxLM(config)


def batches(world: int) -> torch.Tensor:
    """`(steps, ranks, micro_batch, seq)` token ids: each step's global batch, split by rank."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (STEPS, world, MICRO_BATCH, SEQ), generator=g)


def optimizer(params):
    # SGD, not Adam: a parameter's change is then proportional to its gradient, so the comparison
    # checks every gradient. Adam's first steps move each weight by about lr * sign(gradient),
    # which turns a gradient of ~1e-9 summed in another order into a difference of lr.
    return torch.optim.SGD(params, lr=0.5, momentum=0.9)


def one_process(world: int, top_k: int) -> dict:
    """The reference: one process, the global batch as `world` accumulated micro-batches."""
    model, data, trace = tiny(top_k), batches(world), {'loss': [], 'aux': [], 'params': []}
    opt = optimizer(model.parameters())
    for step in range(STEPS):
        for ids in data[step]:
            out = model(ids, labels=ids)
            (out.loss / world).backward()
            trace['loss'].append(out.loss.item())
            trace['aux'].append(out.aux_loss.item())
        opt.step()
        opt.zero_grad()
        trace['params'].append({n: p.detach().clone() for n, p in model.named_parameters()})
    return trace


def as_composer_model(model: DbrxLM):
    """What the Trainer hands Composer's FSDP2: a ComposerModel whose child is the DbrxLM (without
    ComposerDbrx's evaluation metrics, slow to import)."""
    from composer.models import ComposerModel

    class Wrapped(ComposerModel):
        def __init__(self):
            super().__init__()
            self.model = model

        forward = loss = None

    return Wrapped()


def train_on_rank(moe_world_size: int, top_k: int) -> dict:
    from composer.core import Precision
    from composer.distributed import parallelize_composer_model
    from composer.utils.parallelism import FSDP2Config

    from dbrx_train.training.expert_parallel import expert_parallel_mesh, parallelize_experts
    from dbrx_train.training.gradient_average import fix_gradient_average

    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny(top_k)
    parallelize_experts(model, expert_parallel_mesh(moe_world_size))
    opt = optimizer(model.parameters())  # before FSDP2, as the Trainer builds it
    parallelize_composer_model(as_composer_model(model), opt, FSDP2Config(), Precision.FP32)
    fix_gradient_average(model)

    experts = model.blocks[0].ffn.experts
    stored = sum(getattr(experts, n).to_local().numel() for n in EXPERT_WEIGHTS)
    experts.unshard()  # what a forward pass gathers: this rank's whole experts
    gathered = sum(getattr(experts, n).to_local().numel() for n in EXPERT_WEIGHTS)
    experts.reshard()
    trace = {'loss': [], 'aux': [], 'params': [], 'stored': stored, 'gathered': gathered,
             'total': sum(getattr(experts, n).numel() for n in EXPERT_WEIGHTS)}
    data = batches(world)
    for step in range(STEPS):
        ids = data[step, rank]
        out = model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        trace['loss'].append(out.loss.item())
        trace['aux'].append(out.aux_loss.item())
        trace['params'].append({n: p.full_tensor().detach() for n, p in model.named_parameters()})
    return trace


def all_cases_on_rank() -> dict:
    return {case: train_on_rank(*case) for case in CASES[dist.get_world_size()]}


@pytest.fixture(scope='module')
def spawned():
    """Every case of a world size in one group of spawned ranks (starting processes is the slow part)."""
    results = {}

    def get(world):
        if world not in results:
            results[world] = run_ranks(all_cases_on_rank, world)
        return results[world]

    return get


@pytest.mark.parametrize('world,moe_world_size,top_k', [(w, *case) for w, cases in CASES.items() for case in cases])
def test_expert_parallel_training_matches_one_process(spawned, world, moe_world_size, top_k):
    ranks = [cases[moe_world_size, top_k] for cases in spawned(world)]
    reference = one_process(world, top_k)
    for step in range(STEPS):
        for rank, trace in enumerate(ranks):
            micro_batch = step * world + rank
            assert trace['loss'][step] == pytest.approx(reference['loss'][micro_batch], rel=1e-5, abs=1e-5)
            assert trace['aux'][step] == pytest.approx(reference['aux'][micro_batch], rel=1e-5, abs=1e-5)
        expected = reference['params'][step]
        for name, value in ranks[0]['params'][step].items():
            torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-5, msg=lambda m: f'{step} {name}: {m}')
    for trace in ranks:
        # Stored: sharded over all ranks; gathered for the forward pass: 1/moe_world_size, whole experts.
        assert trace['stored'] * world == trace['total']
        assert trace['gathered'] * moe_world_size == trace['total']
