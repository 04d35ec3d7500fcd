"""The server against the official OpenAI API spec: every reply kind (bodies, stream chunks, errors)
validates against the spec's schemas (openai_openapi_2.3.0.yaml, an excerpt of openai/openai-openapi),
and requests the spec accepts are served."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import jsonschema
import openai
import pytest
import requests
import torch
import yaml

from dbrx_train.model.generation import adjust_logits
from dbrx_train.serve import ServeConfig, create_app
from dbrx_train.serve.background import serve_in_background
from dbrx_train.serve.text import chatml_prompt
from dbrx_train.tokenizer import EOS_ID, IM_END_ID, STOP_TOKEN_IDS
from tests.serve.conftest import KEY

SPEC = yaml.safe_load(Path(__file__).with_name('openai_openapi_2.3.0.yaml').read_text())


def as_json_schema(node):
    """OpenAPI 3.0 -> JSON Schema: `nullable: true` lets null through (into `type` and any `enum`)."""
    if isinstance(node, list):
        return [as_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: as_json_schema(value) for key, value in node.items() if key != 'nullable'}
    if node.get('nullable'):
        out['type'] = [node['type'], 'null']
        if 'enum' in out:
            out['enum'] = [*out['enum'], None]
    return out


COMPONENTS = as_json_schema(SPEC)['components']


def spec_errors(name: str, instance, null_at=()) -> list[str]:
    """Where `instance` breaks the spec's schema `name`. `null_at`: paths (`*` any index) where a null
    the spec does not mark nullable is expected, each for a reason its caller gives."""
    schema = {'$ref': f'#/components/schemas/{name}', 'components': COMPONENTS}
    errors = []
    for error in jsonschema.Draft202012Validator(schema).iter_errors(instance):
        path = tuple(error.absolute_path)
        if error.instance is None and any(len(p) == len(path) and all(a in ('*', b) for a, b in zip(p, path))
                                          for p in null_at):
            continue
        errors.append(f"{'/'.join(map(str, path))}: {error.message}")
    return errors


def test_the_schemas_catch_the_bugs_this_suite_guards():
    """The validation is real: replies as the server sent them before (integer error codes, chat
    messages without `refusal`) fail it."""
    assert spec_errors('ErrorResponse', {'error': {'message': 'm', 'type': 't', 'param': None, 'code': 400}})
    message = {'role': 'assistant', 'content': 'hi'}
    reply = {'id': 'x', 'object': 'chat.completion', 'created': 1, 'model': 'tiny',
             'choices': [{'index': 0, 'message': message, 'logprobs': None, 'finish_reason': 'stop'}]}
    assert spec_errors('CreateChatCompletionResponse', reply) == ["choices/0/message: 'refusal' is a required property"]


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + '/v1', api_key='unused', max_retries=0, timeout=60)


def post(url: str, path: str, body, **kwargs) -> requests.Response:
    return requests.post(url + path, json=body, timeout=60, **kwargs)


def events(response: requests.Response) -> list:
    """The JSON payloads of a server-sent event stream, which must end with `[DONE]`."""
    lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == b'data: [DONE]'
    return [json.loads(line.removeprefix(b'data: ')) for line in lines[:-1]]


# Replies.

CHAT = {'model': 'tiny', 'messages': [{'role': 'user', 'content': 'hi'}], 'max_tokens': 5, 'temperature': 0}
COMPLETION = {'model': 'tiny', 'prompt': ['one', 'two'], 'n': 2, 'max_tokens': 5, 'temperature': 0}


@pytest.mark.parametrize('extra', [{}, {'logprobs': 2}, {'logprobs': 1, 'echo': True}])
def test_completion_replies_validate(server, extra):
    reply = post(server.url, '/v1/completions', {**COMPLETION, **extra}).json()
    # OpenAI's echo scores the prompt's first token as null (nothing comes before it); the spec's
    # logprob lists do not say so.
    echo_gap = [('choices', '*', 'logprobs', key, 0) for key in ('token_logprobs', 'top_logprobs')]
    assert spec_errors('CreateCompletionResponse', reply, echo_gap if extra.get('echo') else ()) == []
    assert len(reply['choices']) == 4


def test_streamed_completion_chunks_validate(server):
    body = {**COMPLETION, 'logprobs': 1, 'stream': True, 'stream_options': {'include_usage': True}}
    chunks = events(post(server.url, '/v1/completions', body, stream=True))
    # The spec gives streamed chunks the shape of the whole reply, whose finish_reason is not nullable,
    # yet a choice has no reason until its last chunk: null before it, as OpenAI's API sends.
    for chunk in chunks:
        assert spec_errors('CreateCompletionResponse', chunk, [('choices', '*', 'finish_reason')]) == []
    assert chunks[-1]['choices'] == [] and chunks[-1]['usage']['completion_tokens'] > 0
    finished = [c['index'] for chunk in chunks for c in chunk['choices'] if c['finish_reason'] is not None]
    assert sorted(finished) == [0, 1, 2, 3]


@pytest.mark.parametrize('extra', [{}, {'logprobs': True, 'top_logprobs': 2}, {'n': 2, 'logprobs': True}])
def test_chat_replies_validate(server, extra):
    reply = post(server.url, '/v1/chat/completions', {**CHAT, **extra}).json()
    assert spec_errors('CreateChatCompletionResponse', reply) == []
    for choice in reply['choices']:
        assert choice['message']['refusal'] is None
        if extra.get('logprobs'):
            assert choice['logprobs']['refusal'] is None and len(choice['logprobs']['content']) > 0


def test_streamed_chat_chunks_validate(server):
    body = {**CHAT, 'n': 2, 'logprobs': True, 'top_logprobs': 1, 'stream': True,
            'stream_options': {'include_usage': True}}
    chunks = events(post(server.url, '/v1/chat/completions', body, stream=True))
    for chunk in chunks:
        assert spec_errors('CreateChatCompletionStreamResponse', chunk) == []
    with_choices = [c['choices'][0] for c in chunks if c['choices']]
    assert all(choice['logprobs']['refusal'] is None for choice in with_choices)
    assert chunks[-1]['choices'] == [] and 'usage' in chunks[-1]


def test_models_list_and_model_validate(server):
    reply = requests.get(server.url + '/v1/models', timeout=10).json()
    assert spec_errors('ListModelsResponse', reply) == [] and reply['data'][0]['id'] == 'tiny'
    model = requests.get(server.url + '/v1/models/tiny', timeout=10).json()
    assert spec_errors('Model', model) == [] and model == reply['data'][0]


# Errors: every kind is the spec's ErrorResponse, with OpenAI's code where one fits.

ERRORS = [
    ('POST', '/v1/completions', b'{"prompt": ', 400, None),
    ('POST', '/v1/completions', b'["not", "an", "object"]', 400, 'invalid_type'),
    ('POST', '/v1/completions', {'prompt': 'x', 'temprature': 0.5}, 400, 'unknown_parameter'),
    ('POST', '/v1/completions', {}, 400, 'missing_required_parameter'),
    ('POST', '/v1/completions', {'prompt': 'x', 'max_tokens': '5'}, 400, 'invalid_type'),
    ('POST', '/v1/completions', {'prompt': 'x', 'temperature': 3}, 400, 'invalid_value'),
    ('POST', '/v1/completions', {'prompt': 'word ' * 200}, 400, 'context_length_exceeded'),
    ('POST', '/v1/completions', {'prompt': 'x', 'max_tokens': 10**6}, 400, 'context_length_exceeded'),
    ('POST', '/v1/completions', {'prompt': 'x', 'model': 'gpt-4'}, 404, 'model_not_found'),
    ('GET', '/v1/models/gpt-4', None, 404, 'model_not_found'),
    ('POST', '/v1/completions', {'prompt': 'x', 'logit_bias': {'100352': 1}}, 400, 'invalid_value'),
    ('POST', '/v1/completions', {'prompt': 'x', 'logit_bias': {'hello': 1}}, 400, 'invalid_value'),
    ('POST', '/v1/chat/completions', {'messages': [{'role': 'tool', 'content': 'x'}]}, 400, 'invalid_value'),
    ('POST', '/v1/nowhere', {}, 404, None),
    ('GET', '/v1/completions', None, 405, None),
    ('DELETE', '/v1/models', None, 405, None),
]


@pytest.mark.parametrize('method,path,body,status,code', ERRORS)
def test_error_bodies_validate(server, method, path, body, status, code):
    data = body if isinstance(body, bytes) else None
    response = requests.request(method, server.url + path, data=data, json=None if data else body, timeout=30,
                                headers={'Content-Type': 'application/json'} if data else None)
    reply = response.json()
    assert response.status_code == status and spec_errors('ErrorResponse', reply) == []
    assert reply['error']['code'] == code and reply['error']['message']
    if status == 405:
        assert method not in response.headers['allow']


AUTH = {'Authorization': f'Bearer {KEY}'}


def test_auth_size_and_busy_errors_validate(strict):
    url, model = strict
    unauthorized = requests.get(url + '/v1/models', timeout=10)
    too_large = post(url, '/v1/completions', {'prompt': 'x' * 5000}, headers=AUTH)
    model.hold.clear()
    model.entered.clear()
    holder = threading.Thread(target=post, args=(url, '/v1/completions', {'prompt': 'the one slot'}),
                              kwargs={'headers': AUTH})
    holder.start()
    try:
        assert model.entered.wait(timeout=60)  # the first request is in the engine, holding the slot
        busy = post(url, '/v1/completions', {'prompt': 'x'}, headers=AUTH)
    finally:
        model.hold.set()
        holder.join()  # its reply leaves after its slot is free
    for response, status, code in ((unauthorized, 401, 'invalid_api_key'), (too_large, 413, None),
                                   (busy, 429, 'rate_limit_exceeded')):
        assert response.status_code == status and spec_errors('ErrorResponse', response.json()) == []
        assert response.json()['error']['code'] == code


def test_generation_failures_validate(strict):
    url, model = strict
    model.fail = True
    try:
        failed = post(url, '/v1/completions', {'prompt': 'x'}, headers=AUTH)
        streamed = events(post(url, '/v1/chat/completions', {**CHAT, 'stream': True}, headers=AUTH, stream=True))
    finally:
        model.fail = False
    assert failed.status_code == 500 and spec_errors('ErrorResponse', failed.json()) == []
    assert 'the model broke' in failed.json()['error']['message']
    assert spec_errors('ErrorResponse', streamed[-1]) == [] and streamed[-1]['error']['type'] == 'server_error'


def test_health_error_validates(tiny_model, encoding):
    app = create_app(tiny_model, encoding)
    with serve_in_background(app) as url:
        app.state.engine.stop()
        response = requests.get(url + '/health', timeout=10)
    assert response.status_code == 503 and spec_errors('ErrorResponse', response.json()) == []


# Requests the spec accepts.

NULLS = {key: None for key in ('temperature', 'top_p', 'n', 'stop', 'seed', 'stream', 'stream_options',
                               'presence_penalty', 'frequency_penalty', 'logit_bias', 'logprobs')}


def test_null_parameters_mean_their_defaults(server):
    completion = post(server.url, '/v1/completions', {'model': 'tiny', 'prompt': 'x', 'max_tokens': None,
                                                      'echo': None, **NULLS})
    chat = post(server.url, '/v1/chat/completions', {**CHAT, **NULLS, 'top_logprobs': None, 'max_tokens': None,
                                                     'max_completion_tokens': 3})
    assert completion.status_code == chat.status_code == 200, (completion.text, chat.text)
    assert len(completion.json()['choices']) == len(chat.json()['choices']) == 1
    assert completion.json()['usage']['completion_tokens'] <= ServeConfig().default_max_tokens
    assert post(server.url, '/v1/completions', {'prompt': None, 'max_tokens': 1}).json()['usage']['prompt_tokens'] == 1


def greedy_chat(codec, greedy, messages, max_tokens=5):
    ids = chatml_prompt(codec, messages)
    tokens = greedy(ids, max_tokens, (IM_END_ID, EOS_ID))
    return codec.decode(t for t in tokens if t not in (IM_END_ID, EOS_ID))


def test_spec_valid_chat_parameters_are_served(server, codec, greedy):
    """`developer` is a system message, an assistant's refusal is its text, a message `name` and `user`
    change nothing, `top_p: 0` is greedy, zero penalties and tools left unused are no-ops, any int64
    `seed` goes."""
    body = {'model': 'tiny', 'max_tokens': 5, 'temperature': 1, 'top_p': 0, 'seed': -1, 'user': 'user-1234',
            'presence_penalty': 0, 'frequency_penalty': 0, 'logit_bias': {}, 'service_tier': 'auto',
            'response_format': {'type': 'text'}, 'tool_choice': 'none', 'parallel_tool_calls': True,
            'messages': [{'role': 'developer', 'content': 'Be brief.'},
                         {'role': 'user', 'content': [{'type': 'text', 'text': 'Say hi'}], 'name': 'ann'},
                         {'role': 'assistant', 'content': [{'type': 'refusal', 'refusal': 'No.'}], 'refusal': 'No.'},
                         {'role': 'user', 'content': 'Please'}]}
    reply = post(server.url, '/v1/chat/completions', body)
    assert reply.status_code == 200, reply.text
    expected = greedy_chat(codec, greedy, [('system', 'Be brief.'), ('user', 'Say hi'), ('assistant', 'No.'),
                                           ('user', 'Please')])
    assert reply.json()['choices'][0]['message']['content'] == expected
    for seed in (-2**63, 2**63 - 1):
        assert post(server.url, '/v1/completions', {'prompt': 'x', 'max_tokens': 2, 'seed': seed}).status_code == 200
    assert post(server.url, '/v1/completions', {'prompt': 'x', 'n': 2, 'best_of': 2, 'suffix': ''}).status_code == 200


def test_a_reply_message_appended_as_it_came_is_accepted(server, codec, greedy):
    """The openai client sends a reply's message back with its null fields (refusal, tool_calls, ...)."""
    chat = client(server.url).chat.completions
    first = chat.create(model='tiny', messages=[{'role': 'user', 'content': 'hi'}], max_tokens=3, temperature=0)
    answer = first.choices[0].message
    reply = chat.create(model='tiny', max_tokens=3, temperature=0,
                        messages=[{'role': 'user', 'content': 'hi'}, answer, {'role': 'user', 'content': 'more'}])
    expected = greedy_chat(codec, greedy, [('user', 'hi'), ('assistant', answer.content), ('user', 'more')], 3)
    assert reply.choices[0].message.content == expected


