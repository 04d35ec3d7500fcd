"""The training entry point end to end: one process, two FSDP2 processes, bad input (kill -9 and
autoresume: test_autoresume.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dbrx_train

from tests.training.conftest import CONFIG, REPO, TRAIN, losses, run, tiny_overrides

STEPS = 6


def test_one_process_run_logs_every_step_and_leaves_a_loadable_checkpoint(reference):
    lm = losses(reference / 'metrics.jsonl')
    aux = losses(reference / 'metrics.jsonl', 'loss/train/moe_aux')
    assert sorted(lm) == list(range(STEPS))
    assert all(0.5 < a < 2.0 for a in aux.values())  # load-balancing loss is ~1 near balance
    moe = losses(reference / 'metrics.jsonl', 'moe/max_cv')
    assert len(moe) == STEPS

    model = dbrx_train.load_pretrained(reference / 'checkpoints')  # the save folder: its latest checkpoint
    logits = model(torch.tensor([[100257, 1, 2, 3]]))
    assert logits.shape == (1, 4, 100352) and torch.isfinite(logits).all()
    assert not model.training


def test_a_checkpoint_that_does_not_fit_its_config_names_the_tensor(reference, tmp_path):
    import shutil

    import yaml

    from dbrx_train.errors import CheckpointError

    copy = tmp_path / 'checkpoints'
    shutil.copytree(reference / 'checkpoints', copy, symlinks=True)
    config = yaml.safe_load((copy / 'config.yaml').read_text())
    config['ffn_config']['ffn_hidden_size'] = 32
    (copy / 'config.yaml').write_text(yaml.safe_dump(config))
    with pytest.raises(CheckpointError, match=r'blocks\.0\.ffn\.experts\.w1 has shape \(1536, 64\)'):
        dbrx_train.load_pretrained(copy)
    (copy / 'config.yaml').unlink()
    with pytest.raises(CheckpointError, match='config.yaml is missing'):
        dbrx_train.load_pretrained(copy)


def test_two_fsdp2_processes_match_one_process_with_the_same_global_batch(reference, reference_two_ranks):
    # Also logs to Weights & Biases, offline (the test environment sets WANDB_MODE=offline).
    one, two = losses(reference / 'metrics.jsonl'), losses(reference_two_ranks / 'metrics.jsonl')
    assert sorted(two) == sorted(one)
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step
    assert (reference_two_ranks / 'rank1.out').exists()
    assert (reference_two_ranks / 'checkpoints' / 'ep0-ba6' / '.metadata').is_file()  # sharded
    [wandb_log] = reference_two_ranks.glob('wandb/offline-run-*/run-*.wandb')
    assert b'loss/train/lm' in wandb_log.read_bytes() and b'moe/max_cv' in wandb_log.read_bytes()


def _fails_with_one_line(args: list[str], expected: str) -> None:
    proc = subprocess.run([sys.executable, str(TRAIN), *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('error: ') and expected in last, last


def test_a_typo_in_the_yaml_is_one_line_naming_the_key_and_the_fix(tmp_path):
    _fails_with_one_line([str(CONFIG), 'model.d_modle=64'], "model.d_modle: unknown key (did you mean 'd_model'?)")


def test_a_missing_data_directory_is_one_line_naming_the_stream(tiny_corpus, tmp_path):
    _fails_with_one_line([str(CONFIG), f'train_loader.dataset.streams.text.local={tiny_corpus / "text"}',
                          f'train_loader.dataset.streams.code.local={tmp_path / "nowhere"}'],
                         'train_loader.dataset.streams.code.local: data directory not found')


def test_a_layout_that_cannot_fit_this_host_is_one_line_before_the_model_is_built(tiny_corpus, tmp_path):
    # DBRX-132B on one process of this host: 2.1 TB of weights, gradients and AdamW state.
    big = {'d_model': 6144, 'n_heads': 48, 'n_layers': 40, 'attn_config.kv_n_heads': 8,
           'ffn_config.ffn_hidden_size': 10752}
    _fails_with_one_line([str(CONFIG), *tiny_overrides(tiny_corpus, tmp_path),
                          *(f'model.{k}={v}' for k, v in big.items())],
                         'layout does not fit: 1 rank(s) on this host need at least 1,960.9 GiB')


def test_meta_initialisation_without_fsdp_config_is_one_line_naming_the_key():
    from dbrx_train.errors import ConfigError
    from dbrx_train.training.config import TrainConfig
    from dbrx_train.typed_config import load_yaml, parse

    with pytest.raises(ConfigError, match="^init_device: 'meta' needs fsdp_config"):
        parse(TrainConfig, load_yaml(CONFIG, ['init_device=meta', 'fsdp_config=null']))


@pytest.fixture(scope='module')
def expert_parallel_run(tiny_corpus, tmp_path_factory) -> Path:
    """2 ranks, each owning 8 of the 16 experts of each layer, built on meta: each rank materialises
    and initialises only its shards, the weights of one process."""
    run_dir = tmp_path_factory.mktemp('expert_parallel')
    settings = {'model.ffn_config.moe_world_size': 2, 'init_device': 'meta', 'save_num_checkpoints_to_keep': -1}
    run(tiny_overrides(tiny_corpus, run_dir, **settings), processes=2, log_dir=run_dir, timeout=600)
    return run_dir


def test_expert_parallel_processes_match_one_process(expert_parallel_run, reference):
    for key in ('loss/train/lm', 'loss/train/moe_aux'):
        one, two = losses(reference / 'metrics.jsonl', key), losses(expert_parallel_run / 'metrics.jsonl', key)
        assert sorted(two) == sorted(one)
        for step in one:
            assert two[step] == pytest.approx(one[step], rel=1e-4), (key, step)
    rows = losses(expert_parallel_run / 'metrics.jsonl', 'moe/all_to_all_rows')
    sent = losses(expert_parallel_run / 'metrics.jsonl', 'moe/all_to_all_bytes')
    share = losses(expert_parallel_run / 'metrics.jsonl', 'moe/ep_busiest_rank_share')
    assert sorted(rows) == sorted(sent) == sorted(share) and len(rows) == STEPS
    for step in rows:
        assert rows[step] > 0
        # Rows dispatched away come back: forward and backward, 2 all-to-alls each, d_model 64 in fp32.
        assert sent[step] == rows[step] * 2 * 2 * 64 * 4
        assert 0.5 <= share[step] <= 1.0

    # Its sharded checkpoint (DCP, expert weights as Shard(0) DTensors) loads without any process
    # group into whole experts, and predicts as the one-process run's last checkpoint does.
    ours, theirs = (dbrx_train.load_pretrained(run_dir / 'checkpoints') for run_dir in (expert_parallel_run, reference))
    assert ours.blocks[0].ffn.experts.w1.shape == (16 * 96, 64)
    tokens = torch.tensor([[100257, 1, 2, 3]])
    torch.testing.assert_close(ours(tokens), theirs(tokens), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize('saved_by,moe_world_size', [('expert_parallel_run', 1), ('reference_two_ranks', 2)])
def test_a_run_resumes_with_another_expert_parallel_degree(request, tiny_corpus, reference, tmp_path, saved_by,
                                                           moe_world_size):
    """The layout is not the model: the sharded checkpoint at step 4 of a 2-rank run with
    moe_world_size 2 resumes with 1, and one of moe_world_size 1 with 2 (weights and AdamW state
    resharded); every later loss is the uninterrupted run's."""
    saved = request.getfixturevalue(saved_by) / 'checkpoints'
    assert (saved / 'ep0-ba4' / '.metadata').is_file()
    shutil.copytree(saved, tmp_path / 'checkpoints', symlinks=True, ignore=shutil.ignore_patterns('ep0-ba6'))
    settings = {'model.ffn_config.moe_world_size': moe_world_size, 'autoresume': True}
    run(tiny_overrides(tiny_corpus, tmp_path, **settings), processes=2, log_dir=tmp_path, timeout=600)
    resumed, uninterrupted = losses(tmp_path / 'metrics.jsonl'), losses(reference / 'metrics.jsonl')
    assert sorted(resumed) == [4, 5]
    for step in resumed:
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-4), step


