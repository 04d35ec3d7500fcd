"""`parallelize` on 2 and 4 gloo ranks: a model built on `meta` gets exactly the weights one process
draws with the same seed, whatever the layout (FSDP, expert parallelism, LoRA, freezing, activation
checkpointing); expert parallelism under FSDP2, and HYBRID_SHARD's replicas, train exactly as one
process accumulating the same micro-batches, with or without LoRA, and each rank holds its share of
the expert weights (and of their adapters)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dbrx_train.model.config import AttentionConfig, FFNConfig, ModelConfig
from dbrx_train.model.dbrx import DbrxLM
from dbrx_train.model.init import local_part

from tests.spawn import SpawnedOnce

STEPS, MICRO_BATCH, SEQ, VOCAB, EXPERTS = 3, 2, 16, 64, 8
CLIP = 0.5  # below the gradient norms of these steps: clipping scales every step
# world size: (moe_world_size, top_k, shard_group_size); a shard group size: HYBRID_SHARD, 2 replicas here
CASES = {2: [(2, 1, None), (2, 4, None)], 4: [(2, 4, None), (4, 1, None), (1, 2, 2)]}
RESHARDED = (4, 2)  # (world, moe_world_size) whose trained model is saved and loaded with 1, 4 and no process group
EXPERT_WEIGHTS = ('w1', 'v1', 'w2')
INIT_CASES = {'fsdp': 1, 'ep': 2, 'lora': 1, 'lora_ep': 2, 'freeze_ep': 2}  # layout: moe_world_size
INIT_ON = {2: [('fsdp', 'meta'), ('ep', 'meta'), ('ep', 'cpu'), ('lora', 'meta'), ('lora_ep', 'meta'),
               ('lora_ep', 'cpu'), ('freeze_ep', 'meta')], 4: [('ep', 'meta')]}
ADAPTED_CASES = ('lora', 'lora_ep', 'freeze_ep')  # also one step's loss and gradients
LORA_EP_TOP_K = 2  # LoRA + expert parallelism trained on 2 ranks (moe_world_size 2) against one process


def tiny_config(top_k: int, moe_world_size: int = 1) -> ModelConfig:
    return ModelConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=SEQ, vocab_size=VOCAB, init_std=0.1,
                       attn_config=AttentionConfig(kv_n_heads=2),
                       ffn_config=FFNConfig(ffn_hidden_size=24, moe_num_experts=EXPERTS, moe_top_k=top_k,
                                            moe_world_size=moe_world_size))


def tiny(top_k: int, seed: int = 0, device: str = 'cpu') -> DbrxLM:
    return DbrxLM(tiny_config(top_k), device=device, seed=seed)


def batches(world: int) -> torch.Tensor:
    """`(steps, ranks, micro_batch, seq)` token ids: each step's global batch, split by rank."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (STEPS, world, MICRO_BATCH, SEQ), generator=g)


def optimizer(params):
    # SGD, not Adam: a parameter's change is then proportional to its gradient, so the comparison
    # checks every gradient. Adam's first steps move each weight by about lr * sign(gradient),
    # which turns a gradient of ~1e-9 summed in another order into a difference of lr.
    return torch.optim.SGD(params, lr=0.5, momentum=0.9)


def one_process(world: int, top_k: int) -> dict:
    """The reference: one process, the global batch as `world` accumulated micro-batches."""
    model, data, trace = tiny(top_k), batches(world), {'loss': [], 'aux': [], 'params': [], 'norm': []}
    opt = optimizer(model.parameters())
    for step in range(STEPS):
        for ids in data[step]:
            out = model(ids, labels=ids)
            (out.loss / world).backward()
            trace['loss'].append(out.loss.item())
            trace['aux'].append(out.aux_loss.item())
        trace['norm'].append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        opt.step()
        opt.zero_grad()
        trace['params'].append({n: p.detach().clone() for n, p in model.named_parameters()})
    return trace


