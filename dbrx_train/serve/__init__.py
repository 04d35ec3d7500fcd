"""An OpenAI-compatible inference server for DBRX models: `python -m dbrx_train.serve`.

FastAPI routes (`app`) on the API's schemas (`protocol`) and error replies (`errors`), in front of
one engine thread that batches every running request into each decoding step (`engine`; it serves
any `ServableModel`); settings in `config`.
"""

from dbrx_train.serve.app import create_app
from dbrx_train.serve.config import ServeConfig
from dbrx_train.serve.engine import Engine, SamplingParams, ServableModel

__all__ = ['Engine', 'SamplingParams', 'ServableModel', 'ServeConfig', 'create_app']
