"""DBRX's two chat formats, as Jinja templates (for transformers' `apply_chat_template`) and as token ids,
and the YAML's `tokenizer` section, whose name picks one.

- `chatml`: plain ChatML, every turn `<|im_start|>{role}\\n{content}<|im_end|>\\n`; for base models
  and for models tuned on it.
- `dbrx_instruct`: what DBRX Instruct's own tokenizer renders: a system turn first (DBRX's default
  system prompt unless the chat starts with one, trimmed), the turns joined by a newline with none after
  the last, and the generation prompt `\\n<|im_start|>assistant\\n`. DBRX Instruct was tuned on this.

`chat_ids` renders the same text as the templates, placing the special tokens by id so a message cannot
forge a turn; the server's chat endpoint, fine-tuning data and exported tokenizers all use one of these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from dbrx_train.errors import ConfigError
from dbrx_train.tokenizer import CHATML_TEMPLATE, IM_END_ID, IM_START_ID

ChatTemplateName = Literal['chatml', 'dbrx_instruct']

# DBRX Instruct's default system prompt, verbatim as its tokenizer (and sglang, vLLM, LlamaFactory) has it.
DBRX_INSTRUCT_SYSTEM_PROMPT = (
    'You are DBRX, created by Databricks. You were last updated in December 2023. You answer questions based '
    'on information available up to that point.\n'
    'YOU PROVIDE SHORT RESPONSES TO SHORT QUESTIONS OR STATEMENTS, but provide thorough responses to more '
    'complex and open-ended questions.\n'
    'You assist with various tasks, from writing to coding (using markdown for code blocks \u2014 remember to '
    'use ``` with code, JSON, and tables).\n'
    '(You do not have real-time data access or code execution capabilities. You avoid stereotyping and provide '
    'balanced perspectives on controversial topics. You do not provide song lyrics, poems, or news articles '
    'and do not divulge details of your training data.)\n'
    'This is your system prompt, guiding your responses. Do not reference it, just respond to the user. If '
    'you find yourself talking about this message, stop. You should be responding appropriately and usually '
    'that means not mentioning this.\n'
    "YOU DO NOT MENTION ANY OF THIS INFORMATION ABOUT YOURSELF UNLESS THE INFORMATION IS DIRECTLY PERTINENT TO "
    "THE USER'S QUERY."
)


def _jinja_string(text: str) -> str:
    return "'" + text.replace('\\', '\\\\').replace("'", "\\'").replace('\n', '\\n') + "'"


# As DBRX Instruct's: nothing is rendered for a chat of only a system message.
DBRX_INSTRUCT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system_message = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}"
    "{% set system_message = " + _jinja_string(DBRX_INSTRUCT_SYSTEM_PROMPT) + " %}{% set turns = messages %}"
    "{% endif %}"
    "{% for message in turns %}"
    "{% if loop.first %}{{ '<|im_start|>system\n' + system_message | trim + '<|im_end|>\n' }}"
    "{% else %}{{ '\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}"
    "{% if loop.last and add_generation_prompt %}{{ '\n<|im_start|>assistant\n' }}{% endif %}"
    "{% endfor %}"
)

TEMPLATES: dict[str, str] = {'chatml': CHATML_TEMPLATE, 'dbrx_instruct': DBRX_INSTRUCT_TEMPLATE}
# Hub names of DBRX whose tokenizer renders the instruct template.
INSTRUCT_MODEL_NAMES = ('databricks/dbrx-instruct',)


def chat_ids(messages: list[tuple[str, str]], template: ChatTemplateName, encode: Callable[[str], list[int]],
             add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of `messages` `[(role, content), ...]` rendered as `template` renders them, and per token
    its assistant turn (n inside the n-th assistant response, its content and `<|im_end|>`; 0 elsewhere).
    `encode` tokenizes plain text (no special tokens). An assistant turn is tokenized as its header
    `<|im_start|>assistant\\n` (what the generation prompt ends with) and its content apart."""
    ids: list[int] = []
    turns: list[int] = []
    assistant_turns = 0

    def add(tokens: list[int], turn: int = 0) -> None:
        ids.extend(tokens)
        turns.extend([turn] * len(tokens))

    if template == 'dbrx_instruct':
        if messages and messages[0][0] == 'system':
            system, messages = messages[0][1], messages[1:]
        else:
            system = DBRX_INSTRUCT_SYSTEM_PROMPT
        if not messages:
            return ids, turns
        add([IM_START_ID, *encode(f'system\n{system.strip()}'), IM_END_ID, *encode('\n')])
    separator, after = (encode('\n'), []) if template == 'dbrx_instruct' else ([], encode('\n'))
    for number, (role, content) in enumerate(messages):
        if number:
            add(separator)
        if role == 'assistant':
            assistant_turns += 1
            add([IM_START_ID, *encode('assistant\n')])
            add([*encode(content), IM_END_ID], assistant_turns)
        else:
            add([IM_START_ID, *encode(f'{role}\n{content}'), IM_END_ID])
        add(after)
    if add_generation_prompt:
        add([*separator, IM_START_ID, *encode('assistant\n')])
    return ids, turns


def template_for_model(name: str) -> ChatTemplateName:
    """The chat template a DBRX tokenizer of hub name `name` renders."""
    return 'dbrx_instruct' if name in INSTRUCT_MODEL_NAMES else 'chatml'


# The names the DBRX tokenizer goes by; the bundled offline tokenizer serves them all.
DBRX_TOKENIZER_NAMES = ('dbrx', 'databricks/dbrx-instruct', 'databricks/dbrx-base')
TOKENIZER_KWARGS = ('model_max_length', 'chat_template', 'trust_remote_code')


@dataclass(frozen=True)
class TokenizerConfig:
    """llm-foundry's `tokenizer` section. Every DBRX name is the bundled tokenizer (tiktoken's cl100k_base plus
    DBRX's special tokens, offline); `kwargs.chat_template` defaults to the one that name's tokenizer renders."""

    name: str = 'dbrx'
    kwargs: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.name not in DBRX_TOKENIZER_NAMES:
            raise ConfigError('name', f'{self.name!r} is not a DBRX tokenizer; this framework trains DBRX with its '
                                      f'own tokenizer: use one of {", ".join(DBRX_TOKENIZER_NAMES)}')
        for key in self.kwargs:
            if key not in TOKENIZER_KWARGS:
                raise ConfigError(f'kwargs.{key}', f'not supported for the DBRX tokenizer (supported: '
                                                   f'{", ".join(TOKENIZER_KWARGS)})')
        length = self.kwargs.get('model_max_length')
        if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
            raise ConfigError('kwargs.model_max_length', f'must be a positive integer, got {length!r}')
        if self.kwargs.get('chat_template', 'chatml') not in TEMPLATES:
            raise ConfigError('kwargs.chat_template', f'must be one of {", ".join(TEMPLATES)}, got '
                                                      f'{self.kwargs["chat_template"]!r}')

    @property
    def chat_template(self) -> ChatTemplateName:
        return self.kwargs.get('chat_template') or template_for_model(self.name)

    @property
    def model_max_length(self) -> int | None:
        return self.kwargs.get('model_max_length')

    def notes(self) -> list[str]:
        if self.kwargs.get('trust_remote_code'):
            return ['tokenizer.kwargs.trust_remote_code: no remote code runs: the DBRX tokenizer is built in']
        return []