def sharded(model: DbrxLM, moe_world_size: int, opt_factory=None, seed: int = 0, **settings):
    """`model` (on `meta` or whole) laid out as the Trainer lays it out: `parallelize` over a mesh with
    `moe_world_size` (1: no expert parallelism), initialised from `seed` when on `meta`; then the
    optimizer, if asked. `settings`: more `TrainConfig` keys (lora, fsdp_config)."""
    from dbrx_train.training.config import layout_only
    from dbrx_train.training.parallelize import build_mesh, parallelize

    ffn = replace(model.config.ffn_config, moe_world_size=moe_world_size)
    cfg = layout_only(replace(model.config, ffn_config=ffn), seed=seed, **settings)
    parallelize(model, cfg, build_mesh(cfg, dist.get_world_size(), 'cpu'))
    return opt_factory(model.parameters()) if opt_factory else None


def reshard(model: DbrxLM, top_k: int, workdir: Path) -> dict:
    """Saves `model` with DCP (what Composer's sharded checkpoints hold) and loads it into the same
    model placed with moe_world_size 1 and 4: the logits of each, and of the saved model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    probe = batches(1)[0, 0]
    logits = {'saved': model(probe).detach()}
    dcp.save(get_model_state_dict(model), checkpoint_id=workdir / 'checkpoint')
    for moe_world_size in (1, 4):
        loaded = tiny(top_k, seed=1)  # other weights: the checkpoint must replace them all
        sharded(loaded, moe_world_size)
        state = get_model_state_dict(loaded)
        dcp.load(state, checkpoint_id=workdir / 'checkpoint')
        set_model_state_dict(loaded, state)
        logits[moe_world_size] = loaded(probe).detach()
    logits['init_from'] = init_from(top_k, workdir, probe)
    return logits


def init_from(top_k: int, workdir: Path, probe: torch.Tensor) -> dict:
    """A one-process checkpoint loaded as fine-tuning's `init_from` does, into an expert-parallel
    model (each rank reads its slices): its logits, and those of the model that was saved."""
    from dbrx_train.checkpoints.native import save_checkpoint
    from dbrx_train.training.finetune import load_initial_weights

    source = tiny(top_k, seed=2)
    if dist.get_rank() == 0:
        save_checkpoint(source, workdir / 'native')
    dist.barrier()
    model = tiny(top_k, device='meta')
    sharded(model, 2, seed=1)
    load_initial_weights(model, workdir / 'native')
    return {'loaded': model(probe).detach(), 'saved': source(probe).detach()}


def train_on_rank(moe_world_size: int, top_k: int, shard_group_size: int | None, workdir: Path) -> dict:
    from dbrx_train.training.config import FSDPConfig
    from dbrx_train.training.gradient_clipping import clip_grad_norm_

    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny(top_k, device='meta')  # initialised by parallelize: the weights of tiny(top_k)
    hybrid = {} if shard_group_size is None else {
        'fsdp_config': FSDPConfig(sharding_strategy='HYBRID_SHARD', shard_group_size=shard_group_size)}
    opt = sharded(model, moe_world_size, optimizer, **hybrid)

    experts = model.blocks[0].ffn.experts
    stored = sum(local_part(getattr(experts, n)).numel() for n in EXPERT_WEIGHTS)
    unit = experts if moe_world_size > 1 else model.blocks[0]  # FSDP2's unit of the experts' weights
    unit.unshard()  # what a forward pass gathers: this rank's whole experts
    gathered = sum(local_part(getattr(experts, n)).numel() for n in EXPERT_WEIGHTS)
    unit.reshard()
    trace = {'loss': [], 'aux': [], 'params': [], 'norm': [], 'stored': stored, 'gathered': gathered,
             'total': sum(getattr(experts, n).numel() for n in EXPERT_WEIGHTS)}
    data = batches(world)
    for step in range(STEPS):
        ids = data[step, rank]
        out = model(ids, labels=ids)
        out.loss.backward()
        trace['norm'].append(clip_grad_norm_(model.parameters(), CLIP).item())  # over both meshes
        opt.step()
        opt.zero_grad()
        trace['loss'].append(out.loss.item())
        trace['aux'].append(out.aux_loss.item())
        trace['params'].append({n: p.full_tensor().detach() for n, p in model.named_parameters()})
    if (world, moe_world_size) == RESHARDED:
        trace['logits'] = reshard(model, top_k, workdir)
    if shard_group_size is not None:  # the replicas write one copy of each shard
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        dcp.save(get_model_state_dict(model), checkpoint_id=workdir / 'hybrid-checkpoint')
        trace['logits'] = model(batches(1)[0, 0]).detach()
    return trace


def what_trains(case: str) -> dict:
    """The `TrainConfig` keys (`lora`, `freeze`) of an initialisation case."""
    from dbrx_train.model.lora import LoraConfig
    from dbrx_train.training.finetune import FreezeConfig

    if case.startswith('lora'):
        return {'lora': LoraConfig(r=2, seed=3)}
    return {'freeze': FreezeConfig(router=True, layers=[1])} if case == 'freeze_ep' else {}


def initial_weights(case: str, device: str) -> dict:
    """The full value of every parameter (and the loss and gradients of one step of the LoRA and
    freezing cases) of a model built on `device` and laid out as `case` says, with seed 5."""
    from dbrx_train.training.config import FSDPConfig
    from dbrx_train.training.finetune import prepare_model

    model, moe_world_size, settings = tiny(2, device=device, seed=5), INIT_CASES[case], what_trains(case)
    prepare_model(model, settings.get('freeze'), settings.get('lora'))
    if case in ADAPTED_CASES:
        settings['fsdp_config'] = FSDPConfig(activation_checkpointing=True)
    sharded(model, moe_world_size, seed=5, **settings)
    found = {'params': {n: (p.full_tensor(), p.requires_grad) for n, p in model.named_parameters()}}
    if case in ADAPTED_CASES:
        ids = batches(1)[0, 0]
        loss = model(ids, labels=ids).loss
        loss.backward()
        found['loss'] = loss.item()
        found['grads'] = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    return found


def lora_base(workdir: Path) -> Path:
    """A one-process checkpoint: the pretrained weights LoRA starts from (`init_from`)."""
    from dbrx_train.checkpoints.native import save_checkpoint

    if not (workdir / 'lora_base').exists():
        save_checkpoint(tiny(LORA_EP_TOP_K, seed=2), workdir / 'lora_base')
    return workdir / 'lora_base'


def lora_one_process(workdir: Path, world: int) -> dict:
    """The reference of LoRA with expert parallelism: LoRA in one process from the same `init_from`,
    the global batch as `world` accumulated micro-batches; and the model it trained."""
    from dbrx_train.model.lora import apply_lora
    from dbrx_train.training.finetune import load_initial_weights

    model, data, trace = tiny(LORA_EP_TOP_K, seed=4), batches(world), {'loss': [], 'params': []}
    apply_lora(model, what_trains('lora_ep')['lora'])
    load_initial_weights(model, lora_base(workdir))
    opt = optimizer([p for p in model.parameters() if p.requires_grad])
    for step in range(STEPS):
        for ids in data[step]:
            out = model(ids, labels=ids)
            (out.loss / world).backward()
            trace['loss'].append(out.loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        trace['params'].append({n: p.detach().clone() for n, p in model.named_parameters()})
    return trace | {'model': model}


def lora_train_on_rank(workdir: Path) -> dict:
    """LoRA with expert parallelism as the trainer builds it: the model on `meta` with adapters,
    `parallelize` (moe_world_size 2: each rank owns half the experts and their adapters), `init_from`
    a one-process checkpoint into its shards; a few steps; then the model saved with DCP (what a
    Composer sharded checkpoint holds) under Composer's names."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from dbrx_train.checkpoints.composer import MODEL_PREFIX
    from dbrx_train.checkpoints.native import write_config
    from dbrx_train.training.finetune import load_initial_weights, prepare_model
    from dbrx_train.training.gradient_clipping import clip_grad_norm_

    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        lora_base(workdir)
    dist.barrier()
    # The trainer's model config says moe_world_size 2, the checkpoint's 1: the same architecture.
    model, settings = DbrxLM(tiny_config(LORA_EP_TOP_K, 2), device='meta'), what_trains('lora_ep')
    prepare_model(model, None, settings['lora'])
    opt = sharded(model, 2, lambda params: optimizer([p for p in params if p.requires_grad]), seed=1, **settings)
    load_initial_weights(model, lora_base(workdir))
    adapter = model.blocks[0].ffn.experts.parametrizations.w1[0]
    trace = {'loss': [], 'params': [], 'adapter_rows': (adapter.lora_A.to_local().shape[0],
                                                        adapter.lora_B.to_local().shape[0])}
    data = batches(world)
    for step in range(STEPS):
        ids = data[step, rank]
        out = model(ids, labels=ids)
        out.loss.backward()
        clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        trace['loss'].append(out.loss.item())
        trace['params'].append({n: p.full_tensor().detach() for n, p in model.named_parameters()})
    checkpoint = workdir / 'lora_ep' / f'ep0-ba{STEPS}'
    dcp.save({MODEL_PREFIX + n: t for n, t in get_model_state_dict(model).items()}, checkpoint_id=checkpoint)
    if rank == 0:
        write_config(checkpoint.parent, model.config)
    return trace


