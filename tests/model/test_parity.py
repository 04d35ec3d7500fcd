"""Our DBRX against transformers' `DbrxForCausalLM` (the reference implementation), random weights, fp32."""

import pytest
import torch

transformers = pytest.importorskip('transformers')
from transformers.models.dbrx.modeling_dbrx import load_balancing_loss_func  # noqa: E402

from dbrx_train import load_pretrained  # noqa: E402
from dbrx_train.model.loss import load_balancing_loss  # noqa: E402

VOCAB = 256
# Every variant DBRX configs take: GQA width, q/k/v clipping, top-k, p-norm of the expert weights.
CASES = {
    'mqa-noclip-top1-nonorm': dict(kv_n_heads=1, clip_qkv=None, moe_num_experts=4, moe_top_k=1, p=None),
    'gqa-clip-top2-p1': dict(kv_n_heads=2, clip_qkv=0.3, moe_num_experts=8, moe_top_k=2, p=1.0),
    'mha-clip8-top3-p2': dict(kv_n_heads=4, clip_qkv=8.0, moe_num_experts=16, moe_top_k=3, p=2.0),
    'gqa-clip-top4-p1': dict(kv_n_heads=2, clip_qkv=0.3, moe_num_experts=16, moe_top_k=4, p=1.0),
    'gqa-noclip-top4-nonorm': dict(kv_n_heads=2, clip_qkv=None, moe_num_experts=16, moe_top_k=4, p=None),
}


@pytest.fixture(scope='module', params=list(CASES), ids=list(CASES))
def models(request, tmp_path_factory):
    """(transformers model, ours loaded from its saved directory, the case) in eval mode."""
    case = CASES[request.param]
    config = transformers.DbrxConfig(
        d_model=64, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=VOCAB,
        attn_config=dict(kv_n_heads=case['kv_n_heads'], clip_qkv=case['clip_qkv'], rope_theta=10000.0),
        ffn_config=dict(ffn_hidden_size=32, moe_num_experts=case['moe_num_experts'], moe_top_k=case['moe_top_k'],
                        moe_normalize_expert_weights=case['p']),
    )
    torch.manual_seed(0)
    hf = transformers.DbrxForCausalLM(config).eval()
    with torch.no_grad():  # weights large enough that clipping and routing both matter
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory)
    return hf, load_pretrained(directory), case


def test_logits_match(models):
    hf, ours, case = models
    ids = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(1))
    qkv = []
    handle = ours.blocks[0].attn.Wqkv.register_forward_hook(lambda m, i, out: qkv.append(out))
    with torch.no_grad():
        expected, actual = hf(ids).logits, ours(ids)
    handle.remove()
    if case['clip_qkv'] is not None and case['clip_qkv'] < 1:
        assert qkv[0].abs().max() > case['clip_qkv']  # the case really exercises the clipping
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_lm_loss_matches(models):
    hf, ours, _ = models
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, :7] = -100
    with torch.no_grad():
        expected = hf(ids, labels=labels, output_router_logits=False).loss
        actual = ours.loss(ids, labels=labels).lm_loss
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_greedy_generate_matches(models):
    hf, ours, _ = models
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    # An explicit mask: transformers would otherwise take prompt tokens equal to pad_token_id for padding.
    expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                           pad_token_id=0, output_router_logits=False)
    actual = ours.generate(ids, max_new_tokens=10, stop_token_ids=())
    assert torch.equal(actual, expected)


def test_left_padded_generate_matches(models):
    hf, ours, _ = models
    ids = torch.randint(1, VOCAB, (3, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :7] = 0
    ids = ids.masked_fill(mask == 0, 0)
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                           output_router_logits=False)
    actual = ours.generate(ids, max_new_tokens=8, attention_mask=mask, stop_token_ids=(), pad_token_id=0)
    assert torch.equal(actual, expected)


def test_aux_loss_is_transformers_over_top_k(models):
    """Per layer, transformers' `load_balancing_loss_func` of the raw router logits == top_k * ours
    (the relation `dbrx_train.model.loss.load_balancing_loss` documents)."""
    hf, ours, case = models
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(5))
    router_logits = []
    handles = [block.ffn.router.layer.register_forward_hook(lambda m, i, out: router_logits.append(out))
               for block in hf.transformer.blocks]
    with torch.no_grad():
        hf(ids)
        _, stats = ours.hidden_states(ids)
        total = ours.loss(ids).aux_loss
    for handle in handles:
        handle.remove()
    top_k, num_experts = case['moe_top_k'], case['moe_num_experts']
    per_layer = []
    for layer_logits, layer_stats in zip(router_logits, stats):
        ours_layer = load_balancing_loss(layer_stats.mean_probs[None], layer_stats.tokens_per_expert[None], top_k)
        theirs = load_balancing_loss_func((layer_logits,), num_experts, top_k, None)
        torch.testing.assert_close(theirs, top_k * ours_layer, atol=1e-5, rtol=1e-5)
        per_layer.append(ours_layer)
    torch.testing.assert_close(total, torch.stack(per_layer).mean())
