"""The seam between `DbrxLM` and Composer's trainer: training, perplexity, llm-foundry's ICL tasks."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from typing import Any

import torch
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import ComposerModel
from torchmetrics import Metric

from dbrx_train.model.config import ModelConfig
from dbrx_train.constants import IGNORE_INDEX, next_token_targets
from dbrx_train.model.dbrx import DbrxLM
from dbrx_train.model.flops import train_flops_per_token
from dbrx_train.model.generation import DEFAULT_STOP_TOKENS
from dbrx_train.tokenizer import build_hf_tokenizer

LM_METRICS = ('LanguageCrossEntropy', 'LanguagePerplexity')  # what a held-out text evaluator reports
# llm-foundry's in-context-learning metrics, by registry name (evaluators name them by class name).
ICL_METRICS = ('lm_accuracy', 'mc_accuracy', 'qa_accuracy', 'lm_expected_calibration_error',
               'mc_expected_calibration_error')
# The transformers `generate` arguments that llm-foundry's generation tasks pass and that
# `DbrxLM.generate` can honour. The cache is always used; llm-foundry's `stopping_criteria`
# objects are replaced by the batch's stop strings.
GENERATE_ARGS = frozenset({'max_new_tokens', 'do_sample', 'temperature', 'top_k', 'top_p', 'eos_token_id',
                           'pad_token_id', 'num_beams', 'num_return_sequences', 'use_cache', 'stopping_criteria'})


class ComposerDbrx(ComposerModel):
    """Trains on `model.loss` (fused LM-head cross-entropy + load balancing), evaluates on logits, and
    answers llm-foundry's ICL batches (`mode` 'icl_task': logits; 'generate': decoded continuations)."""

    def __init__(self, model: ModelConfig | DbrxLM, device: str | None = None, seed: int | None = None,
                 cpu_autocast: bool = False):
        """`model`: the config of a fresh model (built on `device`, initialised from `seed`), or a
        built one (e.g. loaded). `cpu_autocast`: forward passes under bf16 autocast on the CPU, which
        Composer's Trainer does not set up (see `composer_precision`)."""
        super().__init__()
        self.model = model if isinstance(model, DbrxLM) else DbrxLM(model, device=device, seed=seed)
        self.cpu_autocast = cpu_autocast
        self.eval_metrics = {'LanguageCrossEntropy': LanguageCrossEntropy(ignore_index=IGNORE_INDEX),
                             'LanguagePerplexity': LanguagePerplexity(ignore_index=IGNORE_INDEX), **icl_metrics()}

    def _autocast(self):
        return torch.autocast('cpu', dtype=torch.bfloat16, enabled=self.cpu_autocast)

    def forward(self, batch):
        labels = batch.get('labels', batch['input_ids'])
        with self._autocast():
            return self.model(batch['input_ids'], batch.get('attention_mask'), labels=labels,
                              sequence_id=batch.get('sequence_id'))

    def loss(self, outputs, batch):
        # Composer backpropagates 'total' and logs every entry as loss/train/<key>.
        losses = {'total': outputs.loss, 'lm': outputs.lm_loss.detach(), 'moe_aux': outputs.aux_loss.detach()}
        if self.model.config.ffn_config.moe_zloss_weight:
            losses['moe_zloss'] = outputs.z_loss.detach()
        return losses

    def eval_forward(self, batch, outputs=None):
        with self._autocast():
            return self._eval_forward(batch)

    def _eval_forward(self, batch):
        mode = batch.get('mode')
        if mode == 'generate':
            return self._generate_answers(batch)
        if mode == 'icl_task':
            # llm-foundry right-pads every example to the task's full length; no metric reads a
            # position past the longest example of the batch, so none is computed.
            width = int(batch['attention_mask'].sum(dim=1).max())
            return self.model(batch['input_ids'][:, :width])
        return self.model(batch['input_ids'], batch.get('attention_mask'), sequence_id=batch.get('sequence_id'))

    def _generate_answers(self, batch) -> list[str]:
        """Continuations of llm-foundry's left-padded prompts, decoded and cut at the batch's stop
        sequences: the strings its generation metrics compare with the answers."""
        options = generation_options(batch.get('generation_kwargs', {}))
        stop_ids = set(options.get('stop_token_ids', DEFAULT_STOP_TOKENS))
        width = int(batch['attention_mask'].sum(dim=1).max())  # columns of padding alone change nothing
        prompts, mask = batch['input_ids'][:, -width:], batch['attention_mask'][:, -width:]
        with self._root_weights_gathered() as sharded:
            if sharded:  # each decoding step gathers weights from every rank: all ranks take every step
                options['stop_token_ids'] = ()
            generated = self.model.generate(prompts, attention_mask=mask, **options)[:, width:]
        tokenizer = hf_tokenizer()
        answers = []
        for row in generated.tolist():
            end = next((i for i, token in enumerate(row) if token in stop_ids), len(row))
            text = tokenizer.decode(row[:end], skip_special_tokens=True)
            answers.append(cut_at_stop_sequences(text, batch.get('stopping_criteria') or ()))
        return answers

    @contextlib.contextmanager
    def _root_weights_gathered(self):
        """FSDP2 gathers a unit's weights around its forward, but `generate` also uses the embedding
        and the LM head outside it: they stay gathered while it runs. Yields whether it is sharded."""
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(self.model, FSDPModule):
            yield False
            return
        self.model.unshard()
        try:
            yield True
        finally:
            self.model.reshard()

    def get_metrics(self, is_train: bool = False):
        return {} if is_train else self.eval_metrics

    def update_metric(self, batch, outputs, metric):
        if batch.get('mode') == 'generate':  # outputs are strings; labels each example's accepted answers
            return metric.update(batch=batch, outputs=outputs, labels=batch['labels'])
        labels = batch.get('labels', batch['input_ids'])
        targets = next_token_targets(labels)
        if getattr(metric, 'needs_batch', False):  # llm-foundry's ICL metrics
            return metric.update(batch=batch, outputs=outputs, labels=targets[:, : outputs.shape[1]])
        metric.update(outputs, targets)
        return None

    def flops_per_batch(self, batch) -> int:
        """Model FLOPs of one training step on `batch` (active parameters only), for MFU."""
        batch_size, seq_len = batch['input_ids'].shape
        return train_flops_per_token(self.model.config, seq_len) * batch_size * seq_len


