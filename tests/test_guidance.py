import numpy as np
import pytest
import torch

from ismctl.objectives.guidance import (
    cfg_combine,
    guidance_grid,
    interval_weight,
    sample_guidance,
    scale_to_w,
    w_to_scale,
)
from ismctl.utils.errors import UserError


def test_cfg_combine_matches_numpy_per_sample_and_scalar() -> None:
    rng = np.random.default_rng(0)
    vc, vn = rng.normal(size=(2, 3, 4, 4, 4))
    w = np.array([0.0, 1.5, 3.0])
    got = cfg_combine(torch.from_numpy(vc), torch.from_numpy(vn), torch.from_numpy(w))
    want = vc + w[:, None, None, None] * (vc - vn)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    got_scalar = cfg_combine(torch.from_numpy(vc), torch.from_numpy(vn), 0.5)
    np.testing.assert_allclose(got_scalar.numpy(), vc + 0.5 * (vc - vn), rtol=1e-12)


def test_cfg_combine_equals_classic_cfg_with_scale_one_plus_w() -> None:
    vc, vn = torch.randn(2, 5, 3, dtype=torch.float64)
    s = 1.5
    classic = vn + s * (vc - vn)
    torch.testing.assert_close(cfg_combine(vc, vn, scale_to_w(s)), classic)


def test_scale_and_w_are_inverse() -> None:
    assert scale_to_w(1.5) == pytest.approx(0.5)
    assert w_to_scale(0.0) == 1.0
    for w in (0.0, 0.25, 3.5):
        assert scale_to_w(w_to_scale(w)) == pytest.approx(w)


def test_guidance_grid_includes_zero_and_max() -> None:
    np.testing.assert_allclose(guidance_grid(3.5, 0.25).numpy(), np.arange(0, 3.5001, 0.25))
    np.testing.assert_allclose(guidance_grid(1.0, 0.3).numpy(), [0.0, 0.3, 0.6, 0.9])
    np.testing.assert_allclose(guidance_grid(0.0, 0.25).numpy(), [0.0])
    with pytest.raises(UserError):
        guidance_grid(1.0, 0.0)


def test_sample_guidance_is_uniform_on_the_grid() -> None:
    gen = torch.Generator().manual_seed(0)
    n = 30_000
    w = sample_guidance(n, 3.5, 0.25, gen, "cpu")
    assert w.shape == (n,) and w.dtype == torch.float32
    grid = np.arange(15) * 0.25
    values, counts = np.unique(w.numpy(), return_counts=True)
    np.testing.assert_allclose(values, grid)
    # Each of 15 values has probability 1/15: binomial sd ~ 43, so 5 sd is ~ 215.
    assert np.abs(counts - n / 15).max() < 5 * np.sqrt(n * (1 / 15) * (14 / 15))


def test_sample_guidance_is_reproducible_with_generator() -> None:
    a = sample_guidance(64, 2.0, 0.5, torch.Generator().manual_seed(3), "cpu")
    b = sample_guidance(64, 2.0, 0.5, torch.Generator().manual_seed(3), "cpu")
    torch.testing.assert_close(a, b)
    # Without a generator, torch's global RNG draws them.
    torch.manual_seed(3)
    a = sample_guidance(64, 2.0, 0.5, None, "cpu")
    torch.manual_seed(3)
    torch.testing.assert_close(sample_guidance(64, 2.0, 0.5, None, "cpu"), a, rtol=0, atol=0)
    assert set(a.tolist()) == {0.0, 0.5, 1.0, 1.5, 2.0}


def test_guidance_grid_is_exact_in_float64() -> None:
    """k * w_step in float64, as numpy computes it (float32 steps drift by an ulp or more)."""
    grid = guidance_grid(2.0, 0.1)
    assert grid.dtype == torch.float64
    np.testing.assert_array_equal(grid.numpy(), np.arange(21) * 0.1)


def test_interval_weight_zeroes_high_noise_end() -> None:
    t = torch.tensor([0.0, 0.29, 0.3, 0.7, 1.0])
    w = torch.tensor([2.0, 2.0, 2.0, 1.0, 3.0])
    torch.testing.assert_close(interval_weight(t, w, 0.3), torch.tensor([0.0, 0.0, 2.0, 1.0, 3.0]))
    torch.testing.assert_close(interval_weight(t, w, 0.0), w)


def test_per_sample_strength_takes_the_velocity_dtype() -> None:
    """A float64 strength does not promote float32 (or bf16) velocities."""
    for dtype in (torch.float32, torch.bfloat16):
        vc, vn = torch.randn(2, 3, 2, 2).to(dtype)
        out = cfg_combine(vc, vn, torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64))
        assert out.dtype == dtype


def test_baked_scale_accepts_kappa_in_zero_to_one() -> None:
    from ismctl.objectives.guidance import baked_scale

    assert baked_scale(1.0, 0.0) == 1.0
    assert baked_scale(0.5, 0.75) == pytest.approx(2.0)
    for kappa in (1.0, 1.5, -0.1):
        with pytest.raises(UserError, match="kappa"):
            baked_scale(0.5, kappa)
