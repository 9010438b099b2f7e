"""The targets, weights and losses the training step really uses, row by row, against the
references the suite trusts.

One real :class:`~ismctl.training.step.TrainStep` (fp32, no compile) per objective, on a small
network of every input (x, t, d, the label, w) whose target EMA differs from the online
weights. The online network records what it is asked; the loss function records the targets it
is given. Each kind of row is then checked against its reference, computed from the snapshot of
the target network the step used: the velocity rows against x1 - x0, the guidance rows against
:func:`guidance_target` and the formula (inside and outside the interval), the consistency rows
against :func:`bootstrap_target` and two hand-made half jumps, sm's against
:func:`sm_bootstrap_target` and the CFG formula, MeanFlow's against :func:`baked_velocity`,
:func:`meanflow_target` and a closed form on Gaussian data; the wavelet loss against PyWavelets
with the band normaliser's weights derived here. The gradient the optimiser receives must be the
gradient of the loss rebuilt from those references.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import pywt
import torch
from torch import Tensor, nn

from ismctl.config.recipe import GuidanceCfg, LossCfg, ObjectiveCfg, Recipe
from ismctl.losses import build_loss
from ismctl.losses.band_stats import BandStats, band_sizes
from ismctl.objectives.meanflow import baked_velocity, meanflow_loss, meanflow_target
from ismctl.objectives.shortcut import (
    bootstrap_target,
    guidance_target,
    ism_loss,
    sm_bootstrap_target,
    split_sizes,
)
from ismctl.system.distributed import DistInfo
from ismctl.training.ema import TwinEMA
from ismctl.training.state import TrainState
from ismctl.training.step import TrainStep

NUM_CLASSES = 3
NULL = NUM_CLASSES
SHAPE = (2, 8, 8)
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _col(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


class Field(nn.Module):
    """A small network of every input: nonlinear in x, t, d and w, with a label embedding that
    w scales, so every input changes the output. ``record`` (a list, or None) keeps the inputs
    and the output of each call."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        channels = SHAPE[0]
        self.num_classes = NUM_CLASSES
        self.scale = nn.Parameter(0.6 + 0.3 * torch.rand(channels, 1, 1, generator=gen))
        self.coef = nn.Parameter(torch.randn(4, channels, generator=gen))
        self.emb = nn.Parameter(torch.randn(NUM_CLASSES + 1, channels, generator=gen))
        self.mix = nn.Parameter(torch.eye(channels) + 0.3 * torch.randn(channels, channels,
                                                                           generator=gen))
        self.record: list[dict[str, Tensor]] | None = None

    def forward(self, x: Tensor, t: Tensor, d: Tensor, y: Tensor, w: Tensor) -> Tensor:
        c = self.coef
        cond = t[:, None] * c[0] + d[:, None] * c[1] + w[:, None] * c[2] + self.emb[y]
        h = torch.tanh(self.scale * x + cond[:, :, None, None])
        out = torch.einsum("oc,bchw->bohw", self.mix, h)
        out = out + _col(1 + w) * self.emb[y][:, :, None, None] + _col(d) * c[3, :, None, None] * x
        if self.record is not None:
            self.record.append({"x": x.detach().clone(), "t": t.detach().clone(),
                                "d": d.detach().clone(), "y": y.clone(),
                                "w": w.detach().clone(), "out": out.detach().clone()})
        return out


