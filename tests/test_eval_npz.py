"""ADM .npz files: sample round trip, reference statistics from mu/sigma vs from images."""

import numpy as np
import pytest
from test_eval_frechet import PROJ_NAME, PROJ_SIDE, numpy_projection, reference_fd

from ismctl.evaluation.features import ExtractorSpec, features_from_images
from ismctl.evaluation.frechet import feature_stats, frechet_distance
from ismctl.evaluation.npz import read_npz, write_samples_npz, write_stats_npz
from ismctl.evaluation.reference import load_reference
from ismctl.utils.errors import UserError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ISMCTL_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("channels", [1, 3])
def test_samples_round_trip_in_adm_layout(tmp_path, channels):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (9, 6, 7, channels), dtype=np.uint8)
    labels = rng.integers(0, 10, 9)
    path = write_samples_npz(tmp_path / "s.npz", images, labels)
    with np.load(path) as data:  # independent reader: exactly the ADM keys and dtypes
        assert sorted(data.files) == ["arr_0", "arr_1"]
        assert data["arr_0"].dtype == np.uint8 and data["arr_1"].dtype == np.int64
        np.testing.assert_array_equal(data["arr_0"], images)
        np.testing.assert_array_equal(data["arr_1"], labels)
    batch = read_npz(path)
    np.testing.assert_array_equal(batch.images, images)
    np.testing.assert_array_equal(batch.labels, labels)
    assert batch.mu is None and batch.sigma is None
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]  # no temporary file left


def test_writer_rejects_bad_arrays(tmp_path):
    with pytest.raises(ValueError):
        write_samples_npz(tmp_path / "a.npz", np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError):
        write_samples_npz(tmp_path / "b.npz", np.zeros((2, 4, 4, 3), np.uint8), np.zeros(3))
    assert not list(tmp_path.iterdir())


def test_reader_errors_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(UserError, match="uint8"):
        read_npz(tmp_path / "float.npz")
    np.savez(tmp_path / "other.npz", foo=np.zeros(3))
    with pytest.raises(UserError, match="arr_0") as err:
        read_npz(tmp_path / "other.npz")
    assert "\n" not in str(err.value)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError):
        read_npz(tmp_path / "junk.npz")


def test_reads_adm_reference_statistics(tmp_path):
    rng = np.random.default_rng(1)
    mu, a = rng.normal(size=5), rng.normal(size=(5, 5))
    np.savez(tmp_path / "ref.npz", mu=mu.astype(np.float32), sigma=(a @ a.T).astype(np.float32),
             mu_s=np.zeros(3), sigma_s=np.eye(3))
    batch = read_npz(tmp_path / "ref.npz")
    assert batch.images is None
    assert batch.mu.dtype == np.float64
    np.testing.assert_allclose(batch.mu, mu, rtol=1e-6)


def test_stats_npz_gives_the_same_fid_as_its_images(tmp_path):
    rng = np.random.default_rng(2)
    real = rng.integers(0, 256, (80, PROJ_SIDE, PROJ_SIDE, 3), dtype=np.uint8)
    fake = np.clip(real.astype(int) // 2 + 60, 0, 255).astype(np.uint8)
    spec = ExtractorSpec(PROJ_NAME)
    write_samples_npz(tmp_path / "real_images.npz", real)
    mu, sigma = feature_stats(numpy_projection(real))
    write_stats_npz(tmp_path / "real_stats.npz", mu, sigma, extractor=PROJ_NAME)

    from_images = load_reference(tmp_path / "real_images.npz", spec, "proj", PROJ_SIDE)
    from_stats = load_reference(tmp_path / "real_stats.npz", spec, "proj", PROJ_SIDE)
    assert from_images.count == 80 and from_stats.count is None
    fake_stats = feature_stats(features_from_images(spec, ["proj"], fake)["proj"])
    fid_images = frechet_distance(*fake_stats, from_images.mu, from_images.sigma)
    fid_stats = frechet_distance(*fake_stats, from_stats.mu, from_stats.sigma)
    n_fake = numpy_projection(fake)
    want = reference_fd(n_fake.mean(0), np.cov(n_fake, rowvar=False), mu, sigma)
    assert fid_images > 1.0
    assert fid_stats == pytest.approx(fid_images, rel=1e-4)
    assert fid_stats == pytest.approx(want, rel=1e-4)


def test_stats_for_another_extractor_fall_back_to_images(tmp_path):
    rng = np.random.default_rng(3)
    real = rng.integers(0, 256, (30, PROJ_SIDE, PROJ_SIDE, 1), dtype=np.uint8)
    with open(tmp_path / "mixed.npz", "wb") as fh:
        # ADM-style file (no "extractor" entry): its mu/sigma are Inception statistics.
        np.savez(fh, arr_0=real, mu=np.zeros(2048), sigma=np.eye(2048))
    ref = load_reference(tmp_path / "mixed.npz", ExtractorSpec(PROJ_NAME), "proj", PROJ_SIDE)
    want_mu, want_sigma = feature_stats(numpy_projection(real))
    np.testing.assert_allclose(ref.mu, want_mu, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ref.sigma, want_sigma, rtol=1e-3, atol=1e-5)
