"""Wavelet transform and loss registry, checked against PyWavelets and closed forms."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import pywt
import torch

from ismctl.errors import UserError
from ismctl.losses import (
    available_losses,
    build_loss,
    dwt2,
    idwt2,
    max_levels,
    mse_loss,
    register_loss,
    wavelet_loss,
)
from ismctl.recipe import LossCfg


def _random(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape))


def _pywt_loss(
    diff: np.ndarray, wavelet: str, levels: int, approx_w: float, detail_w: float | list[float]
) -> np.ndarray:
    """Reference loss from pywt's coefficients: weighted band energies / (C*H*W), per sample."""
    coeffs = pywt.wavedec2(diff, wavelet, mode="periodization", level=levels)
    weights = [detail_w] * levels if np.isscalar(detail_w) else list(detail_w)
    total = approx_w * (coeffs[0] ** 2).sum(axis=(1, 2, 3))
    # wavedec2 lists details coarsest-first; weights are finest-first.
    for level, bands in enumerate(reversed(coeffs[1:])):
        total += weights[level] * sum((band**2).sum(axis=(1, 2, 3)) for band in bands)
    return total / np.prod(diff.shape[1:])


@pytest.mark.parametrize(
    ("wavelet", "levels", "shape"),
    [
        ("haar", 1, (2, 3, 8, 8)),
        ("haar", 5, (2, 4, 32, 32)),
        ("haar", 3, (3, 2, 16, 32)),
        ("db2", 1, (2, 3, 16, 16)),
        ("db2", 3, (2, 4, 32, 32)),
        ("sym4", 2, (1, 2, 32, 16)),
    ],
)
@pytest.mark.filterwarnings("ignore:Level value")
def test_dwt2_matches_pywt(wavelet: str, levels: int, shape: tuple[int, ...]) -> None:
    x = _random(shape, seed=levels)
    approx, details = dwt2(x, wavelet, levels)
    ref = pywt.wavedec2(x.numpy(), wavelet, mode="periodization", level=levels)
    np.testing.assert_allclose(approx.numpy(), ref[0], atol=1e-12)
    assert len(details) == levels
    for level, detail in enumerate(details):
        c_h, c_v, c_d = ref[levels - level]
        assert detail.shape == (*shape[:2], 3, *c_h.shape[-2:])
        np.testing.assert_allclose(detail[:, :, 0].numpy(), c_h, atol=1e-12)
        np.testing.assert_allclose(detail[:, :, 1].numpy(), c_v, atol=1e-12)
        np.testing.assert_allclose(detail[:, :, 2].numpy(), c_d, atol=1e-12)


def test_band_order_on_stripes() -> None:
    # Rows alternating +1/-1 vary along H only: all energy in cH (high-pass along H).
    x = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    x[..., 1::2, :] = -1.0
    _, (detail,) = dwt2(x, "haar", 1)
    energy = detail.square().sum(dim=(0, 1, 3, 4))
    np.testing.assert_allclose(energy.numpy(), [16.0, 0.0, 0.0], atol=1e-12)


@pytest.mark.parametrize(("wavelet", "levels"), [("haar", 5), ("db2", 3), ("db3", 2)])
def test_idwt2_inverts_dwt2(wavelet: str, levels: int) -> None:
    x = _random((2, 3, 32, 32), seed=7)
    approx, details = dwt2(x, wavelet, levels)
    np.testing.assert_allclose(idwt2(approx, details, wavelet).numpy(), x.numpy(), atol=1e-10)
    coeffs = pywt.wavedec2(x.numpy(), wavelet, mode="periodization", level=levels)
    ref = pywt.waverec2(coeffs, wavelet, mode="periodization")
    np.testing.assert_allclose(idwt2(approx, details, wavelet).numpy(), ref, atol=1e-10)


@pytest.mark.parametrize("wavelet", ["haar", "db2"])
def test_unit_weights_equal_mse(wavelet: str) -> None:
    pred, target = _random((4, 4, 32, 32), 1), _random((4, 4, 32, 32), 2)
    loss = wavelet_loss(pred, target, wavelet, levels=5, approx_weight=1.0, detail_weights=1.0,
                        energy_norm=False)
    ref = ((pred - target).numpy() ** 2).mean(axis=(1, 2, 3))
    assert loss.shape == (4,)
    np.testing.assert_allclose(loss.numpy(), ref, rtol=1e-12)


