"""llm-foundry's eval YAML schema (`models:` list, `icl_tasks`, `eval_gauntlet`) run by eval.py's `evaluate`,
the aggregate computed by llm-foundry's own EvalGauntlet callback from small task files written here."""

from __future__ import annotations

import json

import pytest

from dbrx_train.errors import ConfigError
from dbrx_train.typed_config import parse

COLOURS = ['red', 'green', 'blue', 'white']
MC_TASKS = {  # {"query", "choices", "gold"}: llm-foundry's multiple-choice format
    'colours': [{'query': f'The colour of {thing} is', 'choices': COLOURS, 'gold': gold}
                for thing, gold in (('grass', 1), ('snow', 3), ('the sky', 2), ('blood', 0), ('milk', 3))],
    'yes_no': [{'query': f'Is {n} even?', 'choices': ['yes', 'no'], 'gold': n % 2} for n in range(6)],
}
GAUNTLET = {
    'weighting': 'EQUAL', 'subtract_random_baseline': True, 'rescale_accuracy': True,
    'categories': [
        {'name': 'knowledge', 'benchmarks': [{'name': 'colours', 'num_fewshot': 0, 'random_baseline': 0.25},
                                             {'name': 'yes_no', 'num_fewshot': 1, 'random_baseline': 0.5}]},
        {'name': 'logic', 'benchmarks': [{'name': 'yes_no', 'num_fewshot': 0, 'random_baseline': 0.5}]},
    ],
}


def foundry_eval_yaml(model_dir, folder) -> dict:
    tasks = []
    for label, examples in MC_TASKS.items():
        path = folder / f'{label}.jsonl'
        path.write_text(''.join(json.dumps(e) + '\n' for e in examples))
        tasks.append({'label': label, 'dataset_uri': str(path), 'icl_task_type': 'multiple_choice',
                      'num_fewshot': [0, 1], 'continuation_delimiter': ' '})
    return {'max_seq_len': 128, 'seed': 17, 'precision': 'fp32', 'device_eval_batch_size': 4,
            'models': [{'model_name': 'tiny-dbrx', 'model': {'name': 'hf_causal_lm', 'pretrained_model_name_or_path':
                                                             str(model_dir), 'pretrained': True, 'init_device': 'cpu'},
                        'tokenizer': {'name': 'databricks/dbrx-instruct', 'kwargs': {'model_max_length': 128}}}],
            'icl_tasks': tasks, 'eval_gauntlet': GAUNTLET, 'fsdp_config': {'sharding_strategy': 'FULL_SHARD'},
            'progress_bar': False}


def test_the_gauntlet_aggregates_the_tasks_accuracies_as_llm_foundry_defines(tiny_hf_dbrx, tmp_path):
    from dbrx_train.evaluation.config import EvalConfig
    from dbrx_train.evaluation.runner import evaluate

    cfg = parse(EvalConfig, foundry_eval_yaml(tiny_hf_dbrx, tmp_path))
    assert cfg.checkpoint == str(tiny_hf_dbrx) and cfg.run_name == 'tiny-dbrx'
    metrics = evaluate(cfg)

    def rescaled(task: str, shots: int, baseline: float) -> float:
        accuracy = metrics[f'metrics/{task}/{shots}-shot/InContextLearningMultipleChoiceAccuracy']
        return (accuracy - baseline) / (1 - baseline)

    knowledge = (rescaled('colours', 0, 0.25) + rescaled('yes_no', 1, 0.5)) / 2
    logic = rescaled('yes_no', 0, 0.5)
    assert metrics['icl/metrics/eval_gauntlet/knowledge'] == pytest.approx(knowledge)
    assert metrics['icl/metrics/eval_gauntlet/logic'] == pytest.approx(logic)
    assert metrics['icl/metrics/eval_gauntlet/default_average'] == pytest.approx((knowledge + logic) / 2)


@pytest.mark.parametrize('change, key, problem', [
    (lambda d: d['eval_gauntlet']['categories'][1]['benchmarks'][0].update(num_fewshot=5),
     'eval_gauntlet.categories[1].benchmarks[0]', 'yes_no/5-shot is not among icl_tasks'),
    (lambda d: d['models'].append(d['models'][0]), 'models', 'one model'),
    (lambda d: d['models'][0]['model'].update(pretrained_model_name_or_path='databricks/dbrx-instruct'),
     'models[0].model.pretrained_model_name_or_path', 'hub name'),
    (lambda d: d['models'][0]['tokenizer'].update(name='gpt2'), 'models[0].tokenizer.name', 'not a DBRX tokenizer'),
    (lambda d: d['eval_gauntlet'].update(weighting='SAMPLE_SZ'), 'eval_gauntlet.weighting', "must be one of 'EQUAL'"),
])
def test_eval_yaml_errors_name_the_key(tiny_hf_dbrx, tmp_path, change, key, problem):
    from dbrx_train.evaluation.config import EvalConfig

    data = foundry_eval_yaml(tiny_hf_dbrx, tmp_path)
    change(data)
    with pytest.raises(ConfigError) as error:
        parse(EvalConfig, data)
    assert error.value.key == key and problem in error.value.problem
