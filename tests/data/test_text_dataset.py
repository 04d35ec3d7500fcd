import json
import shutil

import numpy as np
import pytest
import torch

from dbrx_train.data import LoaderConfig, TextDataset, TextDatasetConfig, build_text_dataloader, collate_text
from dbrx_train.errors import ConfigError
from dbrx_train.tokenizer import EOS_ID, PAD_ID
from dbrx_train.typed_config import load_yaml, parse

pytestmark = pytest.mark.usefixtures('streaming_shm')

PROSE = [f'Paragraph {i} of the prose stream says something about sparse experts.' * (1 + i % 3) for i in range(40)]
CODE = [f'def function_{i}(x):\n    return x * {i} + {i * i}\n' * (1 + i % 2) for i in range(60)]


@pytest.fixture
def two_streams(write_mds):
    prose, prose_samples = write_mds(PROSE, 'prose', 32)
    code, code_samples = write_mds(CODE, 'code', 32)
    return {'prose': (prose, prose_samples), 'code': (code, code_samples)}


def loader_yaml(streams, **dataset):
    return {
        'name': 'text',
        'dataset': {'streams': streams, 'shuffle': True, 'shuffle_seed': 17, 'max_seq_len': 32, **dataset},
        'drop_last': True,
        'num_workers': 0,
    }


def batches(loader, count=None):
    out = []
    for batch in loader:
        out.append(batch['input_ids'])
        if count is not None and len(out) == count:
            break
    return out


def test_round_trip_gives_exactly_the_packed_tokens(two_streams):
    local, expected = two_streams['prose']
    dataset = TextDataset(parse(TextDatasetConfig, {'local': str(local), 'max_seq_len': 32}))
    assert len(dataset) == len(expected)
    for i in range(len(expected)):
        sample = dataset[i]['input_ids']
        assert sample.dtype == torch.int64
        assert sample.tolist() == expected[i].tolist()
    assert (expected == EOS_ID).sum() > 0
    short = TextDataset(TextDatasetConfig(local=str(local)), max_seq_len=20)  # the trainer's max_seq_len
    assert short[3]['input_ids'].tolist() == expected[3][:20].tolist()


def test_loader_batches_with_labels_and_streams_mixed_by_proportion(two_streams):
    proportions = {'prose': 0.7, 'code': 0.3}
    streams = {name: {'local': str(path), 'proportion': proportions[name]} for name, (path, _) in two_streams.items()}
    loader = build_text_dataloader(loader_yaml(streams, epoch_size=200), device_batch_size=4)
    prose = {tuple(s) for s in two_streams['prose'][1].tolist()}
    code = {tuple(s) for s in two_streams['code'][1].tolist()}
    counts = {'prose': 0, 'code': 0}
    for batch in loader:
        assert batch['input_ids'].shape == (4, 32) and batch['input_ids'].dtype == torch.int64
        assert torch.equal(batch['labels'], batch['input_ids'])  # packed samples: nothing to mask
        for sample in map(tuple, batch['input_ids'].tolist()):
            counts['prose' if sample in prose else 'code' if sample in code else 'neither'] += 1
    assert sum(counts.values()) == 200 and set(counts) == {'prose', 'code'}
    assert abs(counts['prose'] / 200 - 0.7) < 0.05


def test_same_seed_same_order_other_seed_other_order(two_streams):
    streams = {name: {'local': str(path)} for name, (path, _) in two_streams.items()}
    first = batches(build_text_dataloader(loader_yaml(streams), 4))
    again = batches(build_text_dataloader(loader_yaml(streams), 4))
    other = batches(build_text_dataloader(loader_yaml(streams, shuffle_seed=18), 4))
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and len(first) == len(again)
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    unshuffled = batches(build_text_dataloader(loader_yaml(streams, shuffle=False), 4))
    assert not all(torch.equal(a, b) for a, b in zip(first, unshuffled))


def test_state_dict_resumes_with_the_following_samples(two_streams, tmp_path):
    streams = {name: {'local': str(path)} for name, (path, _) in two_streams.items()}
    uninterrupted = batches(build_text_dataloader(loader_yaml(streams), 4))
    interrupted = build_text_dataloader(loader_yaml(streams), 4)
    seen = batches(interrupted, count=3)
    state = interrupted.dataset.state_dict(num_samples=3 * 4, from_beginning=False)
    # A new process after a restart: its own dataset over copies of the data.
    copies = {name: {'local': str(shutil.copytree(path, tmp_path / f'copy-{name}'))} for name, (path, _) in
              two_streams.items()}
    resumed_loader = build_text_dataloader(loader_yaml(copies), 4)
    resumed_loader.dataset.load_state_dict(state)
    resumed = batches(resumed_loader)
    assert len(seen) + len(resumed) == len(uninterrupted)
    for expected, got in zip(uninterrupted, seen + resumed):
        assert torch.equal(expected, got)


