"""training/sizing.py against the parameters of a real (meta-device) model, split the way FSDP2 splits them."""

import dataclasses

import pytest

from dbrx_train.model.config import AttentionConfig, FFNConfig, ModelConfig
from dbrx_train.model.dbrx import DbrxLM
from dbrx_train.model.moe import Experts
from dbrx_train.training.sizing import Layout, Traffic, all_to_all_bytes, rank_size

# Odd sizes, so FSDP's chunks are uneven and padded: vocab 50, Wqkv 24 rows, 4 x 5 expert rows.
TINY = ModelConfig(d_model=12, n_heads=2, n_layers=2, max_seq_len=16, vocab_size=50,
                   attn_config=AttentionConfig(kv_n_heads=1),
                   ffn_config=FFNConfig(ffn_hidden_size=5, moe_num_experts=4, moe_top_k=2))
TRAFFIC = Traffic(gather=2, dispatch=4, combine=2)


def fsdp_rank0(config: ModelConfig, layout: Layout) -> tuple[int, int, int]:
    """Rank 0's expert and non-expert elements and all-gathered bytes per micro-batch, from the
    model's own parameters: dim 0 cut by `torch.chunk` (as DTensor Shard(0) and FSDP2 cut it),
    first over the expert-parallel ranks, then over the FSDP group; FSDP2 pads every shard to the first."""
    model = DbrxLM(config, device='meta')
    expert_params = {id(p) for m in model.modules() if isinstance(m, Experts) for p in m.parameters()}
    m = config.ffn_config.moe_world_size
    expert = non_expert = gathered = 0
    for name, p in model.named_parameters():
        if id(p) in expert_params and m > 1:
            local, ranks = p.chunk(m)[0], layout.world_size // m
        else:
            local, ranks = p, layout.shard_group_size or layout.world_size
        shard = local.chunk(ranks)[0].numel()
        if id(p) in expert_params:
            expert += shard
        else:
            non_expert += shard
        gathers = 2 if name.startswith('blocks.') else 1  # the root unit stays gathered for the backward
        gathered += gathers * (ranks - 1) * shard * TRAFFIC.gather
    return expert, non_expert, gathered


@pytest.mark.parametrize('moe_world_size,layout', [
    (1, Layout(1)),
    (1, Layout(4)),
    (1, Layout(6, shard_group_size=3)),
    (2, Layout(6)),  # 2 experts per rank, their 10 rows over 3 replicas: 4, 4, 2
    (4, Layout(4)),
])
def test_shards_and_gathers_equal_those_of_the_model_parameters(moe_world_size, layout):
    config = dataclasses.replace(TINY, ffn_config=dataclasses.replace(TINY.ffn_config, moe_world_size=moe_world_size))
    size = rank_size(config, layout, tokens=16, micro_batches=3, traffic=TRAFFIC)
    expert, non_expert, gathered = fsdp_rank0(config, layout)
    assert (size.expert_numel, size.non_expert_numel, size.all_gather_bytes) == (expert, non_expert, 3 * gathered)
    if layout.world_size == 1:
        assert size.numel == sum(p.numel() for p in DbrxLM(config, device='meta').parameters())


def test_all_to_all_counts_the_rows_leaving_the_rank():
    config = dataclasses.replace(TINY, ffn_config=dataclasses.replace(TINY.ffn_config, moe_world_size=4))
    # 10 tokens x top-2 = 20 rows, 3/4 of them to other ranks, 12 elements each, out and back, per layer.
    per_pass = 2 * 20 * 3 / 4 * 12 * (4 + 2)
    assert all_to_all_bytes(config, 10, dispatch_bytes=4, combine_bytes=2) == 2 * per_pass
    assert all_to_all_bytes(config, 10, 5, 4, 2, activation_checkpointing=True) == 5 * 3 * per_pass
    assert all_to_all_bytes(TINY, 10) == 0  # one expert-parallel rank: nothing leaves


def test_traffic_follows_composer_mixed_precision():
    assert Traffic.of('fp32') == Traffic(gather=4, dispatch=4, combine=4)
    assert Traffic.of('amp_bf16') == Traffic(gather=2, dispatch=4, combine=2)
    assert Traffic.of('amp_bf16', 'FULL') == Traffic(gather=4, dispatch=4, combine=2)