UNSUPPORTED = [
    ('/v1/completions', {'prompt': 'x', 'best_of': 3}, 'best_of'),
    ('/v1/completions', {'prompt': 'x', 'suffix': 'and then'}, 'suffix'),
    ('/v1/chat/completions', {**CHAT, 'response_format': {'type': 'json_object'}}, 'response_format'),
    ('/v1/chat/completions', {**CHAT, 'tools': [{'type': 'function', 'function': {'name': 'f'}}]}, 'tools'),
    ('/v1/chat/completions', {**CHAT, 'tool_choice': 'required'}, 'tool_choice'),
    ('/v1/chat/completions', {**CHAT, 'messages': [{'role': 'assistant', 'content': None, 'tool_calls': [
        {'id': 'c', 'type': 'function', 'function': {'name': 'f', 'arguments': '{}'}}]}]}, 'messages.0.tool_calls'),
]


@pytest.mark.parametrize('path,body,param', UNSUPPORTED)
def test_features_this_server_lacks_get_a_400_naming_them(server, path, body, param):
    reply = post(server.url, path, body)
    assert reply.status_code == 400 and spec_errors('ErrorResponse', reply.json()) == []
    assert reply.json()['error']['param'] == param and 'not supported' in reply.json()['error']['message']


def test_image_content_gets_a_400_in_words(server):
    part = {'type': 'image_url', 'image_url': {'url': 'https://example.com/cat.png'}}
    reply = post(server.url, '/v1/chat/completions',
                 {'messages': [{'role': 'user', 'content': [{'type': 'text', 'text': 'What is it?'}, part]}]})
    assert reply.status_code == 400 and spec_errors('ErrorResponse', reply.json()) == []
    error = reply.json()['error']
    assert "content parts of type 'image_url' are not supported" in error['message']
    assert error['param'] == 'messages.0.content'


