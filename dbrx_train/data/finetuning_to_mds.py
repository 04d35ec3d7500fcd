"""Fine-tuning examples (JSONL or a `datasets` directory) to MDS shards the `finetuning` loader reads.

Each record is one example, in either format:

    {"prompt": "...", "response": "..."}                       a user turn and the assistant's answer
    {"messages": [{"role": "system", "content": "..."},        a ChatML chat: an optional system
                  {"role": "user", "content": "..."},           message first, then user and assistant
                  {"role": "assistant", "content": "..."}]}     turns, ending with the assistant

A record that does not fit (not JSON, missing fields, unknown roles, an empty response, ...) is a
bad line, named by file and line (or row): `on_bad_line='error'` stops at the first one,
`'skip'` reports each one and leaves it out. Examples are rendered and tokenized whole
(`finetuning.render_chat`); truncation and packing are the loader's, chosen in the YAML.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from dbrx_train.chat_template import ChatTemplateName
from dbrx_train.data.finetuning import MDS_COLUMNS, ROLES, render_chat
from dbrx_train.data.text_to_mds import (
    JSONL_SUFFIXES,
    PREP_INFO_FILE,
    BadRecord,
    check_output_dir,
    expand_inputs,
    staged_output,
)
from dbrx_train.errors import UserError
from dbrx_train.tokenizer import EOS_ID, get_encoding

log = logging.getLogger(__name__)

OnBadLine = Literal['error', 'skip']
TRAIN_SPLIT, EVAL_SPLIT = 'train', 'eval'


class PromptResponse(list):
    """The chat of a {"prompt", "response"} record: `[('user', prompt), ('assistant', response)]`."""


# How {"prompt", "response"} records are rendered: 'chat' as a user turn and the assistant's answer in the
# chat template; 'concatenated' as llm-foundry's decoder-only format does (the prompt, the response, then
# <|endoftext|>; the prompt carries its own instruction format, as mosaicml/dolly_hhrlhf's).
PromptResponseFormat = Literal['chat', 'concatenated']


def render_example(chat: list[tuple[str, str]], template: ChatTemplateName = 'chatml',
                   prompt_response: PromptResponseFormat = 'chat') -> tuple[np.ndarray, np.ndarray]:
    """Token ids and assistant turns of one example (`iter_examples`' chats)."""
    if prompt_response == 'concatenated' and isinstance(chat, PromptResponse):
        encode = get_encoding().encode_ordinary
        prompt, response = encode(chat[0][1]), [*encode(chat[1][1]), EOS_ID]
        return (np.array(prompt + response, dtype=np.int32),
                np.array([0] * len(prompt) + [1] * len(response), dtype=np.int16))
    return render_chat(chat, template)


# ---------------------------------------------------------------- records


def parse_record(record: Any) -> list[tuple[str, str]]:
    """The chat `[(role, content), ...]` of one record, or `BadRecord`."""
    if not isinstance(record, dict):
        raise BadRecord(f'expected a JSON object, got {type(record).__name__}')
    has_chat, has_pair = 'messages' in record, 'prompt' in record or 'response' in record
    if has_chat and has_pair:
        raise BadRecord('has both "messages" and "prompt"/"response": use one format per record')
    if has_chat:
        return _parse_messages(record['messages'])
    if not has_pair:
        raise BadRecord(f'needs "messages" (a chat) or "prompt" and "response"; has {sorted(record) or "no fields"}')
    for name in ('prompt', 'response'):
        if name not in record:
            raise BadRecord(f'missing "{name}"')
        if not isinstance(record[name], str):
            raise BadRecord(f'"{name}" must be a string, got {type(record[name]).__name__}')
    if not record['response'].strip():
        raise BadRecord('empty response')
    return [('user', record['prompt']), ('assistant', record['response'])]


def _parse_messages(messages: Any) -> list[tuple[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise BadRecord('"messages" must be a non-empty list')
    chat = []
    for i, message in enumerate(messages):
        where = f'messages[{i}]'
        if not isinstance(message, dict) or 'role' not in message or 'content' not in message:
            raise BadRecord(f'{where} must be an object with "role" and "content"')
        role, content = message['role'], message['content']
        if role not in ROLES:
            raise BadRecord(f'{where}.role is {role!r}; expected one of {", ".join(ROLES)}')
        if not isinstance(content, str):
            raise BadRecord(f'{where}.content must be a string, got {type(content).__name__}')
        if role == 'system' and i > 0:
            raise BadRecord(f'{where}: a system message may only come first')
        if role == 'assistant' and not content.strip():
            raise BadRecord(f'{where}: empty assistant response')
        chat.append((role, content))
    if chat[-1][0] != 'assistant':
        raise BadRecord(f'the last message is from {chat[-1][0]!r}: a chat must end with an assistant response')
    return chat


# ---------------------------------------------------------------- reading


@dataclass
class BadLines:
    """Where the bad records were and why, in input order."""

    policy: OnBadLine
    found: list[tuple[str, str]] = field(default_factory=list)  # (where, problem)

    def report(self, where: str, problem: str) -> None:
        if self.policy == 'error':
            raise UserError(f'{where}: {problem} (pass --on-bad-line skip to leave such lines out)')
        self.found.append((where, problem))
        log.warning('%s: %s; skipped', where, problem)


def iter_examples(inputs: Sequence[str | Path], bad: BadLines, split: str = 'train') -> Iterator[list[tuple[str, str]]]:
    """The chats of every good record of `inputs`, in order; bad ones go to `bad`. A prompt/response
    record is the chat `[('user', prompt), ('assistant', response)]` with `prompt_response` set.

    An input is a JSONL file (`.jsonl`/`.json`, one record per line), a directory saved by `datasets`'
    `save_to_disk` (`split` picks from a DatasetDict), or a directory of JSONL files (sorted).
    """
    for path, saved_dataset in expand_inputs(inputs, JSONL_SUFFIXES):
        if saved_dataset:
            records = _hf_records(path, split)
        elif path.suffix.lower() in JSONL_SUFFIXES:
            records = _jsonl_records(path)
        else:
            raise UserError(f'{path}: expected a .jsonl file or a datasets directory')
        for where, record in records:
            try:
                if isinstance(record, BadRecord):
                    raise record
                yield PromptResponse(parse_record(record)) if 'messages' not in record else parse_record(record)
            except BadRecord as e:
                bad.report(where, str(e))


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record or the BadRecord that reading it raised) per non-blank line."""
    with open(path, encoding='utf-8') as f:
        try:
            for line_number, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        record = BadRecord(f'not valid JSON ({e.msg})')
                    yield f'{path}:{line_number}', record
        except UnicodeDecodeError as e:
            raise UserError(f'{path}: not UTF-8 text (byte {e.start}: {e.reason})') from None


def _hf_records(path: Path, split: str) -> Iterator[tuple[str, Any]]:
    import datasets

    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise UserError(f'{path}: no split {split!r} (splits: {", ".join(dataset)}); choose one with --hf-split')
        dataset = dataset[split]
    for row, record in enumerate(dataset):
        # Columns a row does not use come back as None (datasets unifies the schema): drop them.
        yield f'{path}: row {row}', {k: v for k, v in record.items() if v is not None}


# ---------------------------------------------------------------- writing


@dataclass(frozen=True)
class PrepStats:
    examples: dict[str, int]  # per split
    tokens: dict[str, int]
    longest: int  # tokens in the longest example
    bad_lines: int


def convert_finetuning_to_mds(
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    eval_fraction: float = 0.0,
    seed: int = 17,
    on_bad_line: OnBadLine = 'error',
    hf_split: str = 'train',
    overwrite: bool = False,
    compression: str | None = 'zstd',
    chat_template: ChatTemplateName = 'chatml',
    prompt_response: PromptResponseFormat = 'chat',
) -> PrepStats:
    """Writes `out/train` (and `out/eval`, a random `eval_fraction` of the examples) plus prep_info.json.
    Chats are rendered with `chat_template`; prompt/response records as `prompt_response` says."""
    from streaming import MDSWriter

    if not 0 <= eval_fraction < 1:
        raise UserError(f'eval fraction must be in [0, 1), got {eval_fraction}')
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    splits = [TRAIN_SPLIT, EVAL_SPLIT] if eval_fraction else [TRAIN_SPLIT]
    bad = BadLines(on_bad_line)
    chooser = random.Random(seed)
    examples = dict.fromkeys(splits, 0)
    tokens = dict.fromkeys(splits, 0)
    longest = 0
    with staged_output(out) as tmp:
        writers = {s: MDSWriter(out=str(tmp / s), columns=MDS_COLUMNS, compression=compression) for s in splits}
        for chat in tqdm(iter_examples(inputs, bad, hf_split), desc='tokenizing', unit='example', disable=None):
            split = EVAL_SPLIT if eval_fraction and chooser.random() < eval_fraction else TRAIN_SPLIT
            input_ids, assistant_turn = render_example(chat, chat_template, prompt_response)
            writers[split].write({'input_ids': input_ids, 'assistant_turn': assistant_turn})
            examples[split] += 1
            tokens[split] += len(input_ids)
            longest = max(longest, len(input_ids))
        empty = [s for s in splits if not examples[s]]
        if empty:
            what = f'{sum(examples.values())} good examples' + (f' ({len(bad.found)} bad lines skipped)' if bad.found
                                                                 else '')
            raise UserError(f'the {empty[0]} split would be empty: the input has {what}')
        for writer in writers.values():
            writer.finish()
        stats = PrepStats(examples, tokens, longest, len(bad.found))
        info = {**asdict(stats), 'inputs': [str(p) for p in inputs], 'eval_fraction': eval_fraction, 'seed': seed,
                'chat_template': chat_template, 'prompt_response': prompt_response,
                'bad_line_list': [{'where': w, 'problem': p} for w, p in bad.found]}
        (tmp / PREP_INFO_FILE).write_text(json.dumps(info, indent=2) + '\n')
    return stats
