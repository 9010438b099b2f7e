"""MeanFlow (method §4.1, docs/meanflow.md): the identity's target against a Gaussian closed form,
the JVP against finite differences, the batch layout, guidance, gradient routing, and the
end-to-end paths (train, eval, sample, ablate, DDP)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy import stats
from torch import Tensor

from ismctl.config.recipe import GuidanceCfg, ObjectiveCfg, Recipe
from ismctl.networks.model import build_model
from ismctl.objectives import available_objectives, get_objective
from ismctl.objectives.guidance import baked_scale
from ismctl.objectives.meanflow import (
    adaptive_weighted,
    baked_velocity,
    logit_normal_jumps,
    meanflow_loss,
    meanflow_target,
    total_derivative,
)
from ismctl.runs.checkpoint import list_checkpoints
from ismctl.sampling.protocol import plan_points, run_sampler
from ismctl.sampling.sampler import sample
from ismctl.utils.errors import UserError

NUM_CLASSES = 3
NULL = NUM_CLASSES


def _col(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


class Gaussian:
    """Noise N(0, I) to data N(mu, s^2) per dimension on the path x_t = (1 - t) x0 + t x1.

    x_t ~ N(m(t), sd(t)^2) with m = t mu, sd^2 = (1 - t)^2 + t^2 s^2. The ODE of the ideal
    velocity moves every quantile with the marginals, so its flow map is affine:
    phi_{t -> T}(x) = m(T) + sd(T) / sd(t) (x - m(t)); the ideal velocity is its T-derivative at
    T = t, u = m' + sd'/sd (x - m), and the average velocity of the jump (t, d) is
    (phi_{t -> t+d}(x) - x) / d.
    """

    def __init__(self, mu: Tensor, s: Tensor) -> None:
        self.mu, self.s = mu, s

    def m_sd(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = _col(t)
        return t * self.mu, torch.sqrt((1 - t) ** 2 + t**2 * self.s**2)

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        m, sd = self.m_sd(t)
        tc = _col(t)
        dsd = (-(1 - tc) + tc * self.s**2) / sd
        return self.mu + dsd / sd * (x - m)

    def average(self, x: Tensor, t: Tensor, d: Tensor, y: Tensor, w: Tensor) -> Tensor:
        m, sd = self.m_sd(t)
        m2, sd2 = self.m_sd(t + d)
        return (m2 + sd2 / sd * (x - m) - x) / _col(d)


def _gaussian() -> Gaussian:
    mu = torch.tensor([1.5, -0.5, 0.3, 2.0], dtype=torch.float64).view(4, 1, 1)
    s = torch.tensor([0.5, 2.0, 1.0, 0.1], dtype=torch.float64).view(4, 1, 1)
    return Gaussian(mu, s)


def _jumps(n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=gen, dtype=torch.float64) * 0.9
    d = (1 - t) * torch.rand(n, generator=gen, dtype=torch.float64).clamp(0.05, 1.0)
    x = 2 * torch.randn(n, 4, 1, 1, generator=gen, dtype=torch.float64)
    return x, t, d


def test_gaussian_closed_form_is_consistent() -> None:
    """The closed-form velocity is the time derivative of the closed-form flow map."""
    g = _gaussian()
    x, t, _ = _jumps(16, 0)
    h = 1e-6
    m1, sd1 = g.m_sd(t + h)
    m0, sd0 = g.m_sd(t - h)
    m, sd = g.m_sd(t)
    fd = ((m1 + sd1 / sd * (x - m)) - (m0 + sd0 / sd * (x - m))) / (2 * h)
    torch.testing.assert_close(g.velocity(x, t), fd, rtol=1e-7, atol=1e-7)


def test_meanflow_target_of_the_exact_average_velocity_is_itself() -> None:
    """With the exact average velocity as the network and the ideal velocity in the tangent,
    v + d dF/dt (tangent (v, 1, -1) in (x, t, d)) returns the network's own output: the exact
    solution is the fixed point of the MeanFlow identity."""
    g = _gaussian()
    x, t, d = _jumps(64, 1)
    y = torch.zeros(64, dtype=torch.long)
    w = torch.zeros(64, dtype=torch.float64)
    v = g.velocity(x, t)
    got = meanflow_target(g.average, x, t, d, y, w, v)
    torch.testing.assert_close(got, g.average(x, t, d, y, w), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("tangent_t, tangent_d, sign", [
    (1.0, 1.0, 1.0),     # start and length both move: the end moves too
    (1.0, 0.0, 1.0),     # the length held fixed instead of the end
    (1.0, -1.0, -1.0),   # MeanFlow's minus sign copied without flipping time
    (-1.0, 1.0, 1.0),    # MeanFlow's time direction copied
])
def test_wrong_tangent_or_sign_misses_the_closed_form(tangent_t: float, tangent_d: float,
                                                      sign: float) -> None:
    g = _gaussian()
    x, t, d = _jumps(64, 2)
    y = torch.zeros(64, dtype=torch.long)
    w = torch.zeros(64, dtype=torch.float64)
    v = g.velocity(x, t)
    _, jvp = torch.func.jvp(lambda a, b, c: g.average(a, b, c, y, w), (x, t, d),
                            (v, torch.full_like(t, tangent_t), torch.full_like(d, tangent_d)))
    wrong = v + sign * _col(d) * jvp
    err = (wrong - g.average(x, t, d, y, w)).abs().max().item()
    assert err > 1e-2


def test_regression_optimum_with_conditional_velocities_is_the_closed_form() -> None:
    """Training sees v = x1 - x0, not the ideal velocity; the target is affine in v, so its mean
    over the data behind one x_t is the target built from E[v | x_t] = u. Monte Carlo over the
    Gaussian posterior of x1 given x_t (independent of the closed form's flow map)."""
    g = _gaussian()
    gen = torch.Generator().manual_seed(3)
    t = torch.tensor([0.3], dtype=torch.float64)
    d = torch.tensor([0.5], dtype=torch.float64)
    x = torch.randn(1, 4, 1, 1, generator=gen, dtype=torch.float64)
    m, sd = g.m_sd(t)
    # x1 | x_t: Gaussian with cov(x1, x_t) = t s^2 per dimension.
    gain = t * g.s**2 / sd**2
    post_mean = g.mu + gain * (x - m)
    post_sd = torch.sqrt(g.s**2 - gain * t * g.s**2)
    n = 200_000
    x1 = post_mean + post_sd * torch.randn(n, 4, 1, 1, generator=gen, dtype=torch.float64)
    v = (x1 - x) / (1 - t)                       # x0 = (x_t - t x1) / (1 - t)
    xs, ts, ds = x.expand(n, -1, -1, -1).clone(), t.expand(n).clone(), d.expand(n).clone()
    y, w = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.float64)
    target = meanflow_target(g.average, xs, ts, ds, y, w, v).mean(0, keepdim=True)
    torch.testing.assert_close(target, g.average(x, t, d, y[:1], w[:1]), rtol=0, atol=2e-2)


