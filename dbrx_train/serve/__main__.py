"""`python -m dbrx_train.serve --checkpoint DIR [--host H] [--port N]`, or `--config serve.yaml
[key=value ...]`: loads the model and serves it with uvicorn until interrupted."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import torch
import uvicorn

from dbrx_train.checkpoints import load_pretrained
from dbrx_train.data.shared_memory import remove_stale_shared_memory
from dbrx_train.errors import ConfigError, cli_entry
from dbrx_train.serve.app import create_app
from dbrx_train.serve.config import API_KEY_ENV, ServeConfig
from dbrx_train.tokenizer import get_encoding
from dbrx_train.typed_config import load_yaml, parse

log = logging.getLogger('dbrx_train.serve')


def parse_args(argv: list[str] | None = None) -> ServeConfig:
    parser = argparse.ArgumentParser(prog='python -m dbrx_train.serve', description=__doc__)
    parser.add_argument('--config', help='a YAML of ServeConfig keys (dbrx_train/serve/config.py)')
    parser.add_argument('--checkpoint', help='a composer checkpoint or a transformers DBRX directory')
    parser.add_argument('--host', help='address to bind (default 127.0.0.1: this machine only)')
    parser.add_argument('--port', type=int)
    parser.add_argument('--dtype', help='float32, bfloat16 or float16 (default: as stored)')
    parser.add_argument('--quantize', help='int8 or int4: weight-only int8, or int4 in groups of quantize_group_size (128) (default: none)')
    parser.add_argument('--compile', action='store_true', default=None,
                        help='torch.compile the decoding step (the first requests wait for it)')
    parser.add_argument('--api-key', help=f'require `Authorization: Bearer KEY` (or set ${API_KEY_ENV})')
    parser.add_argument('overrides', nargs='*', metavar='key=value', help='overrides of --config keys')
    args = parser.parse_args(argv)
    if args.overrides and not args.config:
        raise ConfigError('', 'key=value overrides need --config')
    data = load_yaml(args.config, args.overrides) if args.config else {}
    flags = {'checkpoint': args.checkpoint, 'host': args.host, 'port': args.port, 'api_key': args.api_key,
             'dtype': args.dtype, 'quantize': args.quantize, 'compile': args.compile}
    data.update({key: value for key, value in flags.items() if value is not None})
    if data.get('api_key') is None and os.environ.get(API_KEY_ENV):
        data['api_key'] = os.environ[API_KEY_ENV]
    config = parse(ServeConfig, data)
    if config.checkpoint is None:
        raise ConfigError('checkpoint', 'required: pass --checkpoint DIR or set checkpoint in the YAML')
    return config


def load_model(config: ServeConfig):
    device = config.device
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    return load_pretrained(config.checkpoint, device=device, dtype=config.dtype and getattr(torch, config.dtype),
                           quantize=config.quantize, group_size=config.quantize_group_size)


@cli_entry
def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s:     %(message)s')  # as uvicorn's lines
    if config.api_key is None and config.host not in ('127.0.0.1', 'localhost', '::1'):
        log.warning('serving on %s without an API key: anyone who can reach it can use it', config.host)
    remove_stale_shared_memory()  # a long-lived process: what killed runs left would hold its descriptors
    # Loaded on a thread that then ends, so that the engine thread's OpenMP team is the process's
    # only one: with a second (idle) team libgomp sees more threads than cores and stops spin-waiting
    # between kernels, which halves CPU decoding speed (measured with bench/bench_serve.py).
    with ThreadPoolExecutor(1, thread_name_prefix='load') as loader:
        model = loader.submit(load_model, config).result()
    app = create_app(model, get_encoding(), config)
    log.info('serving %s (%s, %s%s) on http://%s:%d; API key %s', config.checkpoint, model.wte.weight.device,
             model.wte.weight.dtype, f', {config.quantize} weights' if config.quantize else '', config.host,
             config.port, 'required' if config.api_key else 'off')
    uvicorn.run(app, host=config.host, port=config.port, log_level='info')


if __name__ == '__main__':
    sys.exit(main())
