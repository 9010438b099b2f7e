"""Checkpoints record their files' sha256; whatever reads one checks it first: a truncated or
altered file is named in one line (exit 2), and --resume falls back to the newest intact
checkpoint, setting the damaged one aside. Checkpoints without digests still load."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from ismctl.runs.checkpoint import list_checkpoints
from ismctl.runs.integrity import SUMS_NAME, DamagedFile, check_files, check_structure

REPO = Path(__file__).resolve().parent.parent
QUICK = str(REPO / "recipes" / "quickstart.yaml")


def overrides(data: Path, root: Path, name: str, steps: int) -> list[str]:
    sets = {"data.path": data, "run.root": root, "run.name": name, "train.steps": steps,
            "data.batch_size": 16, "coupling.pool_size": 32, "run.log_every": 1,
            "run.sample_every": 10_000, "run.ckpt_every": 2, "run.keep_last": 100,
            "optim.warmup_steps": 0, "run.tracker": "none", "eval.num_samples": 20,
            "eval.batch_size": 20}
    return [f"--set={k}={v}" for k, v in sets.items()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4 (copied by each test)."""
    from ismctl.config.recipe import load_recipe
    from ismctl.data.prepare import prepare_latents
    from ismctl.training.trainer import train

    root = tmp_path_factory.mktemp("integrity")
    prepare_latents("digits", out=root / "digits", progress=False)
    recipe = load_recipe(QUICK, [o.removeprefix("--set=")
                                 for o in overrides(root / "digits", root, "run", 4)])
    return train(recipe, QUICK, progress=False)


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def data_of(run: Path) -> Path:
    from ismctl.config.recipe import load_recipe

    return Path(load_recipe(run / "recipe.yaml").data.path)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def zero_bytes(path: Path, at: int = 200, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    data[at:at + n] = bytes(n)
    path.write_bytes(bytes(data))


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_damaged_file_fails_its_digest(run: Path) -> None:
    ckpt = list_checkpoints(run)[-1][1]
    names = ["online.safetensors", "state.pt"]
    assert set(check_files(ckpt, names)) == set(names)
    zero_bytes(ckpt / "state.pt")  # same length: only the digest sees it
    with pytest.raises(DamagedFile, match="state.pt: damaged: its sha256 differs"):
        check_files(ckpt, names)


def test_resume_falls_back_to_the_newest_intact_checkpoint(
        ismctl_main: Callable[..., int], run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    truncate(run / "checkpoints" / "step-0000004" / "online.safetensors")
    data = data_of(run)
    args = ["train", QUICK, "--no-progress", "--resume",
            *overrides(data, run.parent, "run", 6)]
    assert ismctl_main(*args, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "resume from step 2" in out and "step-0000004 is damaged (online.safetensors" in out
    assert ismctl_main(*args) == 0
    out = capsys.readouterr().out
    assert "step-0000004 is damaged (online.safetensors: damaged: its sha256 differs" in out
    assert "resuming from step 2" in out and "damaged-step-0000004" in out
    assert [s for s, _ in list_checkpoints(run)] == [2, 4, 6]
    assert (run / "checkpoints" / "damaged-step-0000004").is_dir(), "kept, not deleted"
    check_files(list_checkpoints(run)[1][1], ["online.safetensors", "state.pt"])


def test_resume_with_no_intact_checkpoint_is_one_line(
        ismctl_main: Callable[..., int], run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for _, ckpt in list_checkpoints(run):
        zero_bytes(ckpt / "state.pt")
    data = data_of(run)
    args = ["train", QUICK, "--no-progress", "--resume", *overrides(data, run.parent, "run", 6)]
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*")
              if p.is_file()}
    for extra in ([], ["--dry-run"]):
        assert ismctl_main(*args, *extra) == 2
        err = one_line(capsys)
        assert "no intact checkpoint to resume from" in err and "state.pt" in err
    assert before == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*")
                      if p.is_file()}


@pytest.mark.parametrize("damage", [truncate, zero_bytes])
def test_sample_eval_and_export_name_the_damaged_file(
        ismctl_main: Callable[..., int], run: Path, tmp_path: Path, damage: Callable,
        capsys: pytest.CaptureFixture[str]) -> None:
    bad = run / "checkpoints" / "step-0000004" / "inference_ema.safetensors"
    damage(bad)
    previous = run / "checkpoints" / "step-0000002"
    for args in (["sample", str(run), "--out", str(tmp_path / "s.png")],
                 ["eval", str(run), "--out", str(tmp_path / "e.json")],
                 ["export", str(run), "--out", str(tmp_path / "export")]):
        assert ismctl_main(*args) == 2, args
        err = one_line(capsys)
        assert f"{bad}: damaged" in err and f"the previous checkpoint is {previous}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    # The previous checkpoint, named as the way out, samples.
    assert ismctl_main("sample", str(previous), "--num-samples", "4",
                       "--out", str(tmp_path / "s.png")) == 0


def test_checkpoints_without_digests_still_load_and_truncation_is_caught(
        ismctl_main: Callable[..., int], run: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    for _, ckpt in list_checkpoints(run):
        (ckpt / SUMS_NAME).unlink()
    assert ismctl_main("sample", str(run), "--num-samples", "4",
                       "--out", str(tmp_path / "s.png")) == 0
    ckpt = list_checkpoints(run)[-1][1]
    for name in ("inference_ema.safetensors", "state.pt"):
        check_structure(ckpt / name)
        truncate(ckpt / name)
        with pytest.raises(DamagedFile, match="damaged or truncated"):
            check_structure(ckpt / name)
    capsys.readouterr()
    assert ismctl_main("sample", str(run), "--out", str(tmp_path / "t.png")) == 2
    assert "inference_ema.safetensors: damaged or truncated" in one_line(capsys)


def test_an_export_checks_its_weights(ismctl_main: Callable[..., int], run: Path,
                                      tmp_path: Path) -> None:
    from ismctl.tools.api import load_model

    assert ismctl_main("export", str(run), "--out", str(tmp_path / "e")) == 0
    load_model(tmp_path / "e", device="cpu")
    zero_bytes(tmp_path / "e" / "model.safetensors", at=2000)
    with pytest.raises(DamagedFile, match="model.safetensors: damaged"):
        load_model(tmp_path / "e", device="cpu")