def _tiny(dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("tiny/2", 8, 2, NUM_CLASSES, jump_embedding="continuous").to(dtype)
    # Off the adaLN-Zero start (F = 0 there): every weight random, so every path carries signal.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def test_jvp_through_the_transformer_matches_finite_differences() -> None:
    """The JVP through the DiT blocks (attention on the math kernel) against central
    differences along (v, 1, -1), float64."""
    model = _tiny()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 2, 8, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(3, 2, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.7], dtype=torch.float64)
    d = torch.tensor([0.6, 0.3, 0.2], dtype=torch.float64)
    y = torch.tensor([0, 2, NULL])
    w = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)
    with torch.no_grad():
        out, jvp = total_derivative(model, x, t, d, y, w, v)
        def along(h: float) -> Tensor:
            return model(x + h * v, t + h, d - h, y, w)

        # Fourth-order central differences: 2e-11 at h = 1e-3, 7e-12 at 3e-4, then roundoff
        # grows as 1/h (2e-9 at 1e-6); second order reaches only 2e-10 (at 1e-5).
        h = 3e-4
        fd = (8 * (along(h) - along(-h)) - (along(2 * h) - along(-2 * h))) / (12 * h)
        torch.testing.assert_close(out, model(x, t, d, y, w), rtol=1e-12, atol=1e-12)
    rel = ((jvp - fd).norm() / fd.norm()).item()
    print(f"JVP vs finite differences: relative error {rel:.2e}")
    assert fd.norm() > 1.0 and rel < 1e-9, rel


def test_fused_cpu_attention_has_no_forward_derivative() -> None:
    """Why the JVP selects the math kernel: the default CPU kernel refuses forward-mode AD."""
    model = _tiny(torch.float32)
    x = torch.randn(2, 2, 8, 8)
    t, d, w = torch.full((2,), 0.3), torch.full((2,), 0.2), torch.zeros(2)
    y = torch.zeros(2, dtype=torch.long)
    with pytest.raises(RuntimeError, match="forward AD"):
        torch.func.jvp(lambda a: model(a, t, d, y, w), (x,), (x,))
    total_derivative(model, x, t, d, y, w, x)


