"""`dbrx_train.precision`: amp_bf16 on a CPU only where bf16 is native, the choice logged; the
precision Composer's Trainer is given and the model's own CPU autocast."""

from __future__ import annotations

import pytest

from dbrx_train import precision
from dbrx_train.errors import ConfigError


@pytest.mark.parametrize('native, expected', [('AMX', 'amp_bf16'), (None, 'fp32')])
def test_amp_bf16_on_cpu_only_where_bf16_is_native_and_the_choice_is_logged(monkeypatch, caplog, native, expected):
    monkeypatch.setattr(precision, 'cpu_bf16_support', lambda: native)
    with caplog.at_level('INFO', logger='dbrx_train'):
        assert precision.resolve_precision('amp_bf16', 'cpu') == expected
    assert 'precision amp_bf16' in caplog.text and (native or 'no native bf16') in caplog.text
    assert precision.resolve_precision('fp32', 'cpu') == 'fp32'
    assert precision.resolve_precision('amp_bf16', 'gpu') == 'amp_bf16'
    with pytest.raises(ConfigError, match='precision: amp_fp16 needs a GPU'):
        precision.resolve_precision('amp_fp16', 'cpu')


def test_on_a_cpu_the_model_autocasts_and_composer_runs_fp32():
    assert precision.composer_precision('amp_bf16', 'cpu') == ('fp32', True)
    assert precision.composer_precision('fp32', 'cpu') == ('fp32', False)
    assert precision.composer_precision('amp_bf16', 'gpu') == ('amp_bf16', False)
