"""One trainer per run folder, and a start that fails before its first step leaves the folder
as it found it: the lock (held, stale), the folder that already holds a run, and the rollback
of a new run, a resumed one and an --overwrite."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import ismctl.training.step as train_step
import ismctl.training.trainer as trainer
from ismctl.objectives import get_objective
from ismctl.runs.checkpoint import list_checkpoints
from ismctl.training.runlock import LOCK_NAME, acquire, check_unlocked

REPO = Path(__file__).resolve().parent.parent
QUICK = str(REPO / "recipes" / "quickstart.yaml")


def overrides(data: Path, root: Path, name: str, steps: int, **extra: object) -> list[str]:
    sets = {"data.path": data, "run.root": root, "run.name": name, "train.steps": steps,
            "data.batch_size": 16, "coupling.pool_size": 32, "run.log_every": 1,
            "run.sample_every": 10_000, "run.ckpt_every": 2, "run.keep_last": 100,
            "optim.warmup_steps": 0, "run.tracker": "tensorboard", **extra}
    return [f"--set={k}={v}" for k, v in sets.items()]


def tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ismctl.data.prepare import prepare_latents

    out = tmp_path_factory.mktemp("data") / "digits"
    prepare_latents("digits", out=out, progress=False)
    return out


HOLDER = """
import sys, time
from pathlib import Path
from ismctl.training.runlock import acquire
lock = acquire(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def held(tmp_path: Path) -> Callable[[Path], subprocess.Popen[str]]:
    """Start a process that holds a folder's lock until the test ends."""
    procs: list[subprocess.Popen[str]] = []

    def hold(run_dir: Path) -> subprocess.Popen[str]:
        run_dir.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], text=True,
                                stdout=subprocess.PIPE, cwd=REPO)
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_second_trainer_is_refused_naming_the_holder(
        ismctl_main: Callable[..., int], digits: Path, tmp_path: Path, held: Callable,
        capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "busy"
    holder = held(run)
    host = socket.gethostname()
    args = ["train", QUICK, "--no-progress", *overrides(digits, tmp_path, "busy", 2)]
    for extra in ([], ["--dry-run"], ["--resume"], ["--auto-resume"], ["--overwrite"]):
        assert ismctl_main(*args, *extra) == 2, extra
        err = one_line(capsys)
        assert f"{run}: in use by another trainer (pid {holder.pid} on host {host}" in err, err
    assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]
    # An ablation variant trains through the same trainer: refused alike.
    ablation = tmp_path / "ablation"
    variant = held(ablation / "full")
    assert ismctl_main("ablate", QUICK, "--sweep", "optim.lr=0.001,0.002", "--out",
                       str(ablation), "--no-progress",
                       *overrides(digits, ablation, "x", 2)[:2]) == 2
    assert f"pid {variant.pid} on host {host}" in one_line(capsys)


def test_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    with acquire(tmp_path) as lock:
        assert lock.stale is None
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        # A second open file description in this process is refused like another process.
        with pytest.raises(Exception, match="in use by another trainer"):
            acquire(tmp_path)
        with pytest.raises(Exception, match="in use by another trainer"):
            check_unlocked(tmp_path)
    assert not (tmp_path / LOCK_NAME).exists()
    check_unlocked(tmp_path)