def test_logit_normal_jumps_follow_meanflow_sampler() -> None:
    """Our start t = 1 - max of two logit-normal draws (MeanFlow time), end t + d = 1 - min:
    Kolmogorov-Smirnov against the CDFs of the max and the min of two draws."""
    mean, std = -0.4, 1.0
    t, d = logit_normal_jumps(20_000, mean, std, torch.Generator().manual_seed(5), "cpu")
    assert (d >= 0).all() and (t >= 0).all() and (t + d <= 1).all()

    def phi(a: np.ndarray) -> np.ndarray:
        a = np.clip(a, 1e-12, 1 - 1e-12)
        return stats.norm.cdf((np.log(a / (1 - a)) - mean) / std)

    start = (1 - t).double().numpy()
    end = (1 - t - d).double().numpy()
    assert stats.kstest(start, lambda a: phi(a) ** 2).pvalue > 1e-3
    assert stats.kstest(end, lambda a: 1 - (1 - phi(a)) ** 2).pvalue > 1e-3


def test_baked_velocity_fixed_point_is_cfg_at_scale_omega_over_one_minus_kappa() -> None:
    """At d = 0 the target is omega v + kappa F_c + (1 - omega - kappa) F_null; with F_c = the
    guided field it reproduces itself exactly when F_c = v_null + s (v_c - v_null),
    s = omega / (1 - kappa) (docs/meanflow.md)."""
    omega, kappa = 0.2, 0.92
    s = baked_scale(omega, kappa)
    assert s == pytest.approx(2.5) and baked_scale(1.0, 0.5) == 2.0
    v_c, v_null = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    fixed = v_null + s * (v_c - v_null)
    apply = torch.tensor([True, True, False, True])
    got = baked_velocity(v_c, fixed, v_null, apply, omega, kappa)
    torch.testing.assert_close(got[apply], fixed[apply])
    torch.testing.assert_close(got[~apply], v_c[~apply])


class Recorder:
    def __init__(self, net) -> None:
        self.net, self.calls = net, []

    def __call__(self, x: Tensor, t: Tensor, d: Tensor, y: Tensor, w: Tensor) -> Tensor:
        self.calls.append({"t": t.detach().clone(), "d": d.detach().clone(), "y": y.clone(),
                           "w": w.detach().clone()})
        return self.net(x, t, d, y, w)


def _linear_field(x: Tensor, t: Tensor, d: Tensor, y: Tensor, w: Tensor) -> Tensor:
    """A smooth stand-in network: its JVP along (v, 1, -1) is 0.5 v + 2 - 3 per element."""
    cls = torch.where(y == NULL, -1.0, 1.0).to(x.dtype)
    return 0.5 * x + _col(2 * t + 3 * d + cls + 0.25 * w)


def _mse(pred: Tensor, target: Tensor) -> Tensor:
    return (pred - target).pow(2).flatten(1).mean(1)


def _batch(n: int = 8, seed: int = 6) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, 2, 2, generator=gen), torch.randn(n, 1, 2, 2, generator=gen),
            torch.randint(0, NUM_CLASSES, (n,), generator=gen))


def test_batch_layout_targets_and_adaptive_weight() -> None:
    """Rows [0:6] at d = 0 with target v; rows [6:8] at d > 0 with target v + d (0.5 v - 1)
    from the target network; the loss is mean(l / (l + c)) with p = 1 and l the squared error
    summed over the sample's 4 dimensions (MeanFlow's units, official c = 0.01)."""
    x0, x1, y = _batch()
    obj = ObjectiveCfg(mode="meanflow", class_dropout=0.0)
    captured = {}

    def model(x, t, d, yy, w):
        captured.update(x=x, t=t, d=d, y=yy, w=w)
        return torch.zeros_like(x, requires_grad=True)

    tgt = Recorder(_linear_field)
    out = meanflow_loss(model, tgt, x0, x1, y, obj, GuidanceCfg(), _mse, NUM_CLASSES,
                        torch.Generator().manual_seed(0))
    t, d = captured["t"], captured["d"]
    assert (d[:6] == 0).all() and (d[6:] > 0).all() and (t + d <= 1).all()
    assert torch.equal(captured["y"], y) and (captured["w"] == 0).all()
    assert len(tgt.calls) == 1 and torch.equal(tgt.calls[0]["d"], d[6:])   # the JVP rows only
    v = x1 - x0
    target = v.clone()
    target[6:] = v[6:] + _col(d[6:]) * (0.5 * v[6:] - 1.0)
    per = _mse(torch.zeros_like(v), target)
    summed = (target**2).sum(dim=(1, 2, 3))
    assert obj.adaptive_c == 0.01
    assert out["loss"].item() == pytest.approx((summed / (summed + 0.01)).mean().item(), rel=1e-5)
    assert out["velocity"].item() == pytest.approx(per[:6].mean().item(), rel=1e-5)
    assert out["consistency"].item() == pytest.approx(per[6:].mean().item(), rel=1e-5)


