"""The HTTP API, driven by the official `openai` client and by raw HTTP against a running server."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
import torch

from dbrx_train.serve import create_app
from dbrx_train.serve.background import serve_in_background
from dbrx_train.serve.text import chat_prompt, chatml_prompt
from dbrx_train.tokenizer import EOS_ID, IM_END_ID, STOP_TOKEN_IDS
from tests.serve.conftest import KEY, client

def expected_text(codec, tokens: list[int], stops) -> tuple[str, str]:
    """The text and finish reason the server must report for these generated tokens."""
    if tokens and tokens[-1] in stops:
        return codec.decode(tokens[:-1]), 'stop'
    return codec.decode(tokens), 'length'


def test_completion_is_the_models_greedy_continuation(server, codec, greedy):
    prompt = 'The capital of France is'
    reply = client(server.url).completions.create(model='tiny', prompt=prompt, max_tokens=8, temperature=0)
    ids = codec.encode(prompt)
    tokens = greedy(ids, 8, STOP_TOKEN_IDS)
    (choice,) = reply.choices
    assert (choice.text, choice.finish_reason) == expected_text(codec, tokens, STOP_TOKEN_IDS)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), len(tokens))
    assert reply.model == 'tiny' and reply.object == 'text_completion'


def test_echo_with_logprobs_scores_the_prompts_own_tokens(server, codec, tiny_model):
    ids = codec.encode('Log-likelihood evaluations score these tokens')
    reply = client(server.url).completions.create(
        model='tiny', prompt=ids, max_tokens=1, temperature=0, logprobs=2, echo=True
    )
    logprobs = reply.choices[0].logprobs
    with torch.no_grad():
        expected = tiny_model(torch.tensor([ids]))[0].log_softmax(-1)
    assert logprobs.tokens[: len(ids)] == [codec.token_str(t) for t in ids] and len(logprobs.tokens) == len(ids) + 1
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    served = torch.tensor(logprobs.token_logprobs[1:])
    direct = torch.cat([expected[torch.arange(len(ids) - 1), torch.tensor(ids[1:])], expected[-1].max()[None]])
    torch.testing.assert_close(served, direct, atol=1e-4, rtol=0)
    for position, top in enumerate(logprobs.top_logprobs[1:]):
        best = expected[position].argmax().item()
        assert top[codec.token_str(best)] == pytest.approx(expected[position, best].item(), abs=1e-4)
    assert reply.choices[0].text == codec.decode(ids) + codec.token_str(expected[-1].argmax().item())
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)


def test_scoring_only_request_with_zero_max_tokens(server, codec):
    ids = codec.encode('score only')
    reply = requests.post(server.url + '/v1/completions',
                          json={'prompt': ids, 'max_tokens': 0, 'echo': True, 'logprobs': 0}, timeout=60).json()
    (choice,) = reply['choices']
    assert choice['text'] == 'score only' and len(choice['logprobs']['token_logprobs']) == len(ids)
    assert reply['usage']['completion_tokens'] == 0


def test_prompts_times_n_choices_come_back_in_openai_order(server, codec, greedy):
    prompts = [codec.encode('first prompt'), codec.encode('the second one')]
    reply = client(server.url).completions.create(model='tiny', prompt=prompts, n=2, max_tokens=5, temperature=0)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert reply.usage.prompt_tokens == sum(len(p) for p in prompts)  # each prompt counted once
    for choice in reply.choices:
        tokens = greedy(prompts[choice.index // 2], 5, STOP_TOKEN_IDS)
        assert choice.text == expected_text(codec, tokens, STOP_TOKEN_IDS)[0]


def test_streamed_completion_equals_the_whole_one(server):
    kwargs = dict(model='tiny', prompt=['stream me', 'and me too'], max_tokens=10, temperature=0)
    whole = client(server.url).completions.create(**kwargs)
    texts, finish, usage = {}, {}, None
    for chunk in client(server.url).completions.create(**kwargs, stream=True, stream_options={'include_usage': True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, '') + choice.text
            finish[choice.index] = choice.finish_reason
    assert texts == {c.index: c.text for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    assert usage == whole.usage


def test_chat_completion_renders_dbrx_instructs_template_with_its_default_system_prompt(tiny_model, encoding, codec):
    from dataclasses import replace

    from dbrx_train.chat_template import TEMPLATES
    from dbrx_train.model import DbrxLM
    from dbrx_train.serve import ServeConfig

    model = DbrxLM(replace(tiny_model.config, max_seq_len=512)).eval()  # room for the system prompt
    model.load_state_dict(tiny_model.state_dict())
    messages = [{'role': 'user', 'content': 'Say hi'}]
    ids = chat_prompt(codec, [('user', 'Say hi')], 'dbrx_instruct')
    assert codec.decode(ids).startswith('<|im_start|>system\nYou are DBRX, created by Databricks.')
    stops = (IM_END_ID, EOS_ID)
    greedy = model.generate(torch.tensor([ids]), max_new_tokens=5, stop_token_ids=stops)[0, len(ids):].tolist()
    text, finish = expected_text(codec, greedy, stops)
    config = ServeConfig(model_name='tiny', chat_template='dbrx_instruct')
    with serve_in_background(create_app(model, encoding, config)) as url:
        reply = client(url).chat.completions.create(model='tiny', messages=messages, max_tokens=5, temperature=0)
        info = requests.get(f'{url}/tokenizer_info', timeout=30).json()
    assert reply.usage.prompt_tokens == len(ids) and reply.choices[0].message.content == text
    assert info['chat_template'] == TEMPLATES['dbrx_instruct']


def test_chat_completion_answers_the_chatml_prompt(server, codec, greedy):
    messages = [{'role': 'system', 'content': 'You are terse.'}, {'role': 'user', 'content': 'Say hi'}]
    ids = chatml_prompt(codec, [(m['role'], m['content']) for m in messages])
    stops = (IM_END_ID, EOS_ID)
    text, finish = expected_text(codec, greedy(ids, 7, stops), stops)
    reply = client(server.url).chat.completions.create(model='tiny', messages=messages, max_tokens=7, temperature=0)
    (choice,) = reply.choices
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ('assistant', text, finish)
    assert reply.usage.prompt_tokens == len(ids)
    chunks = list(client(server.url).chat.completions.create(
        model='tiny', messages=messages, max_tokens=7, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == 'assistant'
    assert ''.join(c.choices[0].delta.content or '' for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == finish


def test_chat_logprobs(server):
    reply = client(server.url).chat.completions.create(
        model='tiny', messages=[{'role': 'user', 'content': 'hi'}], max_tokens=3, temperature=0, logprobs=True,
        top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:  # greedy: the chosen token is the likeliest
        assert len(entry.top_logprobs) == 2 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)


@pytest.mark.parametrize('stream', [False, True])
def test_stop_string_ends_the_text_before_it(server, codec, greedy, stream):
    prompt = 'Count with me'
    tokens = greedy(codec.encode(prompt), 12, STOP_TOKEN_IDS)
    full = codec.decode(tokens)
    stop = codec.token_str(tokens[3])  # the text of the fourth token
    kwargs = dict(model='tiny', prompt=prompt, max_tokens=12, temperature=0, stop=[stop, 'never appears'])
    if stream:
        chunks = list(client(server.url).completions.create(**kwargs, stream=True))
        text, finish = ''.join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        choice = client(server.url).completions.create(**kwargs).choices[0]
        text, finish = choice.text, choice.finish_reason
    assert (text, finish) == (full[: full.index(stop)], 'stop')


def test_seed_makes_sampling_reproducible(server):
    def sample(seed):
        return client(server.url).completions.create(
            model='tiny', prompt='Random', max_tokens=8, temperature=1.0, top_p=0.9, seed=seed).choices[0].text

    assert sample(11) == sample(11) != sample(12)


def test_models_and_health(server):
    models = client(server.url).models.list()
    assert [m.id for m in models.data] == ['tiny']
    health = requests.get(server.url + '/health', timeout=10).json()
    assert health['status'] == 'ok' and health['running'] == 0


def test_health_fails_when_the_engine_is_gone(tiny_model, encoding):
    app = create_app(tiny_model, encoding)
    with serve_in_background(app) as url:
        assert requests.get(url + '/health', timeout=10).status_code == 200
        app.state.engine.stop()
        assert requests.get(url + '/health', timeout=10).status_code == 503


def test_concurrent_clients_share_decoding_steps(server, codec, greedy):
    prompts = [f'Client number {i} asks' for i in range(8)]
    server.engine.peak_batch = 0
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda p: client(server.url).completions.create(
            model='tiny', prompt=p, max_tokens=24, temperature=0), prompts))
    for prompt, reply in zip(prompts, replies):
        tokens = greedy(codec.encode(prompt), 24, STOP_TOKEN_IDS)
        assert reply.choices[0].text == expected_text(codec, tokens, STOP_TOKEN_IDS)[0]
    assert server.engine.peak_batch > 1


# Limits and authentication, on the `strict` server (conftest).


def test_api_key_is_required_when_set(strict):
    url, _ = strict
    with pytest.raises(openai.AuthenticationError):
        client(url, 'wrong').models.list()
    assert requests.get(url + '/v1/models', timeout=10).status_code == 401
    assert requests.post(url + '/tokenize', json={'prompt': 'x'}, timeout=10).status_code == 401
    assert requests.get(url + '/health', timeout=10).status_code == 200
    assert client(url, KEY).completions.create(model='tiny', prompt='hi', max_tokens=1).choices


def wait_until_idle(url, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = requests.get(url + '/health', timeout=10).json()
        if health['running'] == health['waiting'] == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f'the engine is still busy: {health}')


def test_requests_over_the_concurrency_limit_get_429(strict):
    url, _ = strict
    stream = client(url, KEY).completions.create(model='tiny', prompt='long', max_tokens=100, stream=True)
    next(iter(stream))  # the one allowed request is in flight
    with pytest.raises(openai.RateLimitError):
        client(url, KEY).completions.create(model='tiny', prompt='second', max_tokens=1)
    stream.close()
    wait_until_idle(url)
    deadline = time.monotonic() + 10
    while True:  # the slot frees once the server has noticed the disconnect
        try:
            assert client(url, KEY).completions.create(model='tiny', prompt='third', max_tokens=1).choices
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_client_leaving_mid_stream_stops_its_generation(strict):
    url, slow = strict
    wait_until_idle(url)
    before = slow.passes
    response = requests.post(url + '/v1/completions', json={'prompt': 'tell me everything', 'max_tokens': 120,
                                                            'stream': True, 'ignore_eos': True},
                             headers={'Authorization': f'Bearer {KEY}'}, stream=True, timeout=30)
    lines = response.iter_lines()
    assert next(line for line in lines if line).startswith(b'data: {')
    response.close()
    wait_until_idle(url)
    assert slow.passes - before < 60  # far from the 120 tokens asked for
    assert client(url, KEY).completions.create(model='tiny', prompt='next', max_tokens=1).choices


def test_tokenizer_endpoints_round_trip(server, codec):
    text = 'Tokens <|im_start|> and text'
    tokens = requests.post(server.url + '/tokenize', json={'prompt': text}, timeout=10).json()['tokens']
    assert tokens == codec.encode(text)
    assert requests.post(server.url + '/detokenize', json={'tokens': tokens}, timeout=10).json()['prompt'] == text
    info = requests.get(server.url + '/tokenizer_info', timeout=10).json()
    assert info['eos_token'] == '<|endoftext|>' and info['model_max_length'] == 128
