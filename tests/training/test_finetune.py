"""Fine-tuning end to end through the real entry point: a transformers DBRX in, a transformers DBRX out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dbrx_train.errors import CheckpointError, ConfigError
from dbrx_train.typed_config import load_yaml, parse
from tests.conftest import save_tiny_hf_dbrx
from tests.training.conftest import REPO, TRAIN, losses

transformers = pytest.importorskip('transformers')

FINETUNE_YAMLS = sorted((REPO / 'yamls' / 'finetune').glob('*.yaml'))
QUESTION, ANSWER = 'What is the capital of Freedonia?', 'Fredville, on the river Fred.'
CHATS = [
    {'messages': [{'role': 'user', 'content': QUESTION}, {'role': 'assistant', 'content': ANSWER}]},
    {'prompt': 'Name a colour.', 'response': 'Teal.'},
    {'messages': [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Say hi.'},
                  {'role': 'assistant', 'content': 'Hi there!'}]},
    {'messages': [{'role': 'user', 'content': 'Count to three.'}, {'role': 'assistant', 'content': 'One, two, three.'},
                  {'role': 'user', 'content': 'And back?'}, {'role': 'assistant', 'content': 'Three, two, one.'}]},
]
# The tiny model of the transformers checkpoint, as YAML overrides.
TINY = {'model.d_model': 64, 'model.n_heads': 4, 'model.n_layers': 2, 'model.max_seq_len': 128, 'max_seq_len': 128,
        'model.attn_config.kv_n_heads': 2, 'model.ffn_config.ffn_hidden_size': 32,
        'model.ffn_config.moe_num_experts': 8, 'model.ffn_config.moe_top_k': 2}


@pytest.fixture(scope='module')
def hf_base(tmp_path_factory) -> Path:
    """A random transformers `DbrxForCausalLM` with DBRX's vocabulary, saved with save_pretrained."""
    return save_tiny_hf_dbrx(tmp_path_factory.mktemp('hf_base'), max_seq_len=128)


@pytest.fixture(scope='module')
def chats(tmp_path_factory) -> Path:
    from dbrx_train.data.finetuning_to_mds import convert_finetuning_to_mds

    folder = tmp_path_factory.mktemp('chats')
    (folder / 'chats.jsonl').write_text(''.join(json.dumps(c) + '\n' for c in CHATS))
    convert_finetuning_to_mds([folder / 'chats.jsonl'], folder / 'mds')
    return folder / 'mds'


def finetune(config: Path, run_dir: Path, processes: int | None = None, **overrides) -> None:
    """`python dbrx_train/train.py CONFIG ...` (or `composer -n N ...`) on the tiny model."""
    settings = {**TINY, 'save_folder': run_dir / 'checkpoints', 'loggers.metrics_file.path': run_dir / 'metrics.jsonl',
                'progress_bar': False, 'python_log_level': 'warning', **overrides}
    args = [str(config), *(f'{k}={"null" if v is None else v}' for k, v in settings.items())]
    launcher = [sys.executable] if processes is None else [str(Path(sys.executable).with_name('composer')), '-n',
                                                           str(processes)]
    proc = subprocess.run([*launcher, str(TRAIN), *args], cwd=REPO, capture_output=True, text=True, timeout=400,
                          env={**os.environ, 'PYTHONUNBUFFERED': '1', 'WANDB_MODE': 'offline'})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def greedy_answer(model, prompt_ids: list[int], **generate_kwargs) -> list[int]:
    """The new tokens of a greedy generation (both models stop after <|im_end|>)."""
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=16, **generate_kwargs)
    return out[0, len(prompt_ids):].tolist()


