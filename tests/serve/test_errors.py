"""Errors in OpenAI's shape (dbrx_train/serve/errors.py): bad input gets a 4xx JSON error naming the
problem, an oversize body a 413, and the server goes on serving."""

from __future__ import annotations

import pytest
import requests

from tests.serve.conftest import KEY, client

BAD_REQUESTS = [
    ('/v1/completions', b'{"prompt": "x", ', 400, 'not valid JSON'),
    ('/v1/completions', b'["a", "list"]', 400, 'JSON object'),
    ('/v1/completions', b'{"prompt": "\xff\xfe"}', 400, 'parsing the body'),  # not UTF-8
    ('/v1/completions', {'prompt': 'x', 'temprature': 0.5}, 400, 'temprature: unknown field'),
    ('/v1/completions', {'prompt': 'word ' * 200}, 400, 'the context holds 128'),
    ('/v1/completions', {'prompt': 'x', 'max_tokens': 0}, 400, 'max_tokens must be at least 1'),
    ('/v1/completions', {'prompt': 'x', 'max_tokens': -5}, 400, 'max_tokens'),
    ('/v1/completions', {'prompt': 'x', 'max_tokens': 10**9}, 400, 'exceeds the context'),
    ('/v1/completions', {'prompt': 'x', 'max_tokens': '5'}, 400, 'max_tokens: Input should be a valid integer'),
    ('/v1/completions', {'prompt': 'x', 'seed': 2**64}, 400, 'seed'),
    ('/v1/completions', {'prompt': [[1, 2], [100352]]}, 400, 'outside the vocabulary'),
    ('/v1/completions', {'prompt': [1, 'a']}, 400, 'prompt: must be a string'),
    ('/v1/completions', {}, 400, 'prompt'),
    ('/v1/completions', {'prompt': 'x', 'model': 'gpt-4'}, 404, "serves 'tiny'"),
    ('/v1/completions', {'prompt': 'x', 'n': 1000}, 400, 'n is at most'),
    ('/v1/completions', {'prompt': 'x', 'logprobs': 1000}, 400, 'logprobs is at most'),
    ('/v1/completions', {'prompt': 'x', 'temperature': -1}, 400, 'temperature'),
    ('/v1/completions', {'prompt': 'x', 'top_k': 0}, 400, 'top_k'),
    ('/v1/completions', {'prompt': 'x', 'stop': ['']}, 400, 'stop strings must not be empty'),
    ('/v1/chat/completions', {'messages': []}, 400, 'messages'),
    ('/v1/chat/completions', {'messages': [{'role': 'tool', 'content': 'x'}]}, 400, 'role'),
    ('/v1/chat/completions', {'messages': [{'role': 'user', 'content': 'x'}], 'max_tokens': 0}, 400, 'max_tokens'),
    ('/v1/nowhere', {'prompt': 'x'}, 404, 'Not Found'),
]


@pytest.mark.parametrize('path,body,status,message', BAD_REQUESTS)
def test_bad_request_gets_a_json_error(server, path, body, status, message):
    if isinstance(body, bytes):
        response = requests.post(server.url + path, data=body, headers={'Content-Type': 'application/json'}, timeout=30)
    else:
        response = requests.post(server.url + path, json=body, timeout=30)
    assert response.status_code == status
    error = response.json()['error']
    assert message in error['message'] and '\n' not in error['message']


def test_server_serves_after_bad_requests(server):
    for path, body, _, _ in BAD_REQUESTS:
        requests.post(server.url + path, **({'data': body} if isinstance(body, bytes) else {'json': body}), timeout=30)
    assert client(server.url).completions.create(model='tiny', prompt='still here', max_tokens=2).choices


def test_request_body_over_the_limit_is_refused(strict):
    url, _ = strict
    response = requests.post(url + '/v1/completions', json={'prompt': 'x' * 5000},
                             headers={'Authorization': f'Bearer {KEY}'}, timeout=10)
    assert response.status_code == 413 and 'error' in response.json()
