"""`python -m dbrx_train.info`: sizes and FLOPs of a model preset or a training YAML, on the meta device."""

from pathlib import Path

import pytest
import yaml

from dbrx_train.info import load_model_config, main
from dbrx_train.model.flops import attention_flops_per_token, parameter_counts, train_flops_per_token

DBRX_132B = Path(__file__).parents[1] / 'yamls' / 'models' / 'dbrx-132b.yaml'


def test_prints_counts_and_flops_of_the_132b_preset(capsys):
    main([str(DBRX_132B)])  # 132B parameters: only possible without allocating them
    out = capsys.readouterr().out
    config = load_model_config(DBRX_132B)
    counts = parameter_counts(config)
    assert f'{counts.total:,} total (131.60B)' in out
    assert f'{counts.active:,} (36.47B; 4 of 16 experts)' in out
    assert f'{train_flops_per_token(config):.4g} (seq_len 32768)' in out
    # DBRX's 32K context: 12 x 40 layers x 6144 x 32768 attention FLOPs per token, 31% of the whole.
    attention = 12 * 40 * 6144 * 32768
    assert attention_flops_per_token(config) == attention
    assert f'of which attention: {attention:.4g} ({attention / train_flops_per_token(config):.1%}); ' \
           f'{attention * 32768:.4g} per 32768-token sequence' in out


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


def test_sizes_one_rank_of_the_132b_preset_on_8_expert_parallel_ranks(capsys):
    main([str(DBRX_132B), '--world-size', '8', '--moe-world-size', '8', '--seq-len', '4096'])
    out = capsys.readouterr().out
    d, gib = 6144, 2**30
    experts = 16 * 40 * 3 * 10752 * d // 8  # 2 whole experts of each layer on every rank
    block = 2 * d + (d + 2 * 8 * 128) * d + d * d + 16 * d  # norms, Wqkv, out_proj, router
    root = 2 * 100352 * d + d  # wte, lm_head, norm_f
    non_expert = (40 * block + root) // 8
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith('  ')}
    for name, numel in (('experts', experts), ('non-expert', non_expert), ('total', experts + non_expert)):
        # fp32 parameters, fp32 gradients, two fp32 AdamW moments
        gib_cells = [f'{numel * b / gib:.2f}' for b in (4, 4, 8, 16)]
        assert rows[name] == [f'{numel:,}', *gib_cells]
    # 4096 tokens x top-4 rows of 6144, 7/8 of them to other ranks, out in fp32 and back in bf16, forward and
    # backward, in 40 layers; the non-expert parameters gathered in bf16 from the 7 other ranks.
    all_to_all = 40 * 2 * 4096 * 4 * d * 7 / 8 * (4 + 2)
    all_gather = 2 * 7 * (40 * 2 * block + root) // 8
    assert f'all-to-all:      {all_to_all / gib:.2f} GiB sent = 1 micro-batch(es) x 40 layers x 2 passes x 4096 ' \
           f'tokens x top_k 4 x d_model 6144 x (8 - 1)/8 x (4 dispatch + 2 combine bytes)' in out
    assert f'FSDP all-gather: {all_gather / gib:.2f} GiB received' in out


@pytest.mark.parametrize('args,error', [
    (['--world-size', '12', '--moe-world-size', '8'],
     'model.ffn_config.moe_world_size: the world size (12) is not divisible by 8'),
    (['--world-size', '8', '--moe-world-size', '16'],
     'model.ffn_config.moe_world_size: 16 is larger than the world size (8)'),
    (['--world-size', '6', '--moe-world-size', '3'],
     'ffn_config.moe_world_size: moe_num_experts (16) is not divisible by 3'),
    (['--world-size', '16', '--shard-group-size', '8', '--moe-world-size', '8'],
     'model.ffn_config.moe_world_size: expert parallelism needs FULL_SHARD'),
    (['--world-size', '12', '--shard-group-size', '8'],
     'fsdp_config.shard_group_size: the world size (12) is not a multiple of 8'),
    (['--world-size', '8', '--micro-batch', '0'], 'micro_batch: must be at least 1, got 0'),
    (['--world-size', '8', '--quantization', 'int4'], '--lora-rank: QLoRA sizing needs both'),
])
def test_impossible_layouts_are_one_line_errors_naming_the_key(args, error, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(DBRX_132B), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f'error: {error}') and err.count('\n') == 1


def test_a_dry_run_of_the_132b_preset_on_16_ranks_measures_what_sizing_predicts(capsys):
    main([str(DBRX_132B), '--world-size', '16', '--moe-world-size', '8', '--dry-run'])
    out = capsys.readouterr().out
    dry = out[out.index('dry run:'):].splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in dry[2:]}
    assert set(rows) == {'experts', 'non-expert', 'params', 'grads', 'AdamW'}
    assert rows['experts'][:3] == [f'{16 * 40 * 3 * 10752 * 6144 // 16:,}'] * 2 + ['0']  # 1/8 of experts, 2 replicas
    for name, cells in rows.items():
        assert cells[0] == cells[1] and float(cells[2].replace(',', '')) == 0, name


@pytest.mark.parametrize('lora_dtype', ['fp32', 'bf16'])
def test_sizes_one_rank_of_132b_qlora_on_8_ranks(capsys, lora_dtype):
    main([str(DBRX_132B), '--world-size', '8', '--quantization', 'int4', '--lora-rank', '16', '--lora-dtype', lora_dtype])
    out = capsys.readouterr().out
    assert 'frozen base int4 in groups of 128 (4.25 bits per weight)' in out
    assert f'{lora_dtype} with {lora_dtype} gradients and AdamW moments' in out
    head = 100352 * 6144 * 4.25 / 8  # the LM head's int4 rows, gathered while the loss reads them block by block
    assert f'its quantized rows gathered: {head / 2**30:.2f} GiB' in out
    table = {line[:18].strip(): float(line[18:]) for line in out.splitlines() if line.startswith('  ')
             and line[18:].strip().replace('.', '').isdigit()}
    # 131.6B parameters, all but ~0.6B of them int4 at 4.25 bits, over 8 ranks: about 8.1 GiB each
    assert table['base, quantized'] == pytest.approx(131.0e9 * 4.25 / 8 / 8 / 2**30, rel=0.02)
    assert table['adapter grads'] == table['adapters'] and table['AdamW'] == pytest.approx(2 * table['adapters'], abs=0.015)
    assert table['total'] == pytest.approx(sum(v for k, v in table.items() if k != 'total'), abs=0.02)
    assert table['total'] < 80 * 10**9 / 2**30 / 4  # a quarter of an 80 GB GPU: the rest is for activations
    # 81.9M adapter parameters on rank 0: fp32 or bf16, so are their gradients and moments
    assert table['adapters'] == pytest.approx(81_920_000 * (2 if lora_dtype == 'bf16' else 4) / 2**30, abs=0.005)
