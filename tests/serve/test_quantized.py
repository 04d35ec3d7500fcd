"""The server on an int8 or int4 model: the openai client gets the quantized model's own greedy
tokens, for requests decoded together; `--dtype` / `--quantize` reach the config, and a bad value is one line."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from dbrx_train.model.quantize import QuantizedLinear, quantize
from dbrx_train.serve import ServeConfig, create_app
from dbrx_train.serve.__main__ import main, parse_args
from dbrx_train.serve.background import serve_in_background


@pytest.mark.parametrize('method', ['int8', 'int4'])
def test_serves_a_quantized_model_to_the_openai_client(tiny_model, encoding, codec, method):
    model = quantize(copy.deepcopy(tiny_model).to(torch.bfloat16), method, group_size=32)
    assert isinstance(model.lm_head, QuantizedLinear) and model.config.quantization == method
    prompts = [f'An {method} model', 'serves several prompts at once', 'x']
    expected = []
    for prompt in prompts:
        ids = codec.encode(prompt)
        out = model.generate(torch.tensor([ids]), max_new_tokens=6, stop_token_ids=())[0, len(ids):]
        expected.append(codec.decode(out.tolist()))
    app = create_app(model, encoding, ServeConfig(model_name=f'tiny-{method}', max_batch_size=4))
    with serve_in_background(app) as url:
        client = openai.OpenAI(base_url=url + '/v1', api_key='unused', max_retries=0)

        def complete(prompt):
            return client.completions.create(model=f'tiny-{method}', prompt=prompt, max_tokens=6, temperature=0,
                                             extra_body={'ignore_eos': True}).choices[0].text

        with ThreadPoolExecutor(len(prompts)) as pool:
            assert list(pool.map(complete, prompts)) == expected


def test_dtype_and_quantize_flags():
    config = parse_args(['--checkpoint', 'x', '--dtype', 'bfloat16', '--quantize', 'int8'])
    assert (config.dtype, config.quantize) == ('bfloat16', 'int8')
    assert parse_args(['--checkpoint', 'x', '--quantize', 'int4']).quantize == 'int4'


@pytest.mark.parametrize('flag,value', [('--quantize', 'int3'), ('--dtype', 'fp8')])
def test_bad_quantize_or_dtype_is_one_line(capsys, flag, value):
    with pytest.raises(SystemExit) as exit_:
        main(['--checkpoint', 'x', flag, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {flag[2:]}: must be one of ") and repr(value) in err and '\n' not in err