def test_reads_llm_foundry_converter_output(tmp_path, monkeypatch, packed_tokens):
    from llmfoundry.command_utils.data_prep import convert_dataset_json as foundry

    from dbrx_train.tokenizer import build_hf_tokenizer

    # llm-foundry loads its tokenizer by name; hand it ours instead of a hub download.
    monkeypatch.setattr(foundry.AutoTokenizer, 'from_pretrained', lambda name: build_hf_tokenizer())
    source = tmp_path / 'docs.jsonl'
    source.write_text(''.join(json.dumps({'text': text}) + '\n' for text in PROSE[:10]))
    foundry.convert_dataset_json(path=str(source), out_root=str(tmp_path / 'foundry'), compression='zstd',
                                 concat_tokens=32, split='train', tokenizer='dbrx', eos_text='<|endoftext|>')
    dataset = TextDataset(TextDatasetConfig(local=str(tmp_path / 'foundry'), max_seq_len=32))
    expected = packed_tokens(PROSE[:10], 32)
    assert np.array_equal(np.stack([dataset[i]['input_ids'].numpy() for i in range(len(dataset))]), expected)


def test_reads_legacy_bytes_token_column(tmp_path, packed_tokens):
    from streaming import MDSWriter

    expected = packed_tokens(PROSE[:5], 16)
    with MDSWriter(out=str(tmp_path / 'legacy'), columns={'tokens': 'bytes'}) as writer:
        for sample in expected:
            writer.write({'tokens': sample.astype(np.int64).tobytes()})
    dataset = TextDataset(TextDatasetConfig(local=str(tmp_path / 'legacy'), max_seq_len=16))
    assert [dataset[i]['input_ids'].tolist() for i in range(len(dataset))] == expected.tolist()


def test_untokenized_text_shards_are_refused(tmp_path):
    from streaming import MDSWriter

    with MDSWriter(out=str(tmp_path / 'raw'), columns={'text': 'str'}) as writer:
        writer.write({'text': 'not tokenized'})
    streams = {'raw': {'local': str(tmp_path / 'raw')}}
    with pytest.raises(ConfigError, match=r"^train_loader.dataset.streams.raw: shards have no 'tokens' column"):
        build_text_dataloader(loader_yaml(streams), 1)


def test_collate_pads_and_never_learns_padding():
    samples = [{'input_ids': torch.tensor([5, 6, 7, EOS_ID])}, {'input_ids': torch.tensor([8, PAD_ID])}]
    batch = collate_text(samples)
    assert batch['input_ids'].tolist() == [[5, 6, 7, EOS_ID], [8, PAD_ID, PAD_ID, PAD_ID]]
    assert batch['labels'].tolist() == [[5, 6, 7, EOS_ID], [8, -100, -100, -100]]


def test_missing_local_directory_fails_naming_stream_and_path(two_streams, tmp_path):
    missing = tmp_path / 'no-such-dir'
    streams = {'text': {'local': str(two_streams['prose'][0])}, 'code': {'local': str(missing)}}
    with pytest.raises(ConfigError) as error:
        build_text_dataloader(loader_yaml(streams), 4)
    assert str(error.value) == f'train_loader.dataset.streams.code.local: data directory not found: {missing}'
    missing.mkdir()
    with pytest.raises(ConfigError, match='^eval_loader.dataset.streams.code.local: .*no-such-dir is not an MDS'):
        build_text_dataloader(loader_yaml(streams), 4, section='eval_loader')
    with pytest.raises(ConfigError, match='^eval_loader.dataset.local: data directory not found'):
        build_text_dataloader({'dataset': {'local': str(tmp_path / 'gone')}}, 4, 32, section='eval_loader')


def test_bad_yaml_keys_are_named(tmp_path):
    config = tmp_path / 'train.yaml'
    config.write_text(
        'train_loader:\n  name: text\n  dataset:\n    streams:\n'
        '      text: {local: data/embedded/text, proportion: 0.7}\n    shufle: true\n    max_seq_len: 256\n'
    )
    loader = load_yaml(config)['train_loader']
    with pytest.raises(ConfigError, match=r"^train_loader.dataset.shufle: unknown key \(did you mean 'shuffle'\?\)$"):
        build_text_dataloader(loader, 4)
    loader['dataset'].pop('shufle')
    loader['dataset']['streams']['text']['proportion'] = -1
    with pytest.raises(ConfigError, match=r'^train_loader.dataset.streams.text.proportion: must be positive'):
        parse(LoaderConfig, loader, 'train_loader')
    loader['dataset']['local'] = 'data/x'
    loader['dataset']['streams']['text']['proportion'] = 0.7
    with pytest.raises(ConfigError, match='^train_loader.dataset.local: give either streams or a single local'):
        parse(LoaderConfig, loader, 'train_loader')
    with pytest.raises(ConfigError, match='^train_loader.dataset.max_seq_len: 512 exceeds'):
        build_text_dataloader({'dataset': {'local': 'x', 'max_seq_len': 512}}, 4, 256)
