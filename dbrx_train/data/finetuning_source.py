"""llm-foundry's `hf_name` fine-tuning data, converted to MDS beside it on first use.

`hf_name` is a local directory laid out as `datasets.load_dataset(dir)` reads one: a split's records in
`{split}.jsonl` (or `.json`, or `{split}-*.jsonl` shards, or a `{split}/` folder, each also under `data/`),
or a directory written by `save_to_disk`. The records are llm-foundry's: `{"prompt", "response"}`
(mosaicml/dolly_hhrlhf's format: the prompt carries its instruction template and is followed by the response
and `<|endoftext|>`, as llm-foundry's decoder-only format does) or `{"messages": [...]}` chats, rendered
with the tokenizer's chat template.

The converted split is cached in `{hf_name}/.dbrx_train_mds/{split}-{template}-{fingerprint}/`, the
fingerprint covering the source files (names, sizes, modification times) and how they are rendered:
later runs reuse it, and editing the data converts it again. Local rank 0 converts; the others wait.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

from composer.utils import dist

from dbrx_train.chat_template import ChatTemplateName
from dbrx_train.data.finetuning import FinetuningDatasetConfig
from dbrx_train.data.finetuning_to_mds import TRAIN_SPLIT, convert_finetuning_to_mds
from dbrx_train.data.text_to_mds import JSONL_SUFFIXES
from dbrx_train.errors import ConfigError

log = logging.getLogger(__name__)

CACHE_DIR = '.dbrx_train_mds'
RENDERING = 'foundry-1'  # bump when the rendering of records changes: cached conversions are then redone


def split_inputs(source: Path, split: str, key: str) -> list[Path]:
    """The files (or the `datasets` directory) holding `split` of `source`."""
    if (source / 'dataset_dict.json').is_file() or (source / 'state.json').is_file():
        return [source]
    found: list[Path] = []
    for folder in (source, source / 'data'):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            stem = path.name.removesuffix(path.suffix)
            if path.is_file() and path.suffix.lower() in JSONL_SUFFIXES and (
                    stem == split or stem.startswith((f'{split}-', f'{split}_'))):
                found.append(path)
            elif path.is_dir() and path.name == split:
                found.append(path)
    if not found:
        present = sorted(p.name for p in source.iterdir() if not p.name.startswith('.'))
        raise ConfigError(f'{key}.split', f'no {split!r} split in {source} (expected {split}.jsonl, {split}-*.jsonl or '
                                          f'a {split}/ folder; found: {", ".join(present) or "nothing"})')
    return found


def _fingerprint(inputs: list[Path], source: Path, template: ChatTemplateName) -> str:
    files = sorted(f for p in inputs for f in ([p] if p.is_file() else p.rglob('*')) if f.is_file())
    described = [[str(f.relative_to(source)), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    return hashlib.sha256(json.dumps([RENDERING, template, described]).encode()).hexdigest()[:12]


def prepare_hf_name(dataset: FinetuningDatasetConfig, template: ChatTemplateName,
                    key: str = 'train_loader.dataset') -> FinetuningDatasetConfig:
    """`dataset` reading the cached MDS of its `hf_name` split, converting it first if needed."""
    source = Path(dataset.hf_name).expanduser()
    split = dataset.split or TRAIN_SPLIT
    inputs = split_inputs(source, split, key)
    out = source / CACHE_DIR / f'{split}-{template}-{_fingerprint(inputs, source, template)}'
    if dist.get_local_rank() == 0:
        if (out / TRAIN_SPLIT / 'index.json').is_file():
            log.info('%s: reading %s split %r converted earlier, from %s', key, source, split, out)
        else:
            log.info('%s: converting %s split %r to MDS in %s (kept beside the data: later runs reuse it)', key,
                     source, split, out)
            convert_finetuning_to_mds(inputs, out, hf_split=split, overwrite=True, chat_template=template,
                                      prompt_response='concatenated')
    dist.barrier()
    return dataclasses.replace(dataset, hf_name=None, local=str(out), split=TRAIN_SPLIT)
