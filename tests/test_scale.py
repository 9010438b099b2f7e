"""iSM at scale, simulated on the CPU: the ImageNet recipes under 2 gloo ranks against 1 process
with 2 accumulation steps (sOT pool sizes, wavelet band weights, EMA decays and losses; the sm
and MeanFlow baselines too), and the live coupling statistics the trainer logs."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

import ismctl.data.coupling as coupling
import ismctl.objectives.shortcut as shortcut
import ismctl.training.ema as ema
import ismctl.training.trainer as trainer
from ismctl.config.recipe import Recipe, load_recipe
from ismctl.data.coupling import STATS
from ismctl.data.loader import TrainLoader
from ismctl.losses import dwt2, idwt2
from ismctl.objectives.shortcut import official_levels
from ismctl.utils.errors import UserError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
STEPS = 3


def _losses(run: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln]


def _imagenet_recipe(data: Path, root: Path, name: str, grad_accum: int,
                     recipe: str = "ism_xl") -> Recipe:
    """A shipped ImageNet recipe as it is (objective, guidance, loss, coupling mode, EMA), on
    XL/2's 4x32x32 latents with 1,000 classes; only the backbone (tiny, patch 8), the batch
    (8: micro-batches of 4 on 2 slots), the sOT pool where there is one (16 samples: 4
    micro-batches) and the run length are small."""
    pool = {"coupling.pool_size": 16} if load_recipe(RECIPES / f"{recipe}.yaml") \
        .coupling.pool_size else {}
    sets = {"model.preset": "tiny/8", "data.path": data, "data.batch_size": 8,
            "data.num_workers": 0, "data.shuffle_buffer": 64, **pool,
            "loss.band_stats_samples": 64, "train.steps": STEPS, "train.grad_accum": grad_accum,
            "train.device": "cpu", "train.precision": "fp32", "run.root": root,
            "run.name": name, "run.log_every": 1, "run.ckpt_every": 1000,
            "run.sample_every": 1000, "run.sample_num": 4, "run.tracker": "none",
            "eval.steps": "[1]"}
    return load_recipe(RECIPES / f"{recipe}.yaml", [f"{k}={v}" for k, v in sets.items()])


def _band_weights(loss_fn: Any) -> list[float]:
    """The loss of a residual that lives in one wavelet band, over its mean square: each band's
    weight relative to MSE (detail levels finest first, then the approximation)."""
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    approx, details = dwt2(x, "haar", 5)
    weights = []
    for band in range(len(details) + 1):
        parts = [d if i == band else torch.zeros_like(d) for i, d in enumerate(details)]
        only = idwt2(approx if band == len(details) else torch.zeros_like(approx), parts)
        only = only.float()
        value = loss_fn(only, torch.zeros_like(only)) / only.square().mean(dim=(1, 2, 3))
        weights.append(float(value.mean()))
    return weights


def _record(out: Path) -> None:
    """Patch the coupler, the EMA and the loss factory of this process to append what they
    see to ``out`` (one JSON line each)."""

    def write(kind: str, value: Any) -> None:
        with open(out, "a") as fh:
            fh.write(json.dumps({"kind": kind, "value": value}) + "\n")

    real_pair, real_decay, real_build = coupling.pair_pool, ema.ema_decay, trainer.build_loss
    real_levels = shortcut.slot_levels

    def pair_pool(x0: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        write("pool", [x0.shape[0], kwargs.get("mode")])
        return real_pair(x0, *args, **kwargs)

    def ema_decay(decay: float, num_updates: int, warmup: bool) -> float:
        value = real_decay(decay, num_updates, warmup)
        write("decay", [decay, num_updates, value])
        return value

    def build_loss(*args: Any, **kwargs: Any) -> Any:
        fn = real_build(*args, **kwargs)
        # The loss trained with gets the data set's band statistics; a call without them only
        # checks the recipe before the run folder is written.
        if len(args) > 2 or kwargs.get("band_stats") is not None:
            write("bands", _band_weights(fn))
        return fn

    def slot_levels(micro: int, fraction: float, base_steps: int, slot: Any) -> torch.Tensor:
        levels = real_levels(micro, fraction, base_steps, slot)
        write("levels", levels.tolist())
        return levels

    coupling.pair_pool, ema.ema_decay, trainer.build_loss = pair_pool, ema_decay, build_loss
    shortcut.slot_levels = slot_levels


def _read(path: Path) -> dict[str, list]:
    out: dict[str, list] = {"pool": [], "decay": [], "bands": [], "levels": []}
    for line in path.read_text().splitlines():
        item = json.loads(line)
        out[item["kind"]].append(item["value"])
    return out


def _rank(rank: int, port: int, data: str, root: str, recipe: str = "ism_xl") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    _record(Path(root) / f"record-rank{rank}.jsonl")
    trainer.train(_imagenet_recipe(Path(data), Path(root), "ranks", 1, recipe), progress=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ismctl.data.bench import make_synthetic_latents

    out = tmp_path_factory.mktemp("latents")
    make_synthetic_latents(out, count=320, channels=4, size=32, num_classes=1000,
                           shard_size=100, structure=0.5)
    return out


@pytest.mark.slow
def test_imagenet_recipe_on_two_ranks_equals_one_rank_with_accumulation(
        imagenet_like: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    single_log = tmp_path / "record-single.jsonl"
    with monkeypatch.context() as patch:
        for module, name in ((coupling, "pair_pool"), (ema, "ema_decay"),
                             (trainer, "build_loss"), (shortcut, "slot_levels")):
            patch.setattr(module, name, getattr(module, name))  # restored on exit
        _record(single_log)
        single = trainer.train(_imagenet_recipe(imagenet_like, tmp_path, "single", 2),
                               progress=False)
    mp.spawn(_rank, args=(_free_port(), str(imagenet_like), str(tmp_path)), nprocs=2)

    one = _read(single_log)
    ranks = [_read(tmp_path / f"record-rank{r}.jsonl") for r in range(2)]
    recipe = load_recipe(RECIPES / "ism_xl.yaml")
    # sOT: every assignment covers the recipe's 16 samples, in the recipe's mode; each slot
    # pairs one pool of 4 micro-batches in the first step, and no other before step 4.
    assert one["pool"] == [[16, recipe.coupling.mode]] * 2
    assert [r["pool"] for r in ranks] == [[[16, recipe.coupling.mode]]] * 2
    # The wavelet loss's band weights are the data set's, on every rank.
    assert len(one["bands"]) == 1 and len(one["bands"][0]) == 6
    for r in ranks:
        assert r["bands"] == one["bands"]
    # The EMA decays: per update, the recipe's (no warm-up in the paper's recipe), alike.
    expected = [[d, n, ema.ema_decay(d, n, recipe.ema.warmup)] for n in range(STEPS)
                for d in (recipe.ema.target_decay, recipe.ema.inference_decay)]
    assert one["decay"] == expected
    for r in ranks:
        assert r["decay"] == one["decay"]
    # Same data, same draws, same coupling: the same losses up to float summation order.
    a, b = _losses(single), _losses(tmp_path / "ranks")
    assert [line["step"] for line in a] == [line["step"] for line in b] == [1, 2, 3]
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "sot_cost_reduction", "sot_leakage"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), key
    _assert_same_weights(tmp_path / "single", tmp_path / "ranks")


def _assert_same_weights(one: Path, other: Path) -> None:
    """The final online weights of two runs agree up to float summation order: the ranks
    all-reduced every step's gradients. (Ranks that each train on their own half end about
    6e-4 apart here, which the losses of three steps barely show.)"""
    from safetensors.torch import load_file

    from ismctl.runs.checkpoint import WEIGHT_FILES, list_checkpoints

    (*_, (step_a, ckpt_a)), (*_, (step_b, ckpt_b)) = list_checkpoints(one), list_checkpoints(other)
    assert step_a == step_b == STEPS
    a, b = (load_file(str(c / WEIGHT_FILES["online"])) for c in (ckpt_a, ckpt_b))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-5, f"online weights differ by up to {worst:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["sm_xl", "meanflow_xl"])
def test_baselines_on_two_ranks_equal_one_rank_with_accumulation(
        recipe: str, imagenet_like: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sm draws its slot's share of the global batch's level histogram (method §2), MeanFlow
    weighs each sample's summed error (method §4.1): on 2 ranks, the recipe's EMA decays and
    the losses of 1 rank with 2 accumulation steps."""
    single_log = tmp_path / "record-single.jsonl"
    with monkeypatch.context() as patch:
        for module, name in ((coupling, "pair_pool"), (ema, "ema_decay"),
                             (trainer, "build_loss"), (shortcut, "slot_levels")):
            patch.setattr(module, name, getattr(module, name))  # restored on exit
        _record(single_log)
        single = trainer.train(_imagenet_recipe(imagenet_like, tmp_path, "single", 2, recipe),
                               progress=False)
    mp.spawn(_rank, args=(_free_port(), str(imagenet_like), str(tmp_path), recipe), nprocs=2)

    one = _read(single_log)
    ranks = [_read(tmp_path / f"record-rank{r}.jsonl") for r in range(2)]
    loaded = load_recipe(RECIPES / f"{recipe}.yaml")
    assert one["pool"] == [] and all(r["pool"] == [] for r in ranks)   # independent pairing
    if loaded.objective.mode == "sm":
        # Per step the two slots (accumulation steps or ranks) train the global batch's
        # histogram: floor(8 x 1/8) = 1 bootstrap row, at d = 1.
        glob = sorted(official_levels(1, loaded.objective.base_steps).tolist())
        assert [sorted(a + b) for a, b in zip(one["levels"][::2], one["levels"][1::2],
                                              strict=True)] == [glob] * STEPS
        assert [sorted(a + b) for a, b in zip(*(r["levels"] for r in ranks),
                                              strict=True)] == [glob] * STEPS
    # MeanFlow's targets come from the online weights: no target EMA to update.
    decays = [loaded.ema.target_decay] * loaded.ema.target_enabled + [loaded.ema.inference_decay]
    expected = [[d, n, ema.ema_decay(d, n, loaded.ema.warmup)] for n in range(STEPS)
                for d in decays]
    assert one["decay"] == expected
    for r in ranks:
        assert r["decay"] == one["decay"]
    a, b = _losses(single), _losses(tmp_path / "ranks")
    assert [line["step"] for line in a] == [line["step"] for line in b] == [1, 2, 3]
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4, abs=1e-6)
    _assert_same_weights(tmp_path / "single", tmp_path / "ranks")


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ismctl.data.prepare import prepare_latents

    out = tmp_path_factory.mktemp("data") / "digits"
    prepare_latents("digits", out=out, progress=False)
    return out