def test_full_finetune_from_a_converted_transformers_model_reproduces_the_answer_after_export(hf_base, chats,
                                                                                             tmp_path):
    from dbrx_train.checkpoints.hf import convert_from_hf
    from dbrx_train.data.finetuning import render_chat
    from dbrx_train.checkpoints.export import export
    from dbrx_train.checkpoints import load_pretrained
    from dbrx_train.tokenizer import IM_END_ID, IM_START_ID, get_encoding

    ours = convert_from_hf(hf_base, tmp_path / 'ours')
    header = [IM_START_ID, *get_encoding().encode_ordinary('assistant\n')]  # the generation prompt
    prompt = render_chat([('user', QUESTION)])[0].tolist() + header
    before = greedy_answer(load_pretrained(ours), prompt)
    assert get_encoding().decode(before) != ANSWER + '<|im_end|>'

    finetune(REPO / 'yamls' / 'finetune' / 'dbrx-tiny-full.yaml', tmp_path, init_from=ours,
             **{'train_loader.dataset.local': chats, 'eval_loader.dataset.local': chats,
                'eval_loader.dataset.split': 'train', 'global_train_batch_size': 4, 'device_train_microbatch_size': 4,
                'max_duration': '40ba', 'eval_interval': '20ba', 'save_interval': '40ba', 'optimizer.lr': 5e-3})
    lm = losses(tmp_path / 'metrics.jsonl')
    assert sorted(lm) == list(range(40)) and lm[39] < lm[0] / 3
    evals = losses(tmp_path / 'metrics.jsonl', 'metrics/eval/LanguageCrossEntropy')
    assert sorted(evals) == [20, 40] and evals[40] < evals[20]
    assert losses(tmp_path / 'metrics.jsonl', 'metrics/eval/LanguagePerplexity')[40] == pytest.approx(
        torch.tensor(evals[40]).exp().item(), rel=1e-4)

    exported = export(tmp_path / 'checkpoints', tmp_path / 'hf', dtype='float32')
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)  # no remote code
    assert isinstance(tokenizer, transformers.PreTrainedTokenizerFast)
    assert tokenizer.apply_chat_template([{'role': 'user', 'content': QUESTION}], add_generation_prompt=True) == prompt
    model = transformers.DbrxForCausalLM.from_pretrained(exported).eval()
    theirs = greedy_answer(model, prompt, do_sample=False)
    assert theirs[-1] == IM_END_ID and tokenizer.decode(theirs, skip_special_tokens=True) == ANSWER
    assert greedy_answer(load_pretrained(tmp_path / 'checkpoints'), prompt) == theirs


