"""Our checkpoint directory: round trip, sharding, atomic writes, and errors that name the problem."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dbrx_train.checkpoints import load_pretrained, storage
from dbrx_train.checkpoints.native import CONFIG_FILE, load_checkpoint, save_checkpoint
from dbrx_train.checkpoints.storage import INDEX_FILE, WEIGHTS_FILE
from dbrx_train.errors import CheckpointError
from dbrx_train.model.config import AttentionConfig, FFNConfig, ModelConfig
from dbrx_train.model.dbrx import DbrxLM

CONFIG = ModelConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=32, vocab_size=64,
                     attn_config=AttentionConfig(kv_n_heads=2),
                     ffn_config=FFNConfig(ffn_hidden_size=16, moe_num_experts=8, moe_top_k=2))


def make_model(seed=0) -> DbrxLM:
    torch.manual_seed(seed)
    return DbrxLM(CONFIG).eval()


def assert_same_weights(a: DbrxLM, b: DbrxLM):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_round_trip_single_file(tmp_path):
    model = make_model()
    save_checkpoint(model, tmp_path / 'ckpt')
    assert sorted(p.name for p in (tmp_path / 'ckpt').iterdir()) == ['config.yaml', 'model.safetensors']
    loaded = load_pretrained(tmp_path / 'ckpt')
    assert loaded.config == CONFIG and not loaded.training
    assert_same_weights(loaded, model)
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    assert [p.name for p in tmp_path.iterdir()] == ['ckpt']  # no temporary directory left behind


def test_sharded_round_trip_and_dtype(tmp_path):
    model = make_model()
    save_checkpoint(model.to(torch.bfloat16), tmp_path / 'ckpt', max_shard_bytes=8_000)
    shards = sorted(p.name for p in (tmp_path / 'ckpt').glob('model-*.safetensors'))
    assert len(shards) > 2 and shards[0].endswith(f'-of-{len(shards):05d}.safetensors')
    index = json.loads((tmp_path / 'ckpt' / INDEX_FILE).read_text())
    assert set(index['weight_map']) == set(model.state_dict()) and set(index['weight_map'].values()) == set(shards)
    for shard in shards:  # each shard within the limit unless it holds one bigger tensor
        tensors = load_file(tmp_path / 'ckpt' / shard)
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= 8_000
    assert load_checkpoint(tmp_path / 'ckpt').wte.weight.dtype == torch.bfloat16  # the stored dtype
    as_fp32 = load_checkpoint(tmp_path / 'ckpt', dtype=torch.float32)
    assert_same_weights(as_fp32, model.float())


def test_failed_save_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    old = make_model(seed=0)
    save_checkpoint(old, tmp_path / 'ckpt', max_shard_bytes=8_000)
    before = {p.name: p.read_bytes() for p in (tmp_path / 'ckpt').iterdir()}
    real_save_file = save_file
    calls = []

    def failing_save_file(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError('disk full')
        return real_save_file(*args, **kwargs)

    monkeypatch.setattr(storage, 'save_file', failing_save_file)
    with pytest.raises(OSError, match='disk full'):
        save_checkpoint(make_model(seed=1), tmp_path / 'ckpt', max_shard_bytes=8_000, overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / 'ckpt').iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ['ckpt']
    monkeypatch.undo()
    save_checkpoint(make_model(seed=1), tmp_path / 'ckpt', overwrite=True)  # a successful overwrite
    assert_same_weights(load_checkpoint(tmp_path / 'ckpt'), make_model(seed=1))


def test_save_refuses_to_replace_what_is_not_a_checkpoint(tmp_path):
    save_checkpoint(make_model(), tmp_path / 'ckpt')
    with pytest.raises(CheckpointError, match='already exists'):
        save_checkpoint(make_model(), tmp_path / 'ckpt')
    (tmp_path / 'notes').mkdir()
    (tmp_path / 'notes' / 'todo.txt').write_text('keep me')
    with pytest.raises(CheckpointError, match="'todo.txt'"):
        save_checkpoint(make_model(), tmp_path / 'notes', overwrite=True)
    assert (tmp_path / 'notes' / 'todo.txt').read_text() == 'keep me'


@pytest.fixture
def saved(tmp_path):
    directory = tmp_path / 'ckpt'
    save_checkpoint(make_model(), directory)
    return directory


def rewrite_weights(directory, edit):
    tensors = load_file(directory / WEIGHTS_FILE)
    edit(tensors)
    save_file(tensors, directory / WEIGHTS_FILE)


def test_missing_tensor_is_named(saved):
    rewrite_weights(saved, lambda t: t.pop('blocks.1.ffn.router.weight'))
    with pytest.raises(CheckpointError, match=r"missing tensor 'blocks\.1\.ffn\.router\.weight' \(shape \(8, 32\)\)"):
        load_pretrained(saved)


def test_wrong_shape_is_named(saved):
    rewrite_weights(saved, lambda t: t.update({'blocks.0.attn.Wqkv.weight': torch.zeros(48, 32)}))
    with pytest.raises(CheckpointError, match=r"'blocks\.0\.attn\.Wqkv\.weight' .* shape \(48, 32\); the config "
                                              r"expects \(64, 32\)"):
        load_pretrained(saved)


def test_unexpected_tensor_is_named(saved):
    rewrite_weights(saved, lambda t: t.update({'blocks.2.norm_1.weight': torch.ones(32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'blocks\.2\.norm_1\.weight'"):
        load_pretrained(saved)


def test_missing_files_are_named(tmp_path, saved):
    (saved / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match='missing file .*model.safetensors'):
        load_pretrained(saved)
    (saved / CONFIG_FILE).unlink()
    with pytest.raises(CheckpointError, match='is not a model checkpoint'):
        load_pretrained(saved)
    with pytest.raises(CheckpointError, match='does not exist'):
        load_pretrained(tmp_path / 'nowhere')

    sharded = tmp_path / 'sharded'
    save_checkpoint(make_model(), sharded, max_shard_bytes=8_000)
    second_shard = sorted(sharded.glob('model-*.safetensors'))[1]
    second_shard.unlink()
    with pytest.raises(CheckpointError, match=f'missing file .*{second_shard.name}'):
        load_pretrained(sharded)


def test_corrupt_config_and_weights_are_errors(saved):
    (saved / WEIGHTS_FILE).write_bytes(b'\x08\x00\x00\x00\x00\x00\x00\x00{broken}')
    with pytest.raises(CheckpointError, match='not a valid safetensors file'):
        load_pretrained(saved)
    (saved / CONFIG_FILE).write_text('d_model: 32\nn_heads: 5\nn_layers: 2\nmax_seq_len: 32\n')
    with pytest.raises(CheckpointError, match=r'config\.yaml: n_heads: '):
        load_pretrained(saved)
