"""QLoRA through the trainer's pieces: the int4 base sharded over 2 FSDP2 ranks trains as one process,
a float init_from is quantized shard by shard, a run resumes exactly, and a run exports to a bf16
transformers directory."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dbrx_train.checkpoints import save_checkpoint
from dbrx_train.errors import ConfigError
from dbrx_train.model.config import AttentionConfig, FFNConfig, ModelConfig
from dbrx_train.model.dbrx import DbrxLM
from dbrx_train.model.init import local_part, local_region
from dbrx_train.model.lora import LoraConfig, adapters, apply_lora
from dbrx_train.model.quantize import ExpertParallelQuantizedExperts, quantize
from dbrx_train.training.finetune import load_initial_weights
from dbrx_train.typed_config import load_yaml, parse
from tests.spawn import run_ranks
from tests.training.conftest import REPO, losses
from tests.training.test_finetune import chats, finetune, hf_base  # noqa: F401 (fixtures)

VOCAB, SEQ, MICRO_BATCH = 64, 16, 2
LORA = LoraConfig(r=4, alpha=8, seed=3)
QLORA_YAML = REPO / 'yamls' / 'finetune' / 'dbrx-tiny-qlora.yaml'


def float_config() -> ModelConfig:
    # No load-balancing loss: it is not a mean over tokens, so 2 ranks' halves would not add up to one batch's.
    return ModelConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=SEQ, vocab_size=VOCAB, init_std=0.1,
                       attn_config=AttentionConfig(kv_n_heads=2),
                       ffn_config=FFNConfig(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2, moe_loss_weight=0.0))


def qlora_config(moe_world_size: int = 1) -> ModelConfig:
    config = replace(float_config(), quantization='int4', quantization_group_size=32)
    return replace(config, ffn_config=replace(config.ffn_config, moe_world_size=moe_world_size))


def batch(world: int, rank: int) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (world * MICRO_BATCH, SEQ), generator=torch.Generator().manual_seed(7))
    return ids[rank * MICRO_BATCH:(rank + 1) * MICRO_BATCH]


def set_nonzero_b(model: DbrxLM) -> None:
    """B starts at zero; a nonzero one gives every factor a gradient."""
    with torch.no_grad():
        for i, (_, adapter) in enumerate(adapters(model)):
            value = torch.randn(adapter.lora_B.shape, generator=torch.Generator().manual_seed(i))
            local_part(adapter.lora_B).copy_(value[local_region(adapter.lora_B)])


def step(model: DbrxLM, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    model.train()
    loss = model(ids, labels=ids).loss  # through forward: FSDP2 gathers the root module
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            grads[name] = p.grad.full_tensor() if hasattr(p.grad, 'full_tensor') else p.grad
    return loss.item(), grads


def qlora_rank(checkpoint: Path, moe_world_size: int, shard_group_size: int | None, lora: LoraConfig) -> dict:
    """One rank: the QLoRA model built on meta, laid out by `parallelize` (FSDP2, activation
    checkpointing, expert parallelism over `moe_world_size` ranks, HYBRID_SHARD in groups of
    `shard_group_size` ranks), filled from the float `checkpoint`, one step on this rank's micro-batch."""
    from dbrx_train.training.config import FSDPConfig, layout_only
    from dbrx_train.training.parallelize import build_mesh, parallelize

    model = DbrxLM(qlora_config(moe_world_size), device='meta')
    apply_lora(model, lora)
    strategy = 'FULL_SHARD' if shard_group_size is None else 'HYBRID_SHARD'
    fsdp = FSDPConfig(sharding_strategy=strategy, shard_group_size=shard_group_size, activation_checkpointing=True)
    cfg = layout_only(model.config, init_device='meta', lora=lora, fsdp_config=fsdp)
    parallelize(model, cfg, build_mesh(cfg, dist.get_world_size(), 'cpu'))
    load_initial_weights(model, checkpoint)
    set_nonzero_b(model)
    stored = {name: (local_region(t)[0], local_part(t).clone(), type(t).__name__)
              for name, t in model.named_buffers() if 'lora' not in name}
    loss, grads = step(model, batch(dist.get_world_size(), dist.get_rank()))
    placed = all(isinstance(block.ffn.experts, ExpertParallelQuantizedExperts) for block in model.blocks)
    return {'loss': loss, 'grads': grads, 'stored': stored, 'expert_parallel': placed}


