"""DBRX Instruct's chat template: the text its tokenizer renders, byte for byte, and the same tokens everywhere
(fine-tuning rendering, the server's prompt, the exported tokenizer)."""

from __future__ import annotations

import pytest

from dbrx_train.chat_template import DBRX_INSTRUCT_SYSTEM_PROMPT, TEMPLATES, chat_ids
from dbrx_train.tokenizer import get_encoding

transformers = pytest.importorskip('transformers')

# What DBRX Instruct's tokenizer renders, written out by hand from its published format: a system turn
# (the default prompt unless the chat brings one, trimmed), turns joined by '\n' with none after the last,
# and the generation prompt '\n<|im_start|>assistant\n'.
SYSTEM_TURN = '<|im_start|>system\n{}<|im_end|>\n'
CASES = {
    'no system message': (
        [('user', 'What is DBRX?')],
        SYSTEM_TURN.format(DBRX_INSTRUCT_SYSTEM_PROMPT) + '<|im_start|>user\nWhat is DBRX?<|im_end|>'),
    'a system message': (
        [('system', '  Answer in French. \n'), ('user', 'Bonjour ?')],
        SYSTEM_TURN.format('Answer in French.') + '<|im_start|>user\nBonjour ?<|im_end|>'),
    'several turns': (
        [('user', 'Count to two.'), ('assistant', 'One, two.'), ('user', ' And back? ')],
        SYSTEM_TURN.format(DBRX_INSTRUCT_SYSTEM_PROMPT) + '<|im_start|>user\nCount to two.<|im_end|>\n'
        '<|im_start|>assistant\nOne, two.<|im_end|>\n<|im_start|>user\n And back? <|im_end|>'),
}
GENERATION_PROMPT = '\n<|im_start|>assistant\n'


def test_the_default_system_prompt_is_dbrx_instructs():
    assert DBRX_INSTRUCT_SYSTEM_PROMPT.startswith('You are DBRX, created by Databricks. You were last updated in '
                                                  'December 2023.')
    assert DBRX_INSTRUCT_SYSTEM_PROMPT.endswith("UNLESS THE INFORMATION IS DIRECTLY PERTINENT TO THE USER'S QUERY.")
    assert DBRX_INSTRUCT_SYSTEM_PROMPT.count('\n') == 5 and '\u2014 remember to use ```' in DBRX_INSTRUCT_SYSTEM_PROMPT


@pytest.fixture(scope='module')
def hf_tokenizer(tmp_path_factory):
    from dbrx_train.checkpoints.export import save_tokenizer

    folder = tmp_path_factory.mktemp('instruct_tokenizer')
    save_tokenizer(folder, 4096, 'dbrx_instruct')
    return transformers.AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize('case', CASES)
@pytest.mark.parametrize('generation_prompt', [False, True])
def test_rendering_is_byte_identical_to_dbrx_instructs_template(hf_tokenizer, case, generation_prompt):
    from dbrx_train.data.finetuning import render_chat
    from dbrx_train.serve.text import TextCodec, chat_prompt

    messages, expected = CASES[case]
    expected += GENERATION_PROMPT if generation_prompt else ''
    chat = [{'role': role, 'content': content} for role, content in messages]
    assert hf_tokenizer.chat_template == TEMPLATES['dbrx_instruct']
    assert hf_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt) == expected
    expected_ids = get_encoding().encode(expected, allowed_special='all')
    assert hf_tokenizer.apply_chat_template(chat, add_generation_prompt=generation_prompt) == expected_ids
    if generation_prompt:  # the server's prompt
        assert chat_prompt(TextCodec(get_encoding()), messages, 'dbrx_instruct') == expected_ids
    else:  # fine-tuning renders whole chats
        assert render_chat(messages, 'dbrx_instruct')[0].tolist() == expected_ids


def test_fine_tuning_trains_on_the_responses_of_the_instruct_rendering():
    from dbrx_train.data.finetuning import render_chat

    messages = [('user', 'Hi'), ('assistant', 'Hello!'), ('user', 'Bye'), ('assistant', 'Bye!')]
    ids, turns = render_chat(messages, 'dbrx_instruct')
    text = SYSTEM_TURN.format(DBRX_INSTRUCT_SYSTEM_PROMPT) + '\n'.join(
        f'<|im_start|>{role}\n{content}<|im_end|>' for role, content in messages)
    assert ids.tolist() == get_encoding().encode(text, allowed_special='all')
    encoding = get_encoding()
    assert [encoding.decode(ids[turns == n].tolist()) for n in (1, 2)] == ['Hello!<|im_end|>', 'Bye!<|im_end|>']


def test_plain_chatml_renders_no_system_turn():
    ids, _ = chat_ids([('user', 'Hi')], 'chatml', get_encoding().encode_ordinary, add_generation_prompt=True)
    assert get_encoding().decode(ids) == '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n'
