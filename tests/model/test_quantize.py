"""bf16 and weight-only int8 / int4 inference against fp32: logits within stated tolerances, the
same greedy tokens from a model that has learnt something, the quantized matmuls themselves, and
quantized checkpoints that load bit-exactly."""

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.model.conftest import tiny_dbrx
from dbrx_train.errors import ConfigError
from dbrx_train.model.moe import Experts
from dbrx_train.checkpoints import load_pretrained, save_checkpoint
from dbrx_train.model.quantize import (Int4KernelCache, QuantizedExperts, QuantizedLinear, dequantize_int4,
                                       int4_kernel_runs, int4_linear, int8_linear, quantize, quantize_groups,
                                       quantize_rows)

VOCAB = 96
GROUP = 32  # divides the tiny models' d_model (64) and ffn (32)


def variant(model, dtype, method=None):
    return quantize(copy.deepcopy(model).to(dtype), method, group_size=GROUP)


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
    for _ in range(60):
        model.loss(ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), cycle


# Stated tolerances: max |logit error| relative to the largest fp32 logit. int4's 16 levels per
# group of 32 put each random weight about 8% (rms) off, and nothing in random weights cancels it:
# the trained model's greedy tokens below are the meaningful check.
TOLERANCES = [(torch.bfloat16, None, 0.03), (torch.float32, 'int8', 0.03), (torch.bfloat16, 'int8', 0.05),
              (torch.float32, 'int4', 0.3), (torch.bfloat16, 'int4', 0.3)]


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
@pytest.mark.parametrize('dtype,method', [(torch.bfloat16, None), (torch.bfloat16, 'int8'), (torch.float32, 'int8'),
                                          (torch.bfloat16, 'int4'), (torch.float32, 'int4')])
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


def test_quantize_groups_round_trips_within_half_a_step():
    w = torch.randn(40, 96) * torch.linspace(0.01, 3, 96)  # groups of very different ranges
    packed, scales, zeros = quantize_groups(w, 32, torch.float32)
    assert packed.dtype == torch.uint8 and packed.shape == (40, 48) and scales.shape == zeros.shape == (40, 3)
    dequantized = dequantize_int4(packed, scales, zeros, torch.float32)
    step = scales.repeat_interleave(32, dim=1)
    assert ((dequantized - w).abs() <= step / 2 + 1e-5).all()
    # Each group's extremes are on the grid: its levels span the range.
    assert torch.allclose(dequantized.view(40, 3, 32).amin(-1), w.view(40, 3, 32).amin(-1), atol=1e-5)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('out_features', [48, 40])  # 40: not a multiple of 16, the dequantizing path
def test_int4_linear_is_the_dequantized_matmul(dtype, out_features):
    x = torch.randn(5, 3, 64).to(dtype)
    packed, scales, zeros = quantize_groups(torch.randn(out_features, 64), 32, dtype)
    assert int4_kernel_runs(x, out_features, 32) == (out_features == 48)
    expected = F.linear(x.float(), dequantize_int4(packed, scales, zeros, torch.float32))
    out = int4_linear(x, packed, scales, zeros, Int4KernelCache(), None)
    assert out.shape == (5, 3, out_features) and out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=0.05 if dtype == torch.bfloat16 else 1e-4, rtol=0.02)


@pytest.mark.parametrize('method,stored,count', [('int8', torch.int8, 1 + 2 * 2 + 3 * 2),
                                                 ('int4', torch.uint8, 1 + 2 * 2 + 3 * 2)])
def test_quantize_replaces_every_matrix_a_token_multiplies_by(dense_routing_model, method, stored, count):
    model = variant(dense_routing_model, torch.bfloat16, method)
    assert isinstance(model.lm_head, QuantizedLinear)
    for block in model.blocks:
        assert isinstance(block.attn.Wqkv, QuantizedLinear) and isinstance(block.attn.out_proj, QuantizedLinear)
        assert isinstance(block.ffn.experts, QuantizedExperts) and isinstance(block.ffn.experts, Experts)
        assert block.ffn.router.weight.dtype == torch.bfloat16  # the router stays in float
    quantized = [name for name, t in model.state_dict().items() if t.dtype == stored]
    assert len(quantized) == count  # lm_head, Wqkv + out_proj and w1/v1/w2 per layer