class RecordingAdamW(torch.optim.AdamW):
    """AdamW that keeps, at every step, the learning rate and the gradients it is given."""

    def __init__(self, params, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.seen: list[dict[str, object]] = []

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"]]
        self.seen.append({"lr": [g["lr"] for g in self.param_groups],
                          "grads": [p.grad.detach().clone() for p in params]})
        return super().step(closure)


def make_recipe(**sections: dict) -> Recipe:
    """A recipe for the step: fp32, no compile, the sections given on top."""
    body: dict = {"train": {"precision": "fp32", "compile": False, "seed": 3},
                  "optim": {"lr": 1e-3, "warmup_steps": 0, "grad_clip": None},
                  "eval": {"steps": [1]}}
    for name, values in sections.items():
        body[name] = {**body.get(name, {}), **values}
    return Recipe.model_validate(body)


def batches(n: int, seed: int) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Noise, data far from the noise (so that swapping them shows), labels, pool stats."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        x0 = torch.randn(n, *SHAPE, generator=gen)
        x1 = 1.5 + 0.7 * torch.randn(n, *SHAPE, generator=gen)
        y = torch.randint(NUM_CLASSES, (n,), generator=gen)
        yield x0, x1, y, torch.zeros(2)


def field_and_ema() -> tuple[Field, TwinEMA]:
    """The online :class:`Field` and its twin EMA, whose target differs from the online weights
    (targets come from the target EMA: a mix-up of the two must show)."""
    torch.manual_seed(0)
    model = Field(seed=1)
    ema = TwinEMA(model, target_decay=0.5, inference_decay=0.9)
    with torch.no_grad():
        for p in ema.target.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model, ema


class Harness:
    """A real TrainStep on :class:`Field`, with the records the tests read."""

    def __init__(self, recipe: Recipe, loss_fn: Callable[[Tensor, Tensor], Tensor],
                 batch: int = 48, data_seed: int = 0) -> None:
        model, ema = field_and_ema()
        o = recipe.optim
        self.opt = RecordingAdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps,
                                  weight_decay=o.weight_decay)
        self.state = TrainState(model, ema, self.opt)
        self.pairs: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        stream = batches(batch, data_seed)

        def loader() -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
            for item in stream:
                self.pairs.append(item)
                yield item

        self.targets: list[Tensor] = []
        self.preds: list[Tensor] = []

        def recording_loss(pred: Tensor, target: Tensor) -> Tensor:
            self.preds.append(pred.detach().clone())
            self.targets.append(target.detach().clone())
            return loss_fn(pred, target)

        self.loss_fn = loss_fn
        self.step_fn = TrainStep(recipe, self.state, recording_loss, [loader()], 1, CPU)

    def run(self, step: int = 0) -> dict[str, object]:
        """One step; what the online network was asked and given, and the networks before it."""
        model = self.state.model
        before = copy.deepcopy(model)
        target = copy.deepcopy(self.state.ema.target)
        target.record = None
        before.record = None
        model.record = []
        sums, _, bad, grad_norm = self.step_fn(step)
        (call,) = model.record
        model.record = None
        x0, x1, y, _ = self.pairs[-1]
        return {"call": call, "target_net": target, "online_before": before,
                "target": self.targets[-1], "pred": self.preds[-1], "sums": sums,
                "bad": bad, "grad_norm": grad_norm, "x0": x0, "x1": x1, "y": y,
                "seen": self.opt.seen[-1]}


def mse(pred: Tensor, target: Tensor) -> Tensor:
    return (pred.double() - target.double()).pow(2).flatten(1).mean(1)


def assert_grads_match(out: dict, loss: Tensor) -> None:
    """The gradient the optimiser got is that of ``loss`` (built on ``online_before``)."""
    params = list(out["online_before"].parameters())
    want = torch.autograd.grad(loss, params)
    for got, ref in zip(out["seen"]["grads"], want, strict=True):
        torch.testing.assert_close(got.double(), ref.double(), rtol=1e-4, atol=1e-6)


def replay_online(out: dict) -> Tensor:
    c = out["call"]
    return out["online_before"](c["x"], c["t"], c["d"], c["y"], c["w"])


# ism -------------------------------------------------------------------------------------


def band_weights_by_hand(variance: list[float], counts: list[int], ratio: float) -> list[float]:
    """The normaliser of method §3.2 from its definition: 1 / (variance + unit noise), the
    smallest raised to a ``ratio``-th of the largest, scaled so that a white error costs its MSE."""
    raw = [1.0 / (v + 1.0) for v in variance]
    floor = max(raw) / ratio
    raw = [max(r, floor) for r in raw]
    scale = sum(counts) / sum(n * r for n, r in zip(counts, raw, strict=True))
    return [r * scale for r in raw]


LEVELS = 3
DETAIL = [1.0, 2.0, 0.5]          # finest first
APPROX = 1.5
VARIANCE = [0.2, 1.5, 6.0, 40.0]  # per band, finest detail first, then the approximation


