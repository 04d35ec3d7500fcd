"""The curriculum's data: streams mixed as the schedule says, in a seeded order, resumable, split over ranks.

Every sample of the test streams is one token id repeated: 1000 + i in stream `a`, 2000 + i in
`b`, 3000 + i in `c`, so a batch tells which stream and which sample each row came from.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from dbrx_train.data.curriculum import CurriculumConfig, resolve_schedule
from dbrx_train.data.mixture import StreamOrder, build_mixture_dataloader, interleave
from dbrx_train.data.text_dataset import LoaderConfig
from dbrx_train.errors import CheckpointError, ConfigError
from dbrx_train.typed_config import parse

pytestmark = pytest.mark.usefixtures('streaming_shm')

SEQ_LEN = 8
STREAM_SIZES = {'a': 40, 'b': 25, 'c': 30}
BASE = {'a': 1000, 'b': 2000, 'c': 3000}
BATCH = 8
PHASES = {  # 36 steps: a hard switch at 12, a ramp over 24-29
    'first': {'duration': '12ba', 'proportions': {'a': 0.7, 'b': 0.3}},
    'second': {'duration': '12ba', 'proportions': {'a': 0.2, 'b': 0.3, 'c': 0.5}},
    'third': {'duration': '12ba', 'proportions': {'a': 0.1, 'b': 0.0, 'c': 0.9}, 'transition': '6ba'},
}


@pytest.fixture(scope='module')
def streams(tmp_path_factory):
    from streaming import MDSWriter

    root = tmp_path_factory.mktemp('tagged')
    for name, size in STREAM_SIZES.items():
        # ~6 samples a shard: several shards per stream, so the shard-and-block shuffle has work to do.
        with MDSWriter(out=str(root / name), columns={'tokens': 'ndarray:int32'}, size_limit=256) as writer:
            for i in range(size):
                writer.write({'tokens': np.full(SEQ_LEN, BASE[name] + i, dtype=np.int32)})
    return root


def loader_config(root, **dataset) -> LoaderConfig:
    options = {'shuffle': True, 'shuffle_seed': 5, 'shuffle_block_size': 10, **dataset}
    return parse(LoaderConfig, {'dataset': {'streams': {n: {'local': str(root / n)} for n in STREAM_SIZES},
                                            **options}}, 'train_loader')


def schedule_of(cfg: LoaderConfig, phases=PHASES, batch=BATCH):
    curriculum = parse(CurriculumConfig, {'phases': phases}, 'curriculum')
    total = sum(int(p['duration'][:-2]) for p in phases.values())
    return resolve_schedule(curriculum, cfg.dataset, f'{total}ba', batch, SEQ_LEN)


def loader(root, rank=0, world_size=1, phases=PHASES, num_workers=0, **dataset):
    cfg = loader_config(root, **dataset)
    if num_workers:
        cfg = parse(LoaderConfig, {'dataset': cfg.dataset, 'num_workers': num_workers})
    return build_mixture_dataloader(cfg, schedule_of(cfg, phases), SEQ_LEN, rank=rank, world_size=world_size)


def take(data_loader, steps: int) -> list[torch.Tensor]:
    batches = []
    for batch in data_loader:
        assert batch['input_ids'].shape[1] == SEQ_LEN and torch.equal(batch['labels'], batch['input_ids'])
        batches.append(batch['input_ids'])
        if len(batches) == steps:
            return batches
    raise AssertionError('the loader ran out')


def tags(batch: torch.Tensor) -> list[tuple[str, int]]:
    """(stream, sample) of each row."""
    rows = []
    for row in batch.tolist():
        assert len(set(row)) == 1, row
        stream = next(n for n, base in BASE.items() if base <= row[0] < base + STREAM_SIZES[n])
        rows.append((stream, row[0] - BASE[stream]))
    return rows


def test_interleave_keeps_every_stream_within_its_quota_whatever_the_proportions():
    rng = np.random.default_rng(0)
    streams = 3
    deficits = np.zeros(streams)
    for _ in range(2000):
        proportions = rng.dirichlet(np.ones(streams)) * (rng.random(streams) > 0.2)  # some streams switched off
        if proportions.sum() == 0:
            continue
        proportions /= proportions.sum()
        count = int(rng.integers(1, 20))
        chosen = interleave(deficits, proportions, count)
        assert len(chosen) == count and set(chosen) <= set(np.flatnonzero(proportions))
        assert abs(deficits.sum()) < 1e-9
        assert np.all(np.abs(deficits) <= 0.5 + streams / 2 + 1e-9), deficits


def test_stream_order_visits_every_sample_once_a_pass_reshuffled_each_pass():
    shard_sizes = np.array([6, 6, 6, 6, 6, 5])
    order = StreamOrder(shard_sizes, seed=3, tag=7, block_size=10)
    first, second = [order[i] for i in range(35)], [order[i] for i in range(35, 70)]
    assert sorted(first) == sorted(second) == list(range(35))
    assert first != second and first != list(range(35))
    assert [StreamOrder(shard_sizes, seed=3, tag=7, block_size=10)[i] for i in range(70)] == first + second
    assert [StreamOrder(shard_sizes, seed=4, tag=7, block_size=10)[i] for i in range(35)] != first
    shard_of = np.repeat(np.arange(6), shard_sizes)
    assert len({shard_of[s] for s in first[:12]}) <= 3  # blocks of ~10 samples: reads stay on a few shards
    assert [StreamOrder(shard_sizes, seed=None, tag=7)[i] for i in range(40)] == list(range(35)) + list(range(5))


def test_each_phase_draws_its_streams_in_the_scheduled_proportions(streams):
    data_loader = loader(streams)
    schedule = data_loader.dataset.schedule
    batches = take(data_loader, schedule.total_steps)
    table = schedule.proportions_table()
    seen = {name: [] for name in STREAM_SIZES}
    for phase in schedule.phases:
        counts = {name: 0 for name in STREAM_SIZES}
        for step in range(phase.start, phase.end):
            for stream, sample in tags(batches[step]):
                counts[stream] += 1
                seen[stream].append(sample)
        for index, name in enumerate(schedule.streams):
            expected = BATCH * table[phase.start:phase.end, index].sum()
            # Systematic sampling: no noise, only a quota carried over a boundary (a sample or two).
            assert abs(counts[name] - expected) <= 2, (phase.name, name, counts[name], expected)
    assert 'b' not in {s for s, _ in tags(torch.cat(batches[30:]))}  # proportion 0 after the ramp means none
    for name, samples in seen.items():  # passes: every sample once before any sample twice
        size = STREAM_SIZES[name]
        for start in range(0, len(samples) - size + 1, size):
            assert sorted(samples[start:start + size]) == list(range(size)), name


def test_same_seed_same_order_other_seed_other_order_same_mix(streams):
    first = take(loader(streams), 20)
    again = take(loader(streams), 20)
    other = take(loader(streams, shuffle_seed=6), 20)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not all(torch.equal(x, y) for x, y in zip(first, other))
    assert [[s for s, _ in tags(b)] for b in first] == [[s for s, _ in tags(b)] for b in other]


@pytest.mark.parametrize('stop', [7, 12], ids=['mid-phase', 'phase-boundary'])
def test_resumes_with_exactly_the_samples_an_uninterrupted_run_sees(streams, stop, tmp_path):
    uninterrupted = take(loader(streams), 36)
    interrupted = loader(streams)
    seen = take(interrupted, stop)
    state = interrupted.dataset.state_dict(num_samples=stop * BATCH, from_beginning=True)
    assert state['step'] == stop
    # A new process after a restart: fresh objects over copies of the data, two workers this time.
    copies = tmp_path / 'copies'
    for name in STREAM_SIZES:
        shutil.copytree(streams / name, copies / name)
    resumed = loader(copies, num_workers=2)
    resumed.dataset.load_state_dict(state)
    rest = take(resumed, 36 - stop)
    assert all(torch.equal(x, y) for x, y in zip(uninterrupted, seen + rest))


def test_state_is_that_of_the_samples_consumed_not_of_those_prefetched(streams):
    data_loader = loader(streams)
    take(data_loader, 20)
    late = data_loader.dataset.state_dict(num_samples=20 * BATCH)
    early = data_loader.dataset.state_dict(num_samples=5 * BATCH)  # replayed from the start
    assert early['step'] == 5 and late['step'] == 20
    fresh = loader(streams)
    fresh.dataset.load_state_dict(early)
    assert fresh.dataset.state_dict(num_samples=20 * BATCH, from_beginning=True) == late
    assert fresh.dataset.state_dict(num_samples=15 * BATCH, from_beginning=False) == late


def test_two_ranks_see_disjoint_halves_that_make_up_the_one_rank_sequence(streams):
    one = take(loader(streams), 36)
    rank0 = take(loader(streams, rank=0, world_size=2), 36)
    rank1 = take(loader(streams, rank=1, world_size=2), 36)
    for whole, first, second in zip(one, rank0, rank1):
        assert first.shape[0] == second.shape[0] == BATCH // 2
        assert torch.equal(torch.cat([first, second]), whole)


def test_a_one_rank_checkpoint_resumes_on_two_ranks(streams):
    one_rank = loader(streams)
    one = take(one_rank, 36)
    state = one_rank.dataset.state_dict(num_samples=10 * BATCH)  # the position is global, not per rank
    halves = []
    for rank in (0, 1):
        half = loader(streams, rank=rank, world_size=2)
        half.dataset.load_state_dict(state)
        halves.append(take(half, 26))
    assert all(torch.equal(torch.cat([a, b]), whole) for a, b, whole in zip(*halves, one[10:]))


def test_resume_follows_a_changed_phase_not_yet_started_and_refuses_a_changed_running_one(streams):
    interrupted = loader(streams)
    take(interrupted, 12)
    at_boundary = interrupted.dataset.state_dict(num_samples=12 * BATCH)
    in_first = interrupted.dataset.state_dict(num_samples=8 * BATCH)
    new_second = {**PHASES, 'second': {'duration': '12ba', 'proportions': {'c': 1.0}}}
    resumed = loader(streams, phases=new_second)
    resumed.dataset.load_state_dict(at_boundary)  # 'second' had not started
    assert {s for s, _ in tags(torch.cat(take(resumed, 12)))} == {'c'}
    new_first = {**PHASES, 'first': {'duration': '12ba', 'proportions': {'a': 1.0}}}
    with pytest.raises(ConfigError, match=r"^curriculum.phases.first: this phase was running at the checkpoint "
                                          r"\(step 8\), so it cannot change on resume \(was 'first': steps 0-11, "
                                          r"a 0.7 b 0.3 c 0; now 'first': steps 0-11, a 1 b 0 c 0\)$"):
        loader(streams, phases=new_first).dataset.load_state_dict(in_first)


def test_resume_refuses_another_global_batch_another_seed_or_other_data(streams, tmp_path):
    data_loader = loader(streams)
    take(data_loader, 3)
    state = data_loader.dataset.state_dict(num_samples=3 * BATCH)
    cfg = loader_config(streams)
    other_batch = build_mixture_dataloader(cfg, schedule_of(cfg, batch=4), SEQ_LEN, rank=0, world_size=1)
    with pytest.raises(ConfigError, match='^global_train_batch_size: is 4 but the checkpoint was trained with 8'):
        other_batch.dataset.load_state_dict(state)
    with pytest.raises(ConfigError, match=r"^train_loader.dataset: the checkpoint read its streams in the order "
                                          r"of \{'shuffle_seed': 5, 'shuffle_block_size': 10\}, this run would use "
                                          r"\{'shuffle_seed': 6, 'shuffle_block_size': 10\}; keep the shuffle "
                                          r"settings$"):
        loader(streams, shuffle_seed=6).dataset.load_state_dict(state)
    state['streams']['a']['samples'] = 41
    with pytest.raises(ConfigError, match='^train_loader.dataset.streams.a: holds 40 samples but 41 when'):
        loader(streams).dataset.load_state_dict(state)
    with pytest.raises(CheckpointError, match='holds no curriculum position'):
        loader(streams).dataset.load_state_dict({'epoch': 0, 'sample_in_epoch': 24})  # a StreamingDataset's
