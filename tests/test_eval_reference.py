"""Reference statistics: streaming accumulation, image sources, on-disk cache, two ranks."""

import os
import socket

import numpy as np
import pytest
import torch.multiprocessing as mp
from PIL import Image
from test_eval_frechet import PROJ_NAME, numpy_projection

from ismctl.evaluation import reference as reference_mod
from ismctl.evaluation.features import ExtractorSpec
from ismctl.evaluation.frechet import feature_stats
from ismctl.evaluation.reference import (
    StatsAccumulator,
    compute_reference,
    load_reference,
    subset_indices,
)
from ismctl.evaluation.sources import DigitsImages, FolderImages, open_source
from ismctl.utils.errors import UserError

SPEC = ExtractorSpec(PROJ_NAME)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ISMCTL_CACHE", str(tmp_path / "cache"))


def test_accumulator_matches_numpy_across_batches_and_merges():
    x = np.random.default_rng(0).normal(loc=50.0, scale=2.0, size=(103, 6))
    parts = []
    for rows in np.array_split(np.arange(103), 3):
        acc = StatsAccumulator()
        for chunk in np.array_split(rows, 4):
            acc.add(x[chunk])
        parts.append(acc)
    total = StatsAccumulator()
    for acc in parts:
        total.merge(acc)
    mu, sigma = total.finalize()
    assert total.count == 103
    np.testing.assert_allclose(mu, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)


def test_subset_indices_are_a_fixed_sorted_subset():
    a = subset_indices(1000, 10)
    assert len(a) == 10 and len(set(a)) == 10 and np.all(np.diff(a) > 0)
    np.testing.assert_array_equal(a, subset_indices(1000, 10))
    np.testing.assert_array_equal(subset_indices(7, 10), np.arange(7))


def write_folder(root, images):
    (root / "b").mkdir(parents=True)
    (root / "a").mkdir()
    for i, img in enumerate(images):
        # Nested, unsorted creation: the source lists files recursively in sorted order.
        sub = "a" if i % 2 else "b"
        Image.fromarray(img).save(root / sub / f"{i:03d}.png")
    order = [f"a/{i:03d}.png" for i in range(1, len(images), 2)]
    order += [f"b/{i:03d}.png" for i in range(0, len(images), 2)]
    return [int(name[2:5]) for name in order]


def test_folder_source_reads_sorted_files_and_rank_shares(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 5, 5, 3), dtype=np.uint8)
    order = write_folder(tmp_path / "imgs", images)
    src = open_source(tmp_path / "imgs", resolution=5)
    assert isinstance(src, FolderImages) and src.count == 7
    got = np.concatenate([b for _, b in src.batches(3)])
    np.testing.assert_array_equal(got, images[order])
    shares = [np.concatenate([i for i, _ in src.batches(2, r, 3)]) for r in range(3)]
    np.testing.assert_array_equal(np.sort(np.concatenate(shares)), np.arange(7))


def test_open_source_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        open_source(tmp_path / "nope", 8)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(UserError, match="npz"):
        open_source(tmp_path / "x.txt", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        open_source(tmp_path / "empty", 8)


def test_folder_reference_matches_numpy_and_is_cached(tmp_path, monkeypatch):
    images = np.random.default_rng(2).integers(0, 256, (12, 5, 5, 3), dtype=np.uint8)
    order = write_folder(tmp_path / "imgs", images)
    ref = load_reference(tmp_path / "imgs", SPEC, "proj", 5, keep_features=4, batch_size=5)
    want = numpy_projection(images[order])
    mu, sigma = feature_stats(want)
    np.testing.assert_allclose(ref.mu, mu, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ref.sigma, sigma, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(ref.features, want[subset_indices(12, 4)], rtol=1e-4, atol=1e-5)
    assert ref.cache_file is not None and ref.cache_file.is_file()

    def fail(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(reference_mod, "compute_reference", fail)
    again = load_reference(tmp_path / "imgs", SPEC, "proj", 5, keep_features=4, batch_size=5)
    assert again.cache_file == ref.cache_file
    np.testing.assert_array_equal(again.mu, ref.mu)
    np.testing.assert_array_equal(again.features, ref.features)
    assert again.stats_hash() == ref.stats_hash()
    # A changed folder is a different cache key: recomputed.
    Image.fromarray(images[0]).save(tmp_path / "imgs" / "extra.png")
    with pytest.raises(AssertionError, match="recomputed"):
        load_reference(tmp_path / "imgs", SPEC, "proj", 5, keep_features=4)


def test_prepared_digits_shards_decode_to_the_builtin_digits(tmp_path):
    from ismctl.data.prepare import prepare_latents

    prepare_latents("digits", out=tmp_path / "digits", progress=False)
    shards = open_source(tmp_path / "digits", resolution=8)
    builtin = open_source("digits", resolution=8)
    assert isinstance(builtin, DigitsImages) and shards.count == builtin.count == 1797
    shares = [list(shards.batches(500, rank=r, world_size=2)) for r in range(2)]
    idx = [np.concatenate([i for i, _ in share]) for share in shares]
    np.testing.assert_array_equal(idx[1], np.arange(1, 1797, 2))
    decoded = np.concatenate([b for share in shares for _, b in share]).reshape(1797, -1)
    # Shards store a shuffled order: compare the two sets of images as sorted rows.
    flat = builtin.images.reshape(1797, -1)
    np.testing.assert_array_equal(decoded[np.lexsort(decoded.T)], flat[np.lexsort(flat.T)])


def _two_rank_worker(rank, port, folder, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        ref = compute_reference(open_source(folder, 5), SPEC, "proj", keep_features=5,
                                batch_size=2, rank=rank, world_size=2)
        if rank == 0:
            np.savez(out, mu=ref.mu, sigma=ref.sigma, features=ref.features, count=ref.count)
        else:
            assert ref is None
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_give_the_single_process_statistics(tmp_path):
    images = np.random.default_rng(3).integers(0, 256, (11, 5, 5, 3), dtype=np.uint8)
    write_folder(tmp_path / "imgs", images)
    single = compute_reference(open_source(tmp_path / "imgs", 5), SPEC, "proj", keep_features=5)
    out = tmp_path / "two.npz"
    mp.spawn(_two_rank_worker, args=(_free_port(), tmp_path / "imgs", out), nprocs=2)
    two = np.load(out)
    assert int(two["count"]) == single.count == 11
    np.testing.assert_allclose(two["mu"], single.mu, rtol=1e-6)
    np.testing.assert_allclose(two["sigma"], single.sigma, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(two["features"], single.features, rtol=1e-6)