def normalised_wavelet() -> tuple[Callable[[Tensor, Tensor], Tensor], Callable]:
    """The trainer's wavelet loss with a data set's band normaliser, and its PyWavelets
    reference."""
    counts = band_sizes(SHAPE, LEVELS)
    stats = BandStats("haar", LEVELS, SHAPE, 100, counts, tuple(v + 0.5 for v in VARIANCE),
                      tuple(VARIANCE))
    cfg = LossCfg(name="wavelet", levels=LEVELS, detail_weights=DETAIL, approx_weight=APPROX,
                  band_norm="variance", max_band_ratio=10.0)
    fn = build_loss(cfg, SHAPE[1], stats)
    scales = band_weights_by_hand(VARIANCE, list(counts), 10.0)
    weights = [d * s for d, s in zip(DETAIL, scales[:LEVELS], strict=True)] + [APPROX * scales[-1]]

    def reference(pred: Tensor, target: Tensor) -> Tensor:
        diff = (pred.double() - target.double()).numpy()
        out = np.zeros(diff.shape[0])
        for b in range(diff.shape[0]):
            for c in range(diff.shape[1]):
                coeffs = pywt.wavedec2(diff[b, c], "haar", mode="periodization", level=LEVELS)
                # wavedec2: [cA, coarsest details, ..., finest details].
                details = [sum(np.sum(band**2) for band in level) for level in coeffs[1:]][::-1]
                energies = [*details, np.sum(coeffs[0] ** 2)]
                out[b] += sum(w * e for w, e in zip(weights, energies, strict=True))
        return torch.from_numpy(out / diff[0].size)

    return fn, reference


def test_wavelet_loss_with_the_band_normaliser_is_pywavelets_with_those_weights() -> None:
    fn, reference = normalised_wavelet()
    gen = torch.Generator().manual_seed(9)
    pred, target = torch.randn(5, *SHAPE, generator=gen), torch.randn(5, *SHAPE, generator=gen)
    torch.testing.assert_close(fn(pred, target).double(), reference(pred, target),
                               rtol=1e-5, atol=1e-7)
    assert len(set(np.round(band_weights_by_hand(VARIANCE, list(band_sizes(SHAPE, LEVELS)),
                                                 10.0), 6))) == 4


ISM = {"objective": {"mode": "ism", "base_steps": 8, "class_dropout": 0.3,
                     "velocity_weight": 0.5, "guidance_weight": 2.0, "consistency_weight": 3.0},
       "guidance": {"w_max": 2.0, "w_step": 0.5, "interval_start": 0.3}}