def all_cases_on_rank(workdir: Path) -> dict:
    found = {case: train_on_rank(*case, workdir) for case in CASES[dist.get_world_size()]}
    if dist.get_world_size() == 2:
        found['lora_ep'] = lora_train_on_rank(workdir)
    found['init'] = {(case, device): initial_weights(case, device) for case, device in INIT_ON[dist.get_world_size()]}
    return found


@pytest.fixture(scope='module')
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp('ranks')


@pytest.fixture(scope='module')
def spawned(workdir):
    return SpawnedOnce(all_cases_on_rank, workdir)


@pytest.mark.parametrize('world,case,device', [(w, *case) for w, cases in INIT_ON.items() for case in cases])
def test_every_layout_initialises_exactly_the_weights_of_one_process(spawned, world, case, device):
    from dbrx_train.training.finetune import prepare_model

    reference, settings = tiny(2, seed=5), what_trains(case)
    prepare_model(reference, settings.get('freeze'), settings.get('lora'))
    expected = dict(reference.named_parameters())
    for rank in spawned(world):
        found = rank['init'][case, device]
        assert found['params'].keys() == expected.keys()
        for name, (value, requires_grad) in found['params'].items():
            assert torch.equal(value, expected[name]), name
            assert requires_grad == expected[name].requires_grad, name
    if case in ADAPTED_CASES:  # and the adapted (or frozen), activation-checkpointed model computes as one process
        ids = batches(1)[0, 0]
        loss = reference(ids, labels=ids).loss
        loss.backward()
        assert found['loss'] == pytest.approx(loss.item(), rel=1e-6)
        assert found['grads'].keys() == {n for n, p in expected.items() if p.requires_grad}
        for name, grad in found['grads'].items():
            # Each rank's micro-batch is the same: the averaged gradient is the one-process gradient.
            torch.testing.assert_close(grad, expected[name].grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('world,moe_world_size,top_k,shard_group_size',
                         [(w, *case) for w, cases in CASES.items() for case in cases])
def test_expert_parallel_and_hybrid_training_match_one_process(spawned, world, moe_world_size, top_k,
                                                                shard_group_size):
    ranks = [cases[moe_world_size, top_k, shard_group_size] for cases in spawned(world)]
    reference = one_process(world, top_k)
    for step in range(STEPS):
        for rank, trace in enumerate(ranks):
            micro_batch = step * world + rank
            assert trace['loss'][step] == pytest.approx(reference['loss'][micro_batch], rel=1e-5, abs=1e-5)
            assert trace['aux'][step] == pytest.approx(reference['aux'][micro_batch], rel=1e-5, abs=1e-5)
        assert reference['norm'][step] > CLIP
        assert ranks[0]['norm'][step] == pytest.approx(reference['norm'][step], rel=1e-5)
        expected = reference['params'][step]
        for name, value in ranks[0]['params'][step].items():
            torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-5, msg=lambda m: f'{step} {name}: {m}')
    for trace in ranks:
        # Stored: sharded over all ranks (a shard group's, with HYBRID_SHARD); gathered for the forward
        # pass: 1/moe_world_size, whole experts.
        assert trace['stored'] * (shard_group_size or world) == trace['total']
        assert trace['gathered'] * moe_world_size == trace['total']