def test_baked_guidance_target_interval_and_dropout() -> None:
    """The d = 0 targets are omega v + kappa F_c + (1 - omega - kappa) F_null on labelled rows
    inside the interval (t >= 0.4) and v elsewhere; the linear field's F_c - F_null = 2 and
    F_null = 0.5 x + 2 t - 1 at d = 0, w = 0."""
    x0, x1, y = _batch(16, 7)
    obj = ObjectiveCfg(mode="meanflow", class_dropout=0.3, adaptive_p=0.0, bootstrap_fraction=0.25)
    guid = GuidanceCfg(omega=0.5, kappa=0.25, interval_start=0.4)
    captured = {}

    def model(x, t, d, yy, w):
        captured.update(x=x, t=t, d=d, y=yy)
        return torch.zeros_like(x, requires_grad=True)

    def loss(pred, target):
        captured["target"] = target
        return (pred - target).pow(2).sum((1, 2, 3))

    tgt = Recorder(_linear_field)
    meanflow_loss(model, tgt, x0, x1, y, obj, guid, loss, NUM_CLASSES,
                  torch.Generator().manual_seed(1))
    t, labels, x = captured["t"], captured["y"], captured["x"]
    # First call: cond and null rows of the whole batch at d = 0, w = 0.
    first = tgt.calls[0]
    assert torch.equal(first["y"], torch.cat([labels, torch.full_like(labels, NULL)]))
    assert (first["d"] == 0).all() and (first["w"] == 0).all()
    assert (labels == NULL).any() and (labels != NULL).any()
    apply = (t >= 0.4) & (labels != NULL)
    assert apply[:12].any() and ((t < 0.4) & (labels != NULL))[:12].any()
    v = x1 - x0
    f_null = 0.5 * x + _col(2 * t - 1)
    guided = 0.5 * v + 0.25 * (f_null + 2) + 0.25 * f_null
    want = torch.where(_col(apply), guided, v)
    torch.testing.assert_close(captured["target"][:12], want[:12])


def _official_cond_drop(labels: Tensor, v_t: Tensor, v_g: Tensor, u: Tensor, p: float,
                        num_classes: int) -> tuple[Tensor, Tensor]:
    """Gsunshine/meanflow ``MeanFlow.cond_drop``, transcribed: the number of dropped labels is
    how many of the batch's uniforms fall below p; the first that many rows get the null label
    and their guided velocity is replaced by the plain one."""
    count = int((u < p).sum())
    first = torch.arange(labels.shape[0]) < count
    return (torch.where(first, torch.full_like(labels, num_classes), labels),
            torch.where(_col(first.to(v_t.dtype)).bool(), v_t, v_g))


@pytest.mark.parametrize("seed", range(12))
def test_class_dropout_is_the_official_rule(seed: int) -> None:
    """Labels and d = 0 targets of the training step equal a transcription of the official
    dropout on the same uniforms (replayed from the generator: the two time draws, then one
    uniform per row): only leading rows, all at d = 0, lose their label and their guidance."""
    n, n0, p = 16, 12, 0.3
    x0, x1, y = _batch(n, 100 + seed)
    obj = ObjectiveCfg(mode="meanflow", class_dropout=p, bootstrap_fraction=0.25)
    guid = GuidanceCfg(omega=0.5, kappa=0.25, interval_start=0.0)
    seen: dict[str, Tensor] = {}

    def model(x, t, d, yy, w):
        seen.update(x=x, t=t, d=d, y=yy)
        return torch.zeros_like(x, requires_grad=True)

    def loss_fn(pred: Tensor, target: Tensor) -> Tensor:
        seen["target"] = target
        return _mse(pred, target)

    meanflow_loss(model, Recorder(_linear_field), x0, x1, y, obj, guid, loss_fn, NUM_CLASSES,
                  torch.Generator().manual_seed(seed))
    replay = torch.Generator().manual_seed(seed)
    torch.randn(2, n, generator=replay)
    u = torch.rand(n, generator=replay)
    x_t, t, v = seen["x"], seen["t"], x1 - x0
    zeros = torch.zeros(n)
    v_cond = _linear_field(x_t, t, zeros, y, zeros)
    v_null = _linear_field(x_t, t, zeros, torch.full_like(y, NULL), zeros)
    guided = 0.5 * v + 0.25 * v_cond + 0.25 * v_null
    y_inp, v_g = _official_cond_drop(y, v, guided, u, p, NUM_CLASSES)
    assert int((u < p).sum()) <= n0
    assert torch.equal(seen["y"], y_inp)
    assert (seen["y"][n0:] == y[n0:]).all() and (seen["d"][:n0] == 0).all()
    torch.testing.assert_close(seen["target"][:n0], v_g[:n0])


