"""TrainLoader: epoch coverage per rank, exact resume, sOT pairing, latent draws, digits."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from ismctl.data.bench import benchmark_loader, make_synthetic_latents
from ismctl.data.coupling import STATS, coupling_stats
from ismctl.data.loader import PairedLatents, TrainLoader, iter_dataset, shuffle_stream
from ismctl.data.manifest import Manifest, ShardInfo, read_manifest, write_manifest
from ismctl.data.plan import (
    NOISE,
    batches_per_pool,
    locate,
    mix_seed,
    pool_key,
    shard_order,
    slice_segments,
    worker_batch_counts,
    worker_segments,
)
from ismctl.data.prepare import prepare_latents
from ismctl.data.shards import encode_sample, sample_key, sha256_file, write_shard
from ismctl.utils.errors import UserError

NUM_CLASSES = 5


def write_indexed(folder: Path, shard_counts: list[int], std: float = 0.0, scale: float = 1.0,
                  channels: int = 2, size: int = 4) -> Manifest:
    """Shards whose sample ``i`` has mean ``i`` everywhere and flipped mean ``-(i + 1)``, so a
    drawn latent tells which sample (and which copy) it came from."""
    shards, index = [], 0
    for s, n in enumerate(shard_counts):
        samples = []
        for _ in range(n):
            moments = np.full((4, channels, size, size), std, dtype=np.float32)
            moments[0], moments[2] = index, -(index + 1)
            samples.append(encode_sample(sample_key(index), moments, index % NUM_CLASSES))
            index += 1
        name = f"part-{s:03d}.tar"
        write_shard(folder / name, samples)
        shards.append(ShardInfo(name=name, count=n, sha256=sha256_file(folder / name)))
    manifest = Manifest(count=index, num_classes=NUM_CLASSES,
                        class_names=[f"c{i}" for i in range(NUM_CLASSES)], encoder="identity",
                        scale_factor=scale, resolution=size, channels=channels, latent_size=size,
                        flip=True, shards=shards, skipped=[])
    write_manifest(folder, manifest)
    return manifest


def identify(x1: torch.Tensor, scale: float = 1.0) -> tuple[list[int], list[bool]]:
    v = torch.round(x1.mean(dim=(1, 2, 3)) / scale).long().tolist()
    return [i if i >= 0 else -i - 1 for i in v], [i < 0 for i in v]


def interleave(ds: PairedLatents, n: int) -> list:
    """What a DataLoader with ``ds.num_workers`` workers yields: worker slots in turn."""
    streams = [ds.worker_stream(ds.start_batch + s) for s in range(ds.num_workers)]
    return [next(streams[i % ds.num_workers]) for i in range(n)]


def paired(root: Path, workers: int, start: int = 0, **kw) -> PairedLatents:
    batch = kw.get("batch_size", 4)
    args = {"batch_size": batch, "pool_size": 3 * batch, "seed": 7, "rank": 0, "world_size": 1,
            "shuffle_buffer": 16, "flip": True, "mode": "blind"} | kw
    return PairedLatents(root, read_manifest(root), num_workers=workers, start_batch=start,
                         **args)


def same(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    return all(torch.equal(u, v) for x, y in zip(a, b, strict=True)
               for u, v in zip(x, y, strict=True))


def test_plan_arithmetic_matches_brute_force() -> None:
    for batches, workers in itertools.product([1, 2, 5, 6, 7], [1, 2, 3, 4]):
        owner = {}
        for g in range(batches * 6):
            epoch, j = divmod(g, batches)
            owner.setdefault((g % workers, epoch), []).append(g)
        for epoch in range(6):
            counts = worker_batch_counts(batches, workers, epoch)
            assert sum(counts) == batches
            for w in range(workers):
                mine = owner.get((w, epoch), [])
                assert counts[w] == len(mine)
                for pos, g in enumerate(mine):
                    assert locate(g, batches, workers) == (epoch, pos)

    counts = [3, 0, 5, 2, 7]
    order = np.array([2, 0, 4, 1, 3])
    flat = [(s, i) for s in order.tolist() for i in range(counts[s])]
    for start, stop in [(0, 17), (2, 9), (8, 8), (5, 16)]:
        expanded = [(seg.shard, i) for seg in slice_segments(counts, order, start, stop)
                    for i in range(seg.start, seg.stop)]
        assert expanded == flat[start:stop]


def test_pool_keys_match_brute_force() -> None:
    """A pool is keyed by the epoch of its first batch and its index among the pools that
    start in that epoch (so pools that line up with epochs keep their per-epoch keys)."""
    for batches, workers, per_pool in itertools.product([1, 5, 6, 7], [1, 2, 3], [1, 2, 4]):
        for w in range(workers):
            starts: dict[int, list[int]] = {}
            for q in range(12):
                epoch = (w + q * per_pool * workers) // batches
                starts.setdefault(epoch, []).append(q)
            for epoch, pools in starts.items():
                for index, q in enumerate(pools):
                    assert pool_key(q, epoch, batches, w, workers, per_pool) == (epoch, index)


def test_worker_segments_partition_each_epoch() -> None:
    counts = [7, 13, 30, 9, 41]  # 100 samples; 2 ranks x batch 8 -> 6 batches, 96 used
    for epoch, workers in itertools.product(range(3), [1, 2, 4]):
        order = shard_order(len(counts), 3, epoch)
        flat = [(s, i) for s in order.tolist() for i in range(counts[s])]
        seen = []
        for rank, w in itertools.product(range(2), range(workers)):
            n, segs = worker_segments(counts, 3, epoch, rank, 2, w, workers, 8)
            items = [(g.shard, i) for g in segs for i in range(g.start, g.stop)]
            assert len(items) == n * 8
            seen += items
        assert seen == flat[:96]


def test_shuffle_stream_is_a_seeded_permutation() -> None:
    items = list(range(50))
    out = list(shuffle_stream(items, 50, 10, np.random.default_rng(0)))
    assert sorted(out) == items and out != items
    assert out == list(shuffle_stream(items, 50, 10, np.random.default_rng(0)))
    assert list(shuffle_stream(items, 50, 1, np.random.default_rng(0))) == items
    assert sorted(shuffle_stream(items[:3], 3, 100, np.random.default_rng(1))) == [0, 1, 2]


def test_two_ranks_two_workers_cover_each_epoch_once(tmp_path: Path) -> None:
    write_indexed(tmp_path, [10, 10, 7, 13, 10, 10, 10, 10, 16])  # 96 = 2 ranks x 6 x 8
    per_rank = []
    for rank in range(2):
        loader = TrainLoader(tmp_path, batch_size=8, pool_size=16, seed=1, rank=rank,
                             world_size=2, num_workers=2, shuffle_buffer=20)
        assert loader.batches_per_epoch == 6
        per_rank.append(list(itertools.islice(iter(loader), 12)))
    orders = []
    for epoch in range(2):
        seen = []
        for batches in per_rank:
            for x0, x1, y, _ in batches[6 * epoch : 6 * epoch + 6]:
                assert x0.shape == x1.shape == (8, 2, 4, 4) and y.dtype == torch.long
                idx, _ = identify(x1)
                assert y.tolist() == [i % NUM_CLASSES for i in idx]
                seen += idx
        assert sorted(seen) == list(range(96))
        orders.append(seen)
    assert orders[0] != orders[1]


def test_uneven_counts_give_equal_batches_and_no_repeats(tmp_path: Path) -> None:
    write_indexed(tmp_path, [7, 13, 30, 9, 41])
    streams = [interleave(paired(tmp_path, 4, batch_size=8, world_size=2, rank=r), 18)
               for r in range(2)]
    for epoch in range(3):
        seen = []
        for batches in streams:
            for _, x1, _, _ in batches[6 * epoch : 6 * epoch + 6]:
                assert x1.shape[0] == 8
                seen += identify(x1)[0]
        assert len(seen) == len(set(seen)) == 96


def test_dataloader_workers_follow_the_interleaved_order(tmp_path: Path) -> None:
    write_indexed(tmp_path, [10, 13, 9, 11, 17])
    loader = TrainLoader(tmp_path, batch_size=4, pool_size=12, seed=7, num_workers=2,
                         shuffle_buffer=16, start_batch=5, mode="blind")
    got = list(itertools.islice(iter(loader), 9))
    assert same(got, interleave(paired(tmp_path, 2, start=5), 9))


def test_resume_equals_uninterrupted_stream(tmp_path: Path) -> None:
    write_indexed(tmp_path, [10, 13, 9, 11, 17])  # 60 samples, batch 4: 15 batches per epoch
    for workers in (1, 2, 3):
        full = interleave(paired(tmp_path, workers), 40)
        for start in (1, 4, 7, 15, 22, 31):
            assert same(interleave(paired(tmp_path, workers, start=start), 6),
                        full[start : start + 6]), (workers, start)
    full = list(itertools.islice(iter(TrainLoader(tmp_path, 4, 12, seed=7, shuffle_buffer=16)), 25))
    resumed = TrainLoader(tmp_path, 4, 12, seed=7, shuffle_buffer=16, start_batch=17)
    assert same(list(itertools.islice(iter(resumed), 8)), full[17:25])


def test_resume_across_pools_that_straddle_epochs(tmp_path: Path) -> None:
    write_indexed(tmp_path, [10, 13, 9, 11, 17])  # 15 batches of 4 per epoch
    for workers, pool in itertools.product((1, 2), (16, 28)):
        full = interleave(paired(tmp_path, workers, pool_size=pool), 45)
        for start in (13, 14, 16, 29, 33):
            assert same(interleave(paired(tmp_path, workers, start=start, pool_size=pool), 5),
                        full[start : start + 5]), (workers, pool, start)


def _record_pool_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    import ismctl.data.coupling as coupling

    sizes: list[int] = []
    real = coupling.pair_pool

    def recording(x0, x1, y=None, **kw):
        sizes.append(x0.shape[0])
        return real(x0, x1, y, **kw)

    monkeypatch.setattr(coupling, "pair_pool", recording)
    return sizes


def test_assignment_size_is_pool_size_on_any_slots_and_workers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A global batch of 32 cut into 1, 2 or 8 slots (ranks x grad_accum), read by 1 or 3
    workers per slot: every assignment holds pool_size = 64 samples, including pools that run
    across an epoch boundary, and every sample of an epoch is paired once."""
    write_indexed(tmp_path, [50, 70, 80])  # 200 samples: 6 global batches per epoch
    sizes = _record_pool_sizes(monkeypatch)
    for slots, workers in itertools.product((1, 2, 8), (1, 3)):
        micro = 32 // slots
        per_slot = max(6, 2 * 64 // micro * workers)  # two pools per worker
        sizes.clear()
        seen = []
        for slot in range(slots):
            ds = paired(tmp_path, workers, batch_size=micro, pool_size=64, rank=slot,
                        world_size=slots)
            assert ds.pool_batches == 64 // micro
            batches = interleave(ds, per_slot)
            seen += [i for _, x1, _, _ in batches[:6] for i in identify(x1)[0]]
        assert len(set(seen)) == len(seen) == 6 * 32  # each slot's first epoch: 6 batches
        assert set(sizes) == {64} and len(sizes) >= 2 * workers * slots, (slots, workers)


def test_pool_smaller_than_the_batch_pairs_each_piece(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    write_indexed(tmp_path, [10, 13, 9, 11, 17])
    sizes = _record_pool_sizes(monkeypatch)
    batches = interleave(paired(tmp_path, 1, batch_size=8, pool_size=2), 3)
    assert sizes == [2] * 12 and all(len(b[0]) == 8 for b in batches)


def test_pool_must_tile_the_micro_batch() -> None:
    assert batches_per_pool(8192, 32) == 256
    assert batches_per_pool(0, 32) == 1 and batches_per_pool(16, 32) == 1
    with pytest.raises(UserError, match=r"coupling.pool_size=100 does not split into "
                                        r"micro-batches of 32 samples.*e.g. 96 or 128"):
        batches_per_pool(100, 32)
    with pytest.raises(UserError, match=r"e.g. 32 or a divisor of 32"):
        batches_per_pool(20, 32)


def test_small_data_held_in_memory_gives_the_same_stream(tmp_path: Path, monkeypatch) -> None:
    import ismctl.data.loader as loader_module

    write_indexed(tmp_path, [10, 13, 9, 11, 17])
    held = TrainLoader(tmp_path, 4, 12, seed=7, shuffle_buffer=16)
    assert held.dataset._shards == {}  # a few kB: held
    from_memory = list(itertools.islice(iter(held), 40))  # several epochs
    assert sorted(held.dataset._shards) == [0, 1, 2, 3, 4]
    monkeypatch.setattr(loader_module, "IN_MEMORY_BYTES", 0)
    streamed = TrainLoader(tmp_path, 4, 12, seed=7, shuffle_buffer=16)
    assert streamed.dataset._shards is None
    assert same(from_memory, list(itertools.islice(iter(streamed), 40)))


def test_streams_depend_on_seed_only_as_intended(tmp_path: Path) -> None:
    write_indexed(tmp_path, [10, 13, 9, 11, 17])
    a = interleave(paired(tmp_path, 2), 10)
    assert same(a, interleave(paired(tmp_path, 2), 10))
    b = interleave(paired(tmp_path, 2, seed=8), 10)
    assert not torch.equal(a[0][0], b[0][0])
    assert [identify(x1)[0] for _, x1, _, _ in a] != [identify(x1)[0] for _, x1, _, _ in b]


def test_sot_pairs_each_pool_optimally(tmp_path: Path) -> None:
    make_synthetic_latents(tmp_path, count=64, channels=2, size=4, num_classes=3, shard_size=16)
    ds = paired(tmp_path, 1, batch_size=8, pool_size=32, shuffle_buffer=64)
    pool = interleave(ds, 4)
    x0 = torch.cat([b[0] for b in pool]).flatten(1).double()
    x1 = torch.cat([b[1] for b in pool]).flatten(1).double()
    gen = torch.Generator().manual_seed(mix_seed(7, 0, 0, 0, 0, NOISE))
    drawn = torch.cat([torch.randn(8, 2, 4, 4, generator=gen) for _ in range(4)]).flatten(1)
    # x0 is a permutation of the independently drawn noise of the pool ...
    assert sorted(map(tuple, x0.tolist())) == sorted(map(tuple, drawn.double().tolist()))
    # ... the one of least total squared distance (scipy's exact assignment as reference).
    cost = torch.cdist(x1, drawn.double()).square().numpy()
    rows, cols = linear_sum_assignment(cost)
    paired_cost = (x0 - x1).square().sum().item()
    assert paired_cost == pytest.approx(cost[rows, cols].sum(), rel=1e-9)
    assert paired_cost < np.trace(cost) * 0.95
    # Every batch carries its pool's statistics.
    y = torch.cat([b[2] for b in pool])
    expected = coupling_stats(drawn.view(32, 2, 4, 4), x0.float().view(32, 2, 4, 4),
                              x1.float().view(32, 2, 4, 4), y)
    for batch in pool:
        torch.testing.assert_close(batch[3], torch.tensor([expected[k] for k in STATS]))
    assert 0.05 < expected["cost_reduction"] < 1

    independent = interleave(paired(tmp_path, 1, batch_size=8, pool_size=0), 2)
    for k, (noise, _, _, stats) in enumerate(independent):
        assert torch.equal(stats, torch.zeros(2))
        gen = torch.Generator().manual_seed(mix_seed(7, 0, 0, 0, k, NOISE))
        assert torch.equal(noise, torch.randn(8, 2, 4, 4, generator=gen))


def test_latent_draw_statistics_and_flips(tmp_path: Path) -> None:
    write_indexed(tmp_path, [100, 100, 100], std=0.5, scale=0.5)
    eps, flips = [], []
    for _, x1, _, _ in interleave(paired(tmp_path, 2, batch_size=16, shuffle_buffer=300), 30):
        z = x1 / 0.5
        idx, flipped = identify(z)
        mean = torch.tensor([-(i + 1) if f else i for i, f in zip(idx, flipped, strict=True)])
        eps.append((z - mean.view(-1, 1, 1, 1)) / 0.5)
        flips += flipped
    e = torch.cat(eps)
    assert abs(e.mean().item()) < 0.05 and abs(e.std().item() - 1) < 0.05
    assert abs(np.mean(flips) - 0.5) < 0.1
    no_flip = interleave(paired(tmp_path, 1, batch_size=16, flip=False), 10)
    assert not any(f for _, x1, _, _ in no_flip for f in identify(x1, 0.5)[1])


def test_digits_loader(tmp_path: Path) -> None:
    prepare_latents("digits", out=tmp_path / "digits", progress=False)
    loader = TrainLoader(tmp_path / "digits", batch_size=32, pool_size=64, seed=0)
    assert loader.manifest.count == 1797 and loader.batches_per_epoch == 56
    for x0, x1, y, stats in itertools.islice(iter(loader), 4):
        assert stats.shape == (2,) and stats.dtype == torch.float32
        assert x0.shape == x1.shape == (32, 1, 8, 8) and x1.dtype == torch.float32
        assert x1.min() >= -1 and x1.max() <= 1
        assert torch.equal(x1 * 8, torch.round(x1 * 8))  # stored pixels, no latent noise
        assert y.dtype == torch.long and 0 <= y.min() and y.max() <= 9
    means = list(iter_dataset(tmp_path / "digits"))
    assert len(means) == 1797 and means[0][0].shape == (1, 8, 8)


def test_iter_dataset_yields_every_sample_in_stored_order(tmp_path: Path) -> None:
    write_indexed(tmp_path, [3, 5, 2])
    got = [(int(m[0, 0, 0]), y) for m, y in iter_dataset(tmp_path)]
    assert got == [(i, i % NUM_CLASSES) for i in range(10)]


def test_bad_inputs_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="manifest.json: not found — run `ismctl prepare-latents`"):
        TrainLoader(tmp_path / "nothing", batch_size=4, pool_size=0, seed=0)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{oops")
    with pytest.raises(UserError, match="not valid JSON"):
        read_manifest(tmp_path / "bad")
    (tmp_path / "bad" / "manifest.json").write_text('{"count": 3}')
    with pytest.raises(UserError, match="not a valid manifest"):
        read_manifest(tmp_path / "bad")
    write_indexed(tmp_path / "ok", [5, 5])
    with pytest.raises(UserError, match="cannot fill one batch"):
        TrainLoader(tmp_path / "ok", batch_size=8, pool_size=0, seed=0, world_size=2)
    (tmp_path / "ok" / "part-001.tar").unlink()
    with pytest.raises(UserError, match="part-001.tar: shard listed in manifest.json is missing"):
        TrainLoader(tmp_path / "ok", batch_size=2, pool_size=0, seed=0)


def test_synthetic_latents_and_benchmark(tmp_path: Path) -> None:
    manifest = make_synthetic_latents(tmp_path, count=40, channels=4, size=8, num_classes=10,
                                      shard_size=16)
    assert [s.count for s in manifest.shards] == [16, 16, 8]
    assert manifest.sample_shape == (4, 8, 8) and read_manifest(tmp_path) == manifest
    result = benchmark_loader(tmp_path, batch_size=4, pool_size=8, num_batches=5,
                              num_workers=0)
    assert result["latents_per_s"] > 0
    assert result["latents_per_s_per_worker"] == result["latents_per_s"]
