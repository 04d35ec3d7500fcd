"""`--engine spark`: one local[2] Spark session for the module, small inputs split into several partitions."""

import json
import runpy
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dbrx_train.data import spark as spark_engine
from dbrx_train.data.finetuning import FinetuningDataset, FinetuningDatasetConfig
from dbrx_train.data.finetuning_to_mds import convert_finetuning_to_mds
from dbrx_train.data.spark import convert_text_with_spark, spark_session
from dbrx_train.data.spark_finetuning import convert_finetuning_with_spark
from dbrx_train.data.text_dataset import TextDataset, TextDatasetConfig
from dbrx_train.data.text_to_mds import PREP_INFO_FILE, convert_to_mds, iter_documents
from dbrx_train.errors import UserError
from dbrx_train.tokenizer import EOS_ID
from tests.data.test_finetuning import CHATS
from tests.data.test_text_to_mds import DOCS, read_with_llm_foundry, siblings, write_jsonl

pytestmark = pytest.mark.usefixtures('streaming_shm')

REPO = Path(__file__).resolve().parents[2]
SEQ_LEN = 32
BLOCK_BYTES = 8192  # Spark's split size here: a few KB of JSONL is several partitions


@pytest.fixture(scope='module')
def spark():
    conf = {'spark.ui.enabled': 'false', 'spark.sql.files.maxPartitionBytes': str(BLOCK_BYTES),
            'spark.sql.files.openCostInBytes': '0', 'spark.default.parallelism': '2'}
    with spark_session('local[2]', conf) as session:
        session.sparkContext.setLogLevel('ERROR')
        yield session


def complete_documents(tokens: np.ndarray) -> tuple[list[tuple[int, ...]], list[int]]:
    """The documents ended by `<|endoftext|>` in a token stream (without it), and the unended rest."""
    ends = np.flatnonzero(tokens == EOS_ID)
    starts = np.concatenate([[0], ends[:-1] + 1]) if len(ends) else np.empty(0, dtype=int)
    rest = tokens[ends[-1] + 1:] if len(ends) else tokens
    return [tuple(tokens[s:e].tolist()) for s, e in zip(starts, ends)], rest.tolist()


def partition_streams(out: Path, samples: np.ndarray) -> list[np.ndarray]:
    """The samples of each partition's shard group (in index order), each concatenated into one stream."""
    index = json.loads((out / 'index.json').read_text())
    groups: dict[str, list[int]] = {}
    for shard in index['shards']:
        groups.setdefault(shard['raw_data']['basename'].split('/')[0], []).append(shard['samples'])
    streams, start = [], 0
    for counts in groups.values():
        stop = start + sum(counts)
        streams.append(samples[start:stop].reshape(-1))
        start = stop
    assert start == len(samples)
    return streams


GOOD_DOCS = [f'{d} (copy {i})' for i in range(6) for d in DOCS]  # 144 distinct documents, ~14 KB
BAD_JSONL = {3: ('{"text": "unterminated', 'not valid JSON'), 120: ('{"body": "no text"}', "no 'text' field")}


