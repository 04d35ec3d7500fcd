"""Conversion between transformers' DbrxForCausalLM directories and our checkpoints."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip('transformers')

from dbrx_train.checkpoints import load_pretrained  # noqa: E402
from dbrx_train.checkpoints.hf import (  # noqa: E402
    convert_from_hf,
    convert_to_hf,
    hf_config,
    hf_names,
    model_config_from_hf,
)
from dbrx_train.checkpoints.storage import weight_files  # noqa: E402
from dbrx_train.convert import main  # noqa: E402
from dbrx_train.errors import CheckpointError  # noqa: E402
from dbrx_train.model.config import AttentionConfig, FFNConfig, ModelConfig  # noqa: E402
from dbrx_train.model.dbrx import DbrxLM  # noqa: E402

REPO = Path(__file__).parents[2]


def save_random_hf(directory, vocab_size=128, max_shard_size='5GB', **config_changes):
    torch.manual_seed(0)
    config = transformers.DbrxConfig(
        d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=vocab_size,
        attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=500000.0),
        ffn_config=dict(ffn_hidden_size=16, moe_num_experts=16, moe_top_k=4), **config_changes,
    )
    model = transformers.DbrxForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    return model


def read_json(path):
    return json.loads(path.read_text())


def test_name_table_covers_both_models_exactly():
    config = ModelConfig(d_model=32, n_heads=4, n_layers=3, max_seq_len=16, vocab_size=64,
                         attn_config=AttentionConfig(kv_n_heads=2), ffn_config=FFNConfig(ffn_hidden_size=8))
    names = hf_names(config.n_layers)
    model_class = transformers.DbrxForCausalLM  # import outside the device context (torch._dynamo dislikes it)
    with torch.device('meta'):
        theirs = model_class(hf_config(config))
    assert sorted(names) == sorted(DbrxLM(config, device='meta').state_dict())
    assert sorted(names.values()) == sorted(theirs.state_dict())


def test_config_round_trips_through_config_json(tmp_path):
    config = ModelConfig(d_model=48, n_heads=6, n_layers=3, max_seq_len=128, vocab_size=100,
                         attn_config=AttentionConfig(kv_n_heads=3, clip_qkv=None, rope_theta=1234.0),
                         ffn_config=FFNConfig(ffn_hidden_size=40, moe_num_experts=6, moe_top_k=3, moe_jitter_eps=0.01,
                                              moe_loss_weight=0.02, moe_normalize_expert_weights=None),
                         init_std=0.03)
    hf_config(config).to_json_file(tmp_path / 'config.json')
    assert model_config_from_hf(tmp_path) == config


def test_hf_to_ours_to_hf_round_trip(tmp_path):
    """A DBRX-vocabulary model: the export also gets DBRX's stop tokens in generation_config.json."""
    original = save_random_hf(tmp_path / 'hf', vocab_size=100352)
    convert_from_hf(tmp_path / 'hf', tmp_path / 'ours')
    convert_to_hf(tmp_path / 'ours', tmp_path / 'back')

    back, info = transformers.DbrxForCausalLM.from_pretrained(tmp_path / 'back', output_loading_info=True)
    assert info['missing_keys'] == [] and info['unexpected_keys'] == []
    assert read_json(tmp_path / 'back' / 'config.json') == read_json(tmp_path / 'hf' / 'config.json')
    ids = torch.randint(0, 100352, (2, 12))
    with torch.no_grad():
        expected = original(ids).logits
        assert torch.equal(back.eval()(ids).logits, expected)
        torch.testing.assert_close(load_pretrained(tmp_path / 'ours')(ids), expected, atol=1e-5, rtol=0)
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / 'back')
    assert generation.eos_token_id == [100257, 100279]


def test_sharded_hf_checkpoint_converts(tmp_path):
    original = save_random_hf(tmp_path / 'hf', max_shard_size='20KB')
    assert len(list((tmp_path / 'hf').glob('model-*.safetensors'))) > 2
    main(['from-hf', str(tmp_path / 'hf'), str(tmp_path / 'ours'), '--max-shard-size', '30KB'])
    assert len(weight_files(tmp_path / 'ours')) > 2
    main(['to-hf', str(tmp_path / 'ours'), str(tmp_path / 'back')])
    assert weight_files(tmp_path / 'back') == [tmp_path / 'back' / 'model.safetensors']
    ids = torch.randint(0, 128, (2, 12))
    back = transformers.DbrxForCausalLM.from_pretrained(tmp_path / 'back').eval()
    with torch.no_grad():
        expected = original(ids).logits
        torch.testing.assert_close(load_pretrained(tmp_path / 'ours')(ids), expected, atol=1e-5, rtol=0)
        assert torch.equal(back(ids).logits, expected)


def test_unsupported_hf_configs(tmp_path):
    save_random_hf(tmp_path / 'hf')
    config_path = tmp_path / 'hf' / 'config.json'
    good = read_json(config_path)

    config_path.write_text(json.dumps(good | {'resid_pdrop': 0.1}))
    with pytest.warns(UserWarning, match='ignoring resid_pdrop=0.1'):
        convert_from_hf(tmp_path / 'hf', tmp_path / 'ours')
    assert (tmp_path / 'ours' / 'model.safetensors').is_file()

    config_path.write_text(json.dumps(good | {'ffn_config': good['ffn_config'] | {'ffn_act_fn': {'name': 'gelu'}}}))
    with pytest.raises(CheckpointError, match="ffn_act_fn is 'gelu'; only silu"):
        convert_from_hf(tmp_path / 'hf', tmp_path / 'other')
    config_path.write_text(json.dumps(good | {'model_type': 'llama'}))
    with pytest.raises(CheckpointError, match="model_type is 'llama'"):
        load_pretrained(tmp_path / 'hf')
    config_path.write_text(json.dumps(good | {'n_heads': 5}))
    with pytest.raises(CheckpointError, match=r'config\.json: n_heads: '):
        convert_from_hf(tmp_path / 'hf', tmp_path / 'other')
    assert not (tmp_path / 'other').exists()


def test_hf_tensors_are_named_by_their_transformers_names(tmp_path):
    from safetensors.torch import load_file, save_file

    save_random_hf(tmp_path / 'hf')
    config_path, weights_path = tmp_path / 'hf' / 'config.json', tmp_path / 'hf' / 'model.safetensors'
    good = read_json(config_path)
    config_path.write_text(json.dumps(good | {'ffn_config': good['ffn_config'] | {'ffn_hidden_size': 8}}))
    with pytest.raises(CheckpointError, match=r"'transformer\.blocks\.\d\.ffn\.experts\.mlp\.[wv][12]' .* has shape "
                                              r"\(256, 32\); the config expects \(128, 32\)"):
        convert_from_hf(tmp_path / 'hf', tmp_path / 'ours')
    config_path.write_text(json.dumps(good))
    tensors = load_file(weights_path)
    del tensors['transformer.blocks.1.norm_attn_norm.attn.out_proj.weight']
    save_file(tensors, weights_path, metadata={'format': 'pt'})
    with pytest.raises(CheckpointError, match=r"missing tensor 'transformer\.blocks\.1\.norm_attn_norm\.attn\.out_"):
        load_pretrained(tmp_path / 'hf')


def test_cli_error_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, '-m', 'dbrx_train.convert', 'from-hf', str(tmp_path / 'nope'),
                             str(tmp_path / 'out')], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert result.stderr == f'error: missing file {tmp_path / "nope" / "config.json"}\n'