def test_class_dropout_never_reaches_a_jump_row() -> None:
    """Where the drawn count exceeds the d = 0 rows (p = 1), every d = 0 row is nulled and
    every jump row keeps its label."""
    x0, x1, y = _batch(8)
    obj = ObjectiveCfg(mode="meanflow", class_dropout=1.0, bootstrap_fraction=0.25)
    seen: dict[str, Tensor] = {}

    def model(x, t, d, yy, w):
        seen.update(d=d, y=yy)
        return torch.zeros_like(x, requires_grad=True)

    meanflow_loss(model, Recorder(_linear_field), x0, x1, y, obj, GuidanceCfg(), _mse,
                  NUM_CLASSES, torch.Generator().manual_seed(0))
    assert (seen["y"][:6] == NULL).all() and torch.equal(seen["y"][6:], y[6:])
    assert (seen["d"][6:] > 0).all()


def test_intrinsic_guidance_draws_w_and_builds_the_ism_target() -> None:
    x0, x1, y = _batch(16, 8)
    obj = ObjectiveCfg(mode="meanflow", meanflow_guidance="intrinsic", class_dropout=0.2,
                       bootstrap_fraction=0.25, adaptive_p=0.0)
    guid = GuidanceCfg(w_max=1.0, w_step=0.5, interval_start=0.0)
    captured = {}

    def model(x, t, d, yy, w):
        captured.update(t=t, d=d, y=yy, w=w)
        return torch.zeros_like(x, requires_grad=True)

    tgt = Recorder(_linear_field)
    out = meanflow_loss(model, tgt, x0, x1, y, obj, guid, _mse, NUM_CLASSES,
                        torch.Generator().manual_seed(2))
    w, labels, d = captured["w"], captured["y"], captured["d"]
    assert set(w.tolist()) <= {0.0, 0.5, 1.0} and (w[labels == NULL] == 0).all() and (w > 0).any()
    # The linear field's F_c - F_null = 2, so v~ = v + 2 w; the JVP rows keep their w.
    v = x1 - x0
    v_tilde = v + 2 * _col(w)
    target = v_tilde.clone()
    target[12:] = v_tilde[12:] + _col(d[12:]) * (0.5 * v_tilde[12:] - 1.0)
    # adaptive_p = 0: the loss is the squared error summed over the sample (MeanFlow's units).
    summed = target.pow(2).sum(dim=(1, 2, 3))
    assert out["loss"].item() == pytest.approx(summed.mean().item(), rel=1e-5)
    assert torch.equal(tgt.calls[1]["w"], w[12:])


def test_gradients_come_only_from_the_online_network() -> None:
    """The target network's passes (guidance rows and the JVP) are constants: the gradient of
    the loss reaches the online weights and never the target's (under DDP, the online network is
    the wrapped one, so every gradient goes through its all-reduce)."""
    online, target = _tiny(torch.float32, 0), _tiny(torch.float32, 1)
    for p in target.parameters():
        p.requires_grad_(True)
    x0, x1 = torch.randn(8, 2, 8, 8), torch.randn(8, 2, 8, 8)
    y = torch.randint(0, NUM_CLASSES, (8,))
    obj = ObjectiveCfg(mode="meanflow")
    out = meanflow_loss(online.train(), target, x0, x1, y, obj, GuidanceCfg(omega=0.5, kappa=0.2),
                        _mse, NUM_CLASSES, torch.Generator().manual_seed(3))
    out["loss"].backward()
    assert all(p.grad is None for p in target.parameters())
    assert sum(p.grad.abs().sum().item() for p in online.parameters() if p.grad is not None) > 0


