"""End-to-end training on the built-in digits: run directory, sampling, resume, DDP, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ismctl.checkpoint import list_checkpoints
from ismctl.cli import app

REPO = Path(__file__).resolve().parent.parent
QUICK = str(REPO / "recipes" / "quickstart.yaml")


def tiny_overrides(data: Path, root: Path, name: str, steps: int, **extra: object) -> list[str]:
    sets = {"data.path": data, "run.root": root, "run.name": name, "train.steps": steps,
            "data.batch_size": 16, "coupling.pool_batches": 2, "run.log_every": 1,
            "run.sample_every": 10_000, "run.sample_num": 20, "run.ckpt_every": 5,
            "run.keep_last": 100, "optim.warmup_steps": 0, **extra}
    return [f"--set={k}={v}" for k, v in sets.items()]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "ismctl", *args], capture_output=True,
                           text=True, env=env, cwd=REPO, timeout=600)


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
                     "inference_ema.safetensors", "state.pt"}
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


def test_non_finite_loss_stops_and_keeps_checkpoint(digits: Path, tmp_path: Path) -> None:
    res = cli("train", QUICK, "--no-progress",
              *tiny_overrides(digits, tmp_path, "nan", 40, **{"optim.lr": 1e30,
                                                             "optim.grad_clip": "null"}))
    assert res.returncode == 2, res.stderr
    assert "non-finite loss" in res.stderr
    for _, ckpt in list_checkpoints(tmp_path / "nan"):
        weights = load_file(str(ckpt / "online.safetensors"))
        assert all(torch.isfinite(v).all() for v in weights.values())


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted(digits: Path, tmp_path: Path) -> None:
    steps = 60
    ref = cli("train", QUICK, "--no-progress", *tiny_overrides(digits, tmp_path, "ref", steps))
    assert ref.returncode == 0, ref.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "ismctl", "train", QUICK, "--no-progress",
            *tiny_overrides(digits, tmp_path, "killed", steps)]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    run = tmp_path / "killed"
    deadline = time.time() + 300
    while not list_checkpoints(run) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    killed_at = list_checkpoints(run)[-1][0]
    assert killed_at < steps, "the run finished before it could be killed"
    res = cli("train", QUICK, "--no-progress", "--resume",
              *tiny_overrides(digits, tmp_path, "killed", steps))
    assert res.returncode == 0, res.stderr
    expected, got = losses(tmp_path / "ref"), losses(run)
    assert sorted(got) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-7), step


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