def test_lora_with_expert_parallelism_trains_as_lora_in_one_process_and_exports_the_same_merged_weights(
        spawned, workdir):
    """2 ranks, moe_world_size 2, built on meta, adapters on each rank's experts, init_from a
    one-process checkpoint: every step's losses and parameters are those of LoRA in one process, and
    the saved run exports (adapters merged) the weights of the one-process model merged."""
    from dbrx_train.checkpoints.export import export
    from dbrx_train.checkpoints.formats import load_pretrained
    from dbrx_train.checkpoints.native import load_checkpoint
    from dbrx_train.model.lora import merge_lora

    world = 2
    ranks = [found['lora_ep'] for found in spawned(world)]
    reference = lora_one_process(workdir, world)
    rows = (EXPERTS // world, EXPERTS // world)  # whole experts' adapters, as their weights
    assert all(trace['adapter_rows'] == rows for trace in ranks)
    for step in range(STEPS):
        for rank, trace in enumerate(ranks):
            assert trace['loss'][step] == pytest.approx(reference['loss'][step * world + rank], rel=1e-5, abs=1e-5)
        expected = reference['params'][step]
        assert ranks[0]['params'][step].keys() == expected.keys()
        for name, value in ranks[0]['params'][step].items():
            torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-5, msg=lambda m: f'{step} {name}: {m}')
    base = load_checkpoint(lora_base(workdir)).state_dict()
    adapter = reference['params'][-1]['blocks.0.ffn.experts.parametrizations.w1.0.lora_B']
    assert adapter.abs().max() > 0  # trained away from B = 0: the merged weights differ from the base

    model = reference['model']
    merge_lora(model)
    merged = model.state_dict()
    saved = workdir / 'lora_ep' / f'ep0-ba{STEPS}'
    exported = export(saved, workdir / 'lora_ep_exported', dtype='float32')  # a transformers directory
    for loaded in (load_pretrained(saved), load_pretrained(exported)):
        found = loaded.state_dict()
        assert found.keys() == merged.keys()
        for name, value in found.items():
            torch.testing.assert_close(value, merged[name], rtol=1e-5, atol=1e-5, msg=lambda m: f'{name}: {m}')
    assert not torch.equal(merged['blocks.0.ffn.experts.w1'], base['blocks.0.ffn.experts.w1'])