def write_inputs(root: Path, bad: bool) -> list[Path]:
    """Every input kind holding GOOD_DOCS; with `bad`, also bad JSONL records (the second in a later
    Spark block) and a file that is not UTF-8."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = root / 'in'
    folder.mkdir(parents=True)
    lines = [json.dumps({'text': d}) for d in GOOD_DOCS[:140]]
    for line_number, (line, _) in sorted(BAD_JSONL.items()) if bad else ():
        lines.insert(line_number - 1, line)
    (folder / 'a.jsonl').write_text('\n'.join(lines) + '\n')
    assert not bad or (folder / 'a.jsonl').stat().st_size > 2 * BLOCK_BYTES
    (folder / 'b.txt').write_text(GOOD_DOCS[140])
    (folder / 'c.md').write_text(GOOD_DOCS[141])
    if bad:
        (folder / 'latin1.txt').write_bytes('caf\xe9'.encode('latin-1'))
    pq.write_table(pa.table({'text': GOOD_DOCS[142:]}), root / 'd.parquet')
    return [folder, root / 'd.parquet']


@pytest.fixture(scope='module')
def mixed(spark, tmp_path_factory):
    """One Spark job over every input kind with bad records skipped, and every document as the
    one-process converter tokenizes it (seq_len 1 drops nothing) from the same input without them."""
    root = tmp_path_factory.mktemp('mixed')
    convert_to_mds(iter_documents(write_inputs(root / 'clean', bad=False)), root / 'one', seq_len=1, compression=None)
    every, rest = complete_documents(read_with_llm_foundry(root / 'one', 1).reshape(-1))
    assert len(every) == len(GOOD_DOCS) and rest == []
    inputs = write_inputs(root / 'dirty', bad=True)
    out = root / 'dirty' / 'spark'
    stats, run = convert_text_with_spark(spark, inputs, out, seq_len=SEQ_LEN, on_bad_line='skip')
    return inputs, out, stats, run, every


def test_same_documents_tokenized_identically_as_the_one_process_converter(mixed):
    _, out, stats, run, every = mixed
    assert run.partitions >= 3 and stats.documents == len(GOOD_DOCS)
    samples = read_with_llm_foundry(out, SEQ_LEN)  # llm-foundry's StreamingTextDataset reads the merged index
    assert len(samples) == stats.samples
    found, cut = [], []
    for stream in partition_streams(out, samples):
        documents, rest = complete_documents(stream)
        found += documents
        cut.append(rest)
    # None invented, each exactly as the one-process converter tokenized it; what is missing was in
    # the partitions' tails: the tokens dropped plus the cut-off starts of the partitions' last documents.
    missing = Counter(every) - Counter(found)
    assert not Counter(found) - Counter(every)
    assert sum(len(d) + 1 for d in missing.elements()) == stats.dropped_tokens + sum(map(len, cut))
    assert 0 < stats.dropped_tokens < run.partitions * SEQ_LEN
    assert all(any(d[:len(c)] == tuple(c) for d in missing) for c in cut if c)


def test_output_is_read_by_our_loader_and_lands_in_place(mixed):
    _, out, stats, run, _ = mixed
    ours = TextDataset(TextDatasetConfig(local=str(out), max_seq_len=SEQ_LEN))
    assert len(ours) == stats.samples
    assert ours[len(ours) - 1]['input_ids'].tolist() == read_with_llm_foundry(out, SEQ_LEN)[-1].tolist()
    info = json.loads((out / PREP_INFO_FILE).read_text())
    assert (info['engine'], info['samples'], info['partitions']) == ('spark', stats.samples, run.partitions)
    assert siblings(out) == ['d.parquet', 'in']  # the staging directory was renamed into place


def test_bad_records_are_skipped_and_counted_with_file_and_line(mixed):
    inputs, out, stats, run, _ = mixed
    source = inputs[0] / 'a.jsonl'
    expected = sorted([f'{source}:{n}: {problem}' for n, (_, problem) in BAD_JSONL.items()]
                      + [f'{inputs[0] / "latin1.txt"}: not UTF-8 text (byte 3'])
    listed = json.loads((out / PREP_INFO_FILE).read_text())['bad_line_list']
    assert run.bad_lines == len(listed) == 3
    got = sorted(f'{e["where"]}: {e["problem"]}' for e in listed)
    assert [line[:len(x)] for line, x in zip(got, expected)] == expected


def test_finetuning_examples_match_the_one_process_converter(spark, tmp_path):
    records = [dict(c, prompt=f'{c["prompt"]} ({i})') if 'prompt' in c else c for i in range(30) for c in CHATS]
    records = [r for r in records if 'prompt' in r] + CHATS  # distinct records: 60 pairs and the 2 chats
    records += [{'prompt': 'x'}]  # a bad one, skipped
    source = write_jsonl(tmp_path / 'chats.jsonl', records)
    convert_finetuning_to_mds([source], tmp_path / 'one', on_bad_line='skip')
    stats, run = convert_finetuning_with_spark(spark, [source], tmp_path / 'spark', eval_fraction=0.2,
                                               on_bad_line='skip')
    assert run.partitions >= 2 and stats.bad_lines == 1
    assert stats.examples['train'] + stats.examples['eval'] == len(records) - 1 and stats.examples['eval'] > 0
    one = examples(tmp_path / 'one', 'train')
    assert examples(tmp_path / 'spark', 'train') + examples(tmp_path / 'spark', 'eval') == one
    assert stats.longest == max(map(len, one))


def examples(local: Path, split: str) -> Counter:
    dataset = FinetuningDataset(FinetuningDatasetConfig(local=str(local), split=split), max_seq_len=1024)
    return Counter(tuple(dataset[i]['input_ids'].tolist()) for i in range(len(dataset)))


# Last of the Spark jobs: a task that fails takes its Python worker with it, and a new worker
# imports Streaming (and torch) again.
def test_a_bad_record_stops_the_job_naming_file_and_line_and_leaves_nothing(spark, tmp_path):
    lines = [json.dumps({'text': f'{DOCS[i % len(DOCS)]} number {i}'}) for i in range(200)]
    lines[150] = json.dumps({'text': 42})
    source = tmp_path / 'bad.jsonl'
    source.write_text('\n'.join(lines) + '\n')
    assert source.stat().st_size > 2 * BLOCK_BYTES
    with pytest.raises(UserError, match=rf"^{source}:151: 'text' is int, not a string .*--on-bad-line skip"):
        convert_text_with_spark(spark, [source], tmp_path / 'out', seq_len=SEQ_LEN)
    assert siblings(tmp_path / 'out') == ['bad.jsonl'] and not (tmp_path / 'out').exists()


def test_command_line_without_pyspark_is_one_line(tmp_path, capsys, monkeypatch):
    main = runpy.run_path(str(REPO / 'data_prep' / 'convert_text_to_mds.py'))['main']
    monkeypatch.setitem(sys.modules, 'pyspark', None)  # what `import pyspark` meets without the extra
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), '--out', str(tmp_path / 'out'), '--seq-len', '8', '--engine', 'spark'])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: --engine spark needs PySpark: {spark_engine.INSTALL_HINT}\n"
