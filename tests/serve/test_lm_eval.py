"""EleutherAI's lm-eval harness against a running server: its `local-completions` model runs a
log-likelihood task and a generation task, `local-chat-completions` the generation task, all on
the task definitions and data in `lm_eval_tasks/`. The harness tokenizes through the server's
`/tokenize` (vLLM's endpoint, which it detects), so no tokenizer download is needed. With a random
model the scores mean nothing; what is checked is that every number the server returned is the
one the model computes in process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dbrx_train.serve.text import chatml_prompt
from dbrx_train.tokenizer import EOS_ID, IM_END_ID, STOP_TOKEN_IDS

TASKS = Path(__file__).parent / 'lm_eval_tasks'
LIMIT = 4


@pytest.fixture(scope='module')
def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS), include_defaults=False)


def evaluate(task_manager, model: str, model_args: dict, tasks: list[str], **kwargs) -> dict:
    from lm_eval import simple_evaluate

    return simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=task_manager, limit=LIMIT,
                           log_samples=True, **kwargs)


def loglikelihood(model, codec, context: str, continuation: str) -> tuple[float, bool]:
    """What the harness asks for, computed in process: its tokenization (trailing spaces of the
    context go to the continuation; the continuation is what the whole adds to the context)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, context_ids = codec.encode(context + continuation), codec.encode(context)
    targets = torch.tensor(whole[len(context_ids):])
    with torch.no_grad():
        logprobs = model(torch.tensor([whole]))[0, len(context_ids) - 1 : -1].log_softmax(-1)
    picked = logprobs[torch.arange(len(targets)), targets]
    return picked.sum().item(), bool((logprobs.argmax(-1) == targets).all())


def answer(codec, greedy, prompt: list[int], stops, max_tokens: int = 8, until: str = '\n') -> str:
    tokens = greedy(prompt, max_tokens, stops)
    if tokens and tokens[-1] in stops:
        tokens = tokens[:-1]
    return codec.decode(tokens).split(until)[0]


def test_local_completions_loglikelihood_and_generation(server, task_manager, tiny_model, codec, greedy):
    results = evaluate(task_manager, 'local-completions',
                       {'base_url': server.url + '/v1/completions', 'model': 'tiny', 'max_length': 128,
                        'num_concurrent': 2, 'batch_size': 2},
                       ['dbrx_tiny_mc', 'dbrx_tiny_gen'])
    assert 'acc,none' in results['results']['dbrx_tiny_mc']
    assert 'exact_match,none' in results['results']['dbrx_tiny_gen']

    mc = results['samples']['dbrx_tiny_mc']
    assert len(mc) == LIMIT
    correct = []
    for sample in mc:
        served = [tuple(resp[0]) for resp in sample['resps']]
        direct = [loglikelihood(tiny_model, codec, context, continuation)
                  for context, continuation in sample['arguments']]
        assert [g for _, g in served] == [g for _, g in direct]
        assert [ll for ll, _ in served] == pytest.approx([ll for ll, _ in direct], abs=1e-3)
        correct.append(max(range(len(direct)), key=lambda i: direct[i][0]) == sample['target'])
    assert results['results']['dbrx_tiny_mc']['acc,none'] == pytest.approx(sum(correct) / len(correct))

    gen = results['samples']['dbrx_tiny_gen']
    assert len(gen) == LIMIT
    for sample in gen:
        context, _ = sample['arguments'][0]
        assert sample['resps'][0][0] == answer(codec, greedy, codec.encode(context), STOP_TOKEN_IDS)


def test_local_chat_completions_generation(server, task_manager, codec, greedy):
    results = evaluate(task_manager, 'local-chat-completions',
                       {'base_url': server.url + '/v1/chat/completions', 'model': 'tiny', 'max_length': 128},
                       ['dbrx_tiny_gen'], apply_chat_template=True)
    assert 'exact_match,none' in results['results']['dbrx_tiny_gen']
    samples = results['samples']['dbrx_tiny_gen']
    assert len(samples) == LIMIT
    for sample in samples:
        messages = json.loads(sample['arguments'][0][0][0])  # the chat the harness sent
        prompt = chatml_prompt(codec, [(m['role'], m['content']) for m in messages])
        assert sample['resps'][0][0] == answer(codec, greedy, prompt, (IM_END_ID, EOS_ID))