def test_a_layout_that_cannot_fit_is_one_line_with_both_numbers_and_the_smallest_layout_that_fits():
    from dbrx_train.errors import UserError
    from dbrx_train.info import load_model_config, with_moe_world_size
    from dbrx_train.training.sizing import GIB, Placement, check_fits, memory_need

    config = with_moe_world_size(load_model_config('yamls/models/dbrx-132b.yaml'), 8)
    host = 24 * GIB
    on_cpu = Placement(ranks_per_host=8, on_gpu=False, builds_whole_model=False, bytes_per_param=16)
    need = memory_need(config, Layout(8), on_cpu)
    assert need.host == 8 * need.state and need.state == rank_size(config, Layout(8), 1, 1, TRAFFIC).numel * 16
    with pytest.raises(UserError) as info:
        check_fits(config, Layout(8), on_cpu, host, 0)
    message = str(info.value)
    assert '\n' not in message
    assert f'need at least {need.host / GIB:,.1f} GiB' in message and 'the host has 24.0 GiB' in message
    smallest = int(message.split('the smallest layout that fits is world size ')[1].split()[0])
    assert memory_need(config, Layout(smallest), on_cpu).host <= host
    assert memory_need(config, Layout(smallest - 8), on_cpu).host > host  # the multiple of 8 below does not
    check_fits(config, Layout(smallest), on_cpu, host, 0)

    # Every rank building the whole model first: more ranks cannot help, meta can.
    with pytest.raises(UserError, match='more ranks cannot help, each builds the whole model: use init_device: meta; '
                                        f'then the smallest layout that fits is world size {smallest} '):
        check_fits(config, Layout(smallest), dataclasses.replace(on_cpu, builds_whole_model=True), host, 0)
    on_gpu = dataclasses.replace(on_cpu, on_gpu=True)
    with pytest.raises(UserError, match=r'rank 0 needs at least [\d.,]+ GiB on its GPU, which has 80.0 GiB'):
        check_fits(config, Layout(8), on_gpu, host, 80 * GIB)


@pytest.mark.parametrize('method, lora_dtype', [('int4', 'fp32'), ('int8', 'fp32'), ('int4', 'bf16')])
@pytest.mark.parametrize('layout,moe_world_size', [(Layout(1), 1), (Layout(3), 1), (Layout(4, shard_group_size=2), 1),
                                                   (Layout(4), 2)])
def test_qlora_sizing_equals_the_stored_tensors_of_a_qlora_model(method, lora_dtype, layout, moe_world_size):
    import torch

    from dbrx_train.model.lora import LoraConfig, apply_lora
    from dbrx_train.model.quantize import store_scales_in
    from dbrx_train.training.sizing import qlora_rank_size

    ffn_config = dataclasses.replace(TINY.ffn_config, ffn_hidden_size=32, moe_world_size=moe_world_size)
    config = dataclasses.replace(TINY, d_model=64, n_heads=4, quantization=method, quantization_group_size=32,
                                 ffn_config=ffn_config)
    model = DbrxLM(config, device='meta')
    apply_lora(model, LoraConfig(r=3, dtype=lora_dtype))
    store_scales_in(model, torch.bfloat16)  # as training keeps them
    ranks = layout.shard_group_size or layout.world_size

    def rank0_bytes(named) -> int:
        """Rank 0's rows: of its experts under expert parallelism (their stored tensors whole, their
        adapters FSDP-sharded over the replicas), FSDP's otherwise."""
        total = 0
        for name, t in named:
            if moe_world_size > 1 and '.ffn.experts.' in name:
                mine = t.chunk(moe_world_size)[0]
                total += (mine if name in buffers else mine.chunk(layout.world_size // moe_world_size)[0]).nbytes
            else:
                total += t.chunk(ranks)[0].nbytes
        return total

    buffers = dict(model.named_buffers())
    adapters = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    stored = [(n, b) for n, b in buffers.items() if '.lora.' not in n]
    float_bytes = 2 if lora_dtype == 'bf16' else 4
    size = qlora_rank_size(config, layout, 3, float_bytes)
    assert size.base_quantized == rank0_bytes(stored)
    assert size.base_float == rank0_bytes(frozen)
    assert size.adapters == rank0_bytes(adapters) and size.adapter_numel == size.adapters // float_bytes
    assert size.total == size.base_quantized + size.base_float + 4 * size.adapters
