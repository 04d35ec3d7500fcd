"""QLoRA: LoRA adapters on a frozen quantized base, dequantized matrix by matrix just in time."""

import copy

import pytest
import torch

from dbrx_train.model.lora import LoraConfig, adapters, apply_lora, merge_lora, split_adapted_name
from dbrx_train.model.quantize import (QuantizedExperts, QuantizedLinear, dequantize_matrix, dequantized_config,
                                       matrix_layouts, quantize)
from dbrx_train.model.dbrx import DbrxLM
from tests.model.conftest import tiny_dbrx

VOCAB, GROUP = 96, 32


def dequantized_model(quantized: DbrxLM) -> DbrxLM:
    """The float model whose weights are the quantized model's, dequantized."""
    stored = quantized.state_dict()
    weights = {name: t for name, t in stored.items()}
    for layout in matrix_layouts(quantized.config):
        for name in layout.stored.values():
            weights.pop(name)
        weights[layout.float_name] = dequantize_matrix(quantized.config, layout, stored.__getitem__, torch.float32)
    model = DbrxLM(dequantized_config(quantized.config), device='meta').to_empty(device='cpu')
    model.load_state_dict(weights, strict=True)
    return model


def adapter_grads(model: DbrxLM, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    model.loss(ids).loss.backward()
    return {split_adapted_name(name)[0] + '/' + split_adapted_name(name)[1]: p.grad
            for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize('method', ['int4', 'int8'])
def test_qlora_adapter_gradients_match_lora_on_the_dequantized_base(method):
    base = tiny_dbrx(d_model=64, vocab=VOCAB, ffn=32, experts=4, top_k=2)
    qlora = quantize(copy.deepcopy(base), method, group_size=GROUP)
    lora = dequantized_model(qlora)
    config = LoraConfig(r=4, alpha=8, seed=3)
    for model in (qlora, lora):
        apply_lora(model, config)
        with torch.no_grad():  # B nonzero: the A factors get gradients too
            for _, adapter in adapters(model):
                adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=torch.Generator().manual_seed(5)))
    assert isinstance(qlora.blocks[0].ffn.experts, QuantizedExperts)
    assert isinstance(qlora.blocks[1].attn.Wqkv, QuantizedLinear)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    expected, got = adapter_grads(lora, ids), adapter_grads(qlora, ids)
    assert set(got) == set(expected) and len(got) == 2 * 2 * 5
    for name in expected:
        assert got[name].abs().max() > 0, name
        # fp32; x @ (W + s B A).T and x @ W.T + s (x @ A.T) @ B.T differ only in rounding
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5 * scale, msg=name)
    # The frozen base has no gradient and stays in its stored form.
    assert not any(p.requires_grad for name, p in qlora.named_parameters() if '.lora.' not in name)
    assert qlora.blocks[0].ffn.experts.w1.dtype == (torch.uint8 if method == 'int4' else torch.int8)
    with pytest.raises(ValueError, match='export'):
        merge_lora(qlora)
