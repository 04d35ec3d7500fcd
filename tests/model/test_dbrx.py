"""The DBRX model as a whole: sizes of the presets, FLOPs, causality, padding, the training loss."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dbrx_train.info import load_model_config
from dbrx_train.model.dbrx import DbrxLM
from tests.model.conftest import tiny_dbrx
from dbrx_train.model.flops import count_parameters, parameter_counts, train_flops_per_token

PRESETS = sorted((Path(__file__).parents[2] / 'yamls' / 'models').glob('*.yaml'))
VOCAB = 96


@pytest.fixture(scope='module')
def model():
    return tiny_dbrx(d_model=32, vocab=VOCAB, ffn=24, experts=8, top_k=2)


def test_dbrx_132b_sizes_on_meta():
    config = load_model_config(Path(__file__).parents[2] / 'yamls' / 'models' / 'dbrx-132b.yaml')
    model = DbrxLM(config, device='meta')
    assert all(p.is_meta for p in model.parameters())
    counts = count_parameters(model)
    assert counts == parameter_counts(config)
    assert abs(counts.total - 131.6e9) < 0.05e9
    assert 36.4e9 < counts.active < 36.5e9


@pytest.mark.parametrize('preset', PRESETS, ids=[p.stem for p in PRESETS])
def test_presets_keep_dbrx_shape_and_closed_form_counts(preset):
    config = load_model_config(preset)
    assert (config.ffn_config.moe_num_experts, config.ffn_config.moe_top_k) == (16, 4)
    assert 1 < config.attn_config.kv_n_heads < config.n_heads  # grouped-query attention
    assert count_parameters(DbrxLM(config, device='meta')) == parameter_counts(config)


def test_train_flops_per_token_match_a_flop_counter(model):
    """FlopCounterMode counts the matmuls of a real forward + backward (attention through SDPA's
    math kernel: the counter does not see the fused CPU kernel); the formula also counts the norm
    weights (6 FLOPs each), which the counter sees as elementwise work."""
    config = model.config
    ids = torch.randint(0, VOCAB, (2, config.max_seq_len))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.loss(ids).loss.backward()
    model.zero_grad(set_to_none=True)
    norm_weights = (2 * config.n_layers + 1) * config.d_model
    assert counter.get_total_flops() == ids.numel() * (train_flops_per_token(config) - 6 * norm_weights)


@torch.no_grad()
def test_causal_future_tokens_do_not_change_past_logits(model):
    ids = torch.randint(0, VOCAB, (2, 16))
    changed = ids.clone()
    changed[:, 10:] = torch.randint(0, VOCAB, (2, 6))
    torch.testing.assert_close(model(changed)[:, :10], model(ids)[:, :10])
    assert not torch.allclose(model(changed)[:, 10:], model(ids)[:, 10:])


@torch.no_grad()
def test_left_padding_gives_the_unpadded_logits(model):
    ids = torch.randint(1, VOCAB, (1, 12))
    padded = torch.cat([torch.zeros(1, 4, dtype=ids.dtype), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(padded, attention_mask=mask)[:, 4:], model(ids), atol=1e-5, rtol=1e-5)


def test_loss_is_shifted_cross_entropy_plus_weighted_aux(model):
    ids = torch.randint(0, VOCAB, (2, 16))
    labels = ids.clone()
    labels[0, :5] = -100
    out = model.loss(ids, labels=labels)
    logits = model(ids)
    expected_lm = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.lm_loss, expected_lm, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, out.lm_loss + model.config.ffn_config.moe_loss_weight * out.aux_loss)
    assert out.aux_loss >= 1.0 - 1e-6  # 1.0 is the perfectly balanced minimum
    assert out.tokens_per_expert.shape == (2, 8)
    assert (out.tokens_per_expert.sum(dim=1) == ids.numel() * 2).all()  # every token, top_k=2 experts, each layer


def test_router_z_loss_is_the_mean_squared_logsumexp_of_the_router_logits_and_is_weighted_in(model):
    from dataclasses import replace

    from dbrx_train.composer_model import ComposerDbrx

    ids = torch.randint(0, VOCAB, (2, 16))
    captured = []
    hooks = [block.ffn.router.register_forward_hook(lambda m, a, out: captured.append(out)) for block in model.blocks]
    out = model.loss(ids)
    for hook in hooks:
        hook.remove()
    expected = torch.stack([torch.logsumexp(logits.float(), dim=-1).square().mean() for logits in captured]).mean()
    torch.testing.assert_close(out.z_loss, expected)
    weighted = DbrxLM(replace(model.config, ffn_config=replace(model.config.ffn_config, moe_zloss_weight=1e-3)))
    weighted.load_state_dict(model.state_dict())
    composer = ComposerDbrx(weighted.eval())
    with_z = composer.loss(weighted.loss(ids), {})
    torch.testing.assert_close(with_z['total'], out.loss + 1e-3 * out.z_loss)
    torch.testing.assert_close(with_z['moe_zloss'], out.z_loss)  # Composer logs it as loss/train/moe_zloss
    assert 'moe_zloss' not in ComposerDbrx(model).loss(out, {})  # off by default
