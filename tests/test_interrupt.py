"""Ctrl-C: the first one finishes the step in flight, checkpoints it and exits with one line
(exit 130); a second one aborts at once and says what is lost. In a real process, with the
signal sent to its whole process group as a terminal does (loader workers included)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ismctl.runs.checkpoint import list_checkpoints
from ismctl.system.preemption import INTERRUPTED_EXIT_CODE

REPO = Path(__file__).resolve().parent.parent
QUICK = str(REPO / "recipes" / "quickstart.yaml")


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ismctl.data.prepare import prepare_latents

    out = tmp_path_factory.mktemp("data") / "digits"
    prepare_latents("digits", out=out, progress=False)
    return out


def start(digits: Path, root: Path, workers: int,
          batch: int = 16) -> tuple[subprocess.Popen[str], Path]:
    sets = {"data.path": digits, "run.root": root, "run.name": "r", "train.steps": 100_000,
            "data.batch_size": batch, "coupling.pool_size": 0, "run.log_every": 1,
            "run.ckpt_every": 3, "run.sample_every": 100_000, "run.tracker": "none",
            "data.num_workers": workers, "optim.warmup_steps": 0}
    args = [sys.executable, "-m", "ismctl", "train", QUICK, "--no-progress",
            *(f"--set={k}={v}" for k, v in sets.items())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # Its own process group, so that killpg reaches it and its workers like a terminal would.
    proc = subprocess.Popen(args, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    return proc, root / "r"


def wait_for_step(run: Path, proc: subprocess.Popen[str], step: int) -> None:
    deadline = time.time() + 300
    metrics = run / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"no step {step} (exit {proc.poll()}): {proc.stderr.read()}")


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_ctrl_c_checkpoints_the_step_reached(digits: Path, tmp_path: Path,
                                             workers: int) -> None:
    proc, run = start(digits, tmp_path, workers)
    wait_for_step(run, proc, 4)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == INTERRUPTED_EXIT_CODE, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    reached = steps[-1]
    assert lines[0].startswith(f"interrupted: stopped at step {reached} by SIGINT, "
                               f"checkpoint {run / 'checkpoints' / f'step-{reached:07d}'} "
                               "written; continue with --resume"), err
    assert list_checkpoints(run)[-1][0] == reached
    assert not (run / ".lock").exists()


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_and_says_what_is_lost(digits: Path, tmp_path: Path) -> None:
    # Steps long enough (a batch of 512) for the second Ctrl-C to arrive during the step
    # that the first one lets finish.
    proc, run = start(digits, tmp_path, 0, batch=512)
    wait_for_step(run, proc, 4)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == INTERRUPTED_EXIT_CODE, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("interrupted: aborted by a second Ctrl-C at step "), err
    assert "since the last checkpoint (step 3) are lost" in lines[0] or "nothing lost" in lines[0]
    assert not (run / ".lock").exists()
