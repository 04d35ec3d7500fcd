"""Bad evaluation YAMLs and ICL task lists fail with one line naming the key, before anything slow."""

from __future__ import annotations

import pytest
import yaml

from dbrx_train import eval as eval_entry
from dbrx_train import train as train_entry

MC_TASK = {'label': 'mc', 'dataset_uri': 'yamls/eval/tasks/python_mc.jsonl', 'num_fewshot': [0],
           'icl_task_type': 'multiple_choice'}


def one_line_error(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize('change, message', [
    ({'dataset_uri': 'yamls/eval/tasks/gone.jsonl'},
     'icl_tasks[1].dataset_uri: task file not found: yamls/eval/tasks/gone.jsonl'),
    ({'icl_task_type': 'multiple_choise'},
     "icl_tasks[1].icl_task_type: unknown task type 'multiple_choise' (did you mean 'multiple_choice'?); "
     "llm-foundry has 'multiple_choice', 'schema', 'language_modeling', 'generation_task_with_answers'"),
    ({'num_fewshots': [0]}, "icl_tasks[1].num_fewshots: unknown key (did you mean 'num_fewshot'?)"),
    ({'cot_delimiter': 'The answer is '}, 'icl_tasks[1].cot_delimiter: is not an option of multiple_choice tasks'),
    ({'num_fewshot': []}, 'icl_tasks[1].num_fewshot: must be a non-empty list of counts >= 0, got []'),
    ({'metric_names': ['InContextLearningAccuracy']}, "icl_tasks[1].metric_names: unknown metric "
                                                      "'InContextLearningAccuracy'; the model reports "),
    ({'generation_kwargs': {'num_beams': 4}}, 'icl_tasks[1].generation_kwargs: num_beams and num_return_sequences '
                                              'must be 1: no beam search, one answer per prompt'),
    ({'generation_kwargs': {'repetition_penalty': 1.2}}, 'icl_tasks[1].generation_kwargs: repetition_penalty not '
                                                         'supported (DbrxLM.generate honours do_sample, '),
    ({'label': 'first'}, "icl_tasks[1].label: 'first' is used by an earlier task"),
])
def test_a_bad_icl_task_is_one_line_naming_its_key(change, message, capsys):
    tasks = [{**MC_TASK, 'label': 'first'}, {**MC_TASK, **change}]
    argv = ['yamls/eval/dbrx-tiny.yaml', 'checkpoint=no/such/model', f'icl_tasks={tasks}']
    assert one_line_error(eval_entry.main, argv, capsys).startswith(f'error: {message}')


def test_a_task_list_file_is_named_in_its_errors(tmp_path, capsys):
    tasks = tmp_path / 'tasks.yaml'
    tasks.write_text(yaml.safe_dump({'icl_tasks': [MC_TASK, {**MC_TASK, 'label': 'lm', 'icl_task_type': 'lm'}]}))
    error = one_line_error(eval_entry.main, ['yamls/eval/dbrx-tiny.yaml', f'icl_tasks={tasks}'], capsys)
    assert error.startswith(f"error: {tasks}: icl_tasks[1].icl_task_type: unknown task type 'lm'")
    tasks.write_text(yaml.safe_dump({'tasks': [MC_TASK]}))
    error = one_line_error(eval_entry.main, ['yamls/eval/dbrx-tiny.yaml', f'icl_tasks={tasks}'], capsys)
    assert error == f'error: icl_tasks: {tasks} has no icl_tasks list'


def test_an_eval_yaml_needs_something_to_evaluate_and_a_checkpoint_that_exists(tmp_path, capsys):
    config = tmp_path / 'eval.yaml'
    config.write_text(yaml.safe_dump({'checkpoint': str(tmp_path)}))
    assert one_line_error(eval_entry.main, [str(config)], capsys) == (
        'error: eval_loader: nothing to evaluate: give eval_loader (held-out streams), icl_tasks, or both')
    argv = ['yamls/eval/dbrx-tiny.yaml', f'checkpoint={tmp_path / "gone"}']
    assert one_line_error(eval_entry.main, argv, capsys) == f'error: {tmp_path / "gone"} does not exist'
    line = one_line_error(eval_entry.main, ['yamls/eval/dbrx-tiny.yaml', 'quantize=int3'], capsys)
    assert line.startswith("error: quantize: must be one of 'int8', 'int4'") and "'int3'" in line


def test_lengths_beyond_the_models_positions_are_refused_before_its_weights_are_read(tmp_path, capsys):
    from dbrx_train.checkpoints import save_checkpoint
    from dbrx_train.tokenizer import VOCAB_SIZE
    from tests.model.conftest import tiny_dbrx

    save_checkpoint(tiny_dbrx(d_model=32, vocab=VOCAB_SIZE, ffn=16, experts=2, top_k=1), tmp_path / 'model')
    argv = ['yamls/eval/dbrx-tiny.yaml', f'checkpoint={tmp_path / "model"}']
    assert one_line_error(eval_entry.main, [*argv, 'max_seq_len=33'], capsys) == (
        'error: max_seq_len: 33 exceeds the model max_seq_len (32)')
    too_long = [{**MC_TASK, 'max_seq_len': 64}]
    error = one_line_error(eval_entry.main, [*argv, 'max_seq_len=32', 'icl_seq_len=32', f'icl_tasks={too_long}'], capsys)
    assert error == "error: icl_tasks: task 'mc': max_seq_len 64 exceeds the model max_seq_len (32)"


def test_training_checks_its_icl_tasks_before_it_starts(capsys):
    argv = ['yamls/pretrain/dbrx-tiny.yaml', f'icl_tasks={[{**MC_TASK, "icl_task_type": "schemaa"}]}']
    error = one_line_error(train_entry.main, argv, capsys)
    assert error.startswith("error: icl_tasks[0].icl_task_type: unknown task type 'schemaa' (did you mean 'schema'?)")
    argv = ['yamls/pretrain/dbrx-tiny.yaml', f'icl_tasks={[MC_TASK]}', 'icl_seq_len=512']
    assert one_line_error(train_entry.main, argv, capsys) == (
        'error: icl_seq_len: must be in 1..256 (the model max_seq_len), got 512')
