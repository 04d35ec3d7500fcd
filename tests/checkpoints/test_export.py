"""Export to a transformers directory: the fast tokenizer with the chat template, weights, dtype, shards."""

import json

import pytest
import torch

transformers = pytest.importorskip('transformers')

from dbrx_train.checkpoints import save_checkpoint  # noqa: E402
from dbrx_train.data.finetuning import render_chat  # noqa: E402
from dbrx_train.checkpoints.export import save_tokenizer  # noqa: E402
from dbrx_train.export import main  # noqa: E402
from dbrx_train.model.config import AttentionConfig, FFNConfig, ModelConfig  # noqa: E402
from dbrx_train.model.dbrx import DbrxLM  # noqa: E402
from dbrx_train.tokenizer import EOS_ID, IM_END_ID, IM_START_ID, PAD_ID, get_encoding  # noqa: E402

TEXTS = [
    'Hello world!  \n\n  Tabs\tand   spaces, numbers 1234567 and 3.14159.',
    'Unicode: naïve café, 中文字符, emoji 🙂, Ελληνικά.',
    'def f(x):\n    return {"a": [x, x ** 2]}  # code\r\n',
    'Specials as text: <|im_start|>user\nHi<|im_end|>\n<|endoftext|><|pad|>',
    "'s 're 've 'll 'd I'M   trailing   ",
]


@pytest.fixture(scope='module')
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp('tokenizer')
    save_tokenizer(out, model_max_length=4096)
    return out


def test_the_exported_tokenizer_loads_without_remote_code_and_equals_tiktoken(tokenizer_dir):
    assert 'auto_map' not in json.loads((tokenizer_dir / 'tokenizer_config.json').read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    assert isinstance(tokenizer, transformers.PreTrainedTokenizerFast)
    encoding = get_encoding()
    for text in TEXTS:
        assert tokenizer(text)['input_ids'] == encoding.encode(text, allowed_special='all'), text
        assert tokenizer.decode(encoding.encode(text, allowed_special='all')) == text
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (EOS_ID, PAD_ID)
    assert tokenizer.convert_tokens_to_ids(['<|im_start|>', '<|im_end|>']) == [IM_START_ID, IM_END_ID]
    assert tokenizer.model_max_length == 4096


def test_the_chat_template_gives_the_tokens_fine_tuning_trained_on(tokenizer_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    chat = [('system', 'Be brief.'), ('user', 'Hi!\n\nHow are you?'), ('assistant', 'Fine, thanks.'), ('user', 'Good.')]
    messages = [{'role': r, 'content': c} for r, c in chat]
    assert tokenizer.apply_chat_template(messages) == render_chat(chat)[0].tolist()
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    header = render_chat([('assistant', 'x')])[0].tolist()[:-3]  # <|im_start|>assistant\n, before 'x<|im_end|>\n'
    assert prompt == render_chat(chat)[0].tolist() + header


def test_export_of_a_checkpoint_in_bfloat16_and_shards(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=100352, init_std=0.1,
                         attn_config=AttentionConfig(kv_n_heads=2),
                         ffn_config=FFNConfig(ffn_hidden_size=16, moe_num_experts=4, moe_top_k=2))
    model = DbrxLM(config).eval()
    save_checkpoint(model, tmp_path / 'ours')
    main([str(tmp_path / 'ours'), str(tmp_path / 'hf'), '--dtype', 'bfloat16', '--max-shard-size', '4MB'])

    out = tmp_path / 'hf'
    index = json.loads((out / 'model.safetensors.index.json').read_text())
    assert len(set(index['weight_map'].values())) > 1
    theirs, info = transformers.DbrxForCausalLM.from_pretrained(out, torch_dtype='auto', output_loading_info=True)
    assert info['missing_keys'] == [] and info['unexpected_keys'] == []
    assert theirs.dtype == torch.bfloat16 and json.loads((out / 'config.json').read_text())['torch_dtype'] == 'bfloat16'
    assert torch.equal(theirs.transformer.blocks[1].ffn.experts.mlp.w2, model.blocks[1].ffn.experts.w2.bfloat16())
    generation = json.loads((out / 'generation_config.json').read_text())
    assert (generation['eos_token_id'], generation['pad_token_id']) == ([EOS_ID, IM_END_ID], PAD_ID)
    assert transformers.AutoTokenizer.from_pretrained(out).model_max_length == 64


def test_export_refuses_to_replace_a_directory_and_names_the_problem(tmp_path, capsys):
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'notes.txt').write_text('mine')
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / 'nowhere'), str(tmp_path / 'out')])
    assert exit_info.value.code == 2 and 'nowhere does not exist' in capsys.readouterr().err
    torch.manual_seed(0)
    config = ModelConfig(d_model=16, n_heads=2, n_layers=1, max_seq_len=16, vocab_size=64,
                         attn_config=AttentionConfig(kv_n_heads=1), ffn_config=FFNConfig(ffn_hidden_size=8))
    save_checkpoint(DbrxLM(config), tmp_path / 'ours')
    with pytest.raises(SystemExit):
        main([str(tmp_path / 'ours'), str(tmp_path / 'out')])
    assert 'already exists (pass overwrite to replace it)' in capsys.readouterr().err
    assert (tmp_path / 'out' / 'notes.txt').read_text() == 'mine'
