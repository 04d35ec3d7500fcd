"""Saved models, in every format this project reads or writes.

    storage.py    safetensors weight files: atomic directories, header index, streaming, sharding
    native.py     this project's checkpoint (config.yaml + safetensors)
    hf.py         transformers' DbrxForCausalLM directories (names, config, conversion both ways)
    composer.py   the model out of the Composer checkpoints train.py writes
    formats.py    one interface over the three: detect a path's format, its config, its tensors;
                  `load_pretrained`
    export.py     any of them -> a transformers directory with tokenizer (LoRA merged)
"""

from dbrx_train.checkpoints.formats import SavedModel, detect_format, load_pretrained, open_saved
from dbrx_train.checkpoints.native import load_checkpoint, save_checkpoint

__all__ = ['SavedModel', 'detect_format', 'load_checkpoint', 'load_pretrained', 'open_saved', 'save_checkpoint']
