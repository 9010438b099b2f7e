"""Wavelet transform and loss registry, checked against PyWavelets and closed forms."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import pywt
import torch

from ismctl.config.recipe import DataCfg, LossCfg
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
from ismctl.losses.band_stats import (
    BAND_STATS_FILE,
    band_stats_for_run,
    band_weights,
    dataset_band_stats,
    latent_like,
    measure_band_stats,
    run_band_stats,
    weight_table,
    white_stats,
)
from ismctl.losses.wavelet import band_energies
from ismctl.utils.errors import UserError


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
    single = x.float()
    back = idwt2(*dwt2(single, wavelet, levels), wavelet)
    if wavelet == "haar":
        torch.testing.assert_close(idwt2(*dwt2(single, levels=levels)), back)
    assert back.dtype == torch.float32
    np.testing.assert_allclose(back.numpy(), x.numpy(), atol=1e-5)


@pytest.mark.parametrize("wavelet", ["haar", "db2"])
def test_unit_weights_equal_mse(wavelet: str) -> None:
    pred, target = _random((4, 4, 32, 32), 1), _random((4, 4, 32, 32), 2)
    loss = wavelet_loss(pred, target, wavelet, levels=5, approx_weight=1.0, detail_weights=1.0)
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
    loss = wavelet_loss(pred, target, wavelet, levels, approx_w, detail_w)
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
        return wavelet_loss(p, target, detail_weights=2.0).item()

    # A constant lives in the approximation band (weight 1), a checkerboard in the finest
    # diagonal band (weight 2).
    np.testing.assert_allclose(loss(offset), 0.09, rtol=1e-12)
    np.testing.assert_allclose(loss(checker), 0.18, rtol=1e-12)


def _smooth(seed: int, size: int, channels: int, count: int = 16) -> torch.Tensor:
    """Smooth data: most of its variance at coarse scales."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(count, channels, size // 4, size // 4, generator=gen,
                         dtype=torch.float64)
    return 2.0 * torch.nn.functional.interpolate(coarse, size=size, mode="bilinear")