def test_int4_stores_4_25_bits_per_weight_at_group_128():
    model = quantize(tiny_dbrx(d_model=128, vocab=VOCAB, ffn=128, experts=2, top_k=1).to(torch.bfloat16), 'int4')
    assert model.config.quantization_group_size == 128
    for module in (model.lm_head, model.blocks[0].attn.Wqkv):
        tensors = (module.weight, module.scales, module.zeros)
        bits = sum(t.numel() * t.element_size() * 8 for t in tensors) / (module.out_features * module.in_features)
        assert bits == 4.25


def test_int4_group_that_does_not_divide_a_width_is_one_line_and_changes_nothing(dense_routing_model):
    model = copy.deepcopy(dense_routing_model)
    with pytest.raises(ConfigError, match=r"^quantize: int4 groups of 128 weights do not divide the width 64 of the "
                                          r"attention, expert w1/v1 and LM head matrices \(d_model\); choose a "
                                          r"group_size that divides it$"):
        quantize(model, 'int4')  # the default group, 128, on d_model 64
    with pytest.raises(ConfigError, match=r"^quantization_group_size: must be one of 32, 64, 128, 256, got 48$"):
        quantize(model, 'int4', group_size=48)
    assert model.config.quantization is None and isinstance(model.lm_head, torch.nn.Linear)
    with pytest.raises(ConfigError, match='width 32 of the expert w2 matrices'):
        quantize(model, 'int4', group_size=64)
    quantize(model, 'int4', group_size=32)
    with pytest.raises(ConfigError, match=r'^quantize: the model is already int4 in groups of 32, not 64$'):
        quantize(model, 'int4', group_size=64)


def test_unknown_quantization_is_one_clear_line(dense_routing_model):
    with pytest.raises(ConfigError, match=r"^quantize: unknown quantization 'int3'; choose from int8, int4$"):
        quantize(dense_routing_model, 'int3')


@torch.no_grad()
def test_int4_kernel_copy_follows_the_stored_weights(dense_routing_model):
    """The CPU kernel's repacked weights are remade when new weights are loaded into a used model."""
    a = variant(dense_routing_model, torch.bfloat16, 'int4')
    b = variant(tiny_dbrx(d_model=64, vocab=VOCAB, ffn=32, experts=4, top_k=4, seed=5), torch.bfloat16, 'int4')
    ids = torch.randint(0, VOCAB, (1, 8))
    a(ids)  # builds a's kernel copies
    a.load_state_dict(b.state_dict())
    assert torch.equal(a(ids), b(ids))


@pytest.mark.parametrize('method', ['int8', 'int4'])
def test_quantized_checkpoint_round_trips_bit_exactly(dense_routing_model, tmp_path, method):
    model = variant(dense_routing_model, torch.bfloat16, method)
    save_checkpoint(model, tmp_path / method)
    assert f'quantization: {method}' in (tmp_path / method / 'config.yaml').read_text()
    loaded = load_pretrained(tmp_path / method)
    assert loaded.config == model.config and isinstance(loaded.lm_head, QuantizedLinear)
    saved, restored = model.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys()
    for name, tensor in saved.items():
        assert restored[name].dtype == tensor.dtype and torch.equal(restored[name], tensor), name
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    # Asking for the method again keeps the stored weights; a load of the float checkpoint quantizes.
    again = load_pretrained(tmp_path / method, quantize=method, group_size=GROUP)
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)
    save_checkpoint(dense_routing_model, tmp_path / 'fp32')
    fresh = load_pretrained(tmp_path / 'fp32', quantize=method, group_size=GROUP)
    assert fresh.wte.weight.dtype == torch.bfloat16  # quantized models compute in bfloat16 unless told otherwise
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)
