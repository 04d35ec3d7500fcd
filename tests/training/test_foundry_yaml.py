"""llm-foundry's DBRX fine-tuning YAMLs, run as they are: only the local paths, the duration and the precision
are overridden (the hub is unreachable; a CPU trains in fp32)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dbrx_train.errors import ConfigError
from dbrx_train.typed_config import load_yaml, parse
from tests.training.conftest import REPO, TRAIN

transformers = pytest.importorskip('transformers')

FOUNDRY_YAMLS = REPO / 'yamls' / 'finetune' / 'llm-foundry'
LORA_YAML, FULL_YAML = FOUNDRY_YAMLS / 'dbrx-lora-ft.yaml', FOUNDRY_YAMLS / 'dbrx-full-ft.yaml'
# Every key of llm-foundry's published dbrx-lora-ft.yaml / dbrx-full-ft.yaml (read from the llm-foundry repository).
PUBLISHED_KEYS = {
    'max_seq_len', 'icl_seq_len', 'run_name', 'model.name', 'model.pretrained', 'model.init_device',
    'model.peft_config.r', 'model.peft_config.peft_type', 'model.peft_config.task_type', 'model.peft_config.lora_alpha',
    'model.peft_config.lora_dropout', 'model.peft_config.target_modules', 'model.use_auth_token',
    'model.config_overrides', 'model.use_flash_attention_2', 'model.pretrained_model_name_or_path', 'tokenizer.name',
    'tokenizer.kwargs.model_max_length', 'tokenizer.kwargs.trust_remote_code', 'optimizer.lr', 'optimizer.name',
    'optimizer.betas', 'optimizer.weight_decay', 'scheduler.name', 'scheduler.alpha_f', 'scheduler.t_warmup',
    'algorithms.gradient_clipping.clipping_type', 'algorithms.gradient_clipping.clipping_threshold', 'max_duration',
    'eval_interval', 'global_train_batch_size', 'eval_first', 'seed', 'device_train_microbatch_size',
    'device_eval_batch_size', 'precision', 'autoresume', 'dist_timeout', 'fsdp_config.mixed_precision',
    'fsdp_config.state_dict_type', 'fsdp_config.limit_all_gathers', 'fsdp_config.sharding_strategy',
    'fsdp_config.activation_cpu_offload', 'fsdp_config.activation_checkpointing',
    'fsdp_config.activation_checkpointing_reentrant', 'progress_bar', 'log_to_console', 'console_log_interval',
    'callbacks.lr_monitor', 'callbacks.speed_monitor.window_size', 'callbacks.memory_monitor',
    'callbacks.hf_checkpointer.overwrite', 'callbacks.hf_checkpointer.precision',
    'callbacks.hf_checkpointer.save_folder', 'callbacks.hf_checkpointer.save_interval', 'callbacks.runtime_estimator',
    *(f'{loader}.{key}' for loader in ('train_loader', 'eval_loader') for key in (
        'name', 'dataset.split', 'dataset.hf_name', 'dataset.shuffle', 'dataset.max_seq_len', 'dataset.packing_ratio',
        'dataset.allow_pad_trimming', 'dataset.decoder_only_format', 'drop_last', 'pin_memory', 'num_workers',
        'prefetch_factor', 'persistent_workers')),
    'train_loader.dataset.eos_token_id',
}


def _keys(data: dict, prefix: str = '') -> set[str]:
    found = set()
    for key, value in data.items():
        if isinstance(value, dict) and value:
            found |= _keys(value, f'{prefix}{key}.')
        else:
            found.add(f'{prefix}{key}')
    return found


def _overrides(model: Path, data: Path, run_dir: Path, max_duration: str) -> list[str]:
    """The changes a machine without the hub (and without a GPU) must make: local paths, duration, precision;
    and for a CPU to train in seconds, shorter rows (packed rows of 4096 tokens take minutes a step) in
    microbatches of 16 (the same step: microbatching only bounds memory)."""
    return [f'model.pretrained_model_name_or_path={model}', f'train_loader.dataset.hf_name={data}',
            f'eval_loader.dataset.hf_name={data}', f'callbacks.hf_checkpointer.save_folder={run_dir}/{{run_name}}',
            f'max_duration={max_duration}', 'precision=fp32', 'max_seq_len=128', 'device_train_microbatch_size=16']


def _train(yaml: Path, overrides: list[str], run_dir: Path) -> str:
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'RUN_NAME': 'foundry-run'}
    proc = subprocess.run([sys.executable, str(TRAIN), str(yaml), *overrides, 'loggers.metrics_file.path='
                           f'{run_dir}/metrics.jsonl'], cwd=run_dir, env=env, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


def _greedy(model, prompt: list[int], **kwargs) -> list[int]:
    return model.generate(torch.tensor([prompt]), max_new_tokens=8, **kwargs)[0, len(prompt):].tolist()


@pytest.mark.parametrize('yaml', [LORA_YAML, FULL_YAML], ids=lambda p: p.name)
def test_the_yamls_use_every_key_of_the_published_ones(yaml):
    data = load_yaml(yaml)
    published = {k for k in PUBLISHED_KEYS if yaml == LORA_YAML or 'peft_config' not in k}
    assert published <= _keys(data), sorted(published - _keys(data))


def test_lora_yaml_trains_only_its_targets_and_hf_checkpointer_output_loads_in_transformers(
        tiny_hf_dbrx, dolly_dir, tmp_path):
    from safetensors.torch import load_file

    from dbrx_train.chat_template import DBRX_INSTRUCT_SYSTEM_PROMPT, TEMPLATES
    from dbrx_train.checkpoints import load_pretrained
    from dbrx_train.tokenizer import get_encoding

    out = _train(LORA_YAML, _overrides(tiny_hf_dbrx, dolly_dir, tmp_path, '2ba'), tmp_path)
    for note in ('model.use_flash_attention_2', 'model.use_auth_token', 'autoresume: true without save_folder',
                 'tokenizer.kwargs.trust_remote_code', 'train_loader.dataset.eos_token_id: 0'):
        assert note in out, note
    assert 'lora dropout 0.05' not in out  # Wqkv only: every adapter has its dropout
    lines = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    assert sorted(r['step'] for r in lines if 'loss/train/lm' in r) == [0, 1]
    cached = list((dolly_dir / '.dbrx_train_mds').iterdir())
    assert sorted(p.name.split('-')[0] for p in cached) == ['test', 'train']  # converted beside the data

    exported = tmp_path / 'foundry-run' / 'huggingface' / 'ba2'  # save_folder's {run_name} is $RUN_NAME
    base, tuned = load_file(tiny_hf_dbrx / 'model.safetensors'), load_file(exported / 'model.safetensors')
    assert sorted(tuned) == sorted(base)
    for name in base:  # bfloat16 (hf_checkpointer.precision); only the adapted Wqkv moved, adapters merged
        assert tuned[name].dtype == torch.bfloat16
        assert torch.equal(tuned[name], base[name].to(torch.bfloat16)) != name.endswith('Wqkv.weight'), name

    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    assert tokenizer.chat_template == TEMPLATES['dbrx_instruct'] and tokenizer.model_max_length == 128
    prompt = tokenizer.apply_chat_template([{'role': 'user', 'content': 'Add 3 and 4.'}], add_generation_prompt=True)
    assert DBRX_INSTRUCT_SYSTEM_PROMPT in get_encoding().decode(prompt)
    theirs = _greedy(transformers.DbrxForCausalLM.from_pretrained(exported).eval(), prompt, do_sample=False)
    assert _greedy(load_pretrained(exported, dtype=torch.float32), prompt) == theirs


def test_full_yaml_trains_and_writes_a_transformers_dir(tiny_hf_dbrx, dolly_dir, tmp_path):
    out = _train(FULL_YAML, _overrides(tiny_hf_dbrx, dolly_dir, tmp_path, '1ba'), tmp_path)
    assert 'converting' not in out or 'reading' in out  # the session's LoRA run may have converted the data
    model = transformers.DbrxForCausalLM.from_pretrained(tmp_path / 'foundry-run' / 'huggingface' / 'ba1')
    assert model.config.max_seq_len == 32768 and model.config.n_layers == 2


# ---------------------------------------------------------------- the mapping, without training


def _parse(tiny_hf_dbrx, dolly_dir, yaml=LORA_YAML, **changes):
    from dbrx_train.training.config import TrainConfig

    data = load_yaml(yaml, [f'model.pretrained_model_name_or_path={tiny_hf_dbrx}',
                                 f'train_loader.dataset.hf_name={dolly_dir}', f'eval_loader.dataset.hf_name={dolly_dir}',
                                 *(f'{k}={v}' for k, v in changes.items())])
    return parse(TrainConfig, data)


def test_the_model_section_maps_onto_init_from_the_architecture_and_lora(tiny_hf_dbrx, dolly_dir, monkeypatch):
    monkeypatch.setenv('RUN_NAME', 'from-env')
    cfg = _parse(tiny_hf_dbrx, dolly_dir, **{'model.config_overrides.ffn_config.moe_zloss_weight': 0.001,
                                             'model.peft_config.target_modules': '[attn.Wqkv,w1]'})
    assert cfg.init_from == str(tiny_hf_dbrx) and cfg.init_device == 'mixed' and cfg.run_name == 'from-env'
    assert (cfg.model.d_model, cfg.model.ffn_config.moe_num_experts, cfg.model.max_seq_len) == (64, 8, 32768)
    assert cfg.model.ffn_config.moe_zloss_weight == 0.001
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets) == (64, 128.0, 0.05, ['Wqkv', 'w1'])
    assert cfg.tokenizer.chat_template == 'dbrx_instruct' and cfg.tokenizer.model_max_length == 4096
    assert cfg.train_loader.dataset.packs and not cfg.eval_loader.dataset.packs  # packing_ratio auto / null
    assert cfg.autoresume is False  # no save_folder to resume from
    full = _parse(tiny_hf_dbrx, dolly_dir, FULL_YAML, **{'model.pretrained': False})
    assert full.init_from is None and full.lora is None and full.model.n_layers == 2  # the architecture only


@pytest.mark.parametrize('change, key, problem', [
    ({'model.pretrained_model_name_or_path': 'databricks/dbrx-instruct'}, 'model.pretrained_model_name_or_path',
     'hub name and the hub is not reachable'),
    ({'train_loader.dataset.hf_name': 'mosaicml/dolly_hhrlhf'}, 'train_loader.dataset.hf_name', 'hub name'),
    ({'model.config_overrides.n_experts': 4}, 'model.n_experts', 'unknown key'),
    ({'model.load_in_8bit': True}, 'model.load_in_8bit', 'not supported'),
    ({'model.peft_config.peft_type': 'IA3'}, 'model.peft_config.peft_type', "must be one of 'LORA'"),
    ({'model.peft_config.target_modules': '[lm_head]'}, 'model.peft_config.target_modules[0]', 'not an adaptable'),
    ({'tokenizer.name': 'gpt2'}, 'tokenizer.name', 'not a DBRX tokenizer'),
    ({'tokenizer.kwargs.padding_side': 'left'}, 'tokenizer.kwargs.padding_side', 'not supported'),
    ({'train_loader.dataset.preprocessing_fn': 'x:y'}, 'train_loader.dataset.preprocessing_fn', 'unknown key'),
    ({'train_loader.dataset.decoder_only_format': False}, 'train_loader.dataset.decoder_only_format', 'decoder-only'),
    ({'fsdp_config.use_orig_params': True}, 'fsdp_config.use_orig_params', 'unknown key'),
])
def test_an_unsupported_or_wrong_key_is_one_line_naming_it(tiny_hf_dbrx, dolly_dir, change, key, problem):
    with pytest.raises(ConfigError) as error:
        _parse(tiny_hf_dbrx, dolly_dir, **change)
    assert error.value.key == key and problem in error.value.problem and '\n' not in str(error.value)