def _digits_recipe(digits: Path, root: Path, name: str, **extra: Any) -> Recipe:
    sets = {"data.path": digits, "run.root": root, "run.name": name, "train.steps": 8,
            "data.batch_size": 64, "coupling.pool_size": 256, "run.log_every": 3,
            "run.sample_every": 10_000, "run.sample_num": 10, "run.ckpt_every": 1000,
            "run.tracker": "none", **extra}
    return load_recipe(RECIPES / "quickstart.yaml", [f"{k}={v}" for k, v in sets.items()])


@pytest.mark.slow
def test_trainer_logs_the_live_coupling(digits: Path, tmp_path: Path) -> None:
    """metrics.jsonl carries sot_cost_reduction and sot_leakage: the mean, over the batches
    since the previous line, of the statistics of each batch's pool as the loader computed
    them. On the digits, label-blind pairing leaks the class and per-class pairing does not."""
    lines = {}
    for mode in ("blind", "within_class"):
        run = trainer.train(_digits_recipe(digits, tmp_path, mode, **{"coupling.mode": mode}),
                            progress=False)
        lines[mode] = _losses(run)
        loader = TrainLoader(digits, batch_size=64, pool_size=256, seed=0, shuffle_buffer=2000,
                             flip=False, mode=mode)
        batches = iter(loader)
        stats = [next(batches)[3] for _ in range(8)]
        assert [line["step"] for line in lines[mode]] == [3, 6, 8]
        for line, window in zip(lines[mode], (stats[:3], stats[3:6], stats[6:]), strict=True):
            window = torch.stack(window).mean(0)
            for k, v in zip(STATS, window.tolist(), strict=True):
                assert line[f"sot_{k}"] == pytest.approx(v, rel=1e-6, abs=1e-7), (mode, k)
    blind = [ln["sot_leakage"] for ln in lines["blind"]]
    within = [ln["sot_leakage"] for ln in lines["within_class"]]
    assert min(blind) > max(within) + 0.015
    assert all(ln["sot_cost_reduction"] > 0 for ln in lines["blind"] + lines["within_class"])
    independent = trainer.train(_digits_recipe(digits, tmp_path, "independent", **{
        "coupling.pool_size": 0, "train.steps": 1}), progress=False)
    assert not any(k.startswith("sot_") for k in _losses(independent)[0])


def test_a_pool_that_does_not_tile_the_micro_batch_stops_before_the_run(
        digits: Path, tmp_path: Path) -> None:
    r = _digits_recipe(digits, tmp_path, "bad", **{"coupling.pool_size": 36,
                                                   "data.batch_size": 16,
                                                   "train.grad_accum": 2})
    with pytest.raises(UserError, match=r"coupling.pool_size=36 does not split into "
                                        r"micro-batches of 8 samples \(data.batch_size 16 / 2 "
                                        r"= ranks x train.grad_accum\): make it a multiple of 8 "
                                        r"\(e.g. 32 or 40\)"):
        trainer.train(r, progress=False)
    assert not (tmp_path / "bad").exists()
