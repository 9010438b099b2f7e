"""``objective.mode: sm`` against a transcription of the official shortcut-models training step.

``official_get_targets`` below follows ``get_targets`` of kvfrans/shortcut-models
(``targets_shortcut.py``) statement by statement, in numpy, with ``bootstrap_dt_bias`` 0 (the
default of every published run), and ``official_loss`` the loss of its ``train.py``. Two
things differ, both on purpose: its random draws (JAX keys) are arguments, so both sides can be
fed the same noise, times and label drops; and its flow part, which reuses the first rows of the
batch for the bootstrap part too and drops the last ones (kvfrans/shortcut-models issue 10), can
take the rows after the bootstrap part instead (``reuse_rows=False``), as ours does. Both run one
deterministic stand-in network; the targets, the network inputs and the loss must agree to float
rounding at every level, with and without CFG.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor

from ismctl.config.recipe import GuidanceCfg, ObjectiveCfg
from ismctl.objectives.shortcut import official_levels, slot_levels, sm_loss

NUM_CLASSES = 5
DENOISE_TIMESTEPS = 128
SHAPE = (2, 4, 4)


def stand_in(x: np.ndarray, t: np.ndarray, level: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A fixed nonlinear field of every input: x, t, the jump level (d = 2^-level) and label."""
    rng = np.random.default_rng(1234)
    a = rng.normal(size=SHAPE)
    b = rng.normal(size=SHAPE)
    emb = rng.normal(size=(NUM_CLASSES + 1, *SHAPE))
    col = (slice(None), None, None, None)
    return (np.tanh(a * x + b * t[col] + 0.3 * level[col]) + emb[labels]
            + 0.1 * level[col] * x)


