"""torch.compile: per-block compiled training and the static-shape compiled decoding step.

Graph structure and recompilation are dynamo's business and are checked with the cheap 'eager'
backend; numerics are checked with inductor (the backend users get) on tiny models.
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from tests.model.conftest import tiny_dbrx
from dbrx_train.model.attention import Causal
from dbrx_train.model.compile import CompileConfig, compile_blocks
from dbrx_train.model.decode import MIN_BUCKET, bucket_length
from dbrx_train.model.dbrx import rotary_cos_sin

VOCAB = 128


def fresh_model(seed=0):
    return tiny_dbrx(d_model=64, vocab=VOCAB, ffn=32, experts=8, top_k=2, seed=seed)


def ids(batch, length, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def graphs() -> int:
    return counters['stats']['unique_graphs']


@pytest.fixture(autouse=True)
def reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_attention_norms_and_router_compile_without_a_graph_break():
    model = fresh_model().train()
    block = model.blocks[0]
    x = torch.randn(2, 8, 64)
    cos, sin = rotary_cos_sin(torch.arange(8).expand(2, 8), model.config.head_dim, 500000.0)
    explained = torch._dynamo.explain(block)(x, cos, sin, Causal())
    # The only break is the call into the eager experts (dynamo reports it once per frame it splits).
    reasons = explained.break_reasons
    assert reasons
    for reason in reasons:
        assert 'torch.compiler.disable' in reason.reason, reason
        assert 'run_experts(' in reason.user_stack[-1].line, reason
    for part, args in ((block.norm_1, (x,)), (block.attn, (x, cos, sin, Causal())), (block.ffn.router, (x,))):
        torch.compile(part, fullgraph=True, backend='eager')(*args)  # raises on any break


def test_compiled_blocks_train_like_eager_and_do_not_recompile_as_routing_changes():
    # aot_eager: dynamo and AOTAutograd (the graphs, the backward, the eager experts between them)
    # without inductor's C++ build, which costs minutes on a loaded 2-core machine; bench_model.py
    # reports the inductor loss against eager on the bench config.
    eager, compiled = fresh_model().train(), fresh_model().train()
    compile_blocks(compiled, CompileConfig(backend='aot_eager'))
    for step in range(2):
        batch = ids(2, 16, seed=step)
        losses = [m.loss(batch) for m in (eager, compiled)]
        for loss in losses:
            loss.loss.backward()
        torch.testing.assert_close(losses[1].loss, losses[0].loss, atol=1e-5, rtol=1e-5)
        assert torch.equal(losses[1].tokens_per_expert, losses[0].tokens_per_expert)
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
        if step == 0:
            after_first = graphs()
            assert after_first > 0  # the blocks really were compiled
    assert graphs() == after_first  # other routing (other rows per expert): no recompilation


@torch.no_grad()
def test_compiled_greedy_decoding_equals_eager():
    model = fresh_model()
    prompt = ids(1, 5)
    eager = model.generate(prompt, max_new_tokens=12, stop_token_ids=())
    assert torch.equal(model.generate(prompt, max_new_tokens=12, stop_token_ids=(), compile={}), eager)


@torch.no_grad()
def test_a_batch_one_decoding_step_is_one_graph_experts_included():
    model = fresh_model()
    graphs_before, breaks_before = graphs(), sum(counters['graph_break'].values())
    model.generate(ids(1, 5), max_new_tokens=4, stop_token_ids=(), compile={'backend': 'eager'})
    assert graphs() == graphs_before + 1
    # a break per layer (the eager experts) costs more than their matmuls
    assert sum(counters['graph_break'].values()) == breaks_before


@torch.no_grad()
def test_new_lengths_and_batch_sizes_do_not_recompile_the_step_per_request():
    model = fresh_model()
    options = {'backend': 'eager'}
    for new_tokens in (6, 9):  # one bucket
        out = model.generate(ids(1, 5), max_new_tokens=new_tokens, stop_token_ids=(), compile=options)
        assert torch.equal(out, model.generate(ids(1, 5), max_new_tokens=new_tokens, stop_token_ids=()))
        if new_tokens == 6:
            batch_one = graphs()
    assert graphs() == batch_one
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    # The batch becomes dynamic: at batch 2 in the step (which saw batch 1), at batch 3 in the graphs
    # between the eager experts (batch 1 traces its experts, so batch 2 is the first they see).
    for batch in (2, 3):
        model.generate(ids(batch, 7), max_new_tokens=4, stop_token_ids=(), compile=options)
    after_dynamic = graphs()
    for batch in (4, 5):
        prompt = ids(batch, 7, seed=batch)
        padding = mask[:1].expand(batch, 7)
        out = model.generate(prompt, max_new_tokens=10, stop_token_ids=(), attention_mask=padding, compile=options)
        assert torch.equal(out, model.generate(prompt, max_new_tokens=10, stop_token_ids=(), attention_mask=padding))
    assert graphs() == after_dynamic


def test_cache_lengths_are_bucketed():
    assert bucket_length(1, 4096) == MIN_BUCKET
    assert bucket_length(MIN_BUCKET + 1, 4096) == 2 * MIN_BUCKET
    assert bucket_length(300, 400) == 400  # capped at the context
    assert bucket_length(30, 16) == 30  # never below what it must hold


@torch.no_grad()
def test_a_model_with_compiled_blocks_decodes_eagerly_without_compiling_per_token():
    model = fresh_model()
    expected = model.generate(ids(2, 5), max_new_tokens=10, stop_token_ids=())
    compile_blocks(model, CompileConfig(backend='eager'))
    before = graphs()
    assert torch.equal(model.generate(ids(2, 5), max_new_tokens=10, stop_token_ids=()), expected)
    assert graphs() == before  # the growing cache would otherwise compile the blocks again every token


@torch.no_grad()
def test_a_step_that_fails_to_compile_decodes_eagerly():
    def broken_backend(graph, example_inputs):
        raise RuntimeError('no compiler here')

    model = fresh_model()
    expected = model.generate(ids(1, 5), max_new_tokens=6, stop_token_ids=())
    assert torch.equal(model.generate(ids(1, 5), max_new_tokens=6, stop_token_ids=(),
                                      compile={'backend': broken_backend}), expected)


@torch.no_grad()
@pytest.mark.parametrize('rows', [1, 2])
def test_one_token_16_bit_projections_trace_as_reductions_with_the_layers_values(rows):
    """In a traced step of one token with bf16 weights a projection is a multiply-and-sum (no matmul
    in the graph: oneDNN's bf16 matrix-vector product is the slow part of decoding); otherwise the layer."""
    from dbrx_train.model.dbrx import linear

    layer = torch.nn.Linear(64, 48, bias=False).to(torch.bfloat16)
    x = torch.randn(rows, 1, 64).to(torch.bfloat16)
    traced = []

    def backend(gm, example_inputs):
        traced.append({str(node.target) for node in gm.graph.nodes if node.op == 'call_function'})
        return gm.forward

    out = torch.compile(lambda x: linear(layer, x), backend=backend, fullgraph=True)(x)
    [targets] = traced
    assert any('linear' in t for t in targets) == (rows > 1), targets
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 1, 48)
    torch.testing.assert_close(out.float(), torch.nn.functional.linear(x.float(), layer.weight.float()),
                               rtol=1e-2, atol=1e-2)
    assert torch.equal(linear(layer, x), layer(x))  # outside a trace: the layer itself