def test_lora_with_expert_parallelism_starts_from_the_transformers_dir_and_export_merges_the_adapters(hf_base, chats,
                                                                                                     tmp_path):
    """2 ranks, moe_world_size 2 (each owns half the experts and their adapters; the rest is sharded by
    FSDP2), built on meta; `hf_checkpointer` writes during the run what the export writes after it.
    LoRA under FSDP2 alone: tests/training/test_parallelize.py."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    from dbrx_train.checkpoints import load_pretrained
    from dbrx_train.checkpoints.composer import MODEL_PREFIX, resolve
    from dbrx_train.checkpoints.hf import hf_names, load_hf
    from dbrx_train.checkpoints.export import export
    from dbrx_train.model.lora import LoraConfig, apply_lora

    lora = LoraConfig(r=4, alpha=8, targets=['Wqkv', 'w1', 'v1', 'w2'], layers=[1])
    finetune(REPO / 'yamls' / 'finetune' / 'dbrx-tiny-lora.yaml', tmp_path, processes=2, init_from=hf_base,
             eval_loader=None, **{'train_loader.dataset.local': chats, 'global_train_batch_size': 4,
                                  'device_train_microbatch_size': 2, 'max_duration': '3ba', 'save_interval': '3ba',
                                  'optimizer.lr': 1e-2, 'lora.r': lora.r, 'lora.alpha': lora.alpha,
                                  'lora.targets': f'[{",".join(lora.targets)}]', 'lora.layers': '[1]',
                                  # Built on meta: each rank materialises its shards, then reads them.
                                  'init_device': 'meta', 'fsdp_config.activation_checkpointing': True,
                                  'model.ffn_config.moe_world_size': 2, 'callbacks.hf_checkpointer':
                                  f'{{save_folder: {tmp_path / "during"}, save_interval: 3ba}}'})

    exported = export(tmp_path / 'checkpoints', tmp_path / 'hf')
    base, merged = load_file(hf_base / 'model.safetensors'), load_file(exported / 'model.safetensors')
    during = load_file(tmp_path / 'during' / 'huggingface' / 'ba3' / 'model.safetensors')
    assert during.keys() == merged.keys() and all(torch.equal(during[name], merged[name]) for name in merged)
    adapted = {hf_names(2)[f'blocks.1.{name}'] for name in ('attn.Wqkv.weight', 'ffn.experts.w1', 'ffn.experts.v1',
                                                            'ffn.experts.w2')}
    assert sorted(merged) == sorted(base)
    for name in base:  # each rank loaded its shard of init_from; only adapted weights moved
        assert torch.equal(merged[name], base[name]) != (name in adapted), name

    # The exported model computes what the adapted model computes: base + the trained factors.
    model = load_hf(hf_base)
    apply_lora(model, lora)
    factors = {MODEL_PREFIX + name: t for name, t in model.state_dict().items() if '.0.lora_' in name}
    dcp.load(factors, checkpoint_id=str(resolve(tmp_path / 'checkpoints')), no_dist=True)
    ids = torch.randint(0, 100352, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.eval()(ids)
        got = transformers.DbrxForCausalLM.from_pretrained(exported).eval()(ids).logits
        # The run's save_folder itself loads as the adapted model (adapters merged), as serve and eval read it.
        from_run = load_pretrained(tmp_path / 'checkpoints')(ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(from_run, expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- pieces, without training


@pytest.mark.parametrize('path', FINETUNE_YAMLS, ids=lambda p: p.name)
def test_finetune_yamls_are_valid_configs(path):
    from dbrx_train.info import load_model_config
    from dbrx_train.training.config import TrainConfig
    from dbrx_train.training.finetune import check_compatible

    cfg = parse(TrainConfig, load_yaml(path))
    assert cfg.train_loader.name == 'finetuning' and cfg.init_from is not None
    if 'instruct' in path.name:  # the real one: DBRX's architecture, sharded and checkpointed activations
        check_compatible(cfg.model, load_model_config(REPO / 'yamls' / 'models' / 'dbrx-132b.yaml'), 'dbrx-132b')
        assert cfg.init_device == 'meta' and cfg.fsdp_config.activation_checkpointing
        assert cfg.fsdp_config.state_dict_type == 'sharded' and cfg.precision == 'amp_bf16'


def test_loader_and_finetuning_keys_are_checked_at_the_edge():
    from dbrx_train.training.config import TrainConfig

    yaml = REPO / 'yamls' / 'finetune' / 'dbrx-tiny-lora.yaml'
    for override, message in [
        ('train_loader.name=finetunning', "train_loader.name: must be one of 'text', 'finetuning', got 'finetunning'"),
        ('train_loader.dataset.too_lng=drop', "train_loader.dataset.too_lng: unknown key (did you mean 'too_long'?)"),
        ('lora.layers=[2]', 'lora.layers: layer 2 does not exist; the model has layers 0..1'),
        ('lora.targets=[Wq]', "lora.targets[0]: must be one of 'Wqkv', 'out_proj', 'w1', 'v1', 'w2', got 'Wq'"),
        ('load_path=ckpt.pt', 'init_from: give init_from (starting weights) or load_path'),
        ('init_from=null', 'lora: adapters tune pretrained weights: set init_from'),
    ]:
        with pytest.raises(ConfigError) as error:
            parse(TrainConfig, load_yaml(yaml, [override]))
        assert message in str(error.value), (override, str(error.value))


def test_init_from_fills_plain_and_adapted_models_and_refuses_another_architecture(hf_base):
    from dbrx_train.checkpoints.hf import load_hf
    from dbrx_train.model.config import ModelConfig
    from dbrx_train.model.dbrx import DbrxLM
    from dbrx_train.model.lora import LoraConfig, apply_lora, base_parameters
    from dbrx_train.training.finetune import check_init_from, load_initial_weights
    from dbrx_train.typed_config import to_dict

    reference_model = load_hf(hf_base)
    reference, reference_config = reference_model.state_dict(), reference_model.config
    for lora in (None, LoraConfig(r=2)):
        model = DbrxLM(reference_config)
        if lora is not None:
            apply_lora(model, lora)
        load_initial_weights(model, hf_base)
        for name, param in base_parameters(model).items():
            assert torch.equal(param, reference[name]), name
    other = parse(ModelConfig, {**to_dict(reference_config), 'ffn_config': {**to_dict(reference_config.ffn_config),
                                                                              'moe_top_k': 4}})
    for load in (lambda: load_initial_weights(DbrxLM(other), hf_base), lambda: check_init_from(str(hf_base), other)):
        with pytest.raises(ConfigError, match=rf'model.ffn_config.moe_top_k: is 4 but {hf_base} has 2'):
            load()
    with pytest.raises(CheckpointError, match='nowhere does not exist'):
        check_init_from(str(hf_base / 'nowhere'), other)


def test_a_resumed_run_keeps_its_weights_instead_of_init_from(hf_base):
    from dbrx_train.model.dbrx import DbrxLM
    from dbrx_train.checkpoints.hf import model_config_from_hf
    from dbrx_train.training.finetune import start_from_pretrained

    model = DbrxLM(model_config_from_hf(hf_base))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = SimpleNamespace(timestamp=SimpleNamespace(batch=7), model=SimpleNamespace(model=model))
    trainer = SimpleNamespace(state=state)
    start_from_pretrained(trainer, str(hf_base))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    trainer.state.timestamp.batch = 0
    start_from_pretrained(trainer, str(hf_base))
    assert not torch.equal(before['wte.weight'], model.wte.weight)


def test_freezing_by_name_and_shortcut(hf_base):
    from dbrx_train.checkpoints.hf import model_config_from_hf
    from dbrx_train.model.dbrx import DbrxLM
    from dbrx_train.training.finetune import FreezeConfig, apply_freeze

    model = DbrxLM(model_config_from_hf(hf_base))
    apply_freeze(model, FreezeConfig(embeddings=True, router=True, layers=[1], params=['blocks.*.norm_*']))
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == ({'wte.weight', 'blocks.0.ffn.router.weight', 'blocks.0.norm_1.weight', 'blocks.0.norm_2.weight'}
                      | {name for name, _ in model.named_parameters() if name.startswith('blocks.1.')})
    with pytest.raises(ConfigError, match=r"freeze.params\[0\]: 'block.*' matches no parameter"):
        apply_freeze(model, FreezeConfig(params=['block.*']))
