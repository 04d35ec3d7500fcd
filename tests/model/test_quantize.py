"""bf16 and weight-only int8 inference against fp32: logits within stated tolerances, the same
greedy tokens from a model that has learnt something, and the int8 matmul itself."""

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.model.conftest import tiny_dbrx
from dbrx_train.errors import ConfigError
from dbrx_train.model.moe import Experts
from dbrx_train.model.quantize import Int8Experts, Int8Linear, int8_linear, quantize, quantize_rows

VOCAB = 96


def variant(model, dtype, method=None):
    return quantize(copy.deepcopy(model).to(dtype), method)


@pytest.fixture(scope='module')
def dense_routing_model():
    # top_k = all experts: routing weights change smoothly with the logits, so no token switches
    # experts between dtypes and the logits' error is the arithmetic's alone.
    return tiny_dbrx(d_model=64, vocab=VOCAB, ffn=32, experts=4, top_k=4)


@pytest.fixture(scope='module')
def trained_model():
    """A tiny model trained until it continues a fixed 24-token cycle: its greedy choices have margins."""
    model = tiny_dbrx(d_model=64, vocab=VOCAB, ffn=32, experts=8, top_k=2, seed=1).train()
    cycle = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))[:24]
    ids = cycle.repeat(3)[None, :64].expand(2, -1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):
        model.loss(ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), cycle


# Stated tolerances: max |logit error| relative to the largest fp32 logit.
TOLERANCES = [(torch.bfloat16, None, 0.03), (torch.float32, 'int8', 0.03), (torch.bfloat16, 'int8', 0.05)]


@torch.no_grad()
@pytest.mark.parametrize('dtype,method,tolerance', TOLERANCES)
def test_logits_match_fp32(dense_routing_model, dtype, method, tolerance):
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    reference = dense_routing_model(ids)
    out = variant(dense_routing_model, dtype, method)(ids)
    assert out.dtype == dtype
    error = (out.float() - reference).abs().max() / reference.abs().max()
    assert error < tolerance
    assert error > 0  # the variant really runs in lower precision


@torch.no_grad()
@pytest.mark.parametrize('dtype,method', [(torch.bfloat16, None), (torch.bfloat16, 'int8'), (torch.float32, 'int8')])
def test_greedy_tokens_of_a_trained_model_match_fp32(trained_model, dtype, method):
    model, cycle = trained_model
    prompt = cycle[None, :6]
    reference = model.generate(prompt, max_new_tokens=30, stop_token_ids=())
    assert torch.equal(reference[0, 6:], cycle.repeat(2)[6:36])  # it learnt the cycle
    assert torch.equal(variant(model, dtype, method).generate(prompt, max_new_tokens=30, stop_token_ids=()), reference)


def test_quantize_rows_round_trips_within_half_a_step():
    w = torch.randn(40, 24) * torch.linspace(0.01, 3, 40)[:, None]  # rows of very different ranges
    q, scales = quantize_rows(w, torch.float32)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert ((q.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('in_features', [64, 36])  # 36: not a multiple of 8, the dequantizing path
def test_int8_linear_is_the_dequantized_matmul(dtype, in_features):
    x = torch.randn(5, 3, in_features).to(dtype)
    q, scales = quantize_rows(torch.randn(40, in_features), dtype)
    expected = F.linear(x.float(), q.float() * scales.float()[:, None])
    out = int8_linear(x, q, scales)
    assert out.shape == (5, 3, 40) and out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=0.05 if dtype == torch.bfloat16 else 1e-4, rtol=0.02)


def test_quantize_replaces_every_matrix_a_token_multiplies_by(dense_routing_model):
    model = variant(dense_routing_model, torch.bfloat16, 'int8')
    assert isinstance(model.lm_head, Int8Linear)
    for block in model.blocks:
        assert isinstance(block.attn.Wqkv, Int8Linear) and isinstance(block.attn.out_proj, Int8Linear)
        assert isinstance(block.ffn.experts, Int8Experts) and isinstance(block.ffn.experts, Experts)
        assert block.ffn.router.weight.dtype == torch.bfloat16  # the router stays in float
    int8 = [name for name, t in model.state_dict().items() if t.dtype == torch.int8]
    assert len(int8) == 1 + 2 * 2 + 3 * 2  # lm_head, Wqkv + out_proj and w1/v1/w2 per layer


def test_unknown_quantization_is_one_clear_line(dense_routing_model):
    with pytest.raises(ConfigError, match=r"^quantize: unknown quantization 'int3'; choose from int8$"):
        quantize(dense_routing_model, 'int3')


def test_quantized_checkpoint_round_trips_bit_exactly(dense_routing_model, tmp_path):
    from dbrx_train.checkpoints import load_pretrained, save_checkpoint

    model = variant(dense_routing_model, torch.bfloat16, 'int8')
    save_checkpoint(model, tmp_path / 'int8')
    assert 'quantization: int8' in (tmp_path / 'int8' / 'config.yaml').read_text()
    loaded = load_pretrained(tmp_path / 'int8')
    assert loaded.config == model.config and isinstance(loaded.lm_head, Int8Linear)
    saved, restored = model.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys()
    for name, tensor in saved.items():
        assert restored[name].dtype == tensor.dtype and torch.equal(restored[name], tensor), name
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    # Asking for int8 again keeps the stored weights; a float load of the float checkpoint quantizes.
    assert torch.equal(load_pretrained(tmp_path / 'int8', quantize='int8').lm_head.weight, model.lm_head.weight)
    save_checkpoint(dense_routing_model, tmp_path / 'fp32')
    fresh = load_pretrained(tmp_path / 'fp32', quantize='int8')
    assert fresh.wte.weight.dtype == torch.bfloat16  # int8 computes in bfloat16 unless told otherwise
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)
