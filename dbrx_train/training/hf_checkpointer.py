"""`hf_checkpointer`: transformers DBRX directories written during training, under llm-foundry's name and keys.

    callbacks:
      hf_checkpointer:
        save_folder: ./{run_name}/checkpoints   # gets huggingface/ba{batch}/, as llm-foundry's
        save_interval: 1dur                     # also at the end of training
        precision: bfloat16                     # float32, bfloat16 or float16
        overwrite: true                         # replace a directory of the same batch

Each directory is what `python -m dbrx_train.export` writes (`checkpoints/export.py`): config.json,
safetensors, generation config and the tokenizer with the run's chat template, LoRA adapters merged;
`DbrxForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load it. Every rank takes part in
gathering the full weights (FSDP2); rank 0 writes them, atomically. It replaces llm-foundry's callback of
the same name, which needs a transformers model in the trainer.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import create_interval_scheduler, dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from dbrx_train.chat_template import ChatTemplateName
from dbrx_train.checkpoints.export import state_dict_tensors, write_transformers_dir
from dbrx_train.model.quantize import dequantized_config
from dbrx_train.errors import ConfigError
from dbrx_train.uri import is_remote

log = logging.getLogger(__name__)

PRECISIONS = {'float32': 'float32', 'fp32': 'float32', 'bfloat16': 'bfloat16', 'bf16': 'bfloat16',
              'float16': 'float16', 'fp16': 'float16'}


class HFCheckpointer(Callback):
    def __init__(self, save_folder: str, save_interval: str | int, precision: str = 'float32',
                 overwrite: bool = True, chat_template: ChatTemplateName = 'chatml',
                 model_max_length: int | None = None):
        if is_remote(save_folder):
            raise ConfigError('callbacks.hf_checkpointer.save_folder', 'only a local folder is supported here, '
                                                                       f'got {save_folder}')
        if precision not in PRECISIONS:
            raise ConfigError('callbacks.hf_checkpointer.precision',
                              f'must be one of {", ".join(PRECISIONS)}, got {precision!r}')
        self.save_folder = save_folder
        self.dtype = PRECISIONS[precision]
        self.overwrite = overwrite
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self.due = create_interval_scheduler(save_interval)
        self.last_saved_batch: int | None = None

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event in (Event.BATCH_CHECKPOINT, Event.EPOCH_CHECKPOINT, Event.FIT_END) and self.due(state, event):
            batch = int(state.timestamp.batch)
            if batch != self.last_saved_batch:
                self.save(state, batch)
                self.last_saved_batch = batch

    def save(self, state: State, batch: int) -> Path:
        model = state.model.model
        out = Path(self.save_folder.format(run_name=state.run_name)) / 'huggingface' / f'ba{batch}'
        sharded = any(hasattr(p, 'device_mesh') for p in model.parameters())
        if sharded:  # a collective: every rank gathers, rank 0 keeps the full tensors
            weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            weights = {name: t.detach() for name, t in model.state_dict().items()}
        if dist.get_global_rank() == 0:
            with torch.no_grad():
                write_transformers_dir(dequantized_config(model.config), state_dict_tensors(model.config, weights), out,
                                       self.dtype,
                                       overwrite=self.overwrite, chat_template=self.chat_template,
                                       model_max_length=self.model_max_length)
            log.info('hf_checkpointer: wrote %s', out)
        dist.barrier()
        return out