@pytest.mark.parametrize(
    ("wavelet", "approx_w", "detail_w"),
    [("haar", 1.0, 2.0), ("haar", 0.5, [3.0, 1.0, 0.25]), ("db2", 0.7, 1.5)],
)
def test_loss_matches_pywt_band_energies(
    wavelet: str, approx_w: float, detail_w: float | list[float]
) -> None:
    pred, target = _random((3, 2, 16, 16), 3), _random((3, 2, 16, 16), 4)
    levels = 3 if wavelet == "haar" else 2
    loss = wavelet_loss(pred, target, wavelet, levels, approx_w, detail_w, energy_norm=False)
    ref = _pywt_loss((pred - target).numpy(), wavelet, levels, approx_w, detail_w)
    np.testing.assert_allclose(loss.numpy(), ref, rtol=1e-12)


def test_fixed_weights_price_high_frequency_error_more() -> None:
    target = _random((1, 4, 32, 32), 5)
    offset = target + 0.3
    sign = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64).repeat(16, 16)
    checker = target + 0.3 * sign
    # Same energy, so the same MSE.
    np.testing.assert_allclose(mse_loss(offset, target).item(), mse_loss(checker, target).item())

    def loss(p: torch.Tensor) -> float:
        return wavelet_loss(p, target, detail_weights=2.0, energy_norm=False).item()

    # A constant lives in the approximation band (weight 1), a checkerboard in the finest
    # diagonal band (weight 2).
    np.testing.assert_allclose(loss(offset), 0.09, rtol=1e-12)
    np.testing.assert_allclose(loss(checker), 0.18, rtol=1e-12)


