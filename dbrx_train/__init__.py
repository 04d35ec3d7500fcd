"""dbrx_train: pretrain, fine-tune, evaluate and serve DBRX-style fine-grained MoE LLMs.

Public names are imported on first use, so `import dbrx_train` stays cheap (no torch,
Composer until something needs them).
"""

import importlib

# public name -> the module that defines it
_EXPORTS = {
    'DbrxLM': 'dbrx_train.model.dbrx',
    'ModelConfig': 'dbrx_train.model.config',
    'load_pretrained': 'dbrx_train.checkpoints',
    'load_checkpoint': 'dbrx_train.checkpoints',
    'save_checkpoint': 'dbrx_train.checkpoints',
    'load_model_config': 'dbrx_train.info',
    'parameter_counts': 'dbrx_train.model.flops',
    'train_flops_per_token': 'dbrx_train.model.flops',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
