"""The worked example of docs/extending.md: a consistency-training objective outside ismctl
(examples/consistency, package ``ismctl_ct``). Its loss against an independent computation; then,
pip-installed into a folder of its own, trained on the digits, sampled, evaluated, exported and
compared with sm by ``ismctl ablate --method``, with no file under ismctl/ naming it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ismctl.config.recipe import GuidanceCfg, load_recipe

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "consistency"
RECIPE = EXAMPLE / "ismctl_ct" / "ct_digits.yaml"
STANDALONE = REPO / "docs" / "standalone_sampler.py"
# Objectives registered here do not outlive the test (the registry is per process).
pytestmark = pytest.mark.usefixtures("plugin_registry")


@pytest.fixture
def ct(monkeypatch: pytest.MonkeyPatch):
    """The example's module, imported from its source folder (it registers ``ct``)."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    import ismctl_ct

    return ismctl_ct


class AffineNet(torch.nn.Module):
    """F(x, t, d, y, w) = a x + b t + c d + e y, each call's inputs recorded."""

    def __init__(self, a: float, b: float, c: float, e: float) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a))
        self.b, self.c, self.e = b, c, e
        self.calls: list[dict[str, torch.Tensor]] = []

    def forward(self, x, t, d, y, w):
        self.calls.append({"x": x.detach().clone(), "t": t.clone(), "d": d.clone(),
                           "y": y.clone(), "w": w.clone()})
        def col(v):
            return v.to(x.dtype).view(-1, 1, 1, 1)

        return self.a * x + self.b * col(t) + self.c * col(d) + self.e * col(y)


def test_levels_are_the_spaced_grid(ct) -> None:
    np.testing.assert_allclose(ct.level_times(4, 1.0).numpy(), [0, 0.25, 0.5, 0.75, 1])
    n = np.arange(9) / 8
    np.testing.assert_allclose(ct.level_times(8, 2.0).numpy(), 1 - (1 - n) ** 2, atol=1e-7)


def test_ct_loss_regresses_the_online_end_on_the_target_s_end_at_the_next_level(ct) -> None:
    """From the recorded network inputs alone: the online call is at a level t_n of the grid
    with d = 1 - t_n, the target call at t_{n+1} on the same path between the same noise and
    data, the labels are the data's or the null class, and the loss is the mean squared
    difference of the two consistency functions x + (1 - t) F (numpy below)."""
    scales, batch, null = 8, 4000, 10
    obj = load_recipe(RECIPE, [f"objective.scales={scales}", "objective.rho=2",
                               "objective.class_dropout=0.3"]).objective
    online, target = AffineNet(0.7, 0.3, -0.2, 0.05), AffineNet(-0.4, 0.1, 0.6, -0.02)
    gen = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(batch, 1, 2, 2, generator=gen), torch.randn(batch, 1, 2, 2, generator=gen)
    y = torch.randint(null, (batch,), generator=gen)

    def mse(a, b):
        return ((a - b) ** 2).flatten(1).mean(1)

    out = ct.ct_loss(online, target, x0, x1, y, obj, GuidanceCfg(), mse, null,
                     torch.Generator().manual_seed(1))
    (on,), (tg,) = online.calls, target.calls
    grid = 1 - (1 - np.arange(scales + 1) / scales) ** 2
    level = np.searchsorted(grid, on["t"].numpy().astype(np.float64) - 1e-6)
    np.testing.assert_allclose(on["t"].numpy(), grid[level], atol=1e-6)
    assert level.max() <= scales - 1
    np.testing.assert_allclose(tg["t"].numpy(), grid[level + 1], atol=1e-6)
    for call in (on, tg):
        np.testing.assert_allclose(call["d"].numpy(), 1 - call["t"].numpy(), atol=1e-7)
        assert (call["w"] == 0).all()
    assert torch.equal(on["y"], tg["y"])
    dropped = (on["y"] == null).numpy()
    assert (on["y"][~torch.from_numpy(dropped)] == y[~torch.from_numpy(dropped)]).all()
    # Bernoulli(0.3) over 4000 rows, uniform levels: within 5 standard deviations.
    assert abs(dropped.mean() - 0.3) < 5 * np.sqrt(0.3 * 0.7 / batch)
    counts = np.bincount(level, minlength=scales)
    assert np.all(np.abs(counts - batch / scales) < 5 * np.sqrt(batch / scales))
    # The points on the path and both consistency functions, in float64.
    a0, a1 = x0.double().numpy(), x1.double().numpy()
    t, t2 = grid[level].reshape(-1, 1, 1, 1), grid[level + 1].reshape(-1, 1, 1, 1)
    lab = on["y"].double().numpy().reshape(-1, 1, 1, 1)
    x_t, x_next = (1 - t) * a0 + t * a1, (1 - t2) * a0 + t2 * a1
    np.testing.assert_allclose(on["x"].numpy(), x_t, atol=1e-5)
    np.testing.assert_allclose(tg["x"].numpy(), x_next, atol=1e-5)
    f_on = x_t + (1 - t) * (0.7 * x_t + 0.3 * t - 0.2 * (1 - t) + 0.05 * lab)
    f_tg = x_next + (1 - t2) * (-0.4 * x_next + 0.1 * t2 + 0.6 * (1 - t2) - 0.02 * lab)
    want = ((f_on - f_tg) ** 2).reshape(batch, -1).mean(1).mean()
    assert out["loss"].item() == pytest.approx(want, rel=1e-5)
    assert out["consistency"].item() == pytest.approx(want, rel=1e-5)
    # At the last level the target is the data itself: f(x_1, 1) = x_1.
    last = level == scales - 1
    assert last.any()
    np.testing.assert_allclose(f_tg[last], a1[last], atol=1e-6)
    # The gradient reaches the online network only.
    out["loss"].backward()
    assert online.a.grad is not None and online.a.grad != 0 and target.a.grad is None


