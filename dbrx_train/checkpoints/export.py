"""Export a (fine-tuned) model to a transformers directory, tokenizer and chat template included
(`python -m dbrx_train.export` is its command line).

SOURCE is a Composer save_folder or checkpoint that train.py wrote (LoRA adapters are merged
into the weights), a dbrx_train checkpoint, or a transformers DBRX directory. OUT gets what
`DbrxForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load without remote code:
config.json, generation_config.json (stops on <|endoftext|> and <|im_end|>, pads with <|pad|>),
safetensors shards with their index, and a fast tokenizer (tokenizer.json: cl100k_base plus DBRX's
special tokens at DBRX's ids) whose chat template is plain ChatML or DBRX Instruct's (`chat_template`).

Tensors are streamed: each is read on its own (from a sharded Composer checkpoint, only that
tensor's chunks), merged with its adapter factors, cast and written into the current output
shard, so at most one output shard and one tensor are in memory. A Composer *full* checkpoint
(`*.pt`) is a single pickle and is read whole. OUT is written beside itself and renamed into place.
"""

from __future__ import annotations

import base64
import functools
import itertools
import json
import logging
import tempfile
from pathlib import Path

import torch

from dbrx_train.chat_template import TEMPLATES, ChatTemplateName
from dbrx_train.checkpoints.composer import ComposerTensors
from dbrx_train.checkpoints.formats import NamedTensors, open_saved
from dbrx_train.checkpoints.hf import hf_config, hf_names
from dbrx_train.checkpoints.storage import DEFAULT_MAX_SHARD_BYTES, atomic_directory, write_weights
from dbrx_train.errors import UserError
from dbrx_train.model.config import ModelConfig
from dbrx_train.tokenizer import (
    EOS_TOKEN,
    IM_END_ID,
    IM_END_TOKEN,
    IM_START_TOKEN,
    PAD_ID,
    PAD_TOKEN,
    STOP_TOKEN_IDS,
    get_encoding,
)

log = logging.getLogger(__name__)

DTYPES = {'auto': None, 'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


# ---------------------------------------------------------------- reading sources


def source_tensors(source: str | Path) -> tuple[ModelConfig, NamedTensors]:
    """The model config of `source` and its weights under plain `DbrxLM` names (LoRA merged), one at a time."""
    saved = open_saved(source)
    return saved.config, saved.tensors(desc='exporting')


def state_dict_tensors(config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> NamedTensors:
    """The plain `DbrxLM` tensors of a (LoRA-adapted) model's full state dict, adapters merged."""
    return iter(ComposerTensors('the model in memory', config, weights=state_dict))


# ---------------------------------------------------------------- writing


def export(source: str | Path, out: str | Path, dtype: str = 'auto', max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
           overwrite: bool = False, chat_template: ChatTemplateName = 'chatml',
           model_max_length: int | None = None) -> Path:
    """Writes the transformers directory of `source` to `out` (atomically); `dtype` 'auto' keeps the stored one.
    The tokenizer renders `chat_template`; `model_max_length` defaults to the model's max_seq_len."""
    if dtype not in DTYPES:
        raise UserError(f'dtype must be one of {", ".join(DTYPES)}, got {dtype!r}')
    config, tensors = source_tensors(source)
    return write_transformers_dir(config, tensors, out, dtype, max_shard_bytes, overwrite, chat_template,
                                  model_max_length)


def write_transformers_dir(config: ModelConfig, tensors: NamedTensors, out: str | Path, dtype: str = 'auto',
                           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
                           chat_template: ChatTemplateName = 'chatml', model_max_length: int | None = None) -> Path:
    """Writes `tensors` (plain `DbrxLM` names) as a transformers directory, atomically."""
    from transformers import GenerationConfig  # seconds to import: only when exporting

    names = hf_names(config.n_layers)
    with atomic_directory(out, overwrite) as tmp:
        first_name, first = next(tensors)
        target_dtype = DTYPES[dtype] or first.dtype
        hf_config(config, target_dtype).to_json_file(tmp / 'config.json')
        all_tensors = itertools.chain([(first_name, first)], tensors)
        write_weights(tmp, ((names[n], t.to(target_dtype)) for n, t in all_tensors), max_shard_bytes)
        if config.vocab_size <= IM_END_ID:
            log.warning('no tokenizer written: a vocabulary of %d is too small for DBRX\'s tokens', config.vocab_size)
        else:
            GenerationConfig(eos_token_id=list(STOP_TOKEN_IDS), pad_token_id=PAD_ID).save_pretrained(tmp)
            save_tokenizer(tmp, model_max_length or config.max_seq_len, chat_template)
    return Path(out)


def save_tokenizer(directory: str | Path, model_max_length: int, chat_template: ChatTemplateName = 'chatml') -> None:
    """A transformers fast tokenizer equal to `tokenizer.get_encoding()` (same ids, same special tokens),
    with the chat template `chat_template` (chat_template.py): loads with `AutoTokenizer`, no remote code."""
    from tokenizers import Tokenizer  # as transformers: seconds to import
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()), eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN, pad_token=PAD_TOKEN, additional_special_tokens=[IM_START_TOKEN, IM_END_TOKEN],
        chat_template=TEMPLATES[chat_template], model_max_length=model_max_length,
    )
    tokenizer.save_pretrained(directory)


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """cl100k_base as a `tokenizers` BPE (transformers' tiktoken converter), DBRX's special tokens at DBRX's
    ids. (cl100k_base leaves ids 100256 and 100261-100275 unused: `tokenizers` warns of "holes".)"""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    encoding = get_encoding()
    with tempfile.TemporaryDirectory() as tmp:
        ranks_file = Path(tmp) / 'cl100k_base.tiktoken'  # the converter reads tiktoken's file format
        ranks = sorted(encoding._mergeable_ranks.items(), key=lambda item: item[1])
        ranks_file.write_bytes(b''.join(base64.b64encode(token) + b' %d\n' % rank for token, rank in ranks))
        # The converter's default split pattern is cl100k_base's, written without the possessive
        # quantifiers of tiktoken's copy, which the `tokenizers` regex engine would read differently.
        bpe = TikTokenConverter(vocab_file=str(ranks_file), additional_special_tokens=[]).converted()
    # The converter would number added tokens after the vocabulary; DBRX's have fixed ids.
    spec = json.loads(bpe.to_str())
    spec['model']['vocab'].update(encoding._special_tokens)
    spec['added_tokens'] = [{'id': token_id, 'content': token, 'single_word': False, 'lstrip': False, 'rstrip': False,
                             'normalized': False, 'special': True}
                            for token, token_id in sorted(encoding._special_tokens.items(), key=lambda item: item[1])]
    return json.dumps(spec)