def icl_metrics() -> dict[str, Metric]:
    """A fresh instance of each of llm-foundry's ICL metrics, by class name."""
    from llmfoundry.utils.builders import build_metric

    metrics = [build_metric(name, {}) for name in ICL_METRICS]
    return {type(metric).__name__: metric for metric in metrics}


def generation_options(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """`DbrxLM.generate` arguments for the transformers `generate` arguments of an ICL task;
    ValueError for one it cannot honour."""
    unknown = sorted(set(kwargs) - GENERATE_ARGS)
    if unknown:
        raise ValueError(f'{", ".join(unknown)} not supported (DbrxLM.generate honours '
                         f'{", ".join(sorted(GENERATE_ARGS))})')
    if kwargs.get('num_beams', 1) != 1 or kwargs.get('num_return_sequences', 1) != 1:
        raise ValueError('num_beams and num_return_sequences must be 1: no beam search, one answer per prompt')
    options = {name: kwargs[name] for name in ('max_new_tokens', 'top_k', 'top_p', 'pad_token_id') if name in kwargs}
    options['temperature'] = kwargs.get('temperature', 1.0) if kwargs.get('do_sample', False) else 0.0
    if 'eos_token_id' in kwargs:
        eos = kwargs['eos_token_id']
        options['stop_token_ids'] = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    return options


def cut_at_stop_sequences(text: str, stop_sequences) -> str:
    """`text` up to the first occurrence of any of `stop_sequences`."""
    ends = [end for end in (text.find(stop) for stop in stop_sequences) if end >= 0]
    return text[: min(ends)] if ends else text


@functools.lru_cache(maxsize=1)
def hf_tokenizer():
    return build_hf_tokenizer()
