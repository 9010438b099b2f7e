"""End-to-end training on the built-in digits: run directory, sampling, resume, preemption,
logs, TensorBoard, DDP, errors."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import ismctl.training.step as train_step
import ismctl.training.trainer as trainer
from ismctl.cli import app
from ismctl.objectives import ObjectiveSpec, get_objective
from ismctl.runs.checkpoint import list_checkpoints
from ismctl.sampling.pngdir import read_png_folder
from ismctl.system.preemption import PREEMPTED_EXIT_CODE

REPO = Path(__file__).resolve().parent.parent
QUICK = str(REPO / "recipes" / "quickstart.yaml")


def tiny_overrides(data: Path, root: Path, name: str, steps: int, **extra: object) -> list[str]:
    sets = {"data.path": data, "run.root": root, "run.name": name, "train.steps": steps,
            "data.batch_size": 16, "coupling.pool_size": 32, "run.log_every": 1,
            "run.sample_every": 10_000, "run.sample_num": 20, "run.ckpt_every": 5,
            "run.keep_last": 100, "optim.warmup_steps": 0, **extra}
    return [f"--set={k}={v}" for k, v in sets.items()]


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}
    return subprocess.run([sys.executable, "-m", "ismctl", *args], capture_output=True,
                           text=True, env=env, cwd=REPO, timeout=600)


def one_line_error(res: subprocess.CompletedProcess[str], code: int = 2) -> str:
    """The CLI contract for bad input: exit code, one line on stderr, no traceback."""
    assert res.returncode == code, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    return res.stderr


def losses(run: Path) -> dict[int, float]:
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return {ln["step"]: ln["loss"] for ln in lines}


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ismctl.data.prepare import prepare_latents

    out = tmp_path_factory.mktemp("data") / "digits"
    prepare_latents("digits", out=out, progress=False)
    return out


@pytest.fixture(scope="module")
def short_run(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    result = CliRunner().invoke(app, ["train", QUICK, "--no-progress",
                                      *tiny_overrides(digits, root, "short", 10,
                                                      **{"run.sample_every": 10})])
    assert result.exit_code == 0, result.output
    return root / "short"


def test_run_directory_contents(short_run: Path) -> None:
    assert (short_run / "recipe.yaml").is_file() and (short_run / "manifest.json").is_file()
    steps = [s for s, _ in list_checkpoints(short_run)]
    assert steps == [5, 10]
    ckpt = list_checkpoints(short_run)[-1][1]
    names = {p.name for p in ckpt.iterdir()}
    assert names == {"online.safetensors", "target_ema.safetensors",
                     "inference_ema.safetensors", "state.pt", "SHA256SUMS"}
    # The digests are sha256sum's format, one line per file.
    sums = dict(reversed(ln.split()) for ln in (ckpt / "SHA256SUMS").read_text().splitlines())
    assert sums == {n: hashlib.sha256((ckpt / n).read_bytes()).hexdigest()
                    for n in names - {"SHA256SUMS"}}
    # Weights are readable like every other file of the run (the process umask, not 0600).
    assert all((p.stat().st_mode & 0o777) == (short_run / "recipe.yaml").stat().st_mode & 0o777
               for p in ckpt.iterdir())
    assert not (short_run / ".lock").exists(), "the run folder's lock is released at the end"
    online = load_file(str(ckpt / "online.safetensors"))
    inference = load_file(str(ckpt / "inference_ema.safetensors"))
    # The inference EMA (with decay warm-up) has moved off the initial weights but is not
    # the online network.
    assert any(not torch.equal(online[k], inference[k]) for k in online)
    line = json.loads((short_run / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("loss", "velocity", "guidance", "consistency", "grad_norm", "lr", "it_s", "img_s"):
        assert np.isfinite(line[key]), key
    assert sorted(p.name for p in (short_run / "samples").iterdir()) == [
        "step-0000010-1s.png", "step-0000010-4s.png"]


def test_sample_png_and_npz(short_run: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    png = tmp_path / "grid.png"
    res = runner.invoke(app, ["sample", str(short_run), "--steps", "4", "--num", "20",
                              "--out", str(png), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    npz = tmp_path / "samples.npz"
    res = runner.invoke(app, ["sample", str(short_run), "--steps", "2", "--num", "12",
                              "--class", "3", "--out", str(npz), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    data = np.load(npz)
    assert data["arr_0"].shape == (12, 8, 8, 1) and data["arr_0"].dtype == np.uint8
    assert data["arr_1"].dtype == np.int64 and (data["arr_1"] == 3).all()
    res = runner.invoke(app, ["sample", str(short_run), "--steps", "3", "--out", str(png)])
    assert res.exit_code != 0


def test_existing_run_is_not_clobbered(short_run: Path, digits: Path) -> None:
    before = sorted(p.stat().st_mtime_ns for p in short_run.rglob("*.safetensors"))
    res = cli("train", QUICK, *tiny_overrides(digits, short_run.parent, "short", 10))
    assert res.returncode == 2
    assert "--resume" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert sorted(p.stat().st_mtime_ns for p in short_run.rglob("*.safetensors")) == before


@pytest.mark.parametrize(("args", "expect"), [
    (["--set", "optim.lrr=1"], "optim.lrr: unknown key"),
    (["--set", "optim.lr=-1"], "optim.lr: Input should be greater than 0"),
    (["--set", "train.steps=many"], "train.steps:"),
    (["--set", "data.path=/nonexistent/data"], "/nonexistent/data"),
])
def test_bad_input_is_one_line_exit_2(args: list[str], expect: str) -> None:
    res = cli("train", QUICK, *args)
    assert res.returncode == 2, res.stderr
    assert expect in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.stderr


def test_missing_recipe_file() -> None:
    res = cli("train", "recipes/does_not_exist.yaml")
    assert res.returncode == 2 and "recipe file not found" in res.stderr


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def objective_with(fn: Callable[..., dict[str, torch.Tensor]]) -> Callable[[str], ObjectiveSpec]:
    """A stand-in for the trainer's objective lookup whose entries train with ``fn``."""
    return lambda mode: dataclasses.replace(get_objective(mode), fn=fn)