@pytest.mark.parametrize('moe_world_size, shard_group_size, dtype', [(1, None, None), (2, None, None), (1, 1, None),
                                                                   (2, None, 'bf16')],
                         ids=['fsdp', 'expert-parallel', 'hybrid-replicas', 'expert-parallel-bf16-adapters'])
def test_qlora_on_two_ranks_trains_as_one_process_from_a_float_init_from_quantized_per_shard(
        tmp_path, moe_world_size, shard_group_size, dtype):
    """FSDP2 shards the int4 base by rows; expert parallelism stores each rank's two experts whole
    (and runs the rows routed to them) while FSDP2 shards the rest; HYBRID_SHARD in groups of one
    rank keeps a whole replica on each rank and averages the adapters' gradients across them. With
    `lora.dtype: bf16` FSDP2 shards and reduces the bf16 adapters and float weights as it does fp32 ones."""
    lora = replace(LORA, dtype=dtype)
    float_model = DbrxLM(float_config(), seed=0)
    checkpoint = save_checkpoint(float_model, tmp_path / 'float')
    ranks = run_ranks(qlora_rank, 2, checkpoint, moe_world_size, shard_group_size, lora)

    one = DbrxLM(qlora_config())  # one process: the whole model, filled from the same checkpoint
    apply_lora(one, lora)
    load_initial_weights(one, checkpoint)
    set_nonzero_b(one)
    stored = dict(one.named_buffers())
    # Quantizing the checkpoint as it is read (an expert w2 transposed, expert by expert) stores what
    # quantizing the float model in memory stores.
    in_memory = quantize(float_model, 'int4', group_size=32).state_dict()
    for name, tensor in stored.items():
        if '.lora.' not in name:
            assert torch.equal(tensor, in_memory[name]), name
    loss, grads = step(one, torch.cat([batch(2, 0), batch(2, 1)]))

    assert all(rank['expert_parallel'] == (moe_world_size > 1) for rank in ranks)
    for rank in ranks:  # each rank quantized exactly its rows of the float checkpoint, and holds only them
        for name, (rows, local, kind) in rank['stored'].items():
            assert kind == 'DTensor', name
            assert len(local) == len(stored[name]) if shard_group_size == 1 else len(local) < len(stored[name]), name
            assert torch.equal(local, stored[name][rows]), name
    # bf16: each rank's half-batch rounds differently from the whole batch's (the sums of 8 bits of mantissa)
    rtol, atol = (1e-4, 1e-5) if dtype is None else (2e-2, 2e-2)
    assert sum(r['loss'] for r in ranks) / 2 == pytest.approx(loss, rel=rtol)
    assert set(ranks[0]['grads']) == set(grads) and len(grads) == 2 * 2 * 5
    for name, grad in grads.items():  # FSDP2 averages the ranks' gradients: the whole batch's
        assert grad.abs().max() > 0, name
        assert grad.dtype == (torch.bfloat16 if dtype else torch.float32), name
        for rank in ranks:
            torch.testing.assert_close(rank['grads'][name], grad, rtol=rtol, atol=atol * grad.abs().max().item())


def test_qlora_settings_are_checked_at_the_edge():
    from dbrx_train.training.config import TrainConfig

    with pytest.raises(ConfigError, match='model.quantization: a quantized base trains only frozen, under LoRA adapters'):
        parse(TrainConfig, load_yaml(QLORA_YAML, ['lora=null']))
    assert parse(TrainConfig, load_yaml(QLORA_YAML)).model.quantization == 'int4'
    with_experts_parallel = parse(TrainConfig, load_yaml(QLORA_YAML, ['model.ffn_config.moe_world_size=2']))
    assert with_experts_parallel.model.ffn_config.moe_world_size == 2