def _velocity_like(seed: int, size: int, channels: int) -> torch.Tensor:
    """x1 - x0 with smooth data x1 (energy at coarse scales) and white noise x0."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(16, channels, size // 4, size // 4, generator=gen, dtype=torch.float64)
    x1 = 2.0 * torch.nn.functional.interpolate(coarse, size=size, mode="bilinear")
    return x1 - torch.randn(16, channels, size, size, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize(("size", "channels"), [(32, 4), (8, 1)])
def test_default_loss_is_not_a_rescaled_mse(size: int, channels: int) -> None:
    """The recipe default changes the direction of the gradient, not only its scale: a
    uniform detail factor would not (SPEC 3.2), energy normalisation does."""
    target = _velocity_like(0, size, channels)
    pred = (target + 0.5 * _velocity_like(1, size, channels)).requires_grad_(True)

    def grad(loss_fn) -> torch.Tensor:
        pred.grad = None
        loss_fn(pred, target).sum().backward()
        return pred.grad.flatten().clone()

    default = build_loss(LossCfg(), input_size=size)
    uniform = build_loss(LossCfg(detail_weights=2.0, energy_norm=False), input_size=size)
    g_mse = grad(mse_loss)
    cos = torch.nn.functional.cosine_similarity(grad(default), g_mse, dim=0)
    cos_uniform = torch.nn.functional.cosine_similarity(grad(uniform), g_mse, dim=0)
    if size == 32:  # the mean is 1 coefficient in 1,024: a uniform factor is (almost) MSE
        assert cos_uniform > 0.99
    assert cos < 0.9


@pytest.mark.parametrize("wavelet", ["haar", "db2"])
def test_gradcheck(wavelet: str) -> None:
    pred = _random((2, 2, 4, 4), 8).requires_grad_(True)
    target = _random((2, 2, 4, 4), 9)

    def loss(p: torch.Tensor) -> torch.Tensor:
        return wavelet_loss(p, target, wavelet, 2, approx_weight=0.5, detail_weights=[2.0, 3.0])

    assert torch.autograd.gradcheck(loss, (pred,))


def test_gradient_flows_to_pred() -> None:
    pred = torch.randn(2, 4, 32, 32, requires_grad=True)
    wavelet_loss(pred, torch.randn(2, 4, 32, 32)).sum().backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0


@pytest.mark.parametrize("wavelet", ["haar", "db2", "db4", "sym3"])
@pytest.mark.parametrize("size", [2, 4, 8, 16, 32, 64])
def test_max_levels_follows_pywt(wavelet: str, size: int) -> None:
    assert max_levels(size, wavelet) == pywt.dwt_max_level(size, pywt.Wavelet(wavelet).dec_len)


def test_levels_capped_on_small_inputs() -> None:
    assert max_levels(32, "haar") == 5
    assert max_levels(8, "haar") == 3
    assert max_levels(24, "haar") == 3  # 24 -> 12 -> 6 -> 3: odd sides stop the pyramid
    pred, target = _random((2, 3, 8, 8), 10), _random((2, 3, 8, 8), 11)
    loss = wavelet_loss(pred, target, levels=5, detail_weights=2.0, energy_norm=False)
    ref = _pywt_loss((pred - target).numpy(), "haar", 3, 1.0, 2.0)
    np.testing.assert_allclose(loss.numpy(), ref, rtol=1e-12)
    built = build_loss(LossCfg(name="wavelet", levels=5, detail_weights=2.0, energy_norm=False),
                       input_size=8)
    np.testing.assert_allclose(built(pred, target).numpy(), ref, rtol=1e-12)


def test_registry() -> None:
    assert available_losses() == ["mse", "wavelet"]
    pred, target = _random((3, 4, 8, 8), 12), _random((3, 4, 8, 8), 13)
    mse = build_loss(LossCfg(name="mse"), input_size=8)
    ref = ((pred - target).numpy() ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(mse(pred, target).numpy(), ref, rtol=1e-12)
    cfg = LossCfg(name="wavelet", levels=3, approx_weight=0.5, detail_weights=[1.0, 2.0, 4.0],
                  energy_norm=False)
    wav = pickle.loads(pickle.dumps(build_loss(cfg, input_size=8)))
    ref = _pywt_loss((pred - target).numpy(), "haar", 3, 0.5, [1.0, 2.0, 4.0])
    np.testing.assert_allclose(wav(pred, target).numpy(), ref, rtol=1e-12)
    with pytest.raises(ValueError, match="already registered"):
        register_loss("mse")(lambda cfg, size: mse_loss)


def test_registry_errors() -> None:
    expected = r"loss.name: unknown loss 'l7' \(choose from mse, wavelet\)"
    with pytest.raises(UserError, match=expected):
        build_loss(LossCfg(name="l7"), input_size=32)
    with pytest.raises(UserError, match="loss.wavelet: .*not orthogonal"):
        build_loss(LossCfg(wavelet="bior2.2"), input_size=32)
    with pytest.raises(UserError, match="loss.wavelet: .*not a discrete"):
        build_loss(LossCfg(wavelet="nope"), input_size=32)
    with pytest.raises(UserError, match="loss.detail_weights"):
        build_loss(LossCfg(levels=5, detail_weights=[1.0, 2.0]), input_size=32)
    with pytest.raises(UserError, match="loss.detail_weights"):
        build_loss(LossCfg(levels=1, detail_weights=-1.0), input_size=32)
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(UserError, match="not orthogonal"):
        wavelet_loss(x, x, "bior1.3")


def test_low_precision_inputs_give_float32_loss() -> None:
    pred, target = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    loss = wavelet_loss(pred.bfloat16(), target.bfloat16())
    assert loss.dtype == torch.float32
    ref = wavelet_loss(pred.bfloat16().float(), target.bfloat16().float())
    torch.testing.assert_close(loss, ref)


def _pywt_energy_norm_loss(pred: np.ndarray, target: np.ndarray, wavelet: str, levels: int,
                           approx_w: float, detail_w: list[float]) -> np.ndarray:
    """Reference: each level's weight divided by the batch's mean squared target coefficient
    in that level's bands, from pywt's coefficients."""
    diff = pywt.wavedec2(pred - target, wavelet, mode="periodization", level=levels)
    sig = pywt.wavedec2(target, wavelet, mode="periodization", level=levels)
    total = approx_w / (sig[0] ** 2).mean() * (diff[0] ** 2).sum(axis=(1, 2, 3))
    # wavedec2 lists details coarsest-first; weights are finest-first.
    for level, (dbands, sbands) in enumerate(zip(reversed(diff[1:]), reversed(sig[1:]),
                                                 strict=True)):
        energy = np.mean(np.concatenate([(b**2).ravel() for b in sbands]))
        total += detail_w[level] / energy * sum((b**2).sum(axis=(1, 2, 3)) for b in dbands)
    return total / np.prod(pred.shape[1:])


@pytest.mark.parametrize("wavelet", ["haar", "db2"])
def test_energy_norm_matches_pywt(wavelet: str) -> None:
    pred = _random((5, 2, 16, 16), 11)
    # A target with most of its energy at coarse scales, like a velocity of smooth images.
    smooth = torch.nn.functional.interpolate(_random((5, 2, 4, 4), 12) * 4, size=16)
    target = smooth + 0.2 * _random((5, 2, 16, 16), 13)
    levels = 3 if wavelet == "haar" else 2
    weights = [1.0, 2.0, 0.5][:levels]
    loss = wavelet_loss(pred, target, wavelet, levels, 1.5, weights, energy_norm=True)
    ref = _pywt_energy_norm_loss(pred.numpy(), target.numpy(), wavelet, levels, 1.5, weights)
    np.testing.assert_allclose(loss.numpy(), ref, rtol=1e-10)
    # The normaliser is a constant of the batch: no gradient flows through the target.
    pred.requires_grad_(True)
    target.requires_grad_(True)
    wavelet_loss(pred, target, wavelet, levels, 1.0, 1.0, energy_norm=True).sum().backward()
    assert target.grad is not None and pred.grad is not None
    torch.testing.assert_close(target.grad, -pred.grad)
