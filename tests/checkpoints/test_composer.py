"""Reading Composer checkpoints runs no code from them: pickles are refused in one line unless trusted."""

import datetime
import os
import pickle

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from dbrx_train.checkpoints import load_pretrained
from dbrx_train.checkpoints.composer import MODEL_PREFIX, TRUST_ENV
from dbrx_train.checkpoints.native import write_config
from dbrx_train.errors import CheckpointError
from tests.checkpoints.test_native import CONFIG, make_model


class RunsCode:
    """Unpickling this runs a shell command, as a malicious checkpoint would."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


class Unknown:
    """A harmless object of a type no checkpoint of train.py holds."""


def full_checkpoint(folder, extra: dict):
    """A Composer full checkpoint as train.py writes one (numpy RNG states, a timedelta, torch's
    version in the metadata), plus `extra` entries in its state."""
    folder.mkdir()
    write_config(folder, CONFIG)
    model = make_model()
    state = {'model': {f'model.{k}': v for k, v in model.state_dict().items()},
             'metadata': {'torch_version': torch.__version__, 'elapsed': datetime.timedelta(seconds=3)}, **extra}
    rng = [{'numpy': np.random.get_state(), 'torch': torch.get_rng_state()}]
    torch.save({'state': state, 'rng': rng}, folder / 'ep0-ba2-rank0.pt')
    (folder / 'latest-rank0.pt').symlink_to('ep0-ba2-rank0.pt')
    return model


def test_a_checkpoint_of_train_py_loads_with_safe_unpickling(tmp_path):
    model = full_checkpoint(tmp_path / 'run', {})
    loaded = load_pretrained(tmp_path / 'run')
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)


def test_a_pickle_that_would_run_code_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)
    marker = tmp_path / 'pwned'
    full_checkpoint(tmp_path / 'run', {'callbacks': {'Evil': RunsCode(marker)}})
    with pytest.raises(CheckpointError) as info:
        load_pretrained(tmp_path / 'run')
    message = str(info.value)
    assert message.startswith(str(tmp_path / 'run' / 'ep0-ba2-rank0.pt') + ': refusing to unpickle posix.system')
    assert f'set {TRUST_ENV}=1' in message and '\n' not in message
    assert not marker.exists()  # the command never ran


def test_a_trusted_checkpoint_may_hold_other_objects(tmp_path, monkeypatch):
    model = full_checkpoint(tmp_path / 'run', {'callbacks': {'Mine': Unknown()}})
    monkeypatch.delenv(TRUST_ENV, raising=False)
    with pytest.raises(CheckpointError, match=r'refusing to unpickle tests\.checkpoints\.test_composer\.Unknown'):
        load_pretrained(tmp_path / 'run')
    monkeypatch.setenv(TRUST_ENV, '1')
    assert torch.equal(load_pretrained(tmp_path / 'run').wte.weight, model.wte.weight)


def test_sharded_metadata_that_would_run_code_is_refused(tmp_path):
    folder, marker = tmp_path / 'run', tmp_path / 'pwned'
    folder.mkdir()
    write_config(folder, CONFIG)
    dcp.save({MODEL_PREFIX + k: v for k, v in make_model().state_dict().items()}, checkpoint_id=folder / 'ep0-ba1',
             no_dist=True)
    load_pretrained(folder / 'ep0-ba1')  # DCP's own metadata reads
    (folder / 'ep0-ba1' / '.metadata').write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(CheckpointError, match=r'ep0-ba1/\.metadata: refusing to unpickle posix\.system \(loading a '
                                              r'checkpoint runs no code from it\)$'):
        load_pretrained(folder / 'ep0-ba1')
    assert not marker.exists()
