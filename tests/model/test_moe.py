"""Dropless MoE: the grouped backend against a naive per-token loop, and the MoE losses."""

import pytest
import torch
import torch.nn.functional as F

from dbrx_train.model.config import FFNConfig, ModelConfig
from dbrx_train.model.dbrx import DbrxLM, MoE
from dbrx_train.model.moe import TorchDroplessExperts, replace_experts
from dbrx_train.model.loss import load_balancing_loss

D_MODEL, FFN, EXPERTS = 32, 24, 16


def make_moe(top_k=4, p=1.0, seed=0) -> MoE:
    torch.manual_seed(seed)
    config = ModelConfig(d_model=D_MODEL, n_heads=4, n_layers=1, max_seq_len=64, vocab_size=64,
                         ffn_config=FFNConfig(ffn_hidden_size=FFN, moe_num_experts=EXPERTS, moe_top_k=top_k,
                                              moe_normalize_expert_weights=p))
    moe = MoE(config)
    for weight in (moe.experts.w1, moe.experts.v1, moe.experts.w2):
        torch.nn.init.normal_(weight, std=0.2)
    return moe


def reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The definition, token by token: softmax router, top-k, p-normalised weights, sum of GLU experts."""
    probs = moe.router(x).softmax(dim=-1)
    weights, experts = probs.topk(moe.top_k, dim=-1)
    if moe.normalize_p is not None:
        weights = weights / weights.norm(p=moe.normalize_p, dim=-1, keepdim=True)
    shape = (EXPERTS, FFN, D_MODEL)
    w1, v1, w2 = (getattr(moe.experts, n).view(shape) for n in ('w1', 'v1', 'w2'))
    rows = []
    for t in range(x.shape[0]):
        out = torch.zeros(D_MODEL)
        for weight, e in zip(weights[t], experts[t]):
            out = out + weight * ((F.silu(w1[e] @ x[t]) * (v1[e] @ x[t])) @ w2[e])
        rows.append(out)
    return torch.stack(rows)


@pytest.mark.parametrize('top_k,p', [(1, None), (2, 2.0), (4, 1.0), (16, 1.0)])
def test_grouped_experts_match_per_token_reference(top_k, p):
    moe = make_moe(top_k, p)
    x = torch.randn(37, D_MODEL)
    out, stats = moe(x)
    torch.testing.assert_close(out, reference_moe(moe, x), atol=1e-5, rtol=1e-5)
    assert stats.tokens_per_expert.sum() == 37 * top_k  # every token reached all of its top_k experts


@pytest.mark.parametrize('tokens', [1, 3])
@torch.no_grad()
def test_gathered_experts_of_the_compiled_decoding_step_match_the_reference(tokens):
    moe = make_moe(top_k=4)
    x = torch.randn(tokens, D_MODEL)
    weights, experts = moe.router(x).softmax(dim=-1).topk(4, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(moe.experts.gathered(x, weights, experts), reference_moe(moe, x), atol=1e-5, rtol=1e-5)


def tiny_lm(n_layers=3) -> DbrxLM:
    return DbrxLM(ModelConfig(d_model=D_MODEL, n_heads=4, n_layers=n_layers, max_seq_len=16, vocab_size=64,
                              ffn_config=FFNConfig(ffn_hidden_size=FFN, moe_num_experts=EXPERTS, moe_top_k=2)))


def test_replace_experts_swaps_the_blocks_it_is_given():
    model = tiny_lm()
    before = [block.ffn.experts for block in model.blocks]
    replace_experts(model, lambda old: TorchDroplessExperts(old.d_model, old.ffn_hidden_size, old.num_experts),
                    layers=[0, 2])
    after = [block.ffn.experts for block in model.blocks]
    assert after[1] is before[1]
    assert after[0] is not before[0] and after[2] is not before[2]
    assert all(isinstance(e, TorchDroplessExperts) for e in after)


def test_replace_experts_refuses_a_module_that_does_not_fit():
    model = tiny_lm(n_layers=1)
    with pytest.raises(TypeError, match='block 0: Linear is not an Experts module'):
        replace_experts(model, lambda old: torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match='block 0: .*num_experts=8.* replaces experts of other sizes'):
        replace_experts(model, lambda old: TorchDroplessExperts(old.d_model, old.ffn_hidden_size, 8))
    assert isinstance(model.blocks[0].ffn.experts, TorchDroplessExperts)


def test_no_token_dropped_when_all_tokens_route_to_one_expert():
    moe = make_moe(top_k=4)
    with torch.no_grad():  # positive inputs and a router that strongly prefers expert 5
        moe.router.weight.zero_()
        moe.router.weight[5] = 1.0
    x = torch.rand(64, D_MODEL) + 0.5
    out, stats = moe(x)
    assert stats.tokens_per_expert[5] == 64
    assert (out.abs().sum(dim=-1) > 0).all()  # a dropped token would get a zero output
    torch.testing.assert_close(out, reference_moe(moe, x), atol=1e-5, rtol=1e-5)


def test_token_output_does_not_depend_on_the_batch():
    moe = make_moe(top_k=4)
    x = torch.randn(40, D_MODEL)
    out, _ = moe(x)
    perm = torch.randperm(40)
    permuted, _ = moe(x[perm])
    alone, _ = moe(x[3:4])
    others_changed, _ = moe(torch.cat([x[3:4], torch.randn(25, D_MODEL)]))
    torch.testing.assert_close(permuted, out[perm], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(alone[0], out[3], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(others_changed[0], out[3], atol=1e-6, rtol=1e-6)


def test_gradients_match_reference():
    moe = make_moe(top_k=4, p=1.0)
    x = torch.randn(29, D_MODEL, requires_grad=True)
    upstream = torch.randn(29, D_MODEL)
    params = [x, moe.router.weight, moe.experts.w1, moe.experts.v1, moe.experts.w2]
    grads = torch.autograd.grad((moe(x)[0] * upstream).sum(), params)
    expected = torch.autograd.grad((reference_moe(moe, x) * upstream).sum(), params)
    for name, got, want in zip(['x', 'router', 'w1', 'v1', 'w2'], grads, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f'{n}: {m}')


@pytest.mark.parametrize('needs_grad', [(True, True, True, True), (True, False, False, False), (False, True, True, True)])
def test_glu_recomputing_backward_passes_gradcheck(needs_grad):
    from dbrx_train.model.moe.torch_dropless import _GLU

    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(shape, dtype=torch.float64, generator=gen).requires_grad_(grad)
              for shape, grad in zip([(5, 6), (4, 6), (4, 6), (4, 6)], needs_grad)]
    assert torch.autograd.gradcheck(_GLU.apply, inputs)


@pytest.mark.parametrize('top_k', [1, 4])
def test_load_balancing_loss_is_one_when_balanced(top_k):
    """Token t prefers experts t..t+top_k-1 (cyclically) equally: each expert gets the same number of
    assignments and, by symmetry, the same mean probability."""
    moe = make_moe(top_k=top_k)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(EXPERTS, D_MODEL))
    x = torch.zeros(EXPERTS, D_MODEL)
    for t in range(EXPERTS):
        for j in range(top_k):
            x[t, (t + j) % EXPERTS] = 3.0
    _, stats = moe(x)
    assert (stats.tokens_per_expert == top_k).all()
    balanced = load_balancing_loss(stats.mean_probs[None], stats.tokens_per_expert[None], top_k)
    torch.testing.assert_close(balanced, torch.tensor(1.0))
    # Everything on one expert, with all the probability: the worst case, num_experts.
    collapsed = torch.zeros(1, EXPERTS)
    collapsed[0, 0] = 1.0
    torch.testing.assert_close(load_balancing_loss(collapsed, collapsed * 100, top_k), torch.tensor(float(EXPERTS)))
