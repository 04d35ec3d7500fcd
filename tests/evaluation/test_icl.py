"""`ComposerDbrx` answers llm-foundry's ICL batches (built from the shipped tasks) exactly as the
model does when it is run on each example alone."""

from __future__ import annotations

import copy

import pytest

from dbrx_train.tokenizer import VOCAB_SIZE
from tests.evaluation.conftest import REPO, chosen_options, direct_accuracy, greedy_answers, greedy_continuations
from tests.model.conftest import tiny_dbrx

TASKS = REPO / 'yamls' / 'eval' / 'tasks.yaml'
SEQ_LEN = 64  # the model's max_seq_len: 2-shot prompts fit, and generation must stay within it


@pytest.fixture(scope='module')
def model():
    return tiny_dbrx(d_model=SEQ_LEN, vocab=VOCAB_SIZE, ffn=32, experts=4, top_k=2, seed=3)


@pytest.fixture(scope='module')
def composer_model(model):
    from dbrx_train.composer_model import ComposerDbrx

    return ComposerDbrx(model).eval()


@pytest.fixture(scope='module')
def batches():
    """Evaluator label -> (its metric's class name, its batches), batch size 4 (one 4-choice question)."""
    from dbrx_train.evaluation.config import parse_icl_tasks
    from dbrx_train.evaluation.icl import build_icl_evaluators

    evaluators = build_icl_evaluators(parse_icl_tasks(str(TASKS)), SEQ_LEN, batch_size=4)
    return {e.label: (e.metric_names[0], list(e.dataloader.dataloader)) for e in evaluators}


def evaluate(composer_model, metric_name, batches):
    """Per batch: what eval_forward returned and what the metric made of it; then the metric's value."""
    metric = copy.deepcopy(composer_model.get_metrics()[metric_name])
    results = []
    for batch in batches:
        outputs = composer_model.eval_forward(batch)
        results.append((outputs, composer_model.update_metric(batch, outputs, metric)))
    return results, metric.compute().item()


def test_the_shipped_tasks_cover_every_llm_foundry_task_type(batches):
    from llmfoundry import registry

    from dbrx_train.evaluation.config import parse_icl_tasks

    assert {t.icl_task_type for t in parse_icl_tasks(str(TASKS))} == set(registry.icl_datasets.get_all())
    assert set(batches) == {'python_mc/0-shot', 'python_mc/2-shot', 'python_schema/0-shot', 'python_lm/0-shot',
                            'python_qa/0-shot', 'python_qa/2-shot'}


@pytest.mark.parametrize('label', ['python_mc/0-shot', 'python_mc/2-shot', 'python_schema/0-shot'])
def test_a_choice_task_picks_the_option_of_lowest_continuation_loss(label, model, composer_model, batches):
    from dbrx_train.composer_model import hf_tokenizer

    metric_name, task_batches = batches[label]
    results, accuracy = evaluate(composer_model, metric_name, task_batches)
    for batch, (_, result) in zip(task_batches, results):
        assert result['selected_choice_idx'] == chosen_options(model, batch)
    correct = [c for batch in task_batches for c in direct_accuracy(model, batch, hf_tokenizer())]
    assert accuracy == pytest.approx(sum(correct) / len(correct))


def test_language_modelling_compares_greedy_predictions_with_the_continuation(model, composer_model, batches):
    metric_name, task_batches = batches['python_lm/0-shot']
    results, _ = evaluate(composer_model, metric_name, task_batches)
    for batch, (_, result) in zip(task_batches, results):
        direct = greedy_continuations(model, batch)
        assert [p.tolist() for p in result['output']] == [p.tolist() for p in direct]


@pytest.mark.parametrize('label', ['python_qa/0-shot', 'python_qa/2-shot'])
def test_generation_matches_greedy_decoding_of_each_prompt_alone(label, model, composer_model, batches):
    from dbrx_train.composer_model import hf_tokenizer

    metric_name, task_batches = batches[label]
    results, accuracy = evaluate(composer_model, metric_name, task_batches)
    for batch, (answers, _) in zip(task_batches, results):
        assert answers == greedy_answers(model, batch, hf_tokenizer())
    correct = [c for batch in task_batches for c in direct_accuracy(model, batch, hf_tokenizer())]
    assert accuracy == pytest.approx(sum(correct) / len(correct))


def test_generation_honours_max_new_tokens_and_cuts_at_a_stop_sequence(model, composer_model, batches):
    from dbrx_train.composer_model import hf_tokenizer

    batch = copy.deepcopy(batches['python_qa/0-shot'][1][0])  # four prompts of different lengths
    batch['generation_kwargs']['max_new_tokens'] = 6
    batch['stopping_criteria'] = []
    uncut = greedy_answers(model, batch, hf_tokenizer())
    assert composer_model.eval_forward(batch) == uncut
    longest = max(uncut, key=len)
    assert len(longest) >= 4
    batch['stopping_criteria'] = [longest[2:4]]  # occurs in this answer at the latest at its 3rd character
    cut = composer_model.eval_forward(batch)
    assert cut == greedy_answers(model, batch, hf_tokenizer())
    assert len(cut[uncut.index(longest)]) <= 2
