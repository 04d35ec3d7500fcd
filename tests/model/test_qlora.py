"""QLoRA: LoRA adapters on a frozen quantized base, dequantized matrix by matrix just in time."""

import copy

import pytest
import torch

import dbrx_train.model.quantize as quantize_module
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


@pytest.mark.parametrize('block_bytes', [None, 16 * 2**10], ids=['whole-matrices', 'blocks-of-16KiB'])
@pytest.mark.parametrize('method', ['int4', 'int8'])
def test_qlora_adapter_gradients_match_lora_on_the_dequantized_base(method, block_bytes, monkeypatch):
    """Also with the frozen matrices dequantized in blocks of 16 KiB (Wqkv, 128 x 64 in fp32, in two)."""
    dequantized_bytes = []
    if block_bytes is not None:
        monkeypatch.setattr(quantize_module, 'DEQUANTIZED_BLOCK_BYTES', block_bytes)
        fmt_class = quantize_module.Int4Format if method == 'int4' else quantize_module.Int8Format
        dequantize = fmt_class.dequantize

        def recorded(self, parts, dtype):
            out = dequantize(self, parts, dtype)
            dequantized_bytes.append(out.nbytes)
            return out

        monkeypatch.setattr(fmt_class, 'dequantize', recorded)
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
    expected = adapter_grads(lora, ids)
    dequantized_bytes.clear()
    got = adapter_grads(qlora, ids)
    assert set(got) == set(expected) and len(got) == 2 * 2 * 5
    for name in expected:
        assert got[name].abs().max() > 0, name
        # fp32; x @ (W + s B A).T and x @ W.T + s (x @ A.T) @ B.T differ only in rounding
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5 * scale, msg=name)
    # The frozen base has no gradient and stays in its stored form.
    assert not any(p.requires_grad for name, p in qlora.named_parameters() if '.lora.' not in name)
    assert qlora.blocks[0].ffn.experts.w1.dtype == (torch.uint8 if method == 'int4' else torch.int8)
    if block_bytes is not None:
        assert max(dequantized_bytes) <= block_bytes and 128 * 64 * 4 not in dequantized_bytes
    with pytest.raises(ValueError, match='export'):
        merge_lora(qlora)


def test_bf16_adapters_hold_the_float_model_in_bf16_keep_the_base_as_stored_and_train():
    quantized = quantize(tiny_dbrx(d_model=64, vocab=VOCAB, ffn=32, experts=4, top_k=2), 'int4', group_size=GROUP)
    stored = {name: t.clone() for name, t in quantized.named_buffers()}
    fp32, bf16 = copy.deepcopy(quantized), quantized
    apply_lora(fp32, LoraConfig(r=4, alpha=8, seed=3))
    apply_lora(bf16, LoraConfig(r=4, alpha=8, seed=3, dtype='bf16'))

    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}  # one dtype per block for FSDP2
    for name, tensor in stored.items():  # the int4 parts and their scales as they were
        assert bf16.get_buffer(name).dtype == tensor.dtype and torch.equal(bf16.get_buffer(name), tensor), name
    for (_, a), (_, b) in zip(adapters(fp32), adapters(bf16), strict=True):  # the same start, rounded
        assert torch.equal(b.lora_A, a.lora_A.to(torch.bfloat16)) and not b.lora_B.any()

    trainable = [p for p in bf16.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    bf16.train()
    losses = []
    for _ in range(6):
        loss = bf16.loss(ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses  # bf16 updates still learn
    moments = [state[key] for state in optimizer.state.values() for key in ('exp_avg', 'exp_avg_sq')]
    assert moments and {m.dtype for m in moments} == {torch.bfloat16}  # 6 bytes held per adapter parameter