def test_ct_draws_depend_on_the_generator_alone(ct) -> None:
    """Same seed, same batch: the same loss; the world-size rule of docs/extending.md (no draw
    depends on the slot)."""
    obj = load_recipe(RECIPE).objective
    net = AffineNet(0.2, 0.1, 0.1, 0.0)
    x0, x1 = torch.randn(16, 1, 2, 2), torch.randn(16, 1, 2, 2)
    y = torch.zeros(16, dtype=torch.long)

    def mse(a, b):
        return ((a - b) ** 2).flatten(1).mean(1)

    runs = [ct.ct_loss(net, net, x0, x1, y, obj, GuidanceCfg(), mse, 10,
                       torch.Generator().manual_seed(5), slot)["loss"].item()
            for slot in ((0, 1), (1, 2), (0, 1))]
    assert runs[0] == runs[1] == runs[2]


def test_a_ct_step_reads_nothing_back_from_the_device(ct, host_reads) -> None:
    """docs/extending.md's rule of no data-dependent work: draws, the target pass, the online
    pass, the loss and its backward only queue work."""
    from ismctl.networks.model import build_model

    obj = load_recipe(RECIPE).objective
    net = build_model("tiny/2", 8, 1, 10, jump_embedding="continuous")
    gen = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(2, 16, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (16,), generator=gen)

    def mse(a, b):
        return ((a - b) ** 2).flatten(1).mean(1)

    with host_reads() as reads:
        out = ct.ct_loss(net, net, x0, x1, y, obj, GuidanceCfg(), mse, 10, gen)
        out["loss"].backward()
    assert reads.ops == []


def test_nothing_under_ismctl_names_the_example() -> None:
    named = [p for p in (REPO / "ismctl").rglob("*") if p.is_file() and p.suffix != ".pyc"
             and any(word in p.read_bytes() for word in (b"ismctl_ct", b"ismctl-ct"))]
    assert named == []