def test_a_stale_lock_is_named_and_taken_over(
        ismctl_main: Callable[..., int], digits: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "stale"
    run.mkdir()
    (run / LOCK_NAME).write_text(json.dumps({
        "host": socket.gethostname(), "pid": dead.pid, "started": "2025-01-01T00:00:00+00:00",
        "command": "ismctl train old.yaml"}))
    check_unlocked(run)  # the dead holder's flock went with it
    assert ismctl_main("train", QUICK, "--no-progress",
                       *overrides(digits, tmp_path, "stale", 2)) == 0
    out = capsys.readouterr().out
    assert (f"took over the stale lock of pid {dead.pid} on host {socket.gethostname()}, "
            "started 2025-01-01T00:00:00+00:00, `ismctl train old.yaml` (no longer running)"
            in out)
    assert [s for s, _ in list_checkpoints(run)] == [2]
    assert not (run / LOCK_NAME).exists()


def failing_at_first_step(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(train_step, "get_objective",
                        lambda mode: dataclasses.replace(get_objective(mode), fn=boom))


def test_a_new_run_that_fails_before_its_first_step_leaves_nothing(
        digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ismctl.config.recipe import load_recipe

    failing_at_first_step(monkeypatch)
    root = tmp_path / "runs" / "nested"
    recipe = load_recipe(QUICK, [o.removeprefix("--set=") for o in
                                 overrides(digits, root, "new", 4)])
    with pytest.raises(RuntimeError, match="simulated"):
        trainer.train(recipe, QUICK, progress=False)
    assert list(tmp_path.iterdir()) == [], "the folders the start created are gone"


def test_a_folder_holding_a_run_needs_resume_or_overwrite(
        ismctl_main: Callable[..., int], digits: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A run stopped before its first checkpoint (here: killed, leaving its recipe and its
    metrics) is not silently started over beside its old files."""
    args = ["train", QUICK, "--no-progress", *overrides(digits, tmp_path, "early", 4)]
    assert ismctl_main(*args) == 0
    run = tmp_path / "early"
    shutil.rmtree(run / "checkpoints")
    assert ismctl_main(*args) == 2
    err = one_line(capsys)
    assert "already holds a run stopped before its first checkpoint" in err
    assert "--resume" in err and "--overwrite" in err
    assert ismctl_main(*args, "--dry-run") == 2
    assert "already holds a run stopped before its first checkpoint" in one_line(capsys)
    # --resume restarts it in its folder, from step 0, after checking the recipe.
    assert ismctl_main(*args, "--resume", "--dry-run") == 0
    assert "restart at step 0" in capsys.readouterr().out
    assert ismctl_main(*args, "--resume") == 0
    assert "restarts at step 0" in capsys.readouterr().out
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and [s for s, _ in list_checkpoints(run)] == [2, 4]
    # TensorBoard shows the restarted run's steps once, the first attempt's hidden.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]


def test_a_resume_that_fails_before_its_first_step_restores_the_folder(
        ismctl_main: Callable[..., int], digits: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["train", QUICK, "--no-progress", *overrides(digits, tmp_path, "r", 2)]
    assert ismctl_main(*args) == 0
    run = tmp_path / "r"
    time.sleep(0.01)
    before = tree(run)
    failing_at_first_step(monkeypatch)
    more = ["train", QUICK, "--no-progress", "--resume",
            *overrides(digits, tmp_path, "r", 6)]
    with pytest.raises(RuntimeError, match="simulated"):
        ismctl_main(*more)
    # The recipe (train.steps changed), the metrics and the TensorBoard folder are as they
    # were: no new event file, no rewritten recipe.
    assert tree(run) == before


def test_an_overwrite_that_fails_before_its_first_step_keeps_the_old_run(
        ismctl_main: Callable[..., int], digits: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["train", QUICK, "--no-progress", *overrides(digits, tmp_path, "o", 2)]
    assert ismctl_main(*args) == 0
    run = tmp_path / "o"
    before = tree(run)
    failing_at_first_step(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated"):
        ismctl_main(*args, "--overwrite", "--set=optim.lr=0.002")
    assert tree(run) == before and sorted(p.name for p in run.iterdir() if
                                          p.name.startswith(".")) == []
    # A successful overwrite replaces the old run, and leaves nothing of it aside.
    monkeypatch.setattr(train_step, "get_objective", get_objective)
    assert ismctl_main(*args, "--overwrite", "--set=optim.lr=0.002") == 0
    assert "lr: 0.002" in (run / "recipe.yaml").read_text()
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def test_ctrl_c_before_the_first_step_leaves_nothing_and_says_so(
        ismctl_main: Callable[..., int], digits: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "band_stats_for_run", interrupted)
    root = tmp_path / "runs"
    assert ismctl_main("train", QUICK, "--no-progress", *overrides(digits, root, "c", 2)) == 130
    err = one_line(capsys)
    assert err.startswith("interrupted: stopped by Ctrl-C before the first training step")
    assert not root.exists()
