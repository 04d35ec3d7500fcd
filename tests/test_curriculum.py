"""`python -m dbrx_train.curriculum`: the schedule of a training YAML, printed and plotted."""

from __future__ import annotations

import pytest

from dbrx_train.curriculum import main
from tests.data.test_curriculum import SMALL
from tests.training.conftest import CONFIG


def test_command_prints_the_table_and_draws_the_png(tmp_path, capsys):
    png = tmp_path / 'plots' / 'mix.png'
    main([str(CONFIG), *SMALL, '--png', str(png)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith('100 steps of 4 samples x 32 tokens (12,800 tokens); streams: text, code')
    assert out[1].split() == ['phase', 'steps', 'tokens', 'ramp', 'text', 'code']
    assert out[2].split() == ['text_heavy', '0-49', '0-6,400', '-', '0.900', '0.100']
    assert out[3].split() == ['more_code', '50-99', '6,400-12,800', '25ba', '0.300', '0.700']
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and png.stat().st_size > 10_000
    assert [p.name for p in png.parent.iterdir()] == ['mix.png']  # no temporary file left behind


def test_command_reports_a_bad_yaml_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main([str(CONFIG), *SMALL, 'curriculum.phases.more_code.proportions.docs=0.1'])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == 'error: curriculum.phases.more_code.proportions.docs: no such stream (streams: text, code)'