def _ismctl(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m ismctl` in ``cwd`` with the example installed in ``site`` (not in this venv)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(site)}
    res = subprocess.run([sys.executable, "-m", "ismctl", *args], capture_output=True,
                         text=True, env=env, cwd=cwd, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The example pip-installed into a folder of its own (the suite's venv stays as it was),
    and the digits prepared."""
    from ismctl.data.prepare import prepare_latents

    root = tmp_path_factory.mktemp("example")
    source = root / "source"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    site = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(site), str(source)],
                   check=True, capture_output=True, timeout=600)
    data = root / "digits"
    prepare_latents("digits", out=data, progress=False)
    return site, data


@pytest.mark.slow
def test_the_installed_example_trains_samples_evaluates_and_enters_a_comparison(
        installed: tuple[Path, Path], tmp_path: Path) -> None:
    site, data = installed
    recipe = site / "ismctl_ct" / "ct_digits.yaml"
    # Found through its entry point: no --plugin.
    keys = _ismctl(site, tmp_path, "recipe", "keys").stdout
    assert "objective.scales (int, default 16; objective.mode ct)" in keys
    tiny = [f"data.path={data}", "train.steps=6", "data.batch_size=16", "run.log_every=2",
            "run.ckpt_every=6", "run.sample_every=1000", "run.tracker=none",
            "optim.warmup_steps=0", "eval.batch_size=50"]
    sets = [a for s in tiny for a in ("--set", s)]
    _ismctl(site, tmp_path, "train", str(recipe), *sets, "--set", f"run.root={tmp_path}",
            "--set", "run.name=ct", "--no-progress")
    run = tmp_path / "ct"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "consistency" in line] == [2, 4, 6]
    assert all(np.isfinite(line["loss"]) for line in lines if "loss" in line)

    _ismctl(site, tmp_path, "sample", str(run), "--steps", "3", "--num-samples", "20",
            "--out", str(tmp_path / "s.npz"))
    images = np.load(tmp_path / "s.npz")["arr_0"]
    assert images.shape == (20, 8, 8, 1) and images.std() > 0

    _ismctl(site, tmp_path, "eval", str(run), "--steps", "1,2", "--num-samples", "50",
            "--metrics", "acc,fd-digits,cfd-digits", "--out", str(tmp_path / "r.json"))
    points = json.loads((tmp_path / "r.json").read_text())["points"]
    assert [(p["steps"], p["guidance"], p["sampler"]) for p in points] == [
        (1, 0.0, "conditional"), (2, 0.0, "conditional")]
    assert all(np.isfinite(p["metrics"]["fd-digits"]) for p in points)

    _ismctl(site, tmp_path, "export", str(run), "--out", str(tmp_path / "export"))
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["conventions"]["sampler"]["jumps"] == "to_end"
    assert config["sampling"]["objective_mode"] == "ct"
    assert "consistency model" in (tmp_path / "export" / "README.md").read_text()
    # docs/standalone_sampler.py follows the export's jump rule as ismctl's sampler does.
    check = (
        "import importlib.util, sys, torch\n"
        "from ismctl import load_model\n"
        "from ismctl.sampling.sampler import sample\n"
        f"spec = importlib.util.spec_from_file_location('s', {str(STANDALONE)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        f"net, config = m.load({str(tmp_path / 'export')!r})\n"
        f"model = load_model({str(tmp_path / 'export')!r}, device='cpu')\n"
        # After a few steps the conditioning (adaLN-Zero) barely acts: random weights, the
        # same in both copies, make the jump size matter.
        "state = model.network.state_dict()\n"
        "gen = torch.Generator().manual_seed(2)\n"
        "for k in state:\n"
        "    state[k] = 0.05 * torch.randn(state[k].shape, generator=gen)\n"
        "model.network.load_state_dict(state); net.load_state_dict(state)\n"
        "noise = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))\n"
        "labels = torch.arange(6)\n"
        "a = m.sample(net, config, noise, labels, 3, 0.0)\n"
        "b = sample(model.network, noise, labels, 3, 0.0, mode='conditional', jumps='to_end')\n"
        "c = sample(model.network, noise, labels, 3, 0.0, mode='conditional')\n"
        "torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)\n"
        "assert (a - c).abs().max() > 1e-2\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(site)}
    res = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]

    out = tmp_path / "compare"
    _ismctl(site, tmp_path, "ablate", "--method", f"ct:{recipe}:objective.scales=4,8",
            "--method", "sm:sm_quickstart", *sets, "--set", "eval.steps=[1,2]",
            "--set", "eval.metrics=[acc,fd-digits,cfd-digits]", "--eval-num-samples", "50",
            "--out", str(out), "--no-progress")
    report = json.loads((out / "ablation.json").read_text())
    assert report["mode"] == "compare" and report["methods"][1] == "sm:sm_quickstart"
    names = [v["name"] for v in report["variants"]]
    assert names == ["ct_objective.scales=4", "ct_objective.scales=8", "sm"]
    for variant in report["variants"]:
        assert set(variant["points"]) == {"1@0", "2@0"}
        assert sorted(variant["best"]) == ["1", "2"]
    assert yaml.safe_load((out / "ct_objective.scales=8.yaml").read_text())["objective"][
        "scales"] == 8
    assert "| sm |" in (out / "ablation.md").read_text()
