import numpy as np
import pytest
import torch
from torch import nn

from ismctl.networks.unwrap import unwrap_model
from ismctl.training.ema import TwinEMA, ema_decay


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _numpy_params(model: nn.Module) -> list[np.ndarray]:
    return [p.detach().double().numpy().copy() for p in model.parameters()]


def test_ema_decay_schedule() -> None:
    assert ema_decay(0.9999, 0, warmup=True) == pytest.approx(0.1)
    assert ema_decay(0.9999, 10, warmup=True) == pytest.approx(11 / 20)
    assert ema_decay(0.95, 10_000, warmup=True) == 0.95
    assert ema_decay(0.9999, 0, warmup=False) == 0.9999
    # The windows the docs quote: 0.999 is reached after ~9,000 updates, 0.9999 after ~90,000,
    # and a 3,000-step run ends at ~0.997 whichever of the two the recipe asks for.
    assert ema_decay(0.999, 8_989, warmup=True) < 0.999 == ema_decay(0.999, 8_991, warmup=True)
    assert ema_decay(0.9999, 89_989, warmup=True) < 0.9999
    assert ema_decay(0.9999, 89_991, warmup=True) == 0.9999
    assert ema_decay(0.999, 2_999, warmup=True) == ema_decay(0.9999, 2_999, warmup=True)
    assert ema_decay(0.9999, 2_999, warmup=True) == pytest.approx(0.997, abs=5e-4)


def test_default_is_the_papers_ema() -> None:
    """No warm-up unless a recipe asks (method §3.4); the shipped recipes say which they use."""
    from pathlib import Path

    from ismctl.config.recipe import EMACfg, load_recipe

    assert EMACfg().warmup is False and TwinEMA(nn.Linear(2, 2)).warmup is False
    recipes = Path(__file__).resolve().parent.parent / "recipes"
    for name in ("ism_xl", "ism_b", "sm_xl", "sm_b"):
        assert load_recipe(recipes / f"{name}.yaml").ema.warmup is False, name
    assert load_recipe(recipes / "quickstart.yaml").ema.warmup is True
    for path in recipes.glob("*.yaml"):
        text = path.read_text()
        assert "warmup:" in text or "extends:" in text, path.name


@pytest.mark.parametrize("warmup", [True, False])
def test_twin_ema_matches_numpy_reference(warmup: bool) -> None:
    model = _model()
    ema = TwinEMA(model, target_decay=0.8, inference_decay=0.97, warmup=warmup)
    ref_t, ref_i = _numpy_params(model), _numpy_params(model)
    gen = torch.Generator().manual_seed(1)
    for n in range(12):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
            model[1].running_mean.add_(1.0)
        online = _numpy_params(model)
        for ref, decay in ((ref_t, 0.8), (ref_i, 0.97)):
            k = min(decay, (1 + n) / (10 + n)) if warmup else decay
            for j, p in enumerate(online):
                ref[j] = k * ref[j] + (1 - k) * p
        ema.update(model)
    assert ema.num_updates == 12
    for module, ref in ((ema.target, ref_t), (ema.inference, ref_i)):
        for got, want in zip(_numpy_params(module), ref, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(module[1].running_mean, model[1].running_mean)
        assert module[1].num_batches_tracked == model[1].num_batches_tracked


def test_ema_copies_are_frozen_eval_copies() -> None:
    model = _model()
    ema = TwinEMA(model)
    for module in (ema.target, ema.inference):
        assert module is not model and not module.training
        assert not any(p.requires_grad for p in module.parameters())
        assert all(a.data_ptr() != b.data_ptr()
                   for a, b in zip(module.parameters(), model.parameters(), strict=True))


def test_disabled_ema_serves_the_online_module() -> None:
    model = _model()
    ema = TwinEMA(model, target_enabled=False, inference_enabled=False)
    assert ema.target is model and ema.inference is model
    before = _numpy_params(model)
    ema.update(model)
    for got, want in zip(_numpy_params(model), before, strict=True):
        np.testing.assert_array_equal(got, want)
    half = TwinEMA(model, target_enabled=False)
    assert half.target is model and half.inference is not model


def test_state_dict_round_trip() -> None:
    model = _model()
    ema = TwinEMA(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    for _ in range(3):
        ema.update(model)
    state = ema.state_dict()
    torch.manual_seed(123)
    other = TwinEMA(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)))
    other.load_state_dict(state)
    assert other.num_updates == 3
    for a, b in ((ema.target, other.target), (ema.inference, other.inference)):
        for k, v in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[k], v)


def test_wrapped_models_are_unwrapped() -> None:
    model = _model()
    compiled = torch.compile(model)
    assert unwrap_model(compiled) is model
    ema = TwinEMA(compiled, warmup=True)
    assert set(ema.target.state_dict()) == set(model.state_dict())
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(compiled)
    # First warm-up update: decay min(0.95, 1 / 10) = 0.1, so the EMA moves 0.9 of the way.
    for got, old in zip(ema.target.parameters(), before, strict=True):
        torch.testing.assert_close(got, old + 0.9)
