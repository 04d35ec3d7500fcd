"""`python -m dbrx_train.info`: sizes and FLOPs of a model preset or a training YAML, on the meta device."""

from pathlib import Path

import pytest
import yaml

from dbrx_train.info import load_model_config, main
from dbrx_train.model.flops import parameter_counts, train_flops_per_token

DBRX_132B = Path(__file__).parents[1] / 'yamls' / 'models' / 'dbrx-132b.yaml'


def test_prints_counts_and_flops_of_the_132b_preset(capsys):
    main([str(DBRX_132B)])  # 132B parameters: only possible without allocating them
    out = capsys.readouterr().out
    config = load_model_config(DBRX_132B)
    counts = parameter_counts(config)
    assert f'{counts.total:,} total (131.60B)' in out
    assert f'{counts.active:,} (36.47B; 4 of 16 experts)' in out
    assert f'{train_flops_per_token(config):.4g} (seq_len 32768)' in out


def test_reads_the_model_section_of_a_training_yaml_with_overrides(tmp_path, capsys):
    preset = yaml.safe_load(DBRX_132B.read_text())
    training = tmp_path / 'train.yaml'
    training.write_text(yaml.safe_dump({'run_name': 'x', 'max_seq_len': 4096, 'model': preset}))
    main([str(training), 'model.n_layers=20', '--seq-len', '4096'])
    out = capsys.readouterr().out
    config = load_model_config(training, ['model.n_layers=20'])
    assert config.n_layers == 20
    assert f'{parameter_counts(config).total:,} total' in out
    assert f'{train_flops_per_token(config, 4096):.4g} (seq_len 4096)' in out


def test_bad_override_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(DBRX_132B), 'ffn_config.moe_top_k=32'])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith('error: ffn_config.moe_top_k: top_k (32) cannot exceed')