def test_bf16_autocast_step_is_finite_and_close_to_fp32() -> None:
    online = _tiny(torch.float32, 0)
    x0, x1 = torch.randn(8, 2, 8, 8), torch.randn(8, 2, 8, 8)
    y = torch.randint(0, NUM_CLASSES, (8,))
    obj, guid = ObjectiveCfg(mode="meanflow"), GuidanceCfg(omega=0.5, kappa=0.2)
    ref = meanflow_loss(online, online, x0, x1, y, obj, guid, _mse, NUM_CLASSES,
                        torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = meanflow_loss(online, online, x0, x1, y, obj, guid, _mse, NUM_CLASSES,
                            torch.Generator().manual_seed(4))
    assert torch.isfinite(low["loss"]) and low["loss"].dtype == torch.float32
    assert low["consistency"].item() == pytest.approx(ref["consistency"].item(), rel=0.1)


def test_registry_and_recipe_validation() -> None:
    assert {"sm", "ism", "meanflow"} <= set(available_objectives())
    assert get_objective("meanflow").jump_embedding == "continuous"
    assert get_objective("ism").jump_embedding == "table"
    with pytest.raises(UserError, match="unknown objective"):
        get_objective("consistency")
    with pytest.raises(ValueError, match="t_grid does not apply to meanflow"):
        ObjectiveCfg(mode="meanflow", t_grid=True)
    with pytest.raises(ValueError, match="target_clip does not apply to meanflow"):
        ObjectiveCfg(mode="meanflow", target_clip=4.0)


def test_protocol_meanflow_runs() -> None:
    baked = Recipe.model_validate({"objective": {"mode": "meanflow"},
                                   "guidance": {"omega": 1.0, "kappa": 0.5}})
    assert run_sampler(baked) == "conditional"
    points = plan_points(baked, [1, 3, 128], [0.0])
    assert [(p.steps, p.guidance, p.sampler) for p in points] == [
        (1, 0.0, "conditional"), (3, 0.0, "conditional"), (128, 0.0, "conditional")]
    with pytest.raises(UserError, match=r"mode 'meanflow' is .* scale 2 \(omega / \(1 - kappa\)\)"):
        plan_points(baked, [1], [0.0, 1.0])
    intrinsic = Recipe.model_validate({"objective": {"mode": "meanflow",
                                                     "meanflow_guidance": "intrinsic"}})
    assert run_sampler(intrinsic) == "intrinsic"
    assert len(plan_points(intrinsic, [2], [0.0, 0.5])) == 2


def test_sampler_takes_any_step_count_for_continuous_jumps() -> None:
    """A continuous-jump network samples N = 3 (d = 1/3); a dyadic one refuses it."""
    model = _tiny(torch.float32).float()
    calls = Recorder(model)
    calls.training, calls.eval, calls.train = False, lambda: None, lambda mode=True: None
    calls.continuous_jumps = True
    noise = torch.randn(2, 2, 8, 8)
    labels = torch.tensor([0, 1])
    x = sample(calls, noise, labels, 3, 0.0, mode="conditional")
    assert x.shape == noise.shape and len(calls.calls) == 3
    assert all(torch.allclose(c["d"], torch.full((2,), 1 / 3)) for c in calls.calls)
    assert [c["t"][0].item() for c in calls.calls] == pytest.approx([0, 1 / 3, 2 / 3])
    dyadic = build_model("tiny/2", 8, 2, NUM_CLASSES)
    with pytest.raises(UserError, match="power of two"):
        sample(dyadic, noise, labels, 3, 0.0, mode="conditional")


def test_one_step_sample_of_the_closed_form_is_exact() -> None:
    """Sampling the exact average velocity in 1 or 3 steps carries noise to the data law's
    quantile map: x1 = m(1) + sd(1) / sd(0) x0 (up to the sampler's float32 times)."""
    g = _gaussian()

    class Exact(torch.nn.Module):
        continuous_jumps = True

        def forward(self, x, t, d, y, w):
            return g.average(x.double(), t.double(), d.double(), y, w).to(x.dtype)

    noise = torch.randn(5, 4, 1, 1, dtype=torch.float64)
    want = g.mu + g.s * noise
    for steps in (1, 3):
        got = sample(Exact(), noise, torch.zeros(5, dtype=torch.long), steps, 0.0,
                     mode="conditional")
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_flops_count_the_jvp_and_guidance_rows() -> None:
    from ismctl.training.monitor import flops_per_sample

    model = build_model("tiny/2", 8, 2, NUM_CLASSES, jump_embedding="continuous")
    fwd = flops_per_sample(Recipe.model_validate({"objective": {"mode": "sm"},
                                                   "guidance": {"cfg_scale": 1.0}}), model)
    mf = Recipe.model_validate({"objective": {"mode": "meanflow"},
                                "guidance": {"omega": 1.0, "kappa": 0.5}})
    assert flops_per_sample(mf, model) / fwd == pytest.approx((3 + 2 + 0.5) / 3.5)
    # No guidance in the target (omega 1, kappa 0): only the JVP of the d > 0 rows.
    spec = get_objective("meanflow")
    assert spec.target_passes(ObjectiveCfg(mode="meanflow"), GuidanceCfg()) == 0.5
    assert spec.target_passes(ObjectiveCfg(mode="meanflow", meanflow_guidance="intrinsic"),
                              GuidanceCfg(w_max=0.0)) == 0.5
    assert math.isfinite(flops_per_sample(mf, model))


REPO = Path(__file__).resolve().parent.parent
MEANFLOW_DIGITS = str(REPO / "recipes" / "meanflow_digits.yaml")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "ismctl", *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=600)


