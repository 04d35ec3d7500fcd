"""The DBRX model: config, architecture, MoE backends, losses and generation."""

from dbrx_train.model.config import AttentionConfig, FFNConfig, ModelConfig
from dbrx_train.model.dbrx import DbrxLM, LossOutput
from dbrx_train.model.generation import KVCache, generate

__all__ = ['AttentionConfig', 'DbrxLM', 'FFNConfig', 'KVCache', 'LossOutput', 'ModelConfig', 'generate']
