import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from ismctl.config.recipe import GuidanceCfg, ObjectiveCfg
from ismctl.objectives.shortcut import (
    bootstrap_target,
    grid_times,
    guidance_target,
    jump_levels,
    shortcut_loss,
    sm_bootstrap_target,
    split_sizes,
)
from ismctl.utils.errors import UserError

NUM_CLASSES = 3
NULL = NUM_CLASSES


def _col(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


class GaussianFlow:
    """Exact fields of the linear path from N(0, I) noise to N(mu, diag(s^2)) data.

    x_t = (1 - t) x0 + t x1 is Gaussian with mean t mu and variance (1 - t)^2 + t^2 s^2 per
    dimension; E[x1 - x0 | x_t] is affine in x_t and the ODE flow maps x_t to x_t' affinely.
    """

    def __init__(self, mu: Tensor, s: Tensor) -> None:
        self.mu, self.s = mu, s

    def _mean_sd(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = _col(t)
        return t * self.mu, torch.sqrt((1 - t) ** 2 + t**2 * self.s**2)

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        a, b = _col(1 - t), _col(t)
        var = a**2 + b**2 * self.s**2
        centred = x - b * self.mu
        e1 = self.mu + b * self.s**2 * centred / var
        e0 = a * centred / var
        return e1 - e0

    def flow(self, x: Tensor, t: Tensor, t2: Tensor) -> Tensor:
        m, sd = self._mean_sd(t)
        m2, sd2 = self._mean_sd(t2)
        return m2 + sd2 / sd * (x - m)

    def __call__(self, x: Tensor, t: Tensor, d: Tensor, y: Tensor, w: Tensor) -> Tensor:
        safe = torch.where(d > 0, d, torch.ones_like(d))
        avg = (self.flow(x, t, t + safe) - x) / _col(safe)
        return torch.where(_col(d) > 0, avg, self.velocity(x, t))


def _gaussian_flow() -> GaussianFlow:
    mu = torch.tensor([1.5, -0.5, 0.3, 2.0], dtype=torch.float64).view(4, 1, 1)
    s = torch.tensor([0.5, 2.0, 1.0, 0.1], dtype=torch.float64).view(4, 1, 1)
    return GaussianFlow(mu, s)


class Recorder:
    """Wraps a network callable and keeps the inputs of every call."""

    def __init__(self, net) -> None:
        self.net = net
        self.calls: list[dict[str, Tensor]] = []

    def __call__(self, x: Tensor, t: Tensor, d: Tensor, y: Tensor, w: Tensor) -> Tensor:
        self.calls.append({"x": x.clone(), "t": t.clone(), "d": d.clone(), "y": y.clone(),
                           "w": w.clone()})
        return self.net(x, t, d, y, w)

    @property
    def rows(self) -> list[int]:
        return [c["x"].shape[0] for c in self.calls]


def _constant_field(cond: float = 3.0, null: float = 1.0, d_coef: float = 0.0,
                    w_coef: float = 0.0):
    """Velocity independent of x: cond/null constant plus optional d and w terms."""

    def net(x: Tensor, t: Tensor, d: Tensor, y: Tensor, w: Tensor) -> Tensor:
        base = torch.where(y == NULL, null, cond).to(x.dtype) + d_coef * d + w_coef * w
        return _col(base).expand_as(x).clone()

    return net


def _mse(pred: Tensor, target: Tensor) -> Tensor:
    return (pred - target).pow(2).flatten(1).mean(1)


def test_bootstrap_of_exact_field_is_the_doubled_jump() -> None:
    flow = _gaussian_flow()
    base = 128
    k = torch.arange(7).repeat(3)
    d = torch.pow(2.0, -k.double())
    gen = torch.Generator().manual_seed(0)
    t = grid_times(d, gen)
    x = torch.randn(len(d), 4, 1, 1, dtype=torch.float64, generator=gen) * 2
    y = torch.zeros(len(d), dtype=torch.long)
    w = torch.zeros(len(d), dtype=torch.float64)
    got = bootstrap_target(flow, x, t, d, y, w, base, NULL)
    torch.testing.assert_close(got, flow(x, t, d, y, w), rtol=1e-9, atol=1e-9)


def test_bootstrap_finest_level_uses_instantaneous_velocity() -> None:
    flow = _gaussian_flow()
    base = 128
    # Mixed batch: finest (1/128) rows interleaved with a coarse row.
    d = torch.tensor([1 / 128, 0.5, 1 / 128], dtype=torch.float64)
    t = torch.tensor([0.0, 0.5, 127 / 128], dtype=torch.float64)
    x = torch.randn(3, 4, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(3, dtype=torch.long)
    w = torch.zeros(3, dtype=torch.float64)
    got = bootstrap_target(flow, x, t, d, y, w, base, NULL)
    h = _col(d / 2)
    v1 = flow.velocity(x, t)
    v2 = flow.velocity(x + h * v1, t + d / 2)
    heun_like = (v1 + v2) / 2
    torch.testing.assert_close(got[[0, 2]], heun_like[[0, 2]], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], flow(x, t, d, y, w)[1], rtol=1e-9, atol=1e-9)


def _stub_numpy(x: np.ndarray, t: float, d: float, y: int, w: float) -> np.ndarray:
    return np.tanh(x) * (1 + t) + 3 * d + 0.1 * w + 0.01 * y


def _stub_torch(x: Tensor, t: Tensor, d: Tensor, y: Tensor, w: Tensor) -> Tensor:
    return torch.tanh(x) * _col(1 + t) + _col(3 * d + 0.1 * w + 0.01 * y.to(x.dtype))


@pytest.mark.parametrize("clip", [None, 0.6])
def test_bootstrap_of_non_exact_field_matches_hand_computed_two_steps(clip: float | None) -> None:
    base = 8
    gen = torch.Generator().manual_seed(2)
    d = torch.tensor([1.0, 0.5, 0.25, 0.125, 0.125, 0.5], dtype=torch.float64)
    t = grid_times(d, gen)
    x = torch.randn(6, 2, 3, 3, dtype=torch.float64, generator=gen)
    y = torch.tensor([0, 1, 2, NULL, 1, 0])
    w = torch.tensor([0.0, 1.5, 0.25, 0.0, 3.5, 2.0], dtype=torch.float64)
    got = bootstrap_target(_stub_torch, x, t, d, y, w, base, NULL, clip=clip)
    for i in range(6):
        di, ti, xi = float(d[i]), float(t[i]), x[i].numpy()
        d_net = 0.0 if di == 1 / base else di / 2
        v1 = _stub_numpy(xi, ti, d_net, int(y[i]), float(w[i]))
        xm = xi + di / 2 * v1
        if clip is not None:
            xm = np.clip(xm, -clip, clip)
        v2 = _stub_numpy(xm, ti + di / 2, d_net, int(y[i]), float(w[i]))
        want = (v1 + v2) / 2
        if clip is not None:
            want = np.clip(want, -clip, clip)
        np.testing.assert_allclose(got[i].numpy(), want, rtol=1e-12, atol=1e-12)


def test_ism_bootstrap_passes_the_same_w_to_both_half_jumps() -> None:
    rec = Recorder(_stub_torch)
    d = torch.tensor([0.5, 0.125, 1.0])
    t = torch.tensor([0.5, 0.375, 0.0])
    w = torch.tensor([1.25, 3.5, 0.75])
    y = torch.tensor([0, 1, 2])
    bootstrap_target(rec, torch.randn(3, 1, 2, 2), t, d, y, w, 8, NULL)
    assert rec.rows == [3, 3]
    first, second = rec.calls
    for call in rec.calls:
        torch.testing.assert_close(call["w"], w)
        torch.testing.assert_close(call["y"], y)
        torch.testing.assert_close(call["d"], torch.tensor([0.25, 0.0, 0.5]))
    torch.testing.assert_close(first["t"], t)
    torch.testing.assert_close(second["t"], t + d / 2)


def test_sm_bootstrap_applies_cfg_at_the_flow_level_only() -> None:
    """sm: half jumps at d/2 (never d = 0); the rows at d = 2/M, whose half jumps are the flow
    (d = 1/M), take classic CFG v_null + s (v_c - v_null) in both half jumps (method §2)."""
    base, s = 8, 1.5
    rec = Recorder(_constant_field(cond=3.0, null=1.0, d_coef=100.0))
    d = torch.tensor([2 / base, 0.5, 2 / base])
    t = torch.tensor([0.25, 0.0, 0.5])
    y = torch.tensor([2, 2, NULL])
    got = sm_bootstrap_target(rec, torch.zeros(3, 1, 2, 2), t, d, y, base, NULL, cfg_scale=s)
    # Row 0: CFG of the d = 1/8 velocities, (1 + 12.5) + 1.5 ((3 + 12.5) - (1 + 12.5)).
    # Row 1: the conditional d = 1/4 call alone (3 + 100 / 4). Row 2 (null label): v_null.
    want = torch.tensor([13.5 + s * 2.0, 3.0 + 25.0, 1.0 + 12.5])
    torch.testing.assert_close(got[:, 0, 0, 0], want)
    # One call per half jump: 3 rows plus one null row for the conditional d = 2/M sample.
    assert rec.rows == [4, 4]
    for call in rec.calls:
        torch.testing.assert_close(call["y"], torch.tensor([2, 2, NULL, NULL]))
        torch.testing.assert_close(call["w"], torch.zeros(4))
        torch.testing.assert_close(call["d"], torch.tensor([1 / base, 0.25, 1 / base, 1 / base]))
    plain = sm_bootstrap_target(_constant_field(d_coef=100.0), torch.zeros(3, 1, 2, 2), t, d, y,
                                base, NULL, cfg_scale=1.0)
    torch.testing.assert_close(plain[:, 0, 0, 0], torch.tensor([15.5, 28.0, 13.5]))


def test_guidance_target_with_interval() -> None:
    # d and w terms make the stub wrong unless the guidance rows get d = 0 and w = 0.
    rec = Recorder(_constant_field(cond=3.0, null=1.0, d_coef=7.0, w_coef=5.0))
    t = torch.tensor([0.1, 0.5, 0.3, 0.9])
    w = torch.tensor([2.0, 2.0, 1.0, 0.0])
    y = torch.tensor([0, 1, 2, 0])
    v = torch.randn(4, 2, 2, 2, generator=torch.Generator().manual_seed(4))
    got = guidance_target(rec, torch.randn(4, 2, 2, 2), t, y, w, v, NULL, interval_start=0.3)
    w_eff = torch.tensor([0.0, 2.0, 1.0, 0.0])
    torch.testing.assert_close(got, v + _col(w_eff) * (3.0 - 1.0))
    assert rec.rows == [8]
    torch.testing.assert_close(rec.calls[0]["y"], torch.tensor([0, 1, 2, 0] + [NULL] * 4))
    no_interval = guidance_target(_constant_field(), torch.zeros(4, 2, 2, 2), t, y, w, v, NULL, 0.0)
    torch.testing.assert_close(no_interval, v + _col(w) * 2.0)


@pytest.mark.parametrize("mode", ["ism", "sm"])
def test_split_sizes_uses_every_sample_once(mode: str) -> None:
    for batch in range(1, 300):
        for boot, guide in ((0.25, 0.25), (0.125, 0.0), (0.1, 0.3), (0.5, 0.45)):
            sizes = split_sizes(batch, mode, boot, guide)
            assert sum(sizes) == batch and min(sizes) >= 0
            fracs = (1 - boot - guide, guide, boot) if mode == "ism" else (1 - boot, 0.0, boot)
            positive = [f > 0 for f in fracs]
            if mode == "sm":
                assert sizes[1] == 0
            if batch >= sum(positive):
                assert all(n >= 1 for n, p in zip(sizes, positive, strict=True) if p)
            if batch >= 20:
                for n, f in zip(sizes, fracs, strict=True):
                    assert abs(n - batch * f) < 1.0 + 1e-9


def test_split_sizes_known_values_and_errors() -> None:
    assert split_sizes(256, "ism", 0.25, 0.25) == (128, 64, 64)
    assert split_sizes(256, "sm", 0.25, 0.25) == (192, 0, 64)
    assert split_sizes(256, "sm", 0.125, 0.0) == (224, 0, 32)
    assert split_sizes(3, "ism", 0.25, 0.25) == (1, 1, 1)
    with pytest.raises(UserError):
        split_sizes(0, "ism", 0.25, 0.25)
    with pytest.raises(UserError):
        split_sizes(8, "flow", 0.25, 0.25)
    with pytest.raises(UserError):
        split_sizes(8, "ism", 0.6, 0.5)
    # The leftover sample goes to the largest remainder (4.2, 1.7, 4.1: the guidance part),
    # not to the first or the largest part.
    assert split_sizes(10, "ism", 0.41, 0.17) == (4, 2, 4)
    # The bootstrap part must be a share strictly between 0 and 1, the error naming it; the
    # guidance share must leave room for the velocity part.
    for boot in (0.0, 1.0, 1.5):
        with pytest.raises(UserError, match=r"bootstrap_fraction: must be in \(0, 1\)"):
            split_sizes(8, "ism", boot, 0.0)
    with pytest.raises(UserError, match="bootstrap_fraction \\+ guidance_fraction must be < 1"):
        split_sizes(8, "ism", 0.5, 0.5)


def test_jump_levels_spread_evenly_and_shuffled() -> None:
    levels = [2.0**-k for k in range(8)]
    gen = torch.Generator().manual_seed(5)
    for n in (80, 83, 8, 0):
        d = jump_levels(n, 128, gen)
        assert d.shape == (n,) and d.dtype == torch.float32
        values, counts = np.unique(d.numpy(), return_counts=True)
        assert set(values.tolist()) <= set(levels)
        full = dict.fromkeys(levels, 0) | dict(zip(values.tolist(), counts.tolist(), strict=True))
        assert set(full.values()) <= {n // 8, n // 8 + 1}
    d = jump_levels(80, 128, gen)
    assert not torch.all(d[1:] <= d[:-1]) and not torch.all(d[1:] >= d[:-1])


def test_jump_levels_mix_when_part_is_smaller_than_levels() -> None:
    gen = torch.Generator().manual_seed(6)
    seen: set[float] = set()
    for _ in range(20):
        d = jump_levels(5, 128, gen)
        assert len(set(d.tolist())) == 5
        seen |= set(d.tolist())
    assert seen == {2.0**-k for k in range(8)}
    with pytest.raises(UserError):
        jump_levels(4, 100)


def test_jump_levels_of_a_one_step_model_and_the_global_rng() -> None:
    """M = 1 is a power of two: every consistency row jumps the whole way (d = 1). Without a
    generator the draws come from torch's global RNG."""
    assert jump_levels(3, 1).tolist() == [1.0, 1.0, 1.0]
    torch.manual_seed(4)
    first = jump_levels(37, 16)
    torch.manual_seed(4)
    torch.testing.assert_close(jump_levels(37, 16), first, rtol=0, atol=0)
    assert first.device.type == "cpu" and len(set(first.tolist())) == 5


def test_call_fused_runs_the_groups_in_one_call_and_splits_them_back() -> None:
    """Groups of 1, 0 and 2 rows: one call over the 3 rows, each group gets its own rows back
    (a one-row request is a call like any other); an all-empty request makes no call."""
    from ismctl.objectives.shortcut import NetInputs, call_fused

    calls = []

    def net(x: Tensor, t: Tensor, d: Tensor, y: Tensor, w: Tensor) -> Tensor:
        calls.append(x.shape[0])
        return x * (1 + t + d + y + w).view(-1, 1, 1, 1)

    def group(n: int, seed: int) -> NetInputs:
        g = torch.Generator().manual_seed(seed)
        return NetInputs(torch.randn(n, 2, 2, 2, generator=g), torch.rand(n, generator=g),
                         torch.rand(n, generator=g), torch.randint(3, (n,), generator=g),
                         torch.rand(n, generator=g))

    groups = [group(1, 0), group(0, 1), group(2, 2)]
    outs = call_fused(net, groups)
    assert calls == [3] and [o.shape[0] for o in outs] == [1, 0, 2]
    for out, g in zip(outs, groups, strict=True):
        torch.testing.assert_close(out, g.x * (1 + g.t + g.d + g.y + g.w).view(-1, 1, 1, 1))
    torch.testing.assert_close(call_fused(net, [group(1, 3)])[0], net(*vars(group(1, 3)).values()))
    empty = call_fused(net, [group(0, 4), group(0, 5)])
    assert calls == [3, 1, 1] and [tuple(e.shape) for e in empty] == [(0, 2, 2, 2)] * 2


def test_interpolate_defaults_to_the_plain_linear_path() -> None:
    from ismctl.objectives.shortcut import interpolate

    x0, x1, t = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3), torch.rand(4)
    x_t, v = interpolate(x0, x1, t)
    tt = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, (1 - tt) * x0 + tt * x1)
    torch.testing.assert_close(v, x1 - x0)


def test_grid_times_on_grid_with_jump_inside_unit_interval() -> None:
    gen = torch.Generator().manual_seed(7)
    d = torch.pow(2.0, -torch.arange(8.0)).repeat(500)
    t = grid_times(d, gen)
    assert torch.all(t >= 0) and torch.all(t + d <= 1)
    k = t / d
    torch.testing.assert_close(k, torch.round(k), rtol=0, atol=0)
    assert torch.all(t[d == 1.0] == 0)
    quarter = t[d == 0.25]
    counts = np.unique(quarter.numpy(), return_counts=True)[1]
    assert len(counts) == 4 and counts.min() > 80
    finest = t[d == 2.0**-7]
    assert len(torch.unique(finest)) > 100


class TinyNet(nn.Module):
    def __init__(self, channels: int = 2) -> None:
        super().__init__()
        self.num_classes = NUM_CLASSES
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.label = nn.Embedding(NUM_CLASSES + 1, channels)
        self.cond = nn.Linear(3, channels)

    def forward(self, x: Tensor, t: Tensor, d: Tensor, y: Tensor, w: Tensor) -> Tensor:
        c = self.label(y) + self.cond(torch.stack([t, d, w], dim=1).to(x.dtype))
        return self.conv(x) + c[:, :, None, None]


class ZeroNet(nn.Module):
    """Predicts 0 everywhere, differentiably: the loss then equals the target's mean square."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor, t: Tensor, d: Tensor, y: Tensor, w: Tensor) -> Tensor:
        return x * 0 + self.bias


def _batch(n: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 2, 4, 4, generator=gen)
    x1 = torch.randn(n, 2, 4, 4, generator=gen) + 1
    y = torch.randint(NUM_CLASSES, (n,), generator=gen)
    return x0, x1, y


def test_shortcut_loss_ism_counts_target_rows_and_backpropagates() -> None:
    torch.manual_seed(0)
    model, target = TinyNet(), TinyNet()
    rec = Recorder(target)
    x0, x1, y = _batch(32)
    obj = ObjectiveCfg(mode="ism", base_steps=8)
    parts = shortcut_loss(model, rec, x0, x1, y, obj, GuidanceCfg(), _mse, NUM_CLASSES,
                          torch.Generator().manual_seed(1))
    assert set(parts) == {"loss", "velocity", "guidance", "consistency"}
    assert all(torch.isfinite(v) for v in parts.values())
    ng, nc = 8, 8
    # First call: cond/null guidance rows with the first half jumps; second: second half jumps.
    assert rec.rows == [2 * ng + nc, nc]
    assert sum(rec.rows) == 2 * ng + 2 * nc
    parts["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(p.grad is None for p in target.parameters())
    assert not any(v.requires_grad for k, v in parts.items() if k != "loss")


def test_shortcut_loss_parts_inputs_and_weights() -> None:
    model = Recorder(ZeroNet())
    target = Recorder(_constant_field(cond=3.0, null=1.0))
    x0, x1, y = _batch(32, seed=3)
    obj = ObjectiveCfg(mode="ism", base_steps=8, class_dropout=0.5, velocity_weight=0.5,
                       guidance_weight=2.0, consistency_weight=3.0)
    guid = GuidanceCfg(w_max=2.0, w_step=0.5, interval_start=0.3)
    parts = shortcut_loss(model, target, x0, x1, y, obj, guid, _mse, NUM_CLASSES,
                          torch.Generator().manual_seed(2))
    sv, sg, sc = slice(0, 16), slice(16, 24), slice(24, 32)
    (inp,) = model.calls
    t, d, w, lab = inp["t"], inp["d"], inp["w"], inp["y"]
    torch.testing.assert_close(inp["x"], (1 - _col(t)) * x0 + _col(t) * x1)
    assert torch.all(d[:24] == 0) and torch.all(w[sv] == 0)
    assert torch.all((lab[sv] == y[sv]) | (lab[sv] == NULL)) and (lab[sv] == NULL).any()
    assert torch.all(lab[sg] == y[sg])
    assert torch.all((w[sg] * 2 == torch.round(w[sg] * 2)) & (w[sg] >= 0) & (w[sg] <= 2))
    assert set(d[sc].tolist()) <= {1.0, 0.5, 0.25, 0.125}
    assert torch.all(t[sc] + d[sc] <= 1)
    assert torch.all(w[sc][lab[sc] == NULL] == 0)
    # Same w in both half jumps, and the same w as the online row.
    first, second = target.calls
    torch.testing.assert_close(first["w"][16:], w[sc])
    torch.testing.assert_close(second["w"], w[sc])
    torch.testing.assert_close(second["t"], t[sc] + d[sc] / 2)

    v = x1 - x0
    want_v = v[sv].pow(2).mean(dim=(1, 2, 3)).mean()
    w_eff = torch.where(t[sg] >= 0.3, w[sg], 0.0)
    want_g = (v[sg] + _col(w_eff) * 2.0).pow(2).mean(dim=(1, 2, 3)).mean()
    want_c = torch.where(lab[sc] == NULL, 1.0, 9.0).mean()
    torch.testing.assert_close(parts["velocity"], want_v)
    torch.testing.assert_close(parts["guidance"], want_g)
    torch.testing.assert_close(parts["consistency"], want_c)
    torch.testing.assert_close(parts["loss"], 0.5 * want_v + 2.0 * want_g + 3.0 * want_c)


def test_shortcut_loss_label_dropout_extremes() -> None:
    x0, x1, y = _batch(32, seed=4)
    for p in (0.0, 1.0):
        model = Recorder(ZeroNet())
        obj = ObjectiveCfg(mode="ism", base_steps=8, class_dropout=p)
        shortcut_loss(model, _constant_field(), x0, x1, y, obj, GuidanceCfg(), _mse,
                      NUM_CLASSES, torch.Generator().manual_seed(0))
        lab = model.calls[0]["y"]
        assert torch.all(lab[16:24] == y[16:24])
        # Only the velocity part drops labels; the consistency rows keep theirs (method §2).
        assert torch.all(lab[24:] == y[24:])
        if p == 1.0:
            assert torch.all(lab[:16] == NULL)
        else:
            assert torch.all(lab == y)


def test_shortcut_loss_sm_mode() -> None:
    """sm on one slot of 32 with M = 8: floor(32 / 8) = 4 bootstrap rows first, one per level
    1/4, 1/2 and two at d = 1 (the official histogram); the 28 flow rows at d = 1/8 on the 1/8
    time grid; CFG moves the d = 1/4 row only; the loss is one mean over all rows."""
    model = Recorder(ZeroNet())
    target = Recorder(_constant_field(cond=3.0, null=1.0))
    x0, x1, y = _batch(32, seed=5)
    obj = ObjectiveCfg(mode="sm", base_steps=8, class_dropout=0.0, t_grid=True,
                       bootstrap_fraction=0.125)
    guid = GuidanceCfg(cfg_scale=1.5)
    parts = shortcut_loss(model, target, x0, x1, y, obj, guid, _mse, NUM_CLASSES,
                          torch.Generator().manual_seed(3))
    assert set(parts) == {"loss", "velocity", "consistency"}
    inp = model.calls[0]
    nb = 4
    assert torch.all(inp["w"] == 0)
    assert inp["d"][:nb].tolist() == [0.25, 0.5, 1.0, 1.0]
    assert torch.all(inp["d"][nb:] == 1 / 8)
    t_f = inp["t"][nb:]
    torch.testing.assert_close(t_f * 8, torch.round(t_f * 8))
    assert target.rows == [nb + 1, nb + 1]
    # d = 1/4 row: CFG 1 + 1.5 (3 - 1) = 4; coarser rows: 3 (the conditional call alone).
    want_c = (16.0 + 3 * 9.0) / nb
    torch.testing.assert_close(parts["consistency"], torch.tensor(want_c))
    v = x1 - x0
    want_v = v[nb:].pow(2).mean(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(parts["velocity"], want_v)
    torch.testing.assert_close(parts["loss"], (want_c * nb + want_v * 28) / 32)


def test_shortcut_loss_is_deterministic_given_generator() -> None:
    torch.manual_seed(0)
    model, target = TinyNet(), TinyNet()
    x0, x1, y = _batch(16, seed=6)
    obj, guid = ObjectiveCfg(), GuidanceCfg()
    a = shortcut_loss(model, target, x0, x1, y, obj, guid, _mse, NUM_CLASSES,
                      torch.Generator().manual_seed(9))
    b = shortcut_loss(model, target, x0, x1, y, obj, guid, _mse, NUM_CLASSES,
                      torch.Generator().manual_seed(9))
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    assert math.isfinite(a["loss"].item())


def test_sm_levels_edges() -> None:
    """M = 2: one bootstrap level (d = 1), whose half jumps are the flow; a slot index must lie
    below the slot count."""
    from ismctl.objectives.shortcut import official_levels, slot_levels

    assert official_levels(3, 2).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(UserError, match="sm needs base_steps >= 2"):
        official_levels(3, 1)
    assert slot_levels(8, 0.5, 8, (1, 2)).tolist() == official_levels(8, 8)[1::2].tolist()
    for bad in ((2, 2), (-1, 2)):
        with pytest.raises(ValueError, match="slot"):
            slot_levels(8, 0.5, 8, bad)


def test_shortcut_loss_hands_the_slot_to_sm() -> None:
    """The level histogram belongs to the global batch: slot 1 of 2 trains its share of the
    6 bootstrap rows of 24 (M = 16: 1/8, 1/4, 1/2, 1, 1, 1), where a micro-batch of 12 alone
    would have 3 rows, all at d = 1."""
    from ismctl.objectives.shortcut import official_levels

    obj = ObjectiveCfg(mode="sm", base_steps=16, bootstrap_fraction=0.25)
    model = Recorder(ZeroNet())
    x0, x1, y = _batch(12, seed=8)
    shortcut_loss(model, _constant_field(), x0, x1, y, obj, GuidanceCfg(), _mse, NUM_CLASSES,
                  torch.Generator().manual_seed(0), (1, 2))
    assert official_levels(3, 16).tolist() == [1.0, 1.0, 1.0]
    assert model.calls[0]["d"][:3].tolist() == official_levels(6, 16)[1::2].tolist()
    assert model.calls[0]["d"][:3].tolist() == [0.25, 1.0, 1.0]


def test_sm_without_cfg_asks_for_no_null_rows() -> None:
    """Scale 1 (or none) is the conditional velocity itself: the half jumps take one row per
    sample, no null rows."""
    d = torch.tensor([2 / 8, 0.5, 2 / 8])
    t = torch.tensor([0.25, 0.0, 0.5])
    y = torch.tensor([2, 2, 0])
    for scale in (1.0, None):
        rec = Recorder(_constant_field(cond=3.0, null=1.0))
        got = sm_bootstrap_target(rec, torch.zeros(3, 1, 2, 2), t, d, y, 8, NULL,
                                  cfg_scale=scale)
        assert rec.rows == [3, 3]
        torch.testing.assert_close(got, torch.full_like(got, 3.0))
    rec = Recorder(_constant_field(cond=3.0, null=1.0))
    sm_bootstrap_target(rec, torch.zeros(3, 1, 2, 2), t, d, y, 8, NULL, cfg_scale=2.0)
    assert rec.rows == [5, 5]


def test_target_passes_per_sample() -> None:
    """Target-network passes per training sample (method §5): two half jumps per consistency
    row, and for ism the cond and null rows per guidance row."""
    from ismctl.objectives.shortcut import target_passes

    assert target_passes(ObjectiveCfg(mode="ism")) == pytest.approx(2 * 0.25 + 2 * 0.25)
    assert target_passes(ObjectiveCfg(mode="sm", bootstrap_fraction=0.125)) == 0.25
