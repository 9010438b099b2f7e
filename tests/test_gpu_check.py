"""`make gpu-check`: the same code driven on the CPU with the tiny preset writes a complete
report, and every failure (a path that raises, a run whose loss does not fall, no GPU) fails
the command after the report is written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ismctl.tools.gpu_check as gpu_check
from ismctl.cli import app
from ismctl.tools.gpu_check import CheckFailed, run_gpu_check
from ismctl.utils.errors import UserError

EAGER = [("eager", "fp32"), ("eager", "bf16")]
SMOKE = {"steps": 40, "preset": "tiny/2", "batch": 16, "size": 8, "compiled": False,
         "precision": "fp32", "lr": 2e-3, "num_workers": 0, "pool_size": 64}


def check(out: Path, **kwargs) -> dict:
    args = {"presets": ["tiny/2"], "device": "cpu", "batch": 8, "size": 8, "modes": EAGER,
            "warmup": 1, "iters": 2, "split_iters": 1, "smoke": SMOKE, "require_cuda": False,
            "sot_pool": 64}
    return run_gpu_check(out, **{**args, **kwargs})


def test_cpu_run_writes_every_number(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check.json"
    report = check(out)
    assert json.loads(out.read_text()) == report and report["ok"] and report["failed"] == []
    assert [(r["mode"], r["precision"]) for r in report["steps"]] == EAGER
    for row in report["steps"]:
        assert row["img_s"] > 0 and row["step_s"] > 0 and row["losses_finite"]
        assert set(row["split_s"]) == {"online_fwd_bwd", "target_passes", "optimizer",
                                       "ema_update"}
        assert all(v > 0 for v in row["split_s"].values())
        # method §5: 2 target rows per guidance and per consistency sample, 1/4 + 1/4 of the batch.
        assert row["target_rows_per_sample"] == pytest.approx(1.0)
        assert row["recompiles_while_timed"] == 0 and row["mfu"] is None
    coupler = report["coupler"]
    assert coupler["pool_size"] == 64 and coupler["workers_per_gpu"] == gpu_check.SOT_WORKERS
    paths = {"tiny/2 eager fp32", "tiny/2 eager bf16"}
    assert len(coupler["keep_up"]["img_s_per_gpu"]) == 1
    assert set(coupler["keep_up"]["img_s_per_gpu"]) <= paths
    for mode, keep in coupler["keep_up"]["modes"].items():
        assert keep["worker_s_per_pool"] > coupler["modes"][mode]["total_s"] > 0
        for path, need in keep["workers_per_gpu"].items():
            assert coupler["keeps_up"][mode][path] == (need <= gpu_check.SOT_WORKERS)
    smoke = report["smoke_run"]
    assert len(smoke["losses"]) == 20 and all(math.isfinite(v) for v in smoke["losses"])
    assert smoke["relative_drop"] >= gpu_check.SMOKE_MIN_DROP


def test_a_failing_path_fails_the_check_after_the_report(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    real = gpu_check.measure_step

    def flaky(cfg, *args, **kwargs):
        if cfg.precision == "bf16":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(gpu_check, "measure_step", flaky)
    out = tmp_path / "gpu-check.json"
    with pytest.raises(CheckFailed, match="tiny/2 eager bf16: RuntimeError: CUDA out of memory"):
        check(out, smoke={"steps": 0})
    report = json.loads(out.read_text())
    assert not report["ok"] and len(report["failed"]) == 1
    assert "img_s" in report["steps"][0] and "error" in report["steps"][1]


def test_a_run_whose_loss_does_not_fall_fails(tmp_path: Path) -> None:
    with pytest.raises(CheckFailed, match="smoke run: loss did not fall"):
        check(tmp_path / "gpu-check.json", modes=[], smoke={**SMOKE, "lr": 1e-9})


def test_no_cuda_device_fails_loudly() -> None:
    with pytest.raises(UserError, match="no CUDA device"):
        run_gpu_check("unused.json", device="cpu")
    res = CliRunner().invoke(app, ["bench", "--full", "--device", "cpu"])
    assert isinstance(res.exception, UserError) and "no CUDA device" in str(res.exception)
