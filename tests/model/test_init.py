"""Layout-independent initialisation: any region of a parameter is drawn exactly as the same rows
of the whole parameter, so every sharding of the model gets the same weights."""

from __future__ import annotations

import pytest
import torch

from dbrx_train.model.config import AttentionConfig, FFNConfig, ModelConfig
from dbrx_train.model.dbrx import DbrxLM
from dbrx_train.model.init import draw_normal, rows_per_block

CONFIG = ModelConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=16, vocab_size=64, init_std=0.1,
                     attn_config=AttentionConfig(kv_n_heads=2),
                     ffn_config=FFNConfig(ffn_hidden_size=24, moe_num_experts=8, moe_top_k=2))


@pytest.mark.parametrize('rows,block_elements', [(0, 40), (3, 40), (7, 40), (13, 40), (17, 1), (0, 10**6)])
def test_a_region_of_rows_is_drawn_as_those_rows_of_the_whole_parameter(rows, block_elements):
    shape = (23, 10)
    assert rows_per_block(shape, block_elements) == max(1, block_elements // 10)
    whole = draw_normal(5, 'p', shape, (slice(0, 23), slice(0, 10)), 0.5, block_elements)
    for start in range(0, 23 - rows + 1, 3):
        region = (slice(start, start + rows), slice(2, 9))
        assert torch.equal(draw_normal(5, 'p', shape, region, 0.5, block_elements), whole[region])
    assert torch.equal(draw_normal(5, 'p', shape, (slice(0, 23), slice(0, 10)), 0.5, block_elements), whole)
    assert not torch.equal(draw_normal(6, 'p', shape, (slice(0, 23), slice(0, 10)), 0.5, block_elements), whole)
    assert not torch.equal(draw_normal(5, 'q', shape, (slice(0, 23), slice(0, 10)), 0.5, block_elements), whole)


def test_a_meta_model_materialised_and_initialised_equals_the_model_built_with_the_seed():
    built = DbrxLM(CONFIG, seed=3)
    empty = DbrxLM(CONFIG, device='meta').to_empty(device='cpu')
    empty.init_weights(seed=3)
    for (name, param), expected in zip(empty.named_parameters(), built.parameters()):
        assert torch.equal(param, expected), name
    assert torch.equal(empty.norm_f.weight, torch.ones(CONFIG.d_model))
    std = CONFIG.init_std
    assert abs(empty.lm_head.weight.std().item() - std) < 0.1 * std
    for residual in (empty.blocks[0].attn.out_proj.weight, empty.blocks[0].ffn.experts.w2):
        assert residual.std() < 0.6 * std  # projections into the residual stream scaled down
    assert not torch.equal(DbrxLM(CONFIG, seed=4).lm_head.weight, built.lm_head.weight)


def test_without_a_seed_torch_manual_seed_decides():
    torch.manual_seed(1)
    first = DbrxLM(CONFIG).wte.weight
    torch.manual_seed(1)
    assert torch.equal(DbrxLM(CONFIG).wte.weight, first)
    assert not torch.equal(DbrxLM(CONFIG).wte.weight, first)
