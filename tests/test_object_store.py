"""Object-store folders against the real S3 server of the `s3` fixture: what cannot be reached is one
line naming the URI."""

from __future__ import annotations

import json
import runpy
import socket
from pathlib import Path

import pytest

from dbrx_train.checkpoints import load_pretrained, save_checkpoint
from dbrx_train.convert import main as convert
from dbrx_train.data import TextDataset, TextDatasetConfig
from dbrx_train.errors import UserError
from dbrx_train.export import main as export
from dbrx_train.object_store import RemoteFolder

from tests.checkpoints.test_native import assert_same_weights, make_model


def _one_line_naming(error: pytest.ExceptionInfo, uri: str) -> str:
    message = str(error.value)
    assert '\n' not in message and uri in message, message
    return message


def test_a_wrong_key_a_missing_bucket_and_an_unreachable_endpoint_are_one_line(s3, monkeypatch, tmp_path):
    folder = RemoteFolder(f's3://{s3.bucket}/data')
    folder.check_access('save_folder')  # the fixture's credentials work

    monkeypatch.setenv('AWS_SECRET_ACCESS_KEY', 'wrong')
    uri = f's3://{s3.bucket}/data'
    with pytest.raises(UserError) as error:
        RemoteFolder(uri).check_access('save_folder')
    assert 'SignatureDoesNotMatch' in _one_line_naming(error, uri) or 'AccessDenied' in str(error.value)
    monkeypatch.undo()

    uri = 's3://no-such-bucket/data'
    with pytest.raises(UserError) as error:
        RemoteFolder(uri).check_access('save_folder')
    assert 'NoSuchBucket' in _one_line_naming(error, uri)

    with socket.socket() as s:  # a port nothing listens on
        s.bind(('127.0.0.1', 0))
        closed = s.getsockname()[1]
    monkeypatch.setenv('S3_ENDPOINT_URL', f'http://127.0.0.1:{closed}')
    uri = f's3://{s3.bucket}/data'
    with pytest.raises(UserError) as error:
        RemoteFolder(uri).check_file('index.json', 'train_loader.dataset.streams.text.remote:')
    assert 'Could not connect' in _one_line_naming(error, uri)


def test_upload_list_download_delete(s3, tmp_path):
    folder = RemoteFolder(f's3://{s3.bucket}/roundtrip')
    (tmp_path / 'a.bin').write_bytes(b'\x00\x01' * 1000)
    folder.upload(tmp_path / 'a.bin', 'sub/a.bin')
    assert folder.names() == ['sub/a.bin']
    folder.check_file('sub/a.bin', 'x')
    with pytest.raises(UserError, match='no sub/b.bin there'):
        folder.check_file('sub/b.bin', 'x')
    folder.download('sub/a.bin', tmp_path / 'b.bin')
    assert (tmp_path / 'b.bin').read_bytes() == (tmp_path / 'a.bin').read_bytes()
    folder.delete('sub/a.bin')
    assert folder.names() == []


def test_checkpoints_convert_and_export_read_and_write_uris(s3, tmp_path):
    """A dbrx_train checkpoint uploaded to the bucket converts to a transformers directory in the
    bucket, and exports from it to another URI; each loads back with the same weights."""
    model = make_model()
    save_checkpoint(model, tmp_path / 'ours')
    source = RemoteFolder(f's3://{s3.bucket}/models/ours')
    for file in (tmp_path / 'ours').iterdir():
        source.upload(file, file.name)

    convert(['to-hf', source.uri, f's3://{s3.bucket}/models/hf'])
    assert 'config.json' in RemoteFolder(f's3://{s3.bucket}/models/hf').names()
    assert_same_weights(load_pretrained(f's3://{s3.bucket}/models/hf'), model)
    with pytest.raises(SystemExit):  # the target holds objects: refused without --overwrite
        convert(['to-hf', source.uri, f's3://{s3.bucket}/models/hf'])

    export([f's3://{s3.bucket}/models/hf', f's3://{s3.bucket}/models/exported'])
    assert_same_weights(load_pretrained(f's3://{s3.bucket}/models/exported'), model)


def test_data_prep_writes_mds_to_a_uri_that_streams_read(s3, tmp_path, packed_tokens, streaming_shm):
    documents = [f'Document {i} talks about routers and experts. ' * (1 + i % 4) for i in range(30)]
    (tmp_path / 'docs.jsonl').write_text(''.join(json.dumps({'text': d}) + '\n' for d in documents))
    uri = f's3://{s3.bucket}/prepared/docs'
    convert_text_to_mds = runpy.run_path(str(Path(__file__).parents[1] / 'data_prep' / 'convert_text_to_mds.py'))['main']
    convert_text_to_mds([str(tmp_path / 'docs.jsonl'), '--out', uri, '--seq-len', '32'])
    dataset = TextDataset(TextDatasetConfig(remote=uri, local=str(tmp_path / 'cache'), max_seq_len=32))
    expected = packed_tokens(documents, 32)
    assert [dataset[i]['input_ids'].tolist() for i in range(len(dataset))] == expected.tolist()