def test_non_finite_loss_after_a_checkpoint_keeps_it(
        ismctl_main: Callable[..., int], digits: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The loss turns NaN at step 8, after the step-5 checkpoint: the run stops at its next
    check (step 10) with one line and exit 2, writes no checkpoint from the broken weights and
    leaves the step-5 checkpoint byte for byte as it was."""
    run = tmp_path / "nan"
    real_loss = get_objective("ism").fn
    calls: list[int] = []
    before: dict[str, str] = {}

    def poisoned(*args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        parts = real_loss(*args, **kwargs)
        calls.append(1)
        if len(calls) == 8:
            before.update(tree_digest(run / "checkpoints"))
        if len(calls) >= 8:
            parts = {k: v * float("nan") for k, v in parts.items()}
        return parts

    monkeypatch.setattr(train_step, "get_objective", objective_with(poisoned))
    assert ismctl_main("train", QUICK, "--no-progress",
                       *tiny_overrides(digits, tmp_path, "nan", 40, **{"run.log_every": 10})) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "step 10: non-finite loss" in err and "step-0000005" in err
    assert [s for s, _ in list_checkpoints(run)] == [5]
    assert before and tree_digest(run / "checkpoints") == before
    weights = load_file(str(run / "checkpoints" / "step-0000005" / "online.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


# Dropout on, so an exact resume also needs the generator state back.
EXACT = {"model.dropout": 0.1}
STEPS = 30


@pytest.fixture(scope="module")
def reference(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run that the interrupted ones must reproduce step for step."""
    from ismctl.config.recipe import load_recipe

    root = tmp_path_factory.mktemp("reference")
    overrides = [o.removeprefix("--set=") for o in tiny_overrides(digits, root, "ref", STEPS,
                                                                  **EXACT)]
    return trainer.train(load_recipe(QUICK, overrides), QUICK, progress=False)


def assert_same_losses(run: Path, reference: Path) -> None:
    expected, got = losses(reference), losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-7), step


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted(digits: Path, reference: Path,
                                                 tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    overrides = tiny_overrides(digits, tmp_path, "killed", STEPS, **EXACT)
    args = [sys.executable, "-m", "ismctl", "train", QUICK, "--no-progress", *overrides]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    run = tmp_path / "killed"
    deadline = time.time() + 300
    while not list_checkpoints(run) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    killed_at = list_checkpoints(run)[-1][0]
    assert killed_at < STEPS, "the run finished before it could be killed"
    res = cli("train", QUICK, "--no-progress", "--resume", *overrides)
    assert res.returncode == 0, res.stderr
    assert_same_losses(run, reference)


def test_sigterm_checkpoints_the_step_reached_and_resume_is_exact(
        ismctl_main: Callable[..., int], digits: Path, reference: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """SIGTERM arrives while step 7 is computed: the step finishes, step 7 is checkpointed,
    the exit code says "preempted", and --resume continues as if nothing had happened."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    real_loss = get_objective("ism").fn
    calls: list[int] = []

    def signalled(*args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        calls.append(1)
        if len(calls) == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_step, "get_objective", objective_with(signalled))
    overrides = tiny_overrides(digits, tmp_path, "stopped", STEPS, **EXACT,
                               **{"run.ckpt_every": 1000})
    assert ismctl_main("train", QUICK, "--no-progress",
                       *overrides) == PREEMPTED_EXIT_CODE
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "stopped at step 7 by SIGTERM" in err
    run = tmp_path / "stopped"
    assert sorted(losses(run)) == list(range(1, 8))
    assert [s for s, _ in list_checkpoints(run)] == [7]
    monkeypatch.setattr(train_step, "get_objective", get_objective)
    assert ismctl_main("train", QUICK, "--no-progress", "--resume", *overrides) == 0
    assert_same_losses(run, reference)
    # TensorBoard hides the events of the first attempt that the resumed one repeats.
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, STEPS + 1))


def test_resume_refuses_a_changed_recipe(short_run: Path, digits: Path) -> None:
    recipe_text = (short_run / "recipe.yaml").read_text()
    before = tree_digest(short_run / "checkpoints")
    changed = tiny_overrides(digits, short_run.parent, "short", 12,
                             **{"run.sample_every": 10, "optim.lr": 5e-4, "run.log_every": 3})
    err = one_line_error(cli("train", QUICK, "--no-progress", "--resume", *changed))
    assert "(optim.lr 0.001 -> 0.0005)" in err
    assert (short_run / "recipe.yaml").read_text() == recipe_text
    assert tree_digest(short_run / "checkpoints") == before


def test_resume_needs_a_checkpoint_auto_resume_does_not(
        ismctl_main: Callable[..., int], digits: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def train(flag: str, steps: int) -> int:
        return ismctl_main("train", QUICK, "--no-progress", flag,
                           *tiny_overrides(digits, tmp_path, "requeued", steps,
                                           **{"run.tracker": "none"}))

    assert train("--resume", 4) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "no checkpoint" in err and "--auto-resume" in err
    assert train("--auto-resume", 4) == 0
    run = tmp_path / "requeued"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert train("--auto-resume", 8) == 0
    assert [s for s, _ in list_checkpoints(run)] == [4, 5, 8]
    # Continued, not restarted: the first four lines (timings included) are the first run's.
    after = (run / "metrics.jsonl").read_text().splitlines()
    assert after[:4] == lines and [json.loads(ln)["step"] for ln in after] == list(range(1, 9))


def test_piped_stdout_gets_plain_log_lines(
        ismctl_main: Callable[..., int], short_run: Path, digits: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    res = cli("train", QUICK, *tiny_overrides(digits, tmp_path, "logged", 10,
                                              **{"run.log_every": 5, "run.sample_every": 10}),
              ISMCTL_LOG_INTERVAL="0")
    assert res.returncode == 0, res.stderr
    run = tmp_path / "logged"
    steps = [ln for ln in res.stdout.splitlines() if ln.startswith("step ")]
    assert steps[0].startswith("step 5/10 loss ") and " it/s " in steps[0] and " eta " in steps[0]
    assert f"step 5: checkpoint {run / 'checkpoints' / 'step-0000005'}" in steps
    assert f"step 10: sample grid (4 steps) {run / 'samples' / 'step-0000010-4s.png'}" in steps
    assert [ln.split()[1] for ln in steps] == ["5/10", "5:", "10/10", "10:", "10:", "10:"]
    assert "\x1b" not in res.stdout and "━" not in res.stdout
    # The other commands in this process: captured stdout is not a terminal either.
    monkeypatch.setenv("ISMCTL_LOG_INTERVAL", "0")
    assert ismctl_main("eval", str(short_run), "--steps", "1,2", "--guidance", "1",
                       "--num-samples", "20", "--metrics", "acc",
                       "--out", str(tmp_path / "ev" / "results.json")) == 0
    out = capsys.readouterr().out
    assert "sampling 1 step(s), w=1: 20/20" in out
    assert "\n1 step, w=1: acc=" in out and "\n2 steps, w=1: acc=" in out
    assert ismctl_main("prepare-latents", "digits", "--out", str(tmp_path / "d")) == 0
    assert "encoding: 1,797/1,797 img (100%)" in capsys.readouterr().out


def test_tensorboard_holds_every_metric_and_the_grids(short_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(short_run / "tensorboard"),
                              size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    lines = [json.loads(ln) for ln in (short_run / "metrics.jsonl").read_text().splitlines()]
    keys = {"train/loss": "loss", "train/velocity": "velocity", "train/guidance": "guidance",
            "train/consistency": "consistency", "train/grad_norm": "grad_norm",
            "train/lr": "lr", "perf/it_s": "it_s", "perf/img_s": "img_s",
            "train/sot_cost_reduction": "sot_cost_reduction", "train/sot_leakage": "sot_leakage"}
    assert set(events.Tags()["scalars"]) == set(keys)
    for tag, key in keys.items():
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert logged == [(ln["step"], pytest.approx(ln[key], rel=1e-6)) for ln in lines], tag
    assert set(events.Tags()["images"]) == {"samples/1_step", "samples/4_step"}
    assert [e.step for e in events.Images("samples/4_step")] == [10]


def test_eval_which_weights(short_run: Path, tmp_path: Path) -> None:
    from ismctl.evaluation import evaluate
    from ismctl.runs.checkpoint import file_sha256

    ckpt = list_checkpoints(short_run)[-1][1]
    out = {}
    for which, name in (("online", "online"), ("target", "target_ema"),
                        ("inference", "inference_ema")):
        out[which] = evaluate(str(short_run), [1], [1.0], 20, None, ["acc"],
                              tmp_path / which / "results.json", None, False, 20, 0,
                              device="cpu", progress=False, which=which)["checkpoint"]
        assert out[which]["weights"] == which
        assert out[which]["sha256"] == file_sha256(ckpt / f"{name}.safetensors")
    assert out["online"]["sha256"] != out["inference"]["sha256"]


def test_sample_png_folder_matches_the_npz(short_run: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    common = ["sample", str(short_run), "--steps", "2", "--num", "15", "--seed", "4",
              "--device", "cpu"]
    res = runner.invoke(app, [*common, "--out", str(tmp_path / "pngs") + "/"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, [*common, "--out", str(tmp_path / "s.npz")])
    assert res.exit_code == 0, res.output
    images, labels = read_png_folder(tmp_path / "pngs")
    with np.load(tmp_path / "s.npz") as data:
        np.testing.assert_array_equal(images, data["arr_0"])
        np.testing.assert_array_equal(labels, data["arr_1"])
    names = sorted(p.name for p in (tmp_path / "pngs").iterdir())
    assert names[0] == f"000000_class{labels[0]}.png" and len(names) == 15


@pytest.mark.slow
def test_two_ranks_match_one_process(digits: Path, tmp_path: Path) -> None:
    """DDP (2 ranks x 8 samples, gloo) against 1 process (2 accumulation steps x 8 samples):
    the same global batch of 16, the same data and the same random draws, so the weights agree
    up to float summation order (all-reduce vs. accumulation): atol 1e-5 after 6 steps."""
    common = ["--no-progress", "--set=train.device=cpu"]
    single = cli("train", QUICK, *common, "--set=train.grad_accum=2",
                 *tiny_overrides(digits, tmp_path, "single", 6))
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "ismctl", "train", QUICK, *common, *tiny_overrides(digits, tmp_path, "ddp", 6)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = load_file(str(list_checkpoints(tmp_path / "single")[-1][1] / "online.safetensors"))
    b = load_file(str(list_checkpoints(tmp_path / "ddp")[-1][1] / "online.safetensors"))
    moved = load_file(str(list_checkpoints(tmp_path / "single")[0][1] / "online.safetensors"))
    assert any(not torch.equal(a[k], moved[k]) for k in a), "training did not move the weights"
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)
    assert losses(tmp_path / "single") == pytest.approx(losses(tmp_path / "ddp"), rel=1e-4)


def test_bf16_training_tracks_fp32_and_keeps_fp32_state(digits: Path, tmp_path: Path) -> None:
    """train.precision: bf16 on the CPU: the network runs under bf16 autocast (the losses move
    off the fp32 run's) but tracks fp32 closely; weights, EMA copies and the AdamW moments
    are stored in float32."""
    runner = CliRunner()
    for precision in ("fp32", "bf16"):
        res = runner.invoke(app, ["train", QUICK, "--no-progress",
                                  f"--set=train.precision={precision}",
                                  *tiny_overrides(digits, tmp_path, precision, 8)])
        assert res.exit_code == 0, res.output
    fp32, bf16 = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert sorted(bf16) == sorted(fp32) == list(range(1, 9))
    assert bf16 != fp32, "bf16 autocast had no effect"
    for step, value in fp32.items():
        assert bf16[step] == pytest.approx(value, rel=5e-3), step
    ckpt = list_checkpoints(tmp_path / "bf16")[-1][1]
    for name in ("online", "target_ema", "inference_ema"):
        weights = load_file(str(ckpt / f"{name}.safetensors"))
        assert {v.dtype for v in weights.values()} == {torch.float32}, name
    state = torch.load(ckpt / "state.pt", weights_only=False)
    moments = [v for s in state["optimizer"]["state"].values() for k, v in s.items()
               if k in ("exp_avg", "exp_avg_sq")]
    assert moments and {m.dtype for m in moments} == {torch.float32}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_match_one_process(digits: Path, tmp_path: Path) -> None:
    """Two torchrun agents on this machine, one process each, meeting at a c10d rendezvous on
    127.0.0.1 (the multi-node path: --nnodes 2, gloo) against one process with 2 accumulation
    slots: the same model up to float summation order."""
    common = ["--no-progress", "--set=train.device=cpu"]
    single = cli("train", QUICK, *common, "--set=train.grad_accum=2",
                 *tiny_overrides(digits, tmp_path, "single", 6))
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    endpoint = f"127.0.0.1:{_free_port()}"
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
         "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", "--rdzv_id=two-nodes",
         "--local_addr=127.0.0.1", "-m", "ismctl", "train", QUICK, *common,
         *tiny_overrides(digits, tmp_path, "nodes", 6)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        for _ in range(2)]
    try:
        outputs = [agent.communicate(timeout=600) for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    for agent, (_, err) in zip(agents, outputs, strict=True):
        assert agent.returncode == 0, err[-3000:]
    a = load_file(str(list_checkpoints(tmp_path / "single")[-1][1] / "online.safetensors"))
    b = load_file(str(list_checkpoints(tmp_path / "nodes")[-1][1] / "online.safetensors"))
    first = load_file(str(list_checkpoints(tmp_path / "nodes")[0][1] / "online.safetensors"))
    assert any(not torch.equal(b[k], first[k]) for k in b), "training did not move the weights"
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)
    assert losses(tmp_path / "single") == pytest.approx(losses(tmp_path / "nodes"), rel=1e-4)
