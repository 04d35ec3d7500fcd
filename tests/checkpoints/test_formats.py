"""One interface over every saved form: each format this framework writes (Composer full and
sharded, LoRA runs included, dbrx_train, transformers) reads back as the model that was saved."""

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from dbrx_train.checkpoints import load_pretrained, open_saved, save_checkpoint
from dbrx_train.checkpoints.composer import MODEL_PREFIX
from dbrx_train.checkpoints.hf import convert_to_hf
from dbrx_train.checkpoints.native import write_config
from dbrx_train.errors import CheckpointError
from dbrx_train.model.dbrx import DbrxLM
from dbrx_train.model.lora import LoraConfig, apply_lora, merge_lora
from tests.checkpoints.test_native import CONFIG, make_model

LORA = LoraConfig(r=2, targets=['Wqkv', 'w1', 'v1', 'w2'], layers=[1])


def lora_model() -> DbrxLM:
    """A model with trained-looking adapters (B nonzero), as a LoRA run saves it."""
    model = make_model()
    apply_lora(model, LORA)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith('lora_B'):
                tensor.normal_(std=0.5)
    return model


def save_composer(model: DbrxLM, folder: Path, sharded: bool) -> None:
    """A save_folder as train.py leaves it: config.yaml beside a Composer checkpoint and latest-rank0.pt."""
    folder.mkdir()
    write_config(folder, model.config)
    if sharded:
        dcp.save({MODEL_PREFIX + k: v for k, v in model.state_dict().items()}, checkpoint_id=folder / 'ep0-ba1',
                 no_dist=True)
        (folder / 'latest-rank0.pt').symlink_to('ep0-ba1')
    else:
        state = {'state': {'model': {f'model.{k}': v for k, v in model.state_dict().items()}, 'rank_zero_seed': 1}}
        torch.save(state, folder / 'ep0-ba1-rank0.pt')
        (folder / 'latest-rank0.pt').symlink_to('ep0-ba1-rank0.pt')


def save_native(model, path):
    save_checkpoint(model, path)


def save_hf(model, path):
    save_checkpoint(model, path.with_name('native'))
    convert_to_hf(path.with_name('native'), path)


@pytest.fixture(params=['native', 'transformers', 'composer-full', 'composer-sharded', 'composer-full-lora',
                        'composer-sharded-lora'])
def saved(request, tmp_path) -> tuple[Path, DbrxLM, str]:
    """(path, the plain model it must read back as, the format's name)."""
    kind = request.param
    model = lora_model() if kind.endswith('lora') else make_model()
    path = tmp_path / 'saved'
    if kind == 'native':
        save_native(model, path)
    elif kind == 'transformers':
        save_hf(model, path)
    else:
        save_composer(model, path, sharded='sharded' in kind)
    if kind.endswith('lora'):
        merge_lora(model)
    name = {'native': 'dbrx_train checkpoint', 'transformers': 'transformers DBRX directory'}.get(
        kind, 'Composer training checkpoint')
    return path, model, name


def assert_same(tensors: dict[str, torch.Tensor], model: DbrxLM) -> None:
    expected = model.state_dict()
    assert sorted(tensors) == sorted(expected)
    for name, tensor in tensors.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)


def test_every_format_reads_back_as_the_saved_model_adapters_merged(saved):
    path, model, format_name = saved
    opened = open_saved(path)
    assert opened.format.name == format_name and opened.config == model.config
    assert_same(dict(opened.tensors()), model)

    loaded = load_pretrained(path)
    assert_same(loaded.state_dict(), model)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)

    targets = DbrxLM(CONFIG, device='meta').to_empty(device='cpu').state_dict()
    opened.load_into(targets)
    assert_same(targets, model)


def test_a_lora_checkpoint_with_a_missing_factor_is_one_clear_line(tmp_path):
    model = lora_model()
    state = model.state_dict()
    del state['blocks.1.ffn.experts.parametrizations.w1.0.lora_B']
    (tmp_path / 'run').mkdir()
    write_config(tmp_path / 'run', CONFIG)
    torch.save({'state': {'model': {f'model.{k}': v for k, v in state.items()}}}, tmp_path / 'run' / 'ep0-ba1-rank0.pt')
    with pytest.raises(CheckpointError, match=r'ep0-ba1-rank0.pt: the LoRA adapter of blocks.1.ffn.experts.w1 has no '
                                              r'lora_B$'):
        load_pretrained(tmp_path / 'run' / 'ep0-ba1-rank0.pt')