@pytest.mark.parametrize("loss", ["mse", "wavelet"])
def test_ism_step_targets_row_by_row(loss: str) -> None:
    if loss == "mse":
        loss_fn, reference_loss = mse, mse
    else:
        loss_fn, reference_loss = normalised_wavelet()
    recipe = make_recipe(**ISM)
    out = Harness(recipe, loss_fn).run()
    c, tgt = out["call"], out["target_net"]
    x0, x1, y = out["x0"], out["x1"], out["y"]
    x, t, d, lab, w = c["x"], c["t"], c["d"], c["y"], c["w"]
    target = out["target"]
    nv, ng, nc = split_sizes(48, "ism", 0.25, 0.25)
    sv, sg, sc = slice(0, nv), slice(nv, nv + ng), slice(nv + ng, 48)
    v = x1 - x0
    torch.testing.assert_close(x, (1 - _col(t)) * x0 + _col(t) * x1)
    torch.testing.assert_close(out["pred"], c["out"])

    # Velocity rows: d = 0, w = 0, some labels dropped, target x1 - x0.
    assert (d[sv] == 0).all() and (w[sv] == 0).all()
    assert ((lab[sv] == y[sv]) | (lab[sv] == NULL)).all() and (lab[sv] == NULL).any()
    torch.testing.assert_close(target[sv], v[sv])

    # Guidance rows: d = 0, true labels, target v + w (F_c - F_null) inside the interval.
    assert (d[sg] == 0).all() and torch.equal(lab[sg], y[sg])
    inside = t[sg] >= 0.3
    assert (inside & (w[sg] > 0)).any() and (~inside & (w[sg] > 0)).any()
    with torch.no_grad():
        zeros = torch.zeros(ng)
        f_c = tgt(x[sg], t[sg], zeros, y[sg], zeros)
        f_null = tgt(x[sg], t[sg], zeros, torch.full_like(y[sg], NULL), zeros)
        by_hand = torch.where(_col(inside), v[sg] + _col(w[sg]) * (f_c - f_null), v[sg])
        trusted = guidance_target(tgt, x[sg], t[sg], y[sg], w[sg], v[sg], NULL, 0.3)
    torch.testing.assert_close(target[sg], by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(target[sg], trusted, rtol=1e-5, atol=1e-5)

    # Consistency rows: every level, labels kept, two half jumps of the target network at the
    # row's own w, the finest level's from the d = 0 velocity.
    assert set(d[sc].tolist()) == {1.0, 0.5, 0.25, 0.125} and torch.equal(lab[sc], y[sc])
    assert (t[sc] + d[sc] <= 1).all() and (w[sc] > 0).any()
    with torch.no_grad():
        dc, tc, wc, yc = d[sc], t[sc], w[sc], y[sc]
        asked = torch.where(dc == 1 / 8, torch.zeros_like(dc), dc / 2)
        v1 = tgt(x[sc], tc, asked, yc, wc)
        v2 = tgt(x[sc] + _col(dc / 2) * v1, tc + dc / 2, asked, yc, wc)
        trusted = bootstrap_target(tgt, x[sc], tc, dc, yc, wc, 8, NULL)
    torch.testing.assert_close(target[sc], (v1 + v2) / 2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(target[sc], trusted, rtol=1e-5, atol=1e-5)

    # The loss: each part's mean of the per-sample loss, weighted 0.5, 2 and 3.
    per = reference_loss(out["pred"], target)
    for name, rows in (("velocity", sv), ("guidance", sg), ("consistency", sc)):
        torch.testing.assert_close(out["sums"][name].double(), per[rows].mean(),
                                   rtol=1e-5, atol=1e-7)
    pred = replay_online(out)
    per = loss_fn(pred, target)
    total = 0.5 * per[sv].mean() + 2.0 * per[sg].mean() + 3.0 * per[sc].mean()
    torch.testing.assert_close(out["sums"]["loss"].double(), total.detach().double(), rtol=1e-5,
                               atol=1e-7)
    assert_grads_match(out, total)


def test_ism_null_label_rows_train_without_guidance() -> None:
    """A consistency row whose data label is the null class gets w = 0 (its target has nothing
    to guide); its half jumps are asked at w = 0 too."""
    x0, x1 = torch.randn(16, *SHAPE), torch.randn(16, *SHAPE) + 1
    y = torch.tensor([0, 1, 2, NULL] * 4)
    online, target = Field(1), Field(2)
    online.record = []
    target.record = []
    obj = ObjectiveCfg(mode="ism", base_steps=8)
    ism_loss(online, target, x0, x1, y, obj, GuidanceCfg(w_max=2.0, w_step=1.0), mse,
             NUM_CLASSES, torch.Generator().manual_seed(4))
    (call,) = online.record
    rows = slice(12, 16)
    assert (call["y"][rows] == y[rows]).all()
    null_rows = call["y"][rows] == NULL
    assert null_rows.any() and (call["w"][rows][null_rows] == 0).all()
    assert (call["w"][rows][~null_rows] > 0).any()
    for half in target.record[-1:]:
        torch.testing.assert_close(half["w"], call["w"][rows])


def test_ism_with_the_official_path_options() -> None:
    """ism with ``t_grid``, ``sigma_min`` and ``target_clip`` (the official code's options, as
    sm uses them): the velocity rows' t lie on the 1/M grid, every row is interpolated on the
    sigma_min path, x_t = (1 - (1 - s) t) x0 + t x1, the velocity rows regressing
    x1 - (1 - s) x0, and the consistency targets are the clipped bootstrap targets."""
    sigma = 0.05
    x0, x1 = torch.randn(32, *SHAPE), torch.randn(32, *SHAPE) + 1
    y = torch.randint(NUM_CLASSES, (32,))
    online = Field(1)
    online.record = []
    targets: list[Tensor] = []

    def loss(pred: Tensor, target: Tensor) -> Tensor:
        targets.append(target)
        return mse(pred, target)

    obj = ObjectiveCfg(mode="ism", base_steps=8, t_grid=True, sigma_min=sigma, target_clip=1.0)
    net = Field(2)
    ism_loss(online, net, x0, x1, y, obj, GuidanceCfg(w_max=2.0, w_step=0.5), loss, NUM_CLASSES,
             torch.Generator().manual_seed(5))
    (call,), (target,) = online.record, targets
    x, t, d, lab, w = call["x"], call["t"], call["d"], call["y"], call["w"]
    nv, ng, _ = split_sizes(32, "ism", obj.bootstrap_fraction, obj.guidance_fraction)
    torch.testing.assert_close(t[:nv] * 8, torch.round(t[:nv] * 8), rtol=0, atol=1e-6)
    assert (t[:nv] >= 0).all() and (t[:nv] < 1).all()
    assert len(set(t[:nv].tolist())) > 1
    torch.testing.assert_close(x, (1 - (1 - sigma) * _col(t)) * x0 + _col(t) * x1)
    torch.testing.assert_close(target[:nv], x1[:nv] - (1 - sigma) * x0[:nv])
    sc = slice(nv + ng, 32)
    with torch.no_grad():
        clipped = bootstrap_target(net, x[sc], t[sc], d[sc], lab[sc], w[sc], 8, NULL, clip=1.0)
        free = bootstrap_target(net, x[sc], t[sc], d[sc], lab[sc], w[sc], 8, NULL)
    torch.testing.assert_close(target[sc], clipped, rtol=1e-6, atol=1e-6)
    assert (target[sc].abs() <= 1).all() and not torch.allclose(clipped, free)


def test_an_ism_part_without_rows_logs_zero() -> None:
    """guidance_fraction 0 leaves the guidance part empty: it logs 0 (not the NaN mean of no
    rows) and adds nothing to the loss, which is the other two parts' weighted sum."""
    x0, x1 = torch.randn(8, *SHAPE), torch.randn(8, *SHAPE) + 1
    y = torch.randint(NUM_CLASSES, (8,))
    obj = ObjectiveCfg(mode="ism", base_steps=8, guidance_fraction=0.0)
    parts = ism_loss(Field(1), Field(2), x0, x1, y, obj, GuidanceCfg(w_max=1.0), mse,
                     NUM_CLASSES, torch.Generator().manual_seed(3))
    assert parts["guidance"].item() == 0.0
    total = obj.velocity_weight * parts["velocity"] + obj.consistency_weight * parts["consistency"]
    torch.testing.assert_close(parts["loss"].detach(), total, rtol=1e-6, atol=0)


# sm --------------------------------------------------------------------------------------

SM = {"objective": {"mode": "sm", "base_steps": 8, "bootstrap_fraction": 0.25,
                    "class_dropout": 0.3, "sigma_min": 1e-2, "target_clip": 2.5,
                    "t_grid": True},
      "guidance": {"cfg_scale": 1.75}}


def test_sm_step_targets_row_by_row() -> None:
    out = Harness(make_recipe(**SM), mse).run()
    c, tgt = out["call"], out["target_net"]
    x0, x1, y = out["x0"], out["x1"], out["y"]
    x, t, d, lab, w = c["x"], c["t"], c["d"], c["y"], c["w"]
    target, sigma, s = out["target"], 1e-2, 1.75
    nb = 12
    boot, flow = slice(0, nb), slice(nb, 48)
    assert (w == 0).all()
    torch.testing.assert_close(x, (1 - (1 - sigma) * _col(t)) * x0 + _col(t) * x1)

    # Flow rows: the finest jump's embedding, t on the 1/M grid, labels dropped, target
    # x1 - (1 - sigma_min) x0.
    assert (d[flow] == 1 / 8).all() and torch.equal(t[flow] * 8, torch.round(t[flow] * 8))
    assert (t[flow] >= 0).all() and (t[flow] < 1).all() and len(set(t[flow].tolist())) >= 5
    assert ((lab[flow] == y[flow]) | (lab[flow] == NULL)).all() and (lab[flow] == NULL).any()
    torch.testing.assert_close(target[flow], x1[flow] - (1 - sigma) * x0[flow])

    # Bootstrap rows: the official histogram 1/4, 1/2, 1 (4 each), labels kept, half jumps at
    # d/2, CFG at scale s in both half jumps of the d = 2/M rows, midpoints and targets clipped.
    assert sorted(d[boot].tolist()) == [0.25] * 4 + [0.5] * 4 + [1.0] * 4
    assert torch.equal(lab[boot], y[boot])
    with torch.no_grad():
        xb, tb, db, yb = x[boot], t[boot], d[boot], y[boot]
        zero, null = torch.zeros(nb), torch.full_like(yb, NULL)

        def half(xx: Tensor, tt: Tensor) -> Tensor:
            v_c = tgt(xx, tt, db / 2, yb, zero)
            v_null = tgt(xx, tt, db / 2, null, zero)
            return torch.where(_col(db == 0.25), v_null + s * (v_c - v_null), v_c)

        v1 = half(xb, tb)
        v2 = half((xb + _col(db / 2) * v1).clamp(-2.5, 2.5), tb + db / 2)
        by_hand = ((v1 + v2) / 2).clamp(-2.5, 2.5)
        trusted = sm_bootstrap_target(tgt, xb, tb, db, yb, 8, NULL, s, 2.5)
    assert (by_hand.abs() == 2.5).any() and (by_hand.abs() < 2.5).any()
    torch.testing.assert_close(target[boot], by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(target[boot], trusted, rtol=1e-5, atol=1e-5)

    # One mean over all rows.
    per = mse(replay_online(out), target)
    torch.testing.assert_close(out["sums"]["loss"].double(), per.mean().detach(), rtol=1e-5,
                               atol=1e-7)
    torch.testing.assert_close(out["sums"]["consistency"].double(), per[boot].mean().detach(),
                               rtol=1e-5, atol=1e-7)
    assert_grads_match(out, per.mean())


# MeanFlow --------------------------------------------------------------------------------

MF_BAKED = {"objective": {"mode": "meanflow", "bootstrap_fraction": 0.5, "class_dropout": 0.3},
            "guidance": {"omega": 0.6, "kappa": 0.3, "interval_start": 0.4}}
MF_INTRINSIC = {"objective": {"mode": "meanflow", "bootstrap_fraction": 0.5,
                              "class_dropout": 0.3, "meanflow_guidance": "intrinsic"},
                "guidance": {"w_max": 2.0, "w_step": 0.5, "interval_start": 0.4}}


def meanflow_weighted(per: Tensor, c: float = 0.01) -> Tensor:
    """MeanFlow's adaptive weight (p = 1) in its units, the squared error summed over the
    sample's dimensions: l / sg(l + c)."""
    summed = per * float(np.prod(SHAPE))
    return summed / (summed.detach() + c)


@pytest.mark.parametrize("guidance", ["baked", "intrinsic"])
def test_meanflow_step_targets_row_by_row(guidance: str) -> None:
    sections = MF_BAKED if guidance == "baked" else MF_INTRINSIC
    out = Harness(make_recipe(**sections), mse).run()
    c, tgt = out["call"], out["target_net"]
    x0, x1, y = out["x0"], out["x1"], out["y"]
    x, t, d, lab, w = c["x"], c["t"], c["d"], c["y"], c["w"]
    target = out["target"]
    n0 = 24
    flat, jump = slice(0, n0), slice(n0, 48)
    v = x1 - x0
    torch.testing.assert_close(x, (1 - _col(t)) * x0 + _col(t) * x1)
    assert (d[flat] == 0).all() and (d[jump] > 0).all() and (t + d <= 1).all()
    # Labels are dropped among the d = 0 rows only, a leading block of them (MeanFlow's rule).
    dropped = lab == NULL
    assert torch.equal(lab[~dropped], y[~dropped]) and dropped[flat].any()
    assert not dropped[jump].any() and torch.equal(lab[jump], y[jump])
    assert torch.equal(dropped, torch.arange(48) < int(dropped.sum()))

    with torch.no_grad():
        zero = torch.zeros(48)
        f_c = tgt(x, t, zero, lab, zero)
        f_null = tgt(x, t, zero, torch.full_like(lab, NULL), zero)
        inside = t >= 0.4
        labelled = lab != NULL
        assert (inside & labelled).any() and (~inside & labelled).any()
        if guidance == "baked":
            assert (w == 0).all()
            by_hand = torch.where(_col(inside & labelled),
                                  0.6 * v + 0.3 * f_c + 0.1 * f_null, v)
            trusted = baked_velocity(v, f_c, f_null, inside & labelled, 0.6, 0.3)
        else:
            assert (w[~labelled] == 0).all() and (w[inside & labelled] > 0).any()
            assert (w[~inside & labelled] > 0).any()
            by_hand = torch.where(_col(inside), v + _col(w) * (f_c - f_null), v)
            trusted = guidance_target(tgt, x, t, lab, w, v, NULL, 0.4)
        torch.testing.assert_close(by_hand, trusted, rtol=1e-5, atol=1e-5)
        jump_target = meanflow_target(tgt, x[jump], t[jump], d[jump], lab[jump], w[jump],
                                      by_hand[jump])
    torch.testing.assert_close(target[flat], by_hand[flat], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(target[jump], jump_target, rtol=1e-5, atol=1e-5)

    # The jump rows' target is v~ + d dF/dt, dF/dt along (v~, 1, -1) with the end held fixed:
    # central differences of the target network.
    with torch.no_grad():
        xj, tj, dj, yj, wj, vj = x[jump], t[jump], d[jump], lab[jump], w[jump], by_hand[jump]
        xj, tj, dj, vj = xj.double(), tj.double(), dj.double(), vj.double()
        tgt64 = copy.deepcopy(tgt).double()
        h = 1e-4
        fd = (tgt64(xj + h * vj, tj + h, dj - h, yj, wj.double())
              - tgt64(xj - h * vj, tj - h, dj + h, yj, wj.double())) / (2 * h)
    torch.testing.assert_close(target[jump].double(), vj + _col(dj) * fd, rtol=1e-4, atol=1e-4)

    pred = replay_online(out)
    per = mse(pred, target)
    total = meanflow_weighted(per).mean()
    torch.testing.assert_close(out["sums"]["loss"].double(), total.detach(), rtol=1e-5,
                               atol=1e-7)
    torch.testing.assert_close(out["sums"]["velocity"].double(), per[flat].mean().detach(),
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["sums"]["consistency"].double(), per[jump].mean().detach(),
                               rtol=1e-5, atol=1e-7)
    assert_grads_match(out, total)


# Closed forms on Gaussian data -----------------------------------------------------------


class Gaussian(nn.Module):
    """The exact average velocity between N(0, I) noise and N(mu, s^2) data per dimension.

    x_t ~ N(t mu, sd(t)^2), sd(t)^2 = (1 - t)^2 + t^2 s^2; the flow maps quantiles to quantiles,
    phi_{t -> T}(x) = T mu + sd(T) / sd(t) (x - t mu); the velocity is its T-derivative at t and
    the average velocity of (t, d) is (phi_{t -> t + d}(x) - x) / d. Labels and w play no part.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mu = torch.tensor([1.5, -0.5], dtype=torch.float64).view(2, 1, 1)
        self.s = torch.tensor([0.5, 2.0], dtype=torch.float64).view(2, 1, 1)

    def sd(self, t: Tensor) -> Tensor:
        t = _col(t.double())
        return torch.sqrt((1 - t) ** 2 + t**2 * self.s**2)

    def phi(self, x: Tensor, t: Tensor, end: Tensor) -> Tensor:
        return _col(end.double()) * self.mu + self.sd(end) / self.sd(t) * (
            x.double() - _col(t.double()) * self.mu)

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        tt = _col(t.double())
        dsd = (-(1 - tt) + tt * self.s**2) / self.sd(t)
        return self.mu + dsd / self.sd(t) * (x.double() - tt * self.mu)

    def forward(self, x: Tensor, t: Tensor, d: Tensor, y: Tensor, w: Tensor) -> Tensor:
        safe = torch.where(d > 0, d, torch.ones_like(d))
        avg = (self.phi(x, t, t + safe) - x.double()) / _col(safe.double())
        return torch.where(_col(d) > 0, avg, self.velocity(x, t)).to(x.dtype)


def gaussian_batch(n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    g = Gaussian()
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, *SHAPE, generator=gen, dtype=torch.float64)
    x1 = g.mu + g.s * torch.randn(n, *SHAPE, generator=gen, dtype=torch.float64)
    return x0, x1, torch.randint(NUM_CLASSES, (n,), generator=gen)


def test_ism_consistency_targets_of_the_exact_field_are_the_exact_jumps() -> None:
    """Two exact half jumps compose to the exact jump; at the finest level, whose half jumps
    take the instantaneous velocity, the target is two Euler half steps of the exact flow."""
    g, online = Gaussian(), Field(3).double()
    online.record = []
    targets: list[Tensor] = []

    def loss(pred: Tensor, target: Tensor) -> Tensor:
        targets.append(target)
        return mse(pred, target)

    x0, x1, y = gaussian_batch(64, 5)
    ism_loss(online, g, x0, x1, y, ObjectiveCfg(mode="ism", base_steps=128),
             GuidanceCfg(w_max=0.0), loss, NUM_CLASSES, torch.Generator().manual_seed(6))
    c, (target,) = online.record[0], targets
    rows = slice(48, 64)
    x, t, d = c["x"][rows], c["t"][rows], c["d"][rows]
    exact = (g.phi(x, t, t + d) - x) / _col(d)
    coarse = d > 1 / 128
    assert coarse.any() and (~coarse).any()
    torch.testing.assert_close(target[rows][coarse], exact[coarse], rtol=1e-9, atol=1e-9)
    tf, df, xf = t[~coarse], d[~coarse], x[~coarse]
    v1 = g.velocity(xf, tf)
    euler = (v1 + g.velocity(xf + _col(df / 2) * v1, tf + df / 2)) / 2
    torch.testing.assert_close(target[rows][~coarse], euler, rtol=1e-9, atol=1e-9)
    # The velocity rows regress x1 - x0 itself, whose mean given x_t is the exact velocity.
    torch.testing.assert_close(target[:32], x1[:32] - x0[:32])


def test_meanflow_jump_targets_on_gaussian_data_follow_the_closed_form() -> None:
    """With the exact average velocity F as the target network, the MeanFlow target of a jump
    (t, d) for the training velocity v = x1 - x0 is F + sd(t + d) / sd(t) (v - u(x_t, t)): the
    identity's F + (I + d dF/dx)(v - u), dF/dx = (sd(t + d) / sd(t) - 1) / d for this flow."""
    g, online = Gaussian(), Field(3).double()
    online.record = []
    targets: list[Tensor] = []

    def loss(pred: Tensor, target: Tensor) -> Tensor:
        targets.append(target)
        return mse(pred, target)

    x0, x1, y = gaussian_batch(64, 7)
    obj = ObjectiveCfg(mode="meanflow", bootstrap_fraction=0.5, class_dropout=0.0)
    meanflow_loss(online, g, x0, x1, y, obj, GuidanceCfg(), loss, NUM_CLASSES,
                  torch.Generator().manual_seed(8))
    c, (target,) = online.record[0], targets
    x, t, d = c["x"], c["t"], c["d"]
    v = x1 - x0
    jump = d > 0
    assert jump.sum() == 32
    xj, tj, dj = x[jump], t[jump], d[jump]
    exact = (g.phi(xj, tj, tj + dj) - xj) / _col(dj)
    want = exact + g.sd(tj + dj) / g.sd(tj) * (v[jump] - g.velocity(xj, tj))
    torch.testing.assert_close(target[jump], want, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(target[~jump], v[~jump])


def test_a_one_sample_meanflow_batch_trains_one_part() -> None:
    """A micro-batch of one sample has room for one part only (split_sizes): at a bootstrap
    fraction of 1/2 its row is a velocity row at d = 0 whose target is x1 - x0."""
    online, targets = Field(3).double(), []
    online.record = []

    def loss(pred: Tensor, target: Tensor) -> Tensor:
        targets.append(target)
        return mse(pred, target)

    x0, x1, y = gaussian_batch(1, 9)
    obj = ObjectiveCfg(mode="meanflow", bootstrap_fraction=0.5, class_dropout=0.0)
    parts = meanflow_loss(online, Gaussian(), x0, x1, y, obj, GuidanceCfg(), loss, NUM_CLASSES,
                          torch.Generator().manual_seed(8))
    assert online.record[0]["d"].tolist() == [0.0]
    torch.testing.assert_close(targets[0], x1 - x0)
    # The empty part logs 0, not the NaN mean of no rows; the loss is the velocity row's.
    assert parts["consistency"].item() == 0.0
    torch.testing.assert_close(parts["velocity"], mse(online.record[0]["out"], x1 - x0)[0])
    # At a bootstrap fraction above 1/2 the one row is a jump row, and the velocity part is 0.
    obj = ObjectiveCfg(mode="meanflow", bootstrap_fraction=0.75, class_dropout=0.0)
    parts = meanflow_loss(online, Gaussian(), x0, x1, y, obj, GuidanceCfg(), loss, NUM_CLASSES,
                          torch.Generator().manual_seed(8))
    assert online.record[1]["d"].item() > 0 and parts["velocity"].item() == 0.0
    assert parts["consistency"].item() > 0


@pytest.mark.parametrize("sections", [ISM, SM, MF_BAKED, MF_INTRINSIC],
                         ids=["ism", "sm", "meanflow-baked", "meanflow-intrinsic"])
def test_every_draw_comes_from_the_step_generator(sections: dict) -> None:
    """t, d, w and the label drops come from the generator the step seeds, never the global
    one: the same step after other global draws asks and trains exactly the same."""
    recipe = make_recipe(**sections)
    first = Harness(recipe, mse).run(5)
    again = Harness(recipe, mse)
    torch.manual_seed(123)
    torch.rand(7)
    second = again.run(5)
    for key in ("x", "t", "d", "y", "w"):
        assert torch.equal(first["call"][key], second["call"][key]), key
    assert torch.equal(first["target"], second["target"])
