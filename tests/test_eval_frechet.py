"""Frechet distance and feature statistics against independent numpy/scipy references."""

import numpy as np
import pytest
import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from ismctl.evaluation.features import ExtractorSpec, features_from_images, to_nchw_uint8
from ismctl.evaluation.frechet import feature_stats, frechet_distance
from ismctl.evaluation.gather import interleave

PROJ_NAME = "test-eval-random-projection"
PROJ_DIM = 6
PROJ_SIDE = 5


def projection_matrix() -> np.ndarray:
    return np.random.default_rng(1234).normal(size=(3 * PROJ_SIDE * PROJ_SIDE, PROJ_DIM))


class RandomProjection(FeatureExtractorBase):
    """A fixed random linear map of the pixels (uint8 NCHW, 3 channels)."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        self.register_buffer("w", torch.from_numpy(projection_matrix()).float())

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        return (x.flatten(1).float() / 255.0 @ self.w,)

    @staticmethod
    def get_provided_features_list():
        return ("proj",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "proj"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, PROJ_SIDE, PROJ_SIDE, dtype=torch.uint8)


if PROJ_NAME not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(PROJ_NAME, RandomProjection)


def reference_fd(mu1, s1, mu2, s2) -> float:
    """Independent form: tr sqrt(S1 S2) = sum of sqrt of the eigenvalues of S1 S2 (real and
    non-negative for a product of PSD matrices)."""
    eig = np.linalg.eigvals(s1 @ s2)
    root = np.sqrt(np.clip(eig.real, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * root)


def random_psd(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / d


def test_matches_eigenvalue_reference():
    rng = np.random.default_rng(0)
    for d in (1, 3, 12):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = random_psd(rng, d), random_psd(rng, d)
        got = frechet_distance(mu1, s1, mu2, s2)
        assert got == pytest.approx(reference_fd(mu1, s1, mu2, s2), rel=1e-8, abs=1e-9)


def test_diagonal_closed_form():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3.0, 7), rng.uniform(0.1, 3.0, 7)
    mu1, mu2 = rng.normal(size=7), rng.normal(size=7)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_feature_stats_is_mean_and_unbiased_covariance():
    x = np.random.default_rng(2).normal(size=(50, 4)).astype(np.float32)
    mu, sigma = feature_stats(x)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    xd = x.astype(np.float64)
    centred = xd - xd.mean(axis=0)
    np.testing.assert_allclose(mu, xd.sum(axis=0) / 50, rtol=1e-12)
    np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-10)


def test_same_set_is_zero_and_shift_adds_its_squared_norm():
    x = np.random.default_rng(3).normal(size=(400, 10))
    mu, sigma = feature_stats(x)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    direction = np.random.default_rng(4).normal(size=10)
    direction /= np.linalg.norm(direction)
    previous = -1.0
    for k in (0.25, 0.5, 1.0, 2.0, 4.0):
        mu2, sigma2 = feature_stats(x + k * direction)
        fd = frechet_distance(mu, sigma, mu2, sigma2)
        # A pure translation leaves the covariance unchanged: FD = |shift|^2 exactly.
        assert fd == pytest.approx(k**2, rel=1e-6)
        assert fd > previous
        previous = fd


def test_singular_covariances_stay_finite():
    rng = np.random.default_rng(5)
    s1, s2 = random_psd(rng, 20, rank=3), random_psd(rng, 20, rank=4)
    mu = np.zeros(20)
    got = frechet_distance(mu, s1, mu, s2)
    assert np.isfinite(got)
    assert got == pytest.approx(reference_fd(mu, s1, mu, s2), abs=1e-3)
    # The fallback must not bias identical statistics away from 0.
    assert abs(frechet_distance(mu, s1, mu, s1)) < 1e-6


def test_failed_root_falls_back_to_regularised_covariances(monkeypatch):
    import scipy.linalg

    rng = np.random.default_rng(9)
    s1, s2 = random_psd(rng, 5), random_psd(rng, 5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    real_sqrtm, calls = scipy.linalg.sqrtm, []

    def flaky(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(scipy.linalg, "sqrtm", flaky)
    got = frechet_distance(mu1, s1, mu2, s2, eps=1e-3)
    assert len(calls) == 2
    off = np.eye(5) * 1e-3
    assert got == pytest.approx(reference_fd(mu1, s1 + off, mu2, s2 + off), rel=1e-8)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_to_nchw_repeats_grayscale_and_keeps_rgb():
    gray = np.random.default_rng(6).integers(0, 256, (2, 4, 5, 1), dtype=np.uint8)
    out = to_nchw_uint8(gray).numpy()
    assert out.shape == (2, 3, 4, 5)
    for c in range(3):
        np.testing.assert_array_equal(out[:, c], gray[..., 0])
    rgb = np.random.default_rng(7).integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)
    np.testing.assert_array_equal(to_nchw_uint8(rgb).numpy(), rgb.transpose(0, 3, 1, 2))
    with pytest.raises(ValueError):
        to_nchw_uint8(rgb.astype(np.float32))


def numpy_projection(images: np.ndarray) -> np.ndarray:
    """The same features computed by hand: NHWC -> 3-channel NCHW, flatten, project."""
    x = images.astype(np.float64) / 255.0
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return x.transpose(0, 3, 1, 2).reshape(len(x), -1) @ projection_matrix()


@pytest.mark.parametrize("channels", [1, 3])
def test_registered_extractor_path_matches_numpy(channels):
    rng = np.random.default_rng(8)
    real = rng.integers(0, 256, (60, PROJ_SIDE, PROJ_SIDE, channels), dtype=np.uint8)
    fake = np.clip(real.astype(int) + rng.integers(-40, 80, real.shape), 0, 255).astype(np.uint8)
    spec = ExtractorSpec(PROJ_NAME)
    f_real = features_from_images(spec, ["proj"], real, batch_size=7)["proj"]
    f_fake = features_from_images(spec, ["proj"], fake, batch_size=16)["proj"]
    np.testing.assert_allclose(f_real, numpy_projection(real), rtol=1e-4, atol=1e-4)
    got = frechet_distance(*feature_stats(f_real), *feature_stats(f_fake))
    n_real, n_fake = numpy_projection(real), numpy_projection(fake)
    want = reference_fd(n_real.mean(0), np.cov(n_real, rowvar=False),
                        n_fake.mean(0), np.cov(n_fake, rowvar=False))
    assert want > 0.1
    assert got == pytest.approx(want, rel=1e-3)


def test_interleave_inverts_strided_sharding():
    full = np.arange(23 * 2).reshape(23, 2)
    for world in (1, 2, 3, 5):
        parts = [full[r::world] for r in range(world)]
        np.testing.assert_array_equal(interleave(parts), full)
