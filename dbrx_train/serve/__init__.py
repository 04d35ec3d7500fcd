"""An OpenAI-compatible inference server for DBRX models: `python -m dbrx_train.serve`.

FastAPI routes (`app`) in front of one engine thread that batches every running request into
each decoding step (`engine`); settings in `config`.
"""

from dbrx_train.serve.app import create_app
from dbrx_train.serve.config import ServeConfig
from dbrx_train.serve.engine import Engine, SamplingParams

__all__ = ['Engine', 'SamplingParams', 'ServeConfig', 'create_app']
