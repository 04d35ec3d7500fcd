"""`python -m dbrx_train.serve`: flags, YAML, errors, and a real server process on a saved checkpoint."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import openai
import pytest
import requests

from dbrx_train.checkpoints import save_checkpoint
from dbrx_train.serve.__main__ import main, parse_args
from dbrx_train.serve.config import API_KEY_ENV, ServeConfig
from dbrx_train.tokenizer import STOP_TOKEN_IDS


def test_flags_override_the_yaml_and_its_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    yaml = tmp_path / 'serve.yaml'
    yaml.write_text('checkpoint: /models/a\nport: 9000\nmax_batch_size: 8\n')
    config = parse_args(['--config', str(yaml), '--port', '9001', 'max_batch_size=2', 'api_key=k'])
    assert config == ServeConfig(checkpoint='/models/a', port=9001, max_batch_size=2, api_key='k')
    assert parse_args(['--checkpoint', '/models/b']).host == '127.0.0.1'  # loopback unless told otherwise


def test_api_key_from_the_environment(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, 'from-env')
    assert parse_args(['--checkpoint', 'x']).api_key == 'from-env'
    assert parse_args(['--checkpoint', 'x', '--api-key', 'flag']).api_key == 'flag'


@pytest.mark.parametrize('argv,yaml,message', [
    ([], None, 'checkpoint: required'),
    (['--checkpoint', 'x', 'port=1'], None, 'overrides need --config'),
    (['--config', '{yaml}'], 'checkpoint: x\nmax_batch_sise: 4\n',
     "max_batch_sise: unknown key (did you mean 'max_batch_size'?)"),
    (['--config', '{yaml}'], 'checkpoint: x\nport: 70000\n', 'port: must be in 0..65535'),
    (['--checkpoint', '{tmp}/missing'], None, 'does not exist'),
])
def test_bad_configuration_is_one_line_and_exit_2(tmp_path, capsys, argv, yaml, message):
    if yaml is not None:
        (tmp_path / 'serve.yaml').write_text(yaml)
    argv = [a.format(yaml=tmp_path / 'serve.yaml', tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and message in err and '\n' not in err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def test_serves_a_saved_checkpoint(tmp_path, tiny_model, codec, greedy):
    checkpoint = save_checkpoint(tiny_model, tmp_path / 'tiny-ckpt')
    port = free_port()
    env = {**os.environ, API_KEY_ENV: 'secret'}
    process = subprocess.Popen([sys.executable, '-m', 'dbrx_train.serve', '--checkpoint', str(checkpoint),
                                '--port', str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f'http://127.0.0.1:{port}'
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read().decode()
            try:
                if requests.get(url + '/health', timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, 'the server did not come up'
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + '/v1', api_key='secret', max_retries=0)
        assert [m.id for m in client.models.list().data] == ['tiny-ckpt']
        reply = client.completions.create(model='tiny-ckpt', prompt='From disk', max_tokens=4, temperature=0)
        tokens = greedy(codec.encode('From disk'), 4, STOP_TOKEN_IDS)
        assert reply.choices[0].text == codec.decode(t for t in tokens if t not in STOP_TOKEN_IDS)
    finally:
        process.terminate()
        process.wait(timeout=30)