def test_logit_bias_bans_and_forces_tokens(server, codec, greedy):
    prompt = codec.encode('The capital of France is')
    first = greedy(prompt, 1)[0]
    banned = post(server.url, '/v1/completions', {'prompt': prompt, 'max_tokens': 1, 'temperature': 0,
                                                  'logit_bias': {str(first): -100}, 'logprobs': 0}).json()
    assert banned['choices'][0]['logprobs']['tokens'][0] != codec.token_str(first)
    forced = post(server.url, '/v1/completions', {'prompt': prompt, 'max_tokens': 4, 'temperature': 1, 'seed': 3,
                                                  'logit_bias': {'15339': 100}}).json()
    assert forced['choices'][0]['text'] == codec.decode([15339] * 4)


def test_penalties_match_a_direct_decode(server, codec, tiny_model):
    """Greedy decoding with a logit bias and OpenAI's penalties, served, equals the same rule applied by
    hand: the biased token wins once, then its penalties hand the choice to others."""
    prompt, favoured = codec.encode('Repeat repeat repeat'), 15339
    presence, frequency = 0.5, 1.5
    bias = torch.zeros(tiny_model.config.vocab_size)
    bias[favoured] = 4.0
    tokens = []
    with torch.no_grad():
        for _ in range(8):
            logits = tiny_model(torch.tensor([prompt + tokens]))[0, -1]
            counts = torch.bincount(torch.tensor(tokens, dtype=torch.long), minlength=logits.shape[-1]).float()
            tokens.append(int(adjust_logits(logits, bias, counts, presence, frequency).argmax()))
            if tokens[-1] in STOP_TOKEN_IDS:
                break
    assert tokens[0] == favoured and favoured not in tokens[1:]
    reply = post(server.url, '/v1/completions', {'prompt': prompt, 'max_tokens': 8, 'temperature': 0,
                                                 'logit_bias': {str(favoured): 4}, 'presence_penalty': presence,
                                                 'frequency_penalty': frequency}).json()
    stop = tokens[-1] in STOP_TOKEN_IDS
    assert reply['choices'][0]['text'] == codec.decode(tokens[:-1] if stop else tokens)
    assert reply['usage']['completion_tokens'] == len(tokens)


def test_adjust_logits_is_openais_formula():
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0])
    counts = torch.tensor([0.0, 1.0, 3.0, 0.0])
    bias = torch.tensor([0.0, 0.0, 0.0, -100.0])
    adjusted = adjust_logits(logits, bias, counts, presence_penalty=0.5, frequency_penalty=0.25)
    torch.testing.assert_close(adjusted, torch.tensor([1.0, 2.0 - 0.25 - 0.5, 3.0 - 0.75 - 0.5, -96.0]))