def _tiny_run(data: Path, root: Path, name: str, steps: int) -> list[str]:
    sets = {"data.path": data, "run.root": root, "run.name": name, "train.steps": steps,
            "data.batch_size": 16, "run.log_every": 1, "run.sample_every": 10_000,
            "run.sample_num": 20, "run.ckpt_every": 1, "run.keep_last": 100,
            "optim.warmup_steps": 0, "train.device": "cpu"}
    return ["--no-progress", *(f"--set={k}={v}" for k, v in sets.items())]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ismctl.data.prepare import prepare_latents

    out = tmp_path_factory.mktemp("data") / "digits"
    prepare_latents("digits", out=out, progress=False)
    return out


def _metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_train_eval_sample_end_to_end(digits: Path, tmp_path: Path) -> None:
    """meanflow_digits trains, evaluates at 1 and 2 steps (w = 0, one pass per step) and
    samples at 3 steps through the same commands as the shortcut objectives."""
    from typer.testing import CliRunner

    from ismctl.cli import app

    runner = CliRunner()
    threads = torch.get_num_threads()
    try:
        res = runner.invoke(app, ["train", MEANFLOW_DIGITS,
                                  *_tiny_run(digits, tmp_path, "mf", 3)])
        assert res.exit_code == 0, res.output
        run = tmp_path / "mf"
        line = _metrics(run)[-1]
        for key in ("loss", "velocity", "consistency", "grad_norm"):
            assert math.isfinite(line[key]), key
        res = runner.invoke(app, ["eval", str(run), "--steps", "1,2", "--num-samples", "20",
                                  "--metrics", "acc", "--device", "cpu", "--batch-size", "20"])
        assert res.exit_code == 0, res.output
        results = json.loads(next((run / "eval").rglob("results.json")).read_text())
        assert [(p["steps"], p["guidance"], p["sampler"]) for p in results["points"]] == [
            (1, 0.0, "conditional"), (2, 0.0, "conditional")]
        npz = tmp_path / "s.npz"
        res = runner.invoke(app, ["sample", str(run), "--steps", "3", "--num", "10", "--out",
                                  str(npz), "--device", "cpu"])
        assert res.exit_code == 0, res.output
        assert np.load(npz)["arr_0"].shape == (10, 8, 8, 1)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_two_ranks_match_one_process_with_accumulation(digits: Path, tmp_path: Path) -> None:
    """DDP (2 ranks x 8 samples, gloo) against 1 process (2 accumulation steps x 8): the JVP on
    the target network must not bypass the gradient all-reduce, so the weights agree."""
    single = _cli("train", MEANFLOW_DIGITS, "--set=train.grad_accum=2",
                  *_tiny_run(digits, tmp_path, "single", 3))
    assert single.returncode == 0, single.stderr[-3000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "ismctl", "train", MEANFLOW_DIGITS, *_tiny_run(digits, tmp_path, "ddp", 3)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = load_file(str(list_checkpoints(tmp_path / "single")[-1][1] / "online.safetensors"))
    b = load_file(str(list_checkpoints(tmp_path / "ddp")[-1][1] / "online.safetensors"))
    first = load_file(str(list_checkpoints(tmp_path / "single")[0][1] / "online.safetensors"))
    assert any(not torch.equal(a[k], first[k]) for k in a), "training did not move the weights"
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)
    assert [m["loss"] for m in _metrics(tmp_path / "single")] == pytest.approx(
        [m["loss"] for m in _metrics(tmp_path / "ddp")], rel=1e-4)


@pytest.mark.slow
def test_ablate_sweeps_the_objective(digits: Path, tmp_path: Path) -> None:
    """`ablate --sweep objective.mode=sm,ism,meanflow`: each variant at its own protocol (sm and
    baked meanflow at w = 0, ism over the grid)."""
    from ismctl.tools.ablate import run_ablation

    overrides = [f"data.path={digits}", "train.steps=3", "optim.warmup_steps=0",
                 "data.batch_size=16", "run.log_every=3", "run.sample_every=1000",
                 "run.sample_num=10", "run.ckpt_every=1000", "run.tracker=none",
                 "eval.steps=[1]", "eval.guidance=[0,1]", "eval.metrics=[acc]",
                 "eval.batch_size=20", "guidance.omega=0.75", "guidance.kappa=0.5"]
    report = run_ablation(str(REPO / "recipes" / "quickstart.yaml"), None, False,
                          overrides=overrides, out=tmp_path / "abl", eval_num_samples=20,
                          progress=False, sweep="objective.mode=sm,ism,meanflow",
                          report_name="objectives")
    points = {v["name"]: sorted(v["points"]) for v in report["variants"]}
    assert points == {"objective.mode=sm": ["1@0"], "full": ["1@0", "1@1"],
                      "objective.mode=meanflow": ["1@0"]}