def _velocity_like(seed: int, size: int, channels: int) -> torch.Tensor:
    """x1 - x0 with smooth data x1 (energy at coarse scales) and white noise x0."""
    gen = torch.Generator().manual_seed(seed + 1000)
    x1 = _smooth(seed, size, channels)
    return x1 - torch.randn(x1.shape, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize(("size", "channels"), [(32, 4), (8, 1)])
def test_default_loss_is_not_a_rescaled_mse(size: int, channels: int) -> None:
    """The recipe default changes the direction of the gradient, not only its scale: a
    uniform detail factor would not (method §3.2), the data set's band normaliser does."""
    target = _velocity_like(0, size, channels)
    pred = (target + 0.5 * _velocity_like(1, size, channels)).requires_grad_(True)
    stats = measure_band_stats(_smooth(2, size, channels, 256), "haar", 5)

    def grad(loss_fn) -> torch.Tensor:
        pred.grad = None
        loss_fn(pred, target).sum().backward()
        return pred.grad.flatten().clone()

    default = build_loss(LossCfg(), input_size=size, band_stats=stats)
    uniform = build_loss(LossCfg(detail_weights=2.0), input_size=size)
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
    loss = wavelet_loss(pred, target, levels=5, detail_weights=2.0)
    ref = _pywt_loss((pred - target).numpy(), "haar", 3, 1.0, 2.0)
    np.testing.assert_allclose(loss.numpy(), ref, rtol=1e-12)
    built = build_loss(LossCfg(name="wavelet", levels=5, detail_weights=2.0),
                       input_size=8)
    np.testing.assert_allclose(built(pred, target).numpy(), ref, rtol=1e-12)


def test_registry() -> None:
    assert available_losses() == ["mse", "wavelet"]
    pred, target = _random((3, 4, 8, 8), 12), _random((3, 4, 8, 8), 13)
    mse = build_loss(LossCfg(name="mse"), input_size=8)
    ref = ((pred - target).numpy() ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(mse(pred, target).numpy(), ref, rtol=1e-12)
    cfg = LossCfg(name="wavelet", levels=3, approx_weight=0.5, detail_weights=[1.0, 2.0, 4.0],
                  band_norm="none")
    wav = pickle.loads(pickle.dumps(build_loss(cfg, input_size=8)))
    ref = _pywt_loss((pred - target).numpy(), "haar", 3, 0.5, [1.0, 2.0, 4.0])
    np.testing.assert_allclose(wav(pred, target).numpy(), ref, rtol=1e-12)
    with pytest.raises(ValueError, match="already registered"):
        register_loss("mse")(lambda cfg, size, stats: mse_loss)


def test_a_new_loss_registers_once_its_name_is_known(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loss whose name the recipe schema does not know is refused; once the name is in
    ``LOSS_NAMES`` the factory is registered and ``build_loss`` builds it."""
    import ismctl.losses as losses

    monkeypatch.setattr(losses, "_REGISTRY", dict(losses._REGISTRY))

    def l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (pred - target).abs().flatten(1).mean(1)

    with pytest.raises(ValueError, match="add its name to ismctl.config.names.LOSS_NAMES"):
        register_loss("l1")(lambda cfg, size, stats: l1)
    assert available_losses() == ["mse", "wavelet"]
    monkeypatch.setattr(losses, "LOSS_NAMES", (*losses.LOSS_NAMES, "l1"))
    factory = register_loss("l1")(lambda cfg, size, stats: l1)
    assert available_losses() == ["l1", "mse", "wavelet"]
    assert build_loss(LossCfg.model_construct(name="l1"), input_size=8) is l1
    assert factory(None, 8, None) is l1


def test_registry_errors() -> None:
    # The recipe schema refuses most of these too; build_loss checks again for losses built
    # from a LossCfg that skipped validation (model_construct).
    unchecked = LossCfg.model_construct
    expected = r"loss.name: unknown loss 'l7' \(choose from mse, wavelet\)"
    with pytest.raises(UserError, match=expected):
        build_loss(unchecked(name="l7"), input_size=32)
    with pytest.raises(UserError, match="loss.wavelet: .*not orthogonal"):
        build_loss(unchecked(wavelet="bior2.2"), input_size=32)
    with pytest.raises(UserError, match="loss.wavelet: .*not a discrete"):
        build_loss(unchecked(wavelet="nope"), input_size=32)
    with pytest.raises(UserError, match="loss.detail_weights"):
        build_loss(unchecked(levels=5, detail_weights=[1.0, 2.0]), input_size=32)
    with pytest.raises(UserError, match="loss.detail_weights"):
        build_loss(unchecked(levels=1, detail_weights=-1.0), input_size=32)
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(UserError, match="not orthogonal"):
        wavelet_loss(x, x, "bior1.3")


def test_low_precision_inputs_give_float32_loss() -> None:
    pred, target = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    loss = wavelet_loss(pred.bfloat16(), target.bfloat16())
    assert loss.dtype == torch.float32
    ref = wavelet_loss(pred.bfloat16().float(), target.bfloat16().float())
    torch.testing.assert_close(loss, ref)


def _pywt_band_stats(x1: np.ndarray, wavelet: str, levels: int) -> tuple[list, list]:
    """Reference: per band (finest detail level first, then the approximation) the mean square
    and the mean across-sample variance of the coefficients, from pywt."""
    coeffs = pywt.wavedec2(x1, wavelet, mode="periodization", level=levels)
    bands = [np.concatenate([b.reshape(len(x1), -1) for b in lv], axis=1)
             for lv in reversed(coeffs[1:])] + [coeffs[0].reshape(len(x1), -1)]
    return ([float((b**2).mean()) for b in bands],
            [float(b.var(axis=0, ddof=1).mean()) for b in bands])


@pytest.mark.parametrize(("wavelet", "levels"), [("haar", 3), ("db2", 2)])
def test_band_stats_match_pywt(wavelet: str, levels: int) -> None:
    x1 = _smooth(3, 16, 2, count=40) + 0.7
    stats = measure_band_stats(x1, wavelet, levels)
    energy, variance = _pywt_band_stats(x1.numpy(), wavelet, levels)
    np.testing.assert_allclose(stats.energy, energy, rtol=1e-10)
    np.testing.assert_allclose(stats.variance, variance, rtol=1e-10)
    # The velocity x1 - x0 with independent unit noise: +1 per coefficient (orthonormal DWT).
    np.testing.assert_allclose(stats.velocity("variance"), np.array(variance) + 1, rtol=1e-12)
    assert sum(stats.coefficients) == x1[0].numel()


def test_noise_adds_one_per_coefficient() -> None:
    """The analytic noise term against a sampled velocity: v = x1 - x0 measured directly."""
    x1 = latent_like(4096, channels=2, size=8, seed=1, mean_spread=0.3)
    x0 = torch.randn(x1.shape, generator=torch.Generator().manual_seed(2))
    direct = measure_band_stats(x1 - x0, "haar", 3)
    analytic = measure_band_stats(x1, "haar", 3)
    np.testing.assert_allclose(direct.variance, analytic.velocity("variance"), rtol=0.06)
    np.testing.assert_allclose(direct.energy, analytic.velocity("energy"), rtol=0.06)


def test_band_weights_closed_form_and_cap() -> None:
    stats = measure_band_stats(_smooth(4, 16, 2, count=64), "haar", 4)
    for norm in ("energy", "variance"):
        weights = band_weights(stats, norm, None)
        inverse = 1 / np.array(stats.velocity(norm))
        # Proportional to 1 / (per-coefficient statistic), and a white residual costs its MSE.
        np.testing.assert_allclose(np.array(weights) / inverse, weights[0] / inverse[0])
        assert np.dot(stats.coefficients, weights) == pytest.approx(sum(stats.coefficients))
    capped = band_weights(stats, "energy", 3.0)
    assert max(capped) / min(capped) == pytest.approx(3.0)
    assert band_weights(stats, "none", 3.0) == [1.0] * 5
    white = white_stats((4, 32, 32), "haar", 5)
    assert band_weights(white, "variance", None) == pytest.approx([1.0] * 6)


def test_latent_like_mean_band_is_starved_by_raw_energy_only() -> None:
    """32x32x4, unit white details, channel means +-0.5: the raw energy of the approximation
    (the per-channel mean times 32) is ~1024 * 0.25 + 2 per coefficient, so the raw normaliser
    prices mean errors ~130x below detail errors; the centred energy (variance) does not."""
    stats = measure_band_stats(latent_like(2048), "haar", 5)
    raw = band_weights(stats, "energy", None)
    centred = band_weights(stats, "variance", None)
    assert raw[0] / raw[-1] == pytest.approx(129, rel=0.05)
    np.testing.assert_allclose(centred, 1.0, rtol=0.05)
    assert "approx (1x1)" in weight_table(stats, 10.0)


def _tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.GELU(),
                               torch.nn.Conv2d(8, 4, 3, padding=1)).double()


def _grads(net: torch.nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    return [g.clone() for g in torch.autograd.grad(loss, list(net.parameters()))]


def _batch_normalised(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The former normaliser, each band divided by the batch's own target energy: the kind of
    loss this test must catch."""
    weights = [1 / (e.mean() / n) for e, n in
               zip(band_energies(target, "haar", 5), [768 * 4, 192 * 4, 48 * 4, 12 * 4, 3 * 4,
                                                      4], strict=True)]
    return sum(w * e for w, e in zip(weights, band_energies(pred - target, "haar", 5),
                                     strict=True)) / target[0].numel()


def test_batch_split_gives_the_same_loss_and_gradients() -> None:
    """The same 16 samples as 1 rank x 16, 2 ranks x 8 (DDP averages the ranks' gradients) and
    1 rank x 2 accumulation steps of 8 (each micro-batch's mean loss / 2): the same per-sample
    losses, mean loss and gradients with the data-set normaliser; a batch-estimated one
    differs."""
    stats = measure_band_stats(latent_like(512, seed=3, mean_spread=0.3).double(), "haar", 5)
    loss_fn = build_loss(LossCfg(), 32, stats)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(16, 4, 32, 32, generator=gen, dtype=torch.float64)
    target = latent_like(16, seed=6, mean_spread=0.3).double() - x
    net = _tiny_net()
    whole = loss_fn(net(x), target)
    halves = torch.cat([loss_fn(net(x[:8]), target[:8]), loss_fn(net(x[8:]), target[8:])])
    torch.testing.assert_close(whole, halves, rtol=1e-12, atol=0)
    one_rank = _grads(net, whole.mean())
    ranks = [_grads(net, loss_fn(net(x[i:i + 8]), target[i:i + 8]).mean()) for i in (0, 8)]
    two_ranks = [(a + b) / 2 for a, b in zip(*ranks, strict=True)]
    accum = [sum(parts) for parts in zip(*[
        _grads(net, loss_fn(net(x[i:i + 8]), target[i:i + 8]).mean() / 2) for i in (0, 8)],
        strict=True)]
    for g1, g2, g3 in zip(one_rank, two_ranks, accum, strict=True):
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(g1, g3, rtol=1e-10, atol=1e-14)
    # The control: a normaliser estimated on each micro-batch changes with the split.
    old_whole = _batch_normalised(net(x), target)
    old_halves = torch.cat([_batch_normalised(net(x[:8]), target[:8]),
                            _batch_normalised(net(x[8:]), target[8:])])
    assert not torch.allclose(old_whole, old_halves, rtol=1e-3)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory):
    from ismctl.data.prepare import prepare_latents

    out = tmp_path_factory.mktemp("data") / "digits"
    prepare_latents("digits", out=out, progress=False)
    return out


def test_dataset_band_stats_are_the_loaders_latents(digits) -> None:
    """The statistics of the prepared digits equal pywt's on the same samples (the digits are
    stored with std 0, so a drawn latent is the scaled mean) and do not depend on the order
    the subset is asked for: the first N samples in shard order."""
    from ismctl.data.manifest import read_manifest
    from ismctl.data.shards import decode_moments, iter_shard

    manifest = read_manifest(digits)
    samples = [decode_moments(s["npy"]) for shard in manifest.shards
               for s in iter_shard(digits / shard.name)][:500]
    x1 = manifest.scale_factor * np.stack(samples)[:, 0].astype(np.float64)
    stats = dataset_band_stats(digits, "haar", 3, samples=500)
    energy, variance = _pywt_band_stats(x1, "haar", 3)
    np.testing.assert_allclose(stats.energy, energy, rtol=1e-5)
    np.testing.assert_allclose(stats.variance, variance, rtol=1e-5)
    assert stats.samples == 500 and stats.shape == (1, 8, 8)


def test_run_band_stats_are_stored_and_reused(digits, tmp_path, monkeypatch) -> None:
    loss, data = LossCfg(levels=3), DataCfg(path=str(digits), flip=False)
    first = band_stats_for_run(loss, data, tmp_path, is_main=True)
    stored = tmp_path / BAND_STATS_FILE
    assert first is not None and stored.is_file()
    # Another rank (and a resumed run) reads the stored numbers instead of measuring again.
    import ismctl.losses.band_stats as bs

    monkeypatch.setattr(bs, "dataset_band_stats", lambda *a, **k: pytest.fail("measured"))
    assert band_stats_for_run(loss, data, tmp_path, is_main=False) == first
    assert run_band_stats(tmp_path, digits, "haar", 3, 4096, False, write=True) == first
    monkeypatch.undo()
    # Other transform, other statistics: measured again.
    assert run_band_stats(tmp_path, digits, "haar", 2, 4096, False, write=False).levels == 2
    assert band_stats_for_run(LossCfg(name="mse"), data, tmp_path, True) is None
    assert band_stats_for_run(LossCfg(band_norm="none"), data, tmp_path, True) is None
    with pytest.raises(UserError, match="band statistics measured for haar L = 3"):
        build_loss(LossCfg(levels=5), 32, first)


@pytest.mark.parametrize("wavelet", ["haar", "db2"])
@pytest.mark.parametrize("shape", [(2, 8, 32), (2, 32, 8), (1, 16, 16)])
def test_white_stats_are_the_statistics_of_white_data(shape: tuple[int, int, int],
                                                       wavelet: str) -> None:
    """The stand-in for a data set equals what ``measure_band_stats`` finds on unit white noise
    (to sampling error), as deep as the shorter side allows, with PyWavelets' band sizes."""
    white = white_stats(shape, wavelet, 5)
    measured = measure_band_stats(torch.randn(4000, *shape, generator=torch.Generator()
                                              .manual_seed(2), dtype=torch.float64), wavelet, 5)
    depth = min(pywt.dwt_max_level(side, pywt.Wavelet(wavelet).dec_len) for side in shape[1:])
    # The transform is periodic: every level halves both sides, whatever the filter length.
    sizes = [shape[0] * 3 * (shape[1] >> lv) * (shape[2] >> lv) for lv in range(1, depth + 1)]
    assert (white.wavelet, white.levels, white.shape) == (wavelet, depth, shape)
    assert (measured.levels, measured.coefficients) == (depth, white.coefficients)
    assert white.coefficients == (*sizes, shape[0] * (shape[1] >> depth) * (shape[2] >> depth))
    np.testing.assert_allclose(white.energy, measured.energy, rtol=0.1)
    np.testing.assert_allclose(white.variance, measured.variance, rtol=0.1)
    assert white.samples == 0 and white.key == "white"
    # Two samples are the fewest that have a variance.
    assert measure_band_stats(torch.randn(2, *shape), wavelet, 5).samples == 2
    with pytest.raises(UserError, match="at least 2 samples"):
        measure_band_stats(torch.randn(1, *shape), wavelet, 5)


@pytest.mark.parametrize("shape", [(2, 3, 8, 32), (2, 3, 32, 8)])
def test_non_square_inputs_against_pywavelets(shape: tuple[int, ...]) -> None:
    """On H != W (and C != H, W) the band energies and the loss follow PyWavelets, as deep as
    the shorter side allows (3 levels of haar on 8 pixels)."""
    diff = _random(shape, seed=21)
    coeffs = pywt.wavedec2(diff.numpy(), "haar", mode="periodization", level=3)
    details = [sum((b**2).sum(axis=(1, 2, 3)) for b in bands) for bands in reversed(coeffs[1:])]
    want = [*details, (coeffs[0] ** 2).sum(axis=(1, 2, 3))]
    for got, ref in zip(band_energies(diff, "haar", 3), want, strict=True):
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12)
    pred, target = diff + 1, torch.ones(shape, dtype=diff.dtype)
    ref = _pywt_loss(diff.numpy(), "haar", 3, 0.5, [1.0, 2.0, 4.0])
    loss = wavelet_loss(pred, target, "haar", 5, 0.5, [1.0, 2.0, 4.0, 8.0, 16.0])
    np.testing.assert_allclose(loss.numpy(), ref, rtol=1e-12)


def test_wavelet_loss_defaults_are_five_haar_levels_of_unit_weight() -> None:
    """Unit weights on an orthonormal transform are the MSE (Parseval), whatever the depth; with
    other detail weights the default depth shows: 5 levels, on 64 x 64 where 6 would fit."""
    pred, target = _random((2, 2, 64, 64), seed=22), _random((2, 2, 64, 64), seed=23)
    diff = (pred - target).numpy()
    np.testing.assert_allclose(wavelet_loss(pred, target).numpy(),
                               (diff**2).mean(axis=(1, 2, 3)), rtol=1e-12)
    ref = _pywt_loss(diff, "haar", 5, 1.0, 2.0)
    np.testing.assert_allclose(wavelet_loss(pred, target, detail_weights=2.0).numpy(), ref,
                               rtol=1e-12)
    assert not np.allclose(ref, _pywt_loss(diff, "haar", 6, 1.0, 2.0))


def test_dwt2_levels_must_divide_both_sides() -> None:
    """L levels need H and W divisible by 2^L, each side checked on its own; L = 0 is the
    identity and a negative L is refused."""
    x = _random((1, 2, 8, 12), seed=24)
    approx, details = dwt2(x, "haar", 0)
    assert torch.equal(approx, x) and details == []
    assert dwt2(x, "haar", 2)[0].shape == (1, 2, 2, 3)
    approx, details = dwt2(x)  # one haar level by default
    torch.testing.assert_close(approx, dwt2(x, "haar", 1)[0], rtol=0, atol=0)
    assert len(details) == 1
    for shape, levels in (((1, 1, 12, 16), 3), ((1, 1, 16, 12), 3), ((1, 1, 8, 8), -1)):
        with pytest.raises(ValueError, match=f"{levels} DWT levels need H and W divisible"):
            dwt2(torch.zeros(shape), "haar", levels)
