import json
import runpy
from pathlib import Path

import numpy as np
import pytest

from dbrx_train.data import text_to_mds
from dbrx_train.data.embedded_corpus import make_embedded_corpus, stdlib_code, stdlib_docstrings, stdlib_files
from dbrx_train.data.text_to_mds import PREP_INFO_FILE, convert_to_mds, iter_documents, read_prep_info
from dbrx_train.errors import UserError

REPO = Path(__file__).resolve().parents[2]
WORDS = 'the mixture of experts routes every token to four of sixteen small feed forward networks'.split()
DOCS = [f'Document {i}: ' + ' '.join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(5 + 3 * i)) for i in range(24)]


def write_jsonl(path, records):
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))
    return path


def read_with_llm_foundry(out, seq_len):
    from llmfoundry.data.text_data import StreamingTextDataset

    dataset = StreamingTextDataset(tokenizer=None, max_seq_len=seq_len, local=str(out), shuffle=False, batch_size=1)
    return np.stack([dataset[i].numpy() for i in range(len(dataset))])


def siblings(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def test_jsonl_is_packed_with_eos_and_read_by_llm_foundry(tmp_path, packed_tokens, streaming_shm):
    source = write_jsonl(tmp_path / 'docs.jsonl', [{'id': i, 'body': d} for i, d in enumerate(DOCS)])
    out = tmp_path / 'mds'
    stats = convert_to_mds(iter_documents([source], text_field='body'), out, seq_len=32)
    expected = packed_tokens(DOCS, 32)
    assert stats.documents == len(DOCS) and stats.samples == len(expected) > 3
    assert stats.dropped_tokens == packed_tokens(DOCS, 1).size - expected.size
    index = json.loads((out / 'index.json').read_text())
    assert {s['column_encodings'][0] for s in index['shards']} == {'ndarray:int32'}
    assert {s['compression'] for s in index['shards']} == {'zstd'}
    assert np.array_equal(read_with_llm_foundry(out, 32), expected)
    assert json.loads((out / PREP_INFO_FILE).read_text())['samples'] == len(expected)
    assert siblings(out) == ['docs.jsonl']  # the temporary directory was renamed into place


def test_every_input_kind_in_order(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = tmp_path / 'texts'
    texts.mkdir()
    (texts / 'b.txt').write_text(DOCS[1])
    (texts / 'a.txt').write_text(DOCS[0])
    (texts / '.hidden').write_text('not a document')
    write_jsonl(texts / 'c.jsonl', [{'text': DOCS[2]}, {'text': DOCS[3]}])
    pq.write_table(pa.table({'text': DOCS[4:6], 'other': [1, 2]}), tmp_path / 'd.parquet')
    datasets.Dataset.from_dict({'text': DOCS[6:8]}).save_to_disk(str(tmp_path / 'hf'))
    datasets.DatasetDict({'valid': datasets.Dataset.from_dict({'text': DOCS[8:9]})}).save_to_disk(str(tmp_path / 'hfd'))
    inputs = [texts, tmp_path / 'd.parquet', tmp_path / 'hf', tmp_path / 'hfd']
    assert list(iter_documents(inputs, split='valid')) == DOCS[:9]
    with pytest.raises(UserError, match="no split 'train'.*valid"):
        list(iter_documents([tmp_path / 'hfd']))
    with pytest.raises(UserError, match=r"d.parquet: no 'body' column \(columns: text, other\)"):
        list(iter_documents([tmp_path / 'd.parquet'], text_field='body'))


@pytest.mark.parametrize(
    'lines, problem',
    [
        (['{"text": "fine"}', '{"text": "also fine"', '{"text": "x"}'], r'bad.jsonl:2: not valid JSON'),
        (['{"text": "fine"}', '', '{"body": "no text"}'], r"bad.jsonl:3: no 'text' field"),
        (['{"text": 42}'], r"bad.jsonl:1: 'text' is int, not a string"),
    ],
)
def test_bad_jsonl_names_file_and_line_and_leaves_no_output(tmp_path, lines, problem):
    source = tmp_path / 'bad.jsonl'
    source.write_text('\n'.join(lines) + '\n')
    out = tmp_path / 'mds'
    with pytest.raises(UserError, match=problem):
        convert_to_mds(iter_documents([source]), out, seq_len=4)
    assert siblings(out) == ['bad.jsonl'] and not out.exists()


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(UserError, match='input not found: .*nope.jsonl'):
        list(iter_documents([tmp_path / 'nope.jsonl']))
    (tmp_path / 'empty.jsonl').write_text('\n')
    with pytest.raises(UserError, match='no tokens at all'):
        convert_to_mds(iter_documents([tmp_path / 'empty.jsonl']), tmp_path / 'out', seq_len=8)
    with pytest.raises(UserError, match='only 4 tokens: fewer than one sample of seq_len 8'):
        convert_to_mds(['one two three'], tmp_path / 'out', seq_len=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['empty.jsonl']


def test_refuses_to_overwrite_unless_asked_and_replaces_atomically(tmp_path, packed_tokens, streaming_shm):
    out = tmp_path / 'mds'
    out.mkdir()
    (out / 'precious.txt').write_text('keep me')
    with pytest.raises(UserError, match='is not empty.*--overwrite'):
        convert_to_mds(DOCS, out, seq_len=32)
    assert (out / 'precious.txt').read_text() == 'keep me'
    # A failure while replacing leaves the old output as it was.
    with pytest.raises(UserError, match='no tokens'):
        convert_to_mds([''], out, seq_len=32, overwrite=True)
    assert [p.name for p in out.iterdir()] == ['precious.txt']
    convert_to_mds(DOCS, out, seq_len=32, overwrite=True)
    assert not (out / 'precious.txt').exists()
    assert np.array_equal(read_with_llm_foundry(out, 32), packed_tokens(DOCS, 32))
    assert siblings(out) == []


def test_worker_processes_give_identical_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(text_to_mds, '_BATCH_CHARS', 200)  # many small tasks, finishing out of order
    docs = DOCS * 4
    convert_to_mds(docs, tmp_path / 'one', seq_len=32, workers=1)
    convert_to_mds(docs, tmp_path / 'two', seq_len=32, workers=2)
    files = sorted(p.name for p in (tmp_path / 'one').iterdir())
    assert files == sorted(p.name for p in (tmp_path / 'two').iterdir())
    for name in files:
        assert (tmp_path / 'one' / name).read_bytes() == (tmp_path / 'two' / name).read_bytes(), name


def test_max_tokens_caps_the_output(tmp_path, packed_tokens, streaming_shm):
    stats = convert_to_mds(DOCS, tmp_path / 'mds', seq_len=32, max_tokens=100)
    assert stats.samples == 3 and stats.tokens == 96
    assert np.array_equal(read_with_llm_foundry(tmp_path / 'mds', 32), packed_tokens(DOCS, 32)[:3])


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    main = runpy.run_path(str(REPO / 'data_prep' / 'convert_text_to_mds.py'))['main']
    source = write_jsonl(tmp_path / 'docs.jsonl', [{'text': d} for d in DOCS])
    main([str(source), '--out', str(tmp_path / 'mds'), '--seq-len', '32', '--workers', '1'])
    assert 'samples of 32 tokens' in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main([str(source), '--out', str(tmp_path / 'mds'), '--seq-len', '32'])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('error: output') and '--overwrite' in err and err.count('\n') == 1


def test_docstrings_are_read_without_importing(tmp_path):
    module = tmp_path / 'boom.py'
    module.write_text(
        '"""Module prose."""\nraise SystemExit("imported!")\n\n'
        'class Engine:\n    """Class prose."""\n\n    def run(self):\n        """Method prose."""\n\n'
        'def helper():\n    return 1\n'
    )
    (tmp_path / 'broken.py').write_text('def (:\n')
    docs = list(stdlib_docstrings([tmp_path / 'broken.py', module]))
    assert docs == ['boom\n\nModule prose.\n\n\nboom.Engine\n\nClass prose.\n\n\nboom.Engine.run\n\nMethod prose.\n']
    assert list(stdlib_code([module])) == [module.read_text()]


def test_embedded_corpus_streams_are_built_once(tmp_path, packed_tokens, streaming_shm):
    files = stdlib_files()
    assert len(files) > 100 and files == sorted(files) and not any('site-packages' in str(f) for f in files)
    paths = make_embedded_corpus(tmp_path / 'embedded', seq_len=32, max_tokens=640)
    assert set(paths) == {'text', 'code'}
    first_docstrings = [next(stdlib_docstrings())]
    text = read_with_llm_foundry(paths['text'], 32)
    assert len(text) == 20 and np.array_equal(text[:2], packed_tokens(first_docstrings, 32)[:2])
    code = read_with_llm_foundry(paths['code'], 32)
    assert len(code) == 20 and np.array_equal(code[:2], packed_tokens([next(stdlib_code())], 32)[:2])
    # Up to date: a rerun leaves the shards alone; other settings rebuild the stream.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / 'embedded').rglob('*')}
    make_embedded_corpus(tmp_path / 'embedded', seq_len=32, max_tokens=640)
    assert stamps == {p: p.stat().st_mtime_ns for p in (tmp_path / 'embedded').rglob('*')}
    make_embedded_corpus(tmp_path / 'embedded', seq_len=64, max_tokens=640)
    assert read_prep_info(paths['text'])['seq_len'] == 64 and read_prep_info(paths['code'])['samples'] == 10