@pytest.mark.parametrize('moe_world_size', [1, 2], ids=['fsdp', 'expert-parallel'])
def test_a_qlora_run_on_two_ranks_exports_a_bf16_transformers_dir_that_greedy_decodes_as_this_framework(
        hf_base, chats, tmp_path, moe_world_size):
    """A float transformers init_from, quantized as read on 2 ranks (built on meta, activation
    checkpointing; FSDP2, or the experts split over the ranks by expert parallelism), trained; the
    export merges the adapters into the dequantized base, in bf16."""
    import torch.distributed.checkpoint as dcp
    import transformers

    from dbrx_train.checkpoints import load_pretrained
    from dbrx_train.checkpoints.composer import MODEL_PREFIX, resolve
    from dbrx_train.checkpoints.export import export
    from dbrx_train.checkpoints.native import read_config

    finetune(QLORA_YAML, tmp_path, processes=2, init_from=hf_base, eval_loader=None,
             **{'train_loader.dataset.local': chats, 'global_train_batch_size': 4, 'device_train_microbatch_size': 2,
                'max_duration': '3ba', 'save_interval': '3ba', 'optimizer.lr': 1e-2, 'lora.r': 4, 'lora.alpha': 8,
                'init_device': 'meta', 'fsdp_config.activation_checkpointing': True,
                'model.ffn_config.moe_world_size': moe_world_size})
    exported = export(tmp_path / 'checkpoints', tmp_path / 'hf', dtype='bfloat16')
    assert json.loads((exported / 'config.json').read_text())['torch_dtype'] == 'bfloat16'

    # The trained QLoRA model as it trained: int4 base, adapters applied on the inputs.
    config = read_config(tmp_path / 'checkpoints')  # the run's model config, beside its checkpoints
    assert config.quantization == 'int4'
    qlora = DbrxLM(config, device='meta').to_empty(device='cpu')
    apply_lora(qlora, LoraConfig(r=4, alpha=8))
    state = {MODEL_PREFIX + name: t for name, t in qlora.state_dict().items()}
    dcp.load(state, checkpoint_id=str(resolve(tmp_path / 'checkpoints')), no_dist=True)
    qlora.load_state_dict({name.removeprefix(MODEL_PREFIX): t for name, t in state.items()})
    assert any(adapter.lora_B.abs().max() > 0 for _, adapter in adapters(qlora))  # the adapters trained

    # transformers computes in fp32 on the exported bf16 weights; greedy decoding of a random tiny model
    # is compared on those same weights (this framework's fp32 on the bf16 export), since rounding the
    # weights to bf16 moves its near-tied logits.
    theirs = transformers.DbrxForCausalLM.from_pretrained(exported, torch_dtype=torch.float32).eval()
    ours = load_pretrained(exported, dtype=torch.float32)
    ids = torch.randint(0, config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = qlora.eval()(ids)
        # bf16 rounding of the merged weights is all that differs
        torch.testing.assert_close(theirs(ids).logits, expected, atol=0.01 * expected.abs().max().item(), rtol=0)
    greedy = theirs.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 8:].tolist()
    assert ours.generate(ids, max_new_tokens=12)[0, 8:].tolist() == greedy


def test_a_qlora_run_with_expert_parallelism_resumes_with_the_losses_of_an_uninterrupted_run(hf_base, chats, tmp_path):
    """2 ranks, the experts split over them: the int4 base (re-quantized from init_from at each start), the
    adapters and AdamW's moments, sharded by expert and by FSDP2, come back from the checkpoint as saved.
    The resumed run starts from a copy of the uninterrupted run's batch-2 checkpoint. `t_max` fixes the
    cosine schedule's length."""
    import shutil

    settings = {'train_loader.dataset.local': chats, 'global_train_batch_size': 4, 'device_train_microbatch_size': 2,
                'max_duration': '4ba', 'save_interval': '2ba', 'save_num_checkpoints_to_keep': -1,
                'optimizer.lr': 1e-2, 'scheduler.t_warmup': '0ba', 'scheduler.t_max': '4ba', 'lora.r': 4,
                'lora.alpha': 8, 'init_device': 'meta', 'model.ffn_config.moe_world_size': 2}
    straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
    finetune(QLORA_YAML, straight, processes=2, init_from=hf_base, eval_loader=None, **settings)
    (resumed / 'checkpoints').mkdir(parents=True)
    shutil.copy(straight / 'checkpoints' / 'config.yaml', resumed / 'checkpoints')
    [batch_2] = (straight / 'checkpoints').glob('ep*-ba2')  # 4 samples: an epoch a batch
    shutil.copytree(batch_2, resumed / 'checkpoints' / batch_2.name)
    finetune(QLORA_YAML, resumed, processes=2, init_from=hf_base, eval_loader=None,
             **settings)  # the YAML's autoresume: from the batch-2 checkpoint

    expected, found = losses(straight / 'metrics.jsonl'), losses(resumed / 'metrics.jsonl')
    assert sorted(expected) == [0, 1, 2, 3] and sorted(found) == [2, 3]  # resumed, not restarted
    assert expected[3] != pytest.approx(expected[1], abs=1e-3)  # the adapters move the loss
    for step in found:
        assert found[step] == pytest.approx(expected[step], abs=1e-6), step
