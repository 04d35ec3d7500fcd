"""The batching engine, in process: batched results equal one-prompt-at-a-time results."""

from __future__ import annotations

import copy
import dataclasses
import queue
import time

import pytest
import torch

from dbrx_train.model import DbrxLM
from dbrx_train.model.config import AttentionConfig
from dbrx_train.model.quantize import quantize
from dbrx_train.serve.engine import Engine, SamplingParams, ServableModel
from tests.serve.conftest import TINY

GREEDY = dict(temperature=0.0)


@pytest.fixture
def engine(tiny_model, codec):
    engine = Engine(tiny_model, codec, max_batch_size=3)
    engine.start()
    yield engine
    engine.stop()


def collect(engine, jobs, timeout=60):
    """Submits `(prompt, params)` jobs; returns each one's outputs, in job order."""
    sink = queue.Queue()
    for index, (prompt, params) in enumerate(jobs):
        engine.submit(prompt, params, sink.put, index)
    outputs = {i: [] for i in range(len(jobs))}
    running = len(jobs)
    while running:
        out = sink.get(timeout=timeout)
        assert out.error is None, out.error
        outputs[out.index].append(out)
        running -= out.finish_reason is not None
    return [outputs[i] for i in range(len(jobs))]


def tokens_of(outputs):
    return [t for out in outputs for t in out.token_ids]


def test_more_sequences_than_rows_decode_as_if_alone(engine, greedy, codec):
    texts = ['Hello', 'The quick brown fox jumps over the lazy dog', 'a b c', 'One, two, three, four, five, six',
             'x', 'Lorem ipsum dolor sit amet', 'Mixture of experts']
    jobs = [(codec.encode(t), SamplingParams(max_tokens=1 + 2 * i, **GREEDY)) for i, t in enumerate(texts)]
    results = collect(engine, jobs)
    for (prompt, params), outputs in zip(jobs, results):
        assert tokens_of(outputs) == greedy(prompt, params.max_tokens)
        assert outputs[-1].finish_reason == 'length'
        assert ''.join(o.text for o in outputs) == codec.decode(tokens_of(outputs))
    assert engine.peak_batch == 3


def test_a_request_joins_a_running_batch(engine, greedy, codec):
    long_prompt, short_prompt = codec.encode('A long story begins'), codec.encode('Meanwhile, somewhere else,')
    sink = queue.Queue()
    engine.submit(long_prompt, SamplingParams(max_tokens=60, **GREEDY), sink.put, 0)
    first = [sink.get(timeout=30)]  # the long one is decoding now
    late = collect(engine, [(short_prompt, SamplingParams(max_tokens=5, **GREEDY))])[0]
    rest = []
    while not (rest and rest[-1].finish_reason):
        rest.append(sink.get(timeout=30))
    assert engine.peak_batch == 2
    assert tokens_of(late) == greedy(short_prompt, 5)
    assert tokens_of(first + rest) == greedy(long_prompt, 60)


