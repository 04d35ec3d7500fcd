"""What training/ and evaluation/ both build from their YAMLs, below both of them: llm-foundry's
registry entries (with this project's own added), the device, and the Composer loggers.

training/ uses evaluation/ (its ICL evaluators run during training); evaluation/ uses neither
training/ nor its trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import torch

from dbrx_train.errors import ConfigError
from dbrx_train.metrics_file import MetricsFileLogger

OUR_LOGGERS = {'metrics_file': MetricsFileLogger}


def register_ours(callbacks: Mapping[str, type] = {}, replacing: Mapping[str, type] = {},
                  optimizers: Mapping[str, type] = {}) -> None:
    """Adds this project's loggers, and `callbacks`, to llm-foundry's registries (once); `replacing`:
    callbacks, and `optimizers` optimizers, under names llm-foundry uses, in place of its own."""
    from llmfoundry import registry  # seconds to import, and it warns on stderr: only when building

    for name, cls in callbacks.items():
        if name not in registry.callbacks:
            registry.callbacks.register(name, func=cls)
    for name, cls in replacing.items():
        registry.callbacks.register(name, func=cls)
    for name, cls in optimizers.items():
        registry.optimizers.register(name, func=cls)
    for name, cls in OUR_LOGGERS.items():
        if name not in registry.loggers:
            registry.loggers.register(name, func=cls)


def build_from_registry(kind: str, name: str, kwargs: dict, build: Callable):
    """`build(name, kwargs)`, with any failure as one `ConfigError` naming `kind.name`."""
    try:
        return build(name, dict(kwargs))
    except Exception as e:  # the registries raise a variety of types for an unknown name or bad kwargs
        raise ConfigError(f'{kind}.{name}', f'{type(e).__name__}: {str(e).splitlines()[0]}') from None


def resolve_device(device: Literal['auto', 'cpu', 'gpu']) -> str:
    """Composer's device name for a YAML's `device`: 'auto' is 'gpu' where CUDA is available."""
    if device == 'auto':
        return 'gpu' if torch.cuda.is_available() else 'cpu'
    if device == 'gpu' and not torch.cuda.is_available():
        raise ConfigError('device', "'gpu' was asked for but CUDA is not available")
    return device