def test_a_checkpoint_saved_with_expert_parallelism_loads_with_any_degree_and_without_processes(spawned, workdir):
    """DCP reshards: saved by 4 ranks with moe_world_size 2, loaded by 4 ranks with 1 and 4, and by
    one process with no process group at all; every copy predicts the same logits. And `init_from`
    fills an expert-parallel model from a one-process checkpoint."""
    import torch.distributed.checkpoint as dcp

    world, moe_world_size = RESHARDED
    [top_k] = [k for ep, k, _ in CASES[world] if ep == moe_world_size]
    logits = spawned(world)[0][moe_world_size, top_k, None]['logits']
    plain = tiny(top_k, seed=1)
    state = plain.state_dict()
    dcp.load(state, checkpoint_id=workdir / 'checkpoint')
    plain.load_state_dict(state)
    assert plain.blocks[0].ffn.experts.w1.shape == (EXPERTS * 24, 32)  # whole experts
    for copy in (1, 4):
        torch.testing.assert_close(logits[copy], logits['saved'], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(plain(batches(1)[0, 0]), logits['saved'], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits['init_from']['loaded'], logits['init_from']['saved'], rtol=1e-6, atol=1e-6)


def test_a_hybrid_shard_checkpoint_loads_in_one_process(spawned, workdir):
    import torch.distributed.checkpoint as dcp

    [(world, case)] = [(w, case) for w, cases in CASES.items() for case in cases if case[2] is not None]
    logits = spawned(world)[0][case]['logits']
    plain = tiny(case[1], seed=1)
    state = plain.state_dict()
    dcp.load(state, checkpoint_id=workdir / 'hybrid-checkpoint')
    plain.load_state_dict(state)
    torch.testing.assert_close(plain(batches(1)[0, 0]), logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('moe_world_size,world_size,words', [
    (4, 2, '4 is larger than the world size (2)'),
    (2, 3, 'the world size (3) is not divisible by 2'),
])
def test_a_bad_expert_parallel_degree_is_one_line_naming_the_key(moe_world_size, world_size, words):
    from dbrx_train.errors import ConfigError
    from dbrx_train.training.sizing import check_moe_world_size

    with pytest.raises(ConfigError) as info:
        check_moe_world_size(moe_world_size, world_size)
    assert str(info.value) == f'model.ffn_config.moe_world_size: {words}'
