"""LoRA adapters: on attention and per expert on the fused MoE weights; frozen base; exact merge."""

import pytest
import torch

from dbrx_train.errors import ConfigError
from dbrx_train.model.dbrx import DbrxLM
from dbrx_train.model.lora import (
    LoraConfig,
    adapters,
    apply_lora,
    base_parameters,
    initial_adapter_values,
    merge_lora,
    split_adapted_name,
)
from tests.model.conftest import tiny_dbrx

VOCAB, EXPERTS, FFN, D_MODEL, RANK = 96, 4, 24, 32, 4


def adapted(targets=('Wqkv', 'out_proj', 'w1', 'v1', 'w2'), layers=None):
    model = tiny_dbrx(d_model=D_MODEL, vocab=VOCAB, ffn=FFN, experts=EXPERTS, top_k=2)
    apply_lora(model, LoraConfig(r=RANK, alpha=8, targets=list(targets), layers=layers))
    return model


def train_steps(model, steps=3):
    """A few AdamW steps on every parameter (weight decay on): only what requires grad may move."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    model.train()
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_adapters_start_as_the_identity_and_are_per_expert():
    plain = tiny_dbrx(d_model=D_MODEL, vocab=VOCAB, ffn=FFN, experts=EXPERTS, top_k=2)
    model = adapted()
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), plain(ids), atol=0, rtol=0)
    experts = model.blocks[0].ffn.experts
    adapter = experts.parametrizations.w1[0]
    assert adapter.lora_A.shape == (EXPERTS, RANK, D_MODEL) and adapter.lora_B.shape == (EXPERTS, FFN, RANK)
    with torch.no_grad():
        adapter.lora_B[2].fill_(0.5)  # expert 2's update only
    changed = (experts.w1 != experts.parametrizations.w1.original).any(dim=1).view(EXPERTS, FFN)
    assert changed[2].all() and not changed[[0, 1, 3]].any()


def test_training_changes_only_adapter_parameters_and_the_frozen_base_stays_bitwise():
    model = adapted(targets=('out_proj', 'w1', 'v1', 'w2'), layers=[1])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f'blocks.1.{owner}.parametrizations.{tensor}.0.lora_{part}'
                         for owner, tensor in [('attn.out_proj', 'weight'), ('ffn.experts', 'w1'),
                                               ('ffn.experts', 'v1'), ('ffn.experts', 'w2')] for part in 'AB'}
    train_steps(model)
    for name, param in model.named_parameters():
        if name in trainable and name.endswith('lora_B'):  # starts at zero: must have moved
            assert not torch.equal(param, before[name]), name
        elif name not in trainable:
            assert torch.equal(param, before[name]), name


def test_merging_gives_the_adapted_model_s_logits_as_a_plain_model():
    model = train_steps(adapted())
    ids = torch.randint(0, VOCAB, (3, 20))
    with torch.no_grad():
        expected = model(ids)
    base = {name: p.detach().clone() for name, p in base_parameters(model).items()}
    merge_lora(model)
    plain = DbrxLM(model.config).eval()
    plain.load_state_dict(model.state_dict(), strict=True)  # the merged model has plain names only
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), expected, atol=1e-6, rtol=0)
    assert not torch.allclose(plain.blocks[0].ffn.experts.w2, base['blocks.0.ffn.experts.w2'])
    assert torch.equal(plain.blocks[0].ffn.router.weight, base['blocks.0.ffn.router.weight'])


def test_adapted_names_map_back_to_plain_names():
    model = adapted()
    assert sorted(base_parameters(model)) == sorted(DbrxLM(model.config, device='meta').state_dict())
    assert split_adapted_name('blocks.3.ffn.experts.parametrizations.v1.0.lora_B') == ('blocks.3.ffn.experts.v1',
                                                                                     'lora_B')
    assert split_adapted_name('blocks.0.attn.Wqkv.parametrizations.weight.original') == ('blocks.0.attn.Wqkv.weight',
                                                                                          'weight')
    assert split_adapted_name('norm_f.weight') == ('norm_f.weight', 'weight')


def test_adapters_on_a_meta_model_are_drawn_like_on_cpu():
    """Ranks that build the model on meta draw the same adapters as a rank that builds it on CPU."""
    on_cpu = adapted()
    on_meta = DbrxLM(on_cpu.config, device='meta')
    apply_lora(on_meta, LoraConfig(r=RANK, alpha=8))
    drawn = [value for _, value in initial_adapter_values(on_meta, seed=0)]
    stored = [tensor for _, adapter in adapters(on_cpu) for tensor in (adapter.lora_A, adapter.lora_B, adapter.scale)]
    assert len(drawn) == len(stored) == 2 * 5 * 3
    for value, tensor in zip(drawn, stored):
        assert torch.equal(value, tensor)


def test_bad_lora_configs_name_the_key():
    with pytest.raises(ConfigError, match=r'lora.layers: layer 5 does not exist; the model has layers 0..1'):
        adapted(layers=[5])
    with pytest.raises(ConfigError, match='r: must be at least 1'):
        LoraConfig(r=0).check()


def test_lora_dropout_drops_the_attention_adapters_inputs_in_training_only():
    model = tiny_dbrx(d_model=D_MODEL, vocab=VOCAB, ffn=FFN, experts=EXPERTS, top_k=2)
    apply_lora(model, LoraConfig(r=RANK, alpha=8, targets=['Wqkv'], dropout=0.5))
    with torch.no_grad():
        for _, adapter in adapters(model):
            adapter.lora_B.normal_()  # a visible update
    layer = model.blocks[0].attn.Wqkv
    x = torch.randn(6, D_MODEL, generator=torch.Generator().manual_seed(0))
    update = layer.parametrizations.weight[0]
    merged = x @ (layer.parametrizations.weight.original + update.scale * update.lora_B[0] @ update.lora_A[0]).T
    torch.testing.assert_close(layer(x), merged)  # eval: the merged weight, no dropout
    model.train()
    torch.manual_seed(3)
    first = layer(x)
    torch.manual_seed(3)
    mask = torch.nn.functional.dropout(torch.ones_like(x), 0.5, training=True)  # the same draw
    expected = x @ layer.parametrizations.weight.original.T + update.scale * (x * mask) @ update.lora_A[0].T @ \
        update.lora_B[0].T
    torch.testing.assert_close(first, expected)
    assert not torch.allclose(first, layer(x))  # a new draw each call
    merge_lora(model)  # merges the factors whatever the mode, and the hook goes with them
    torch.testing.assert_close(model.blocks[0].attn.Wqkv(x), merged)
