"""Model configs: every mistake is one ConfigError naming the key; the CLI turns it into one line."""

import subprocess
import sys
from pathlib import Path

import pytest

from dbrx_train.errors import ConfigError
from dbrx_train.info import load_model_config
from dbrx_train.model.config import ModelConfig
from dbrx_train.typed_config import parse, to_dict

REPO = Path(__file__).parents[2]
VALID = {'d_model': 64, 'n_heads': 4, 'n_layers': 2, 'max_seq_len': 32,
         'attn_config': {'kv_n_heads': 2}, 'ffn_config': {'moe_num_experts': 8, 'moe_top_k': 2}}


def with_changes(**changes):
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in VALID.items()}
    for dotted, value in changes.items():
        *parents, key = dotted.split('__')
        target = data
        for parent in parents:
            target = target[parent]
        target[key] = value
    return data


@pytest.mark.parametrize('changes,key,words', [
    ({'d_modle': 64}, 'd_modle', "did you mean 'd_model'"),
    ({'ffn_config__moe_topk': 2}, 'ffn_config.moe_topk', "did you mean 'moe_top_k'"),
    ({'n_layers': 'two'}, 'n_layers', 'expected an integer'),
    ({'attn_config__clip_qkv': 'high'}, 'attn_config.clip_qkv', 'expected a number'),
    ({'n_heads': 5}, 'n_heads', 'must be divisible by n_heads'),
    ({'ffn_config__moe_top_k': 9}, 'ffn_config.moe_top_k', 'cannot exceed the number of experts'),
    ({'attn_config__kv_n_heads': 3}, 'attn_config.kv_n_heads', 'must be divisible by kv_n_heads'),
    ({'moe_backend': 'troch'}, 'moe_backend', "did you mean 'torch'"),
    ({'moe_backend': 'megablocks'}, 'moe_backend', "must be one of 'auto', 'torch'"),  # not a backend yet
    ({'ffn_config__moe_world_size': 3}, 'ffn_config.moe_world_size', 'moe_num_experts (8) is not divisible by 3'),
    ({'ffn_config__moe_world_size': 0}, 'ffn_config.moe_world_size', 'must be at least 1'),
])
def test_bad_config_is_one_line_naming_the_key(changes, key, words):
    data = with_changes(**changes)
    with pytest.raises(ConfigError) as info:
        parse(ModelConfig, data)
    assert info.value.key == key
    assert words in str(info.value)
    assert '\n' not in str(info.value)


def test_config_round_trips_through_to_dict():
    config = parse(ModelConfig, VALID)
    assert parse(ModelConfig, to_dict(config)) == config


def test_model_yaml_and_training_yaml_give_the_same_config(tmp_path):
    import yaml

    preset = tmp_path / 'preset.yaml'
    preset.write_text(yaml.safe_dump(VALID))
    training = tmp_path / 'train.yaml'
    training.write_text(yaml.safe_dump({'run_name': 'x', 'max_duration': '1ba', 'model': VALID}))
    assert load_model_config(preset) == load_model_config(training) == parse(ModelConfig, VALID)
    assert load_model_config(preset, ['n_layers=3']).n_layers == 3
    assert load_model_config(training, ['model.n_layers=3']).n_layers == 3
    bad = tmp_path / 'bad.yaml'
    bad.write_text(yaml.safe_dump({'model': with_changes(n_heads=5)}))
    with pytest.raises(ConfigError, match=r'^model\.n_heads: '):
        load_model_config(bad)


def test_cli_reports_a_bad_yaml_in_one_line_and_exits_2(tmp_path):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('d_modle: 64\nn_heads: 4\nn_layers: 2\nmax_seq_len: 32\n')
    result = subprocess.run([sys.executable, '-m', 'dbrx_train.info', str(bad)], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ''
    assert result.stderr == "error: d_modle: unknown key (did you mean 'd_model'?)\n"
