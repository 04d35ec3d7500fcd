"""Streams read from the real S3 server of the `s3` fixture give exactly the samples read locally."""

from __future__ import annotations

import pytest

from dbrx_train.data import TextDataset, TextDatasetConfig, check_local_data
from dbrx_train.errors import UserError
from dbrx_train.typed_config import parse

from tests.conftest import CORPUS_SEQ_LEN

pytestmark = pytest.mark.usefixtures('streaming_shm')


def test_a_stream_from_the_bucket_equals_the_same_mds_read_locally(s3_corpus, tiny_corpus, tmp_path):
    local = TextDataset(TextDatasetConfig(local=str(tiny_corpus / 'code'), max_seq_len=CORPUS_SEQ_LEN))
    remote = TextDataset(TextDatasetConfig(remote=f'{s3_corpus}/code', local=str(tmp_path / 'cache'),
                                           max_seq_len=CORPUS_SEQ_LEN))
    assert len(remote) == len(local) > 0
    for i in range(len(local)):
        assert remote[i]['input_ids'].tolist() == local[i]['input_ids'].tolist()


def test_a_stream_missing_from_the_bucket_is_one_line_before_anything_is_built(s3_corpus, tmp_path):
    config = parse(TextDatasetConfig, {'streams': {'text': {'remote': f'{s3_corpus}/nothing-here',
                                                            'local': str(tmp_path)}}})
    with pytest.raises(UserError) as error:
        check_local_data(config)
    assert str(error.value) == (f'train_loader.dataset.streams.text.remote: {s3_corpus}/nothing-here: '
                                'no index.json there')