def test_amp_bf16_trains_two_cpu_ranks_under_bf16_autocast_where_the_cpu_has_it(tiny_corpus, reference_two_ranks,
                                                                                   tmp_path):
    """Composer's Trainer refuses autocast on a CPU; the model runs its own (FSDP2 gathers bf16 weights).
    Without native bf16 the run is fp32, logged, with fp32's losses."""
    from dbrx_train.precision import cpu_bf16_support

    output = run(tiny_overrides(tiny_corpus, tmp_path, precision='amp_bf16', python_log_level='info'), processes=2,
                 log_dir=tmp_path)
    found, fp32 = losses(tmp_path / 'metrics.jsonl'), losses(reference_two_ranks / 'metrics.jsonl')
    assert sorted(found) == sorted(fp32)
    if cpu_bf16_support() is None:
        assert 'no native bf16' in output and found == fp32
        return
    assert f'precision amp_bf16: bf16 autocast on this CPU ({cpu_bf16_support()}' in output
    assert found != fp32  # bf16 rounding shows in every loss...
    for step, loss in found.items():  # ...and only that
        assert loss == pytest.approx(fp32[step], rel=0.02), step


def test_compile_config_compiles_each_block_and_trains_like_eager(tiny_corpus, reference, tmp_path):
    # aot_eager: the trainer's wiring and the compiled graphs' autograd without inductor's C++ build
    # (tests/model/test_compile.py; inductor's loss is compared in bench/bench_model.py).
    output = run(tiny_overrides(tiny_corpus, tmp_path, compile_config='{backend: aot_eager}',
                                python_log_level='info'))
    assert "compiling each transformer block: {'backend': 'aot_eager'}" in output
    compiled, eager = losses(tmp_path / 'metrics.jsonl'), losses(reference / 'metrics.jsonl')
    assert sorted(compiled) == sorted(eager)
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], abs=1e-5), step


def test_compile_config_is_parsed_and_a_bad_key_is_one_line():
    from dbrx_train.errors import ConfigError
    from dbrx_train.training.config import TrainConfig
    from dbrx_train.typed_config import load_yaml, parse

    assert parse(TrainConfig, load_yaml(CONFIG)).compile_config is None
    cfg = parse(TrainConfig, load_yaml(CONFIG, ['compile_config={mode: max-autotune-no-cudagraphs}']))
    assert cfg.compile_config.kwargs() == {'backend': 'inductor', 'mode': 'max-autotune-no-cudagraphs'}
    with pytest.raises(ConfigError, match='compile_config'):
        parse(TrainConfig, load_yaml(CONFIG, ['compile_config={fulgraph: true}']))
