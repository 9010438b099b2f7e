"""Every refusal of `train` is also a refusal of `train --dry-run`, with the same line: both
call one function (ismctl.training.preflight.check_start) before anything is written. Each case is
run both ways, and neither writes anything."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ismctl.runs.checkpoint import list_checkpoints

REPO = Path(__file__).resolve().parent.parent
QUICK = str(REPO / "recipes" / "quickstart.yaml")
ISM_XL = str(REPO / "recipes" / "ism_xl.yaml")

HOLDER = """
import sys, time
from pathlib import Path
from ismctl.training.runlock import acquire
lock = acquire(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Prepared digits, a trained 2-step run, a damaged copy of the data, and pretrained
    files of the wrong shapes."""
    import torch
    from safetensors.torch import save_file

    from ismctl.config.recipe import load_recipe
    from ismctl.data.prepare import prepare_latents
    from ismctl.networks.model import build_model
    from ismctl.networks.pretrained import RENAMED
    from ismctl.training.trainer import train

    root = tmp_path_factory.mktemp("parity")
    digits = root / "digits"
    prepare_latents("digits", out=digits, progress=False)
    damaged = root / "damaged"
    shutil.copytree(digits, damaged)
    shard = next(damaged.glob("shard-*.tar"))
    shard.write_bytes(shard.read_bytes()[:5000])
    missing = root / "missing-shard"
    shutil.copytree(digits, missing)
    next(missing.glob("shard-*.tar")).unlink()
    wrong = root / "wrong_shapes.safetensors"
    # A DiT-S/2 state dict under DiT's own names: a DiT, but not of the recipe's width.
    state = build_model("S/2", input_size=8, in_channels=1, num_classes=10).state_dict()
    save_file({RENAMED.get(k, k): v for k, v in state.items()}, str(wrong))
    runs = root / "runs"
    recipe = load_recipe(QUICK, [f"data.path={digits}", f"run.root={runs}", "run.name=done",
                                 "train.steps=2", "run.ckpt_every=1", "data.batch_size=16",
                                 "coupling.pool_size=16", "run.tracker=none",
                                 "run.sample_every=1000"])
    train(recipe, QUICK, progress=False)
    broken = runs / "broken"
    shutil.copytree(runs / "done", broken)
    for _, ckpt in list_checkpoints(broken):
        (ckpt / "online.safetensors").write_bytes(b"\0" * 100)
    torch.set_num_threads(1)
    return {"digits": digits, "damaged": damaged, "missing": missing, "wrong": wrong,
            "runs": runs, "root": root}


def base(w: dict[str, Path], name: str = "new") -> list[str]:
    return [f"--set=data.path={w['digits']}", f"--set=run.root={w['runs']}",
            f"--set=run.name={name}", "--set=train.steps=2", "--set=data.batch_size=16",
            "--set=coupling.pool_size=16", "--set=run.tracker=none",
            "--set=run.ckpt_every=1", "--set=run.sample_every=1000"]


# (case, recipe, arguments after the recipe, text the refusal contains)
CASES: list[tuple[str, str, Callable[[dict[str, Path]], list[str]], str]] = [
    ("pool does not tile the micro-batch", QUICK,
     lambda w: [*base(w), "--set=data.batch_size=64", "--set=coupling.pool_size=100"],
     "coupling.pool_size=100 does not split into micro-batches of 64"),
    ("ism_xl pool of 1000", ISM_XL,
     lambda w: [f"--set=data.path={w['digits']}", f"--set=run.root={w['runs']}",
                "--set=coupling.pool_size=1000", "--set=train.device=cpu"],
     "coupling.pool_size=1000 does not split into micro-batches of 256"),
    ("batch not divisible by the slots", QUICK,
     lambda w: [*base(w), "--set=train.grad_accum=3"], "not divisible by ranks x"),
    ("batch larger than the data", QUICK,
     lambda w: [*base(w), "--set=data.batch_size=4096", "--set=coupling.pool_size=0"],
     "1797 samples cannot fill one batch of 4096"),
    ("init_from of the wrong shapes", QUICK,
     lambda w: [*base(w), f"--set=model.init_from={w['wrong']}"], "has shape"),
    ("init_from missing", QUICK,
     lambda w: [*base(w), f"--set=model.init_from={w['root'] / 'nope.pt'}"],
     "file not found"),
    ("no data", QUICK, lambda w: [*base(w), f"--set=data.path={w['root'] / 'nodata'}"],
     "manifest.json: not found"),
    ("damaged shard", QUICK, lambda w: [*base(w), f"--set=data.path={w['damaged']}"],
     "damaged: its sha256 differs from the one in manifest.json"),
    ("missing shard", QUICK, lambda w: [*base(w), f"--set=data.path={w['missing']}"],
     "shard listed in manifest.json is missing"),
    ("patch does not tile the input", QUICK, lambda w: [*base(w), "--set=model.preset=tiny/3"],
     "not a multiple of the patch size 3"),
    ("detail weights of the wrong length", QUICK,
     lambda w: [*base(w), "--set=loss.detail_weights=[1,2]"], "loss.detail_weights"),
    ("folder holds a run", QUICK, lambda w: base(w, "done"), "already holds a run"),
    ("resume without a run", QUICK, lambda w: [*base(w, "none"), "--resume"],
     "no checkpoint to resume from"),
    ("resume with another recipe", QUICK,
     lambda w: [*base(w, "done"), "--resume", "--set=optim.lr=0.5"],
     "cannot resume with a different recipe (optim.lr"),
    ("resume with every checkpoint damaged", QUICK, lambda w: [*base(w, "broken"), "--resume"],
     "no intact checkpoint to resume from"),
    ("resume and overwrite", QUICK, lambda w: [*base(w, "done"), "--resume", "--overwrite"],
     "choose one"),
    ("folder held by another trainer", QUICK, lambda w: base(w, "busy"),
     "in use by another trainer"),
]


@pytest.fixture(scope="module")
def busy(world: dict[str, Path]) -> subprocess.Popen[str]:
    run = world["runs"] / "busy"
    run.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], text=True,
                            stdout=subprocess.PIPE, cwd=REPO)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def snapshot(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


@pytest.mark.parametrize(("case", "recipe", "args", "expect"), CASES, ids=[c[0] for c in CASES])
def test_train_and_dry_run_refuse_alike(
        case: str, recipe: str, args: Callable[[dict[str, Path]], list[str]], expect: str,
        world: dict[str, Path], busy: subprocess.Popen[str], ismctl_main: Callable[..., int],
        capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(world["root"])
    errors = []
    for extra in (["--dry-run"], []):
        assert ismctl_main("train", recipe, "--no-progress", *args(world), *extra) == 2, extra
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert expect in err, (extra, err)
        errors.append(err)
    assert errors[0] == errors[1]
    assert snapshot(world["root"]) == before, "a refused start wrote something"


CHECKS = [
    ("ismctl.training.preflight", "check_data"),
    ("ismctl.training.preflight", "batches_per_pool"),
    ("ismctl.training.preflight", "batches_per_rank"),
    ("ismctl.training.preflight", "run_directory"),
    ("ismctl.runs.checkpoint", "model_from_recipe"),
    ("ismctl.losses", "build_loss"),
    ("ismctl.training.runlock", "check_unlocked"),
    ("ismctl.training.resume", "check_run_start"),
    ("ismctl.runs.checkpoint", "newest_intact"),
    ("ismctl.networks.pretrained", "check_init_from"),
]


@pytest.mark.parametrize(("module", "name"), CHECKS, ids=[c[1] for c in CHECKS])
def test_train_and_dry_run_pass_through_every_check(
        module: str, name: str, world: dict[str, Path], ismctl_main: Callable[..., int],
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Each check the trainer makes before writing, made to refuse: `train` and
    `train --dry-run` both stop on it with its line and write nothing (a resume, so that the
    newest intact checkpoint is looked for too)."""
    import importlib

    from ismctl.utils.errors import UserError

    def refuse(*args: object, **kwargs: object) -> None:
        raise UserError(f"refused by {name}")

    monkeypatch.setattr(importlib.import_module(module), name, refuse)
    before = snapshot(world["root"])
    for extra in (["--dry-run"], []):
        assert ismctl_main("train", QUICK, "--no-progress", *base(world, "done"), "--resume",
                           *extra) == 2, extra
        err = capsys.readouterr().err
        assert f"refused by {name}" in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(world["root"]) == before
