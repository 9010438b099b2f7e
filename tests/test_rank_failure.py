"""One rank's failure ends the whole job within seconds, naming that rank's error: two gloo
ranks under torchrun, rank 1's loss made non-finite at step 3 (``tests/fault_injection``), in
a run that would otherwise train for hours. Without the failure watch, rank 0 goes on into
the next step's collective; on NCCL it would wait there for the process group's timeout."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FAULTS = Path(__file__).resolve().parent / "fault_injection"


@pytest.mark.slow
def test_one_rank_failure_ends_every_rank_and_names_it(tmp_path: Path) -> None:
    from ismctl.data.prepare import prepare_latents

    data = tmp_path / "digits"
    prepare_latents("digits", out=data, progress=False)
    sets = {"data.path": data, "run.root": tmp_path, "run.name": "r", "train.steps": 100_000,
            "run.log_every": 1, "run.sample_every": 100_000, "run.tracker": "none"}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ISMCTL_TEST_FAULT": "1:3",
           "PYTHONPATH": os.pathsep.join([str(FAULTS), str(REPO)])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "ismctl", "train", "quickstart", "--no-progress",
           *(f"--set={k}={v}" for k, v in sets.items())]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    failed_at = None
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if failed_at is None and "rank 1 of 2 failed" in line:
            failed_at = time.monotonic()
    proc.wait(timeout=120)
    ended = time.monotonic() - (failed_at or 0)
    text = "".join(lines)
    assert failed_at is not None, text[-3000:]
    print(f"the job ended {ended:.1f} s after rank 1's failure")
    assert proc.returncode != 0 and ended < 60
    assert "error: rank 1 of 2 failed: step 4: non-finite loss" in text
    assert "stopping: rank 0 of 2 ends because rank 1: step 4: non-finite loss" in text