def official_get_targets(model, images, labels, *, batch_size, bootstrap_every, cfg_scale,
                         bootstrap_cfg, class_dropout_prob, t_boot, noise_boot, drop, t_flow,
                         noise_flow, reuse_rows=True):
    """get_targets of kvfrans/shortcut-models in numpy; the JAX draws are the keyword inputs:
    ``t_boot`` the integers of ``randint(time_key, (bs,), 0, dt_sections)``, ``noise_boot`` and
    ``noise_flow`` the two ``normal(noise_key, ...)`` draws, ``drop`` the bernoulli label drops,
    ``t_flow`` the integers of ``randint(time_key, (B,), 0, denoise_timesteps)``."""
    num_classes = NUM_CLASSES
    # 1) Sample dt.
    bootstrap_batchsize = batch_size // bootstrap_every
    log2_sections = np.log2(DENOISE_TIMESTEPS).astype(np.int32)
    dt_base = np.repeat(log2_sections - 1 - np.arange(log2_sections),
                        bootstrap_batchsize // log2_sections)
    dt_base = np.concatenate([dt_base, np.zeros(bootstrap_batchsize - dt_base.shape[0])])
    num_dt_cfg = bootstrap_batchsize // log2_sections
    dt = 1 / (2 ** (dt_base))
    dt_base_bootstrap = dt_base + 1
    dt_bootstrap = dt / 2

    # 2) Sample t.
    dt_sections = np.power(2, dt_base)
    t = np.asarray(t_boot).astype(np.float64)
    assert np.all((0 <= t) & (t < dt_sections))
    t = t / dt_sections
    t_full = t[:, None, None, None]

    # 3) Bootstrap targets.
    x_1 = images[:bootstrap_batchsize]
    x_0 = noise_boot
    x_t = (1 - (1 - 1e-5) * t_full) * x_0 + t_full * x_1
    bst_labels = labels[:bootstrap_batchsize]
    if not bootstrap_cfg:
        v_b1 = model(x_t, t, dt_base_bootstrap, bst_labels)
        t2 = t + dt_bootstrap
        x_t2 = x_t + dt_bootstrap[:, None, None, None] * v_b1
        x_t2 = np.clip(x_t2, -4, 4)
        v_b2 = model(x_t2, t2, dt_base_bootstrap, bst_labels)
        v_target = (v_b1 + v_b2) / 2
    else:
        x_t_extra = np.concatenate([x_t, x_t[:num_dt_cfg]], axis=0)
        t_extra = np.concatenate([t, t[:num_dt_cfg]], axis=0)
        dt_base_extra = np.concatenate([dt_base_bootstrap, dt_base_bootstrap[:num_dt_cfg]])
        labels_extra = np.concatenate([bst_labels,
                                       np.ones(num_dt_cfg, dtype=np.int64) * num_classes])
        v_b1_raw = model(x_t_extra, t_extra, dt_base_extra, labels_extra)
        v_b_cond = v_b1_raw[:x_1.shape[0]]
        v_b_uncond = v_b1_raw[x_1.shape[0]:]
        v_cfg = v_b_uncond + cfg_scale * (v_b_cond[:num_dt_cfg] - v_b_uncond)
        v_b1 = np.concatenate([v_cfg, v_b_cond[num_dt_cfg:]], axis=0)

        t2 = t + dt_bootstrap
        x_t2 = x_t + dt_bootstrap[:, None, None, None] * v_b1
        x_t2 = np.clip(x_t2, -4, 4)
        x_t2_extra = np.concatenate([x_t2, x_t2[:num_dt_cfg]], axis=0)
        t2_extra = np.concatenate([t2, t2[:num_dt_cfg]], axis=0)
        v_b2_raw = model(x_t2_extra, t2_extra, dt_base_extra, labels_extra)
        v_b2_cond = v_b2_raw[:x_1.shape[0]]
        v_b2_uncond = v_b2_raw[x_1.shape[0]:]
        v_b2_cfg = v_b2_uncond + cfg_scale * (v_b2_cond[:num_dt_cfg] - v_b2_uncond)
        v_b2 = np.concatenate([v_b2_cfg, v_b2_cond[num_dt_cfg:]], axis=0)
        v_target = (v_b1 + v_b2) / 2

    v_target = np.clip(v_target, -4, 4)
    bst_v, bst_dt, bst_t, bst_xt, bst_l = v_target, dt_base, t, x_t, bst_labels

    # 4) Flow-matching targets.
    labels_dropped = np.where(drop, num_classes, labels)
    t = np.asarray(t_flow).astype(np.float64)
    t /= DENOISE_TIMESTEPS
    t_full = t[:, None, None, None]
    x_0 = noise_flow
    x_1 = images
    x_t = (1 - (1 - 1e-5) * t_full) * x_0 + t_full * x_1
    v_t = x_1 - (1 - 1e-5) * x_0
    dt_flow = np.log2(DENOISE_TIMESTEPS).astype(np.int32)
    dt_base = np.ones(images.shape[0], dtype=np.int32) * dt_flow

    # 5) Merge flow + bootstrap.
    bst_size = batch_size // bootstrap_every
    bst_size_data = batch_size - bst_size
    rows = slice(0, bst_size_data) if reuse_rows else slice(bst_size, batch_size)
    x_t = np.concatenate([bst_xt, x_t[rows]], axis=0)
    t = np.concatenate([bst_t, t[rows]], axis=0)
    dt_base = np.concatenate([bst_dt, dt_base[rows]], axis=0)
    v_t = np.concatenate([bst_v, v_t[rows]], axis=0)
    labels_dropped = np.concatenate([bst_l, labels_dropped[rows]], axis=0)
    return x_t, v_t, t, dt_base, labels_dropped


def official_loss(v_prime: np.ndarray, v_t: np.ndarray) -> float:
    """train.py: mse_v = mean((v_prime - v_t)^2) over (1, 2, 3); loss = mean(mse_v)."""
    mse_v = np.mean((v_prime - v_t) ** 2, axis=(1, 2, 3))
    return float(np.mean(mse_v))


def _level(d: Tensor) -> np.ndarray:
    """d = 2^-level as the integer level the official network takes (d = 0 never occurs)."""
    dd = d.double().numpy()
    assert np.all(dd > 0), "sm never asks the network for d = 0"
    level = -np.log2(dd)
    assert np.all(level == np.round(level))
    return level


def torch_net(x: Tensor, t: Tensor, d: Tensor, y: Tensor, w: Tensor) -> Tensor:
    assert torch.all(w == 0)
    out = stand_in(x.double().numpy(), t.double().numpy(), _level(d), y.numpy())
    return torch.from_numpy(out).to(x.dtype)


def online_np(x: np.ndarray, t: np.ndarray, level: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The online network: another fixed field, so the loss is not trivially zero."""
    return 0.5 * stand_in(x, t, level + 0.5, labels) - 0.2 * x


class Online(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones((), dtype=torch.float64))
        self.inputs: dict[str, Tensor] = {}

    def forward(self, x: Tensor, t: Tensor, d: Tensor, y: Tensor, w: Tensor) -> Tensor:
        self.inputs = {"x": x, "t": t, "d": d, "y": y, "w": w}
        out = online_np(x.double().detach().numpy(), t.double().numpy(), _level(d), y.numpy())
        return self.scale * torch.from_numpy(out).to(x.dtype)


def _run_both(batch: int, cfg: bool, seed: int, reuse_rows: bool = False):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, *SHAPE, generator=gen, dtype=torch.float64)
    x1 = 1.5 * torch.randn(batch, *SHAPE, generator=gen, dtype=torch.float64) + 0.5
    y = torch.randint(NUM_CLASSES, (batch,), generator=gen)
    obj = ObjectiveCfg(mode="sm", base_steps=DENOISE_TIMESTEPS, bootstrap_fraction=1 / 8,
                       t_grid=True, target_clip=4.0, sigma_min=1e-5, class_dropout=0.3)
    guid = GuidanceCfg(cfg_scale=1.5 if cfg else 1.0, interval_start=0.0)
    captured: dict[str, Tensor] = {}

    def loss_fn(pred: Tensor, target: Tensor) -> Tensor:
        captured["target"] = target
        return (pred - target).pow(2).flatten(1).mean(1)

    online = Online()
    ours = sm_loss(online, torch_net, x0, x1, y, obj, guid, loss_fn, NUM_CLASSES,
                   torch.Generator().manual_seed(seed + 100))
    inp = online.inputs
    nb = batch // 8
    # The draws our objective made, read back from the online network's inputs.
    t_boot = inp["t"][:nb].double().numpy() * 2.0 ** _level(inp["d"][:nb])
    t_flow = np.zeros(batch)
    t_flow[nb:] = (inp["t"][nb:].double() * DENOISE_TIMESTEPS).numpy()
    assert np.all(t_boot == np.round(t_boot)) and np.all(t_flow == np.round(t_flow))
    drop = np.zeros(batch, dtype=bool)
    drop[nb:] = (inp["y"][nb:] == NUM_CLASSES).numpy()
    noise_flow = np.zeros((batch, *SHAPE))
    noise_flow[nb:] = x0[nb:].numpy()
    off = official_get_targets(
        stand_in, x1.numpy(), y.numpy(), batch_size=batch, bootstrap_every=8, cfg_scale=1.5,
        bootstrap_cfg=cfg, class_dropout_prob=0.3, t_boot=t_boot.astype(np.int64),
        noise_boot=x0[:nb].numpy(), drop=drop, t_flow=t_flow.astype(np.int64),
        noise_flow=noise_flow, reuse_rows=reuse_rows)
    return ours, inp, captured["target"], off


@pytest.mark.parametrize("batch", [256, 64, 16])
@pytest.mark.parametrize("cfg", [True, False])
def test_sm_equals_the_official_targets_and_loss(batch: int, cfg: bool) -> None:
    ours, inp, target, (x_t, v_t, t, dt_base, labels) = _run_both(batch, cfg, seed=batch)
    np.testing.assert_allclose(inp["x"].numpy(), x_t, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(inp["t"].double().numpy(), t)
    np.testing.assert_array_equal(_level(inp["d"]), dt_base)
    np.testing.assert_array_equal(inp["y"].numpy(), labels)
    np.testing.assert_allclose(target.numpy(), v_t, rtol=0, atol=1e-12)
    v_prime = online_np(x_t, t, dt_base.astype(np.float64), labels)
    assert ours["loss"].item() == pytest.approx(official_loss(v_prime, v_t), rel=1e-12)
    # Every bootstrap level of the official histogram is present, each checked above.
    nb = batch // 8
    levels = sorted(set(dt_base[:nb].tolist()))
    assert levels == (list(range(7)) if nb >= 7 else [0])


def test_the_flow_rows_are_the_only_ones_with_dropped_labels_and_the_cfg_changes_targets() -> None:
    """Labels are dropped in the flow part only; CFG moves exactly the d = 1/64 bootstrap rows
    (and, through nothing else, no other row)."""
    ours_cfg, inp, target_cfg, _ = _run_both(256, True, seed=7)
    _, _, target_plain, _ = _run_both(256, False, seed=7)
    nb = 32
    assert (inp["y"][:nb] != NUM_CLASSES).all() and (inp["y"][nb:] == NUM_CLASSES).any()
    moved = (target_cfg - target_plain).flatten(1).abs().amax(1) > 0
    finest = inp["d"] == 1 / 64
    assert torch.equal(moved, finest) and int(finest.sum()) == 4
    assert torch.all(inp["d"][nb:] == 1 / 128)


def test_the_official_row_reuse_is_a_documented_difference_only() -> None:
    """With the official row reuse (issue 10) the flow part would repeat the bootstrap samples;
    everything else equal, only those rows differ from ours."""
    _, inp, target, (x_t, v_t, *_) = _run_both(64, True, seed=3, reuse_rows=True)
    nb = 8
    np.testing.assert_allclose(target[:nb].numpy(), v_t[:nb], rtol=0, atol=1e-12)
    assert not np.allclose(inp["x"][nb:].numpy(), x_t[nb:])


def test_official_level_histogram() -> None:
    d = official_levels(32, 128)
    want = [1 / 64] * 4 + [1 / 32] * 4 + [1 / 16] * 4 + [1 / 8] * 4 + [1 / 4] * 4 + [1 / 2] * 4
    assert d.tolist() == want + [1.0] * 8
    assert official_levels(4, 128).tolist() == [1.0] * 4
    assert official_levels(8, 128).tolist() == [1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2,
                                                 1.0, 1.0]


@pytest.mark.parametrize("slots", [1, 2, 4, 8, 16])
def test_slots_share_the_global_histogram(slots: int) -> None:
    """The same recipe on 1 or 16 data slots (ranks x accumulation steps) trains the same level
    histogram: the slots' levels together are the global batch's, whatever the split."""
    micro = 256 // slots
    parts = [slot_levels(micro, 1 / 8, 128, (s, slots)) for s in range(slots)]
    merged = torch.sort(torch.cat(parts)).values
    torch.testing.assert_close(merged, torch.sort(official_levels(32, 128)).values)
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def test_sm_loss_slot_uses_its_share_of_levels() -> None:
    obj = ObjectiveCfg(mode="sm", bootstrap_fraction=1 / 8, t_grid=True)
    gen = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(32, *SHAPE, generator=gen), torch.randn(32, *SHAPE, generator=gen)
    y = torch.randint(NUM_CLASSES, (32,), generator=gen)
    online = Online()
    sm_loss(online, torch_net, x0.double(), x1.double(), y, obj, GuidanceCfg(),
            lambda p, q: (p - q).pow(2).flatten(1).mean(1), NUM_CLASSES,
            torch.Generator().manual_seed(1), slot=(3, 8))
    want = slot_levels(32, 1 / 8, 128, (3, 8))
    assert len(want) == 4
    torch.testing.assert_close(online.inputs["d"][:4], want)
    assert torch.all(online.inputs["d"][4:] == 1 / 128)