def test_bench_reports_the_meanflow_step_against_flow_matching() -> None:
    from ismctl.tools.bench import meanflow_step_ratio

    out = meanflow_step_ratio("tiny/2", 4, 8, torch.device("cpu"), 1, 2)
    assert out["expected_ratio_forward_equivalents"] == pytest.approx((3 + 2 + 0.5) / 3)
    assert out["ratio_meanflow_over_fm"] > 0 and out["fm_step_s"] > 0


def test_composes_with_the_wavelet_loss_and_intrinsic_interval_guidance() -> None:
    """iSM's per-sample wavelet loss under MeanFlow's adaptive weight, with intrinsic and
    interval guidance and a separate target network (twin EMA): the targets are the guidance
    target and the MeanFlow identity of the target network, the loss the mean of
    l / sg(l + c) with l the wavelet loss in MeanFlow's units (summed over the dimensions)."""
    from ismctl.config.recipe import LossCfg
    from ismctl.losses import build_loss
    from ismctl.objectives.shortcut import guidance_target

    online, target = _tiny(torch.float32, 0).train(), _tiny(torch.float32, 1)
    x0, x1 = torch.randn(8, 2, 8, 8), torch.randn(8, 2, 8, 8)
    y = torch.randint(0, NUM_CLASSES, (8,))
    obj = ObjectiveCfg(mode="meanflow", meanflow_guidance="intrinsic", class_dropout=0.0)
    guid = GuidanceCfg(w_max=1.5, interval_start=0.3)
    wavelet = build_loss(LossCfg(name="wavelet", levels=2, detail_weights=[2.0, 0.5]), 8)
    seen = {}

    def loss_fn(pred, tgt):
        seen.update(pred=pred, target=tgt)
        return wavelet(pred, tgt)

    inputs = Recorder(online)
    out = meanflow_loss(inputs, target, x0, x1, y, obj, guid, loss_fn, NUM_CLASSES,
                        torch.Generator().manual_seed(5))
    (call,) = inputs.calls
    t, d, lab, w = call["t"], call["d"], call["y"], call["w"]
    x_t = (1 - _col(t)) * x0 + _col(t) * x1
    assert (w > 0).any() and ((t < 0.3) & (w > 0)).any() and ((t >= 0.3) & (w > 0)).any()
    v_tilde = guidance_target(target, x_t, t, lab, w, x1 - x0, NULL, 0.3)
    jump = slice(6, 8)
    want = v_tilde.clone()
    want[jump] = meanflow_target(target, x_t[jump], t[jump], d[jump], lab[jump], w[jump],
                                 v_tilde[jump])
    torch.testing.assert_close(seen["target"], want, rtol=1e-4, atol=1e-5)
    summed = wavelet(seen["pred"], want).detach() * (2 * 8 * 8)
    assert out["loss"].item() == pytest.approx((summed / (summed + 0.01)).mean().item(),
                                               rel=1e-4)
    out["loss"].backward()
    assert all(p.grad is None for p in target.parameters())


def test_adaptive_weight_is_in_meanflows_units() -> None:
    """The weight both ways on a known error: MeanFlow's l is the squared error summed over the
    D dimensions, and c is added to that sum. Our per-sample MSE times D is that l; adding c to
    the per-dimension mean instead is the same as c x D on the sum, a different weight."""
    err = torch.tensor([[0.1, -0.2, 0.3, 0.0], [1.0, 2.0, -1.0, 0.5]]).view(2, 1, 2, 2)
    dims, c = 4, 0.01
    summed = err.pow(2).sum(dim=(1, 2, 3))            # MeanFlow: l = ||e||^2
    official = summed / (summed + c)                  # l / sg(l + c), p = 1
    mse = err.pow(2).mean(dim=(1, 2, 3)).requires_grad_()
    ours = adaptive_weighted(mse, dims, c, 1.0)
    torch.testing.assert_close(ours.detach(), official)
    per_dim_c = mse.detach() / (mse.detach() + c)     # c on the mean: c x D on the sum
    torch.testing.assert_close(per_dim_c, summed / (summed + c * dims))
    assert not torch.allclose(per_dim_c, official)
    # The gradient is that of l / sg(l + c) in l (the weight is a constant): D / (l + c) per unit
    # of the per-dimension mean.
    ours.sum().backward()
    torch.testing.assert_close(mse.grad, dims / (summed + c))
    # p = 0 disables the weight: the summed error itself.
    torch.testing.assert_close(adaptive_weighted(mse.detach(), dims, c, 0.0), summed)
