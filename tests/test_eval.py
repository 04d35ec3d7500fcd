"""`dbrx_train/eval.py` end to end on a DBRX trained for two batches (with the shipped ICL tasks
evaluated after each batch), checked against the model run directly on the same samples."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml

from tests.evaluation.conftest import chosen_options, direct_accuracy, greedy_answers
from tests.evaluation.conftest import from_the_repository_root  # noqa: F401 (an autouse fixture)
from tests.conftest import CORPUS_SEQ_LEN
from tests.training.conftest import REPO, losses, run, tiny_overrides

EVAL = REPO / 'dbrx_train' / 'eval.py'
EVAL_CONFIG = REPO / 'yamls' / 'eval' / 'dbrx-tiny.yaml'
TASKS = REPO / 'yamls' / 'eval' / 'tasks.yaml'
MODEL_SEQ_LEN = 64  # room for the 2-shot prompts (the corpus samples are shorter)
BATCH, SUBSET = 4, 2  # perplexity on the first 8 samples of each stream
ANSWER_TOKENS = 4


@pytest.fixture(scope='module')
def trained(tiny_corpus, tmp_path_factory):
    """Two training batches, the shipped ICL tasks evaluated after each; the checkpoint at the end."""
    run_dir = tmp_path_factory.mktemp('trained')
    run(tiny_overrides(tiny_corpus, run_dir, **{
        'model.max_seq_len': MODEL_SEQ_LEN, 'max_duration': '2ba', 'save_interval': '2ba', 'icl_tasks': TASKS,
        'icl_seq_len': MODEL_SEQ_LEN, 'eval_interval': '1ba', 'device_eval_batch_size': BATCH}))
    return run_dir


def icl_batches(tasks: list[dict]):
    """Evaluator label -> (metric name, batches), as llm-foundry builds them for the eval run."""
    from dbrx_train.evaluation.config import parse_icl_tasks
    from dbrx_train.evaluation.icl import build_icl_evaluators

    evaluators = build_icl_evaluators(parse_icl_tasks(tasks), MODEL_SEQ_LEN, BATCH)
    return {e.label: (e.metric_names[0], list(e.dataloader.dataloader)) for e in evaluators}


@pytest.fixture(scope='module')
def shipped_batches():
    return icl_batches(yaml.safe_load(TASKS.read_text())['icl_tasks'])


@pytest.fixture(scope='module')
def model(trained):
    import dbrx_train

    return dbrx_train.load_pretrained(trained / 'checkpoints')


def own_answer_tasks(model, shipped_batches, tmp_path) -> list[dict]:
    """The shipped tasks, plus a multiple-choice task whose gold options are the ones the model
    prefers and a generation task whose answers are its own greedy answers (4 tokens each): both
    must score 1, which no mistake in scoring or decoding leaves standing."""
    from dbrx_train.composer_model import hf_tokenizer

    shipped = yaml.safe_load(TASKS.read_text())['icl_tasks']
    by_label = {task['label']: task for task in shipped}
    chosen = [c for batch in shipped_batches['python_mc/0-shot'][1] for c in chosen_options(model, batch)]
    answers = []
    for batch in copy.deepcopy(shipped_batches['python_qa/0-shot'][1]):
        batch['generation_kwargs']['max_new_tokens'] = ANSWER_TOKENS
        answers += greedy_answers(model, batch, hf_tokenizer())
    examples = {name: [json.loads(line) for line in open(REPO / by_label[name]['dataset_uri'])]
                for name in ('python_mc', 'python_qa')}
    derived = {'mc_model_choice': [{**e, 'gold': c} for e, c in zip(examples['python_mc'], chosen, strict=True)],
               'qa_model_answer': [{'context': e['context'], 'answer': a, 'aliases': []}
                                   for e, a in zip(examples['python_qa'], answers, strict=True)]}
    for name, rows in derived.items():
        (tmp_path / f'{name}.jsonl').write_text(''.join(json.dumps(row) + '\n' for row in rows))
    zero_shot = {name: {**by_label[name], 'num_fewshot': [0]} for name in ('python_mc', 'python_qa')}
    return [*shipped,
            {**zero_shot['python_mc'], 'label': 'mc_model_choice', 'dataset_uri': str(tmp_path / 'mc_model_choice.jsonl')},
            {**zero_shot['python_qa'], 'label': 'qa_model_answer', 'dataset_uri': str(tmp_path / 'qa_model_answer.jsonl'),
             'generation_kwargs': {'max_new_tokens': ANSWER_TOKENS}}]


@pytest.fixture(scope='module')
def evaluated(trained, model, shipped_batches, tiny_corpus, tmp_path_factory):
    """The eval entry point on the trained checkpoint, with tasks the model's own answers make certain:
    the table it printed and the metrics it logged."""
    tmp = tmp_path_factory.mktemp('eval')
    (tmp / 'tasks.yaml').write_text(yaml.safe_dump({'icl_tasks': own_answer_tasks(model, shipped_batches, tmp)}))
    return run_eval(trained, tiny_corpus, tmp, icl_tasks=tmp / 'tasks.yaml')


def run_eval(trained, tiny_corpus, out, **overrides) -> tuple[str, dict[str, float]]:
    """The eval entry point on the trained checkpoint, perplexity on both streams, with `overrides`:
    the table it printed and the metrics it logged (to `out`/metrics.jsonl)."""
    from dbrx_train import eval as eval_entry

    overrides = {
        'checkpoint': trained / 'checkpoints', 'max_seq_len': CORPUS_SEQ_LEN, 'icl_seq_len': MODEL_SEQ_LEN,
        'device_eval_batch_size': BATCH, 'eval_subset_num_batches': SUBSET,
        'eval_loader.dataset.streams.text.local': tiny_corpus / 'text',
        'eval_loader.dataset.streams.code.local': tiny_corpus / 'code',
        'loggers.metrics_file.path': out / 'metrics.jsonl', 'progress_bar': False, **overrides}
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        eval_entry.main([str(EVAL_CONFIG), *(f'{k}={v}' for k, v in overrides.items())])
    logged = {k: v for line in (out / 'metrics.jsonl').read_text().splitlines()
              for k, v in json.loads(line).items() if k != 'step'}
    return table.getvalue(), logged


@pytest.mark.parametrize('stream', ['text', 'code'])
def test_perplexity_of_a_stream_is_exp_of_its_mean_cross_entropy(stream, evaluated, model, tiny_corpus):
    from streaming import LocalDataset

    _, logged = evaluated
    samples = LocalDataset(str(tiny_corpus / stream))
    tokens = torch.stack([torch.from_numpy(samples[i]['tokens'].astype('int64')) for i in range(BATCH * SUBSET)])
    with torch.no_grad():
        logits = model(tokens)
    cross_entropy = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).item()
    assert logged[f'metrics/eval/{stream}/LanguageCrossEntropy'] == pytest.approx(cross_entropy, rel=1e-5)
    assert logged[f'metrics/eval/{stream}/LanguagePerplexity'] == pytest.approx(math.exp(cross_entropy), rel=1e-5)


def test_every_icl_accuracy_is_what_the_model_answers_directly(evaluated, model, shipped_batches):
    from dbrx_train.composer_model import hf_tokenizer

    _, logged = evaluated
    assert len(shipped_batches) == 6
    for label, (metric, task_batches) in shipped_batches.items():
        correct = [c for batch in task_batches for c in direct_accuracy(model, batch, hf_tokenizer())]
        assert logged[f'metrics/{label}/{metric}'] == pytest.approx(sum(correct) / len(correct)), label
    assert logged['metrics/mc_model_choice/0-shot/InContextLearningMultipleChoiceAccuracy'] == 1.0
    assert logged['metrics/qa_model_answer/0-shot/InContextLearningGenerationExactMatchAccuracy'] == 1.0


def test_amp_bf16_evaluates_under_bf16_autocast_on_a_cpu_that_has_it(trained, evaluated, tiny_corpus, tmp_path):
    """Composer refuses autocast on a CPU; the model runs its own. fp32 where bf16 is not native."""
    from dbrx_train.precision import cpu_bf16_support

    _, fp32 = evaluated
    _, logged = run_eval(trained, tiny_corpus, tmp_path, precision='amp_bf16', icl_tasks='null')
    key = 'metrics/eval/text/LanguageCrossEntropy'
    if cpu_bf16_support() is None:
        assert logged[key] == fp32[key]
    else:
        assert logged[key] != fp32[key] and logged[key] == pytest.approx(fp32[key], rel=0.02)


def test_the_table_lists_every_logged_metric(evaluated):
    table, logged = evaluated
    rows = {tuple(line.split()) for line in table.splitlines()}
    for key, value in logged.items():
        label, metric = key.removeprefix('metrics/').rsplit('/', 1)
        assert (label, metric, f'{value:.4f}') in rows


def test_training_evaluates_the_icl_tasks_at_each_interval_as_eval_does_after(trained, evaluated):
    _, logged = evaluated
    metrics_file = trained / 'metrics.jsonl'
    keys = [k for k in logged if k.startswith('metrics/python_')]
    assert len(keys) == 6
    for key in keys:
        during_training = losses(metrics_file, key)
        assert sorted(during_training) == [1, 2]
        assert during_training[2] == logged[key], key  # the same weights: the checkpoint of step 2


def test_the_command_line_names_a_missing_checkpoint_in_one_line(tmp_path):
    config = tmp_path / 'eval.yaml'
    config.write_text(yaml.safe_dump({'checkpoint': str(tmp_path / 'gone'), 'eval_loader': {
        'dataset': {'local': str(tmp_path)}}}))
    proc = subprocess.run([sys.executable, str(EVAL), str(config)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f'error: {tmp_path / "gone"} does not exist']