def test_prompt_scores_are_the_models_logprobs(engine, tiny_model, codec):
    prompts = [codec.encode('Scoring a prompt token by token'), codec.encode('short one')]
    jobs = [(p, SamplingParams(max_tokens=0, logprobs=3, prompt_logprobs=True)) for p in prompts]
    jobs.append((codec.encode('generating alongside'), SamplingParams(max_tokens=4, **GREEDY)))
    results = collect(engine, jobs)
    for prompt, outputs in zip(prompts, results):
        (out,) = outputs
        assert out.token_ids == [] and out.finish_reason == 'length'
        logprobs = tiny_model(torch.tensor([prompt]))[0].log_softmax(-1)
        scores = out.prompt_logprobs
        assert [s.token for s in scores] == prompt and scores[0].logprob is None
        expected = logprobs[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
        torch.testing.assert_close(torch.tensor([s.logprob for s in scores[1:]]), expected, atol=1e-4, rtol=0)
        best = logprobs[:-1].topk(3)
        assert [[t for t, _ in s.top] for s in scores[1:]] == best.indices.tolist()


def test_stop_token_ends_a_sequence_without_its_text(engine, greedy, codec):
    prompt = codec.encode('Stop here')
    expected = greedy(prompt, 6)
    stop = expected[2]
    (outputs,) = collect(engine, [(prompt, SamplingParams(max_tokens=6, stop_token_ids=(stop,), **GREEDY))])
    cut = expected.index(stop)
    assert tokens_of(outputs) == expected[: cut + 1]
    assert outputs[-1].finish_reason == 'stop'
    assert ''.join(o.text for o in outputs) == codec.decode(expected[:cut])


def test_seeded_sampling_is_reproducible(engine, codec):
    prompt = codec.encode('Once upon a time')
    sampled = [tokens_of(collect(engine, [(prompt, SamplingParams(max_tokens=8, seed=seed, top_k=50))])[0])
               for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_cancelled_sequence_leaves_the_batch(engine, codec):
    sink = queue.Queue()
    seq = engine.submit(codec.encode('Go on forever'), SamplingParams(max_tokens=120, **GREEDY), sink.put)
    for _ in range(3):  # decoding
        sink.get(timeout=30)
    engine.cancel([seq])
    deadline = time.monotonic() + 30
    while engine.status()['running'] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.status() == {'running': 0, 'waiting': 0, 'peak_batch': 1}
    produced = sink.qsize()
    assert produced < 117 and all(sink.get().finish_reason is None for _ in range(produced))


class FailsOnce:
    """The tiny model, except that its first forward pass raises."""

    def __init__(self, model):
        self.model, self.failed = model, False

    def __getattr__(self, name):
        return getattr(self.model, name)

    def hidden_states(self, *args, **kwargs):
        if not self.failed:
            self.failed = True
            raise RuntimeError('out of memory')
        return self.model.hidden_states(*args, **kwargs)


def test_a_failing_step_fails_its_sequences_and_the_engine_goes_on(tiny_model, greedy, codec):
    engine = Engine(FailsOnce(tiny_model), codec)
    engine.start()
    try:
        sink = queue.Queue()
        engine.submit(codec.encode('first'), SamplingParams(max_tokens=3, **GREEDY), sink.put)
        failed = sink.get(timeout=30)
        assert failed.finish_reason == 'error' and 'out of memory' in failed.error
        prompt = codec.encode('second')
        (outputs,) = collect(engine, [(prompt, SamplingParams(max_tokens=3, **GREEDY))])
        assert tokens_of(outputs) == greedy(prompt, 3)
    finally:
        engine.stop()


def test_a_long_prompt_is_prefilled_in_chunks_between_decoding_steps(tiny_model, greedy, codec):
    engine = Engine(tiny_model, codec, max_batch_size=4, prefill_chunk=4)
    engine.start()
    try:
        sink = queue.Queue()
        running, long = codec.encode('running'), codec.encode('a prompt of twenty tokens ' * 4)[:20]
        engine.submit(running, SamplingParams(max_tokens=12, **GREEDY), sink.put, 0)
        order = [sink.get(timeout=30)]  # the first sequence is decoding
        engine.submit(long, SamplingParams(max_tokens=3, prompt_logprobs=True, **GREEDY), sink.put, 1)
        while sum(out.finish_reason is not None for out in order) < 2:
            order.append(sink.get(timeout=30))
        first_of_long = next(i for i, out in enumerate(order) if out.index == 1)
        assert first_of_long >= 1 + 4  # a decoding step after each of the first four of five chunks
        assert tokens_of(o for o in order if o.index == 0) == greedy(running, 12)
        assert tokens_of(o for o in order if o.index == 1) == greedy(long, 3)
        scores = order[first_of_long].prompt_logprobs  # scored across the chunks
        assert [s.token for s in scores] == long and scores[0].logprob is None
    finally:
        engine.stop()


def test_the_engine_serves_what_fits_servable_model_and_names_what_does_not(tiny_model, codec):
    assert isinstance(tiny_model, ServableModel)
    int8 = quantize(copy.deepcopy(tiny_model).to(torch.bfloat16), 'int8')
    assert isinstance(int8, ServableModel)  # a quantized model fits as it is
    with pytest.raises(TypeError, match='Linear cannot be served: it lacks what ServableModel names'):
        Engine(torch.nn.Linear(2, 2), codec)


def test_a_32k_prompt_is_prefilled_in_chunks_within_max_seq_len(codec):
    """DBRX's context: a 32K prompt, prefilled in 1024-token chunks, then decoded beside a short one
    (a left-padded batch 32K wide), continues as `generate` continues each prompt alone."""
    torch.manual_seed(0)
    config = dataclasses.replace(TINY, d_model=32, n_heads=1, n_layers=1, max_seq_len=32768,
                                 attn_config=AttentionConfig(kv_n_heads=1))
    model = DbrxLM(config).eval()
    long = torch.randint(0, 100_000, (32768 - 4,), generator=torch.Generator().manual_seed(0)).tolist()
    short = long[-50:]
    engine = Engine(model, codec, max_batch_size=2, prefill_chunk=1024)
    engine.start()
    try:
        results = collect(engine, [(long, SamplingParams(max_tokens=4, **GREEDY)),
                                   (short, SamplingParams(max_tokens=4, **GREEDY))], timeout=120)
    finally:
        engine.stop()
    for prompt, outputs in zip((long, short), results):
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=4, stop_token_ids=())[0, len(prompt):]
        assert tokens_of(outputs) == expected.tolist()


def test_compiled_decoding_steps_give_the_eager_tokens(tiny_model, greedy, codec):
    # Dynamo's 'eager' backend: the static-shape cache (masked slots, positions, left padding, rows
    # joining and leaving) is what is under test here; inductor's numerics are tests/model/test_compile.py's.
    engine = Engine(tiny_model, codec, max_batch_size=3, compile={'backend': 'eager'})
    engine.start()
    try:
        texts = ['Hello', 'The quick brown fox jumps over the lazy dog', 'a b c', 'One, two, three, four']
        jobs = [(codec.encode(t), SamplingParams(max_tokens=2 + 3 * i, **GREEDY)) for i, t in enumerate(texts)]
        for (prompt, params), outputs in zip(jobs, collect(engine, jobs)):
            assert tokens_of(outputs) == greedy(prompt, params.max_tokens)
    finally:
        engine.stop()
    assert engine.decode_step.compiled  # it did not fall back to eager
