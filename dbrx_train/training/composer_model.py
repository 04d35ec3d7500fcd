"""The seam between `DbrxLM` and Composer's trainer."""

from __future__ import annotations

import torch
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import ComposerModel

from dbrx_train.model.config import ModelConfig
from dbrx_train.model.dbrx import IGNORE_INDEX, DbrxLM
from dbrx_train.model.flops import train_flops_per_token


class ComposerDbrx(ComposerModel):
    """Trains on `model.loss` (fused LM-head cross-entropy + load balancing), evaluates on logits."""

    def __init__(self, config: ModelConfig, device: str | None = None):
        super().__init__()
        self.model = DbrxLM(config, device=device)
        self.eval_metrics = {'LanguageCrossEntropy': LanguageCrossEntropy(ignore_index=IGNORE_INDEX),
                             'LanguagePerplexity': LanguagePerplexity(ignore_index=IGNORE_INDEX)}

    def forward(self, batch):
        labels = batch.get('labels', batch['input_ids'])
        return self.model(batch['input_ids'], batch.get('attention_mask'), labels=labels)

    def loss(self, outputs, batch):
        # Composer backpropagates 'total' and logs every entry as loss/train/<key>.
        return {'total': outputs.loss, 'lm': outputs.lm_loss.detach(), 'moe_aux': outputs.aux_loss.detach()}

    def eval_forward(self, batch, outputs=None):
        return self.model(batch['input_ids'], batch.get('attention_mask'))

    def get_metrics(self, is_train: bool = False):
        return {} if is_train else self.eval_metrics

    def update_metric(self, batch, outputs, metric) -> None:
        labels = batch.get('labels', batch['input_ids'])
        targets = torch.full_like(labels, IGNORE_INDEX)
        targets[:, :-1] = labels[:, 1:]
        metric.update(outputs, targets)

    def flops_per_batch(self, batch) -> int:
        """Model FLOPs of one training step on `batch` (active parameters only), for MFU."""
        batch_size, seq_len = batch['input_ids'].shape
        return train_flops_per_token(self.model.config, seq_len) * batch_size * seq_len
