"""torchrun command lines (one node, several nodes), the ablation's multi-node launch, and the
--threads option of the compute commands."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import ismctl.tools.ablate as ablate
from ismctl.cli import app
from ismctl.system.launch import Torchrun
from ismctl.system.runtime import default_threads, set_threads
from ismctl.utils.errors import UserError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_one_node_is_standalone() -> None:
    cmd = Torchrun(nproc_per_node=8).command("train-full")
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in cmd and "--nproc_per_node=8" in cmd
    assert not [a for a in cmd if a.startswith(("--nnodes", "--rdzv", "--node_rank"))]
    assert cmd[-2:] == ["-m", "ismctl"]


def test_several_nodes_meet_at_the_endpoint() -> None:
    run = Torchrun(nproc_per_node=8, nnodes=4, node_rank=2, rdzv_endpoint="node0:29400",
                   rdzv_id="abl")
    cmd = run.command("eval-no-wavelet+sot")
    assert "--standalone" not in cmd
    assert {"--nnodes=4", "--rdzv_backend=c10d", "--rdzv_endpoint=node0:29400",
            "--rdzv_id=abl-eval-no-wavelet-sot", "--nproc_per_node=8"} <= set(cmd)
    # c10d hands out the ranks itself; the static backend needs the node rank.
    assert not [a for a in cmd if a.startswith("--node_rank")]
    static = Torchrun(nnodes=2, node_rank=1, rdzv_endpoint="10.0.0.1:29500",
                      rdzv_backend="static").command()
    assert "--node_rank=1" in static and "--rdzv_id=ismctl" in static
    assert not run.is_main_node and Torchrun().is_main_node


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"nnodes": 2}, "--rdzv-endpoint"),
    ({"nnodes": 2, "node_rank": 2, "rdzv_endpoint": "h:1"}, "--node-rank 2"),
    ({"nnodes": 0}, "--nnodes 0"),
    ({"nnodes": 2, "rdzv_endpoint": "nohostport"}, "HOST:PORT"),
    ({"rdzv_backend": "zookeeper"}, "--rdzv-backend"),
    ({"rdzv_id": "a b"}, "--rdzv-id"),
])
def test_bad_launch_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        Torchrun(**kwargs)


def test_ablation_on_a_second_node_joins_every_job_and_leaves_the_report(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commands: list[list[str]] = []
    monkeypatch.setattr(ablate, "_run_subprocess", lambda cmd, what: commands.append(cmd))
    nodes = Torchrun(nnodes=2, node_rank=1, rdzv_endpoint="127.0.0.1:29400", rdzv_id="abl")
    report = ablate.run_ablation(str(RECIPES / "quickstart.yaml"), ["wavelet"], False,
                                 launch="torchrun", nproc_per_node=2, out=tmp_path,
                                 progress=False, nodes=nodes, threads=1)
    assert report == {}
    jobs = [(c[c.index("ismctl") + 1], c[c.index("ismctl") + 2]) for c in commands]
    assert jobs == [("train", str(tmp_path / "full.yaml")), ("eval", str(tmp_path / "full")),
                    ("train", str(tmp_path / "no-wavelet.yaml")),
                    ("eval", str(tmp_path / "no-wavelet"))]
    for cmd in commands:
        assert {"--nnodes=2", "--nproc_per_node=2", "--rdzv_endpoint=127.0.0.1:29400"} <= set(cmd)
        assert "--standalone" not in cmd and cmd[-2:] == ["--threads", "1"]
    assert len({next(a for a in c if a.startswith("--rdzv_id")) for c in commands}) == 4
    assert not (tmp_path / "ablation.json").exists()


def test_ablate_cli_multi_node_errors() -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["ablate", str(RECIPES / "quickstart.yaml"), "--disable", "sot",
                              "--launch", "torchrun", "--nnodes", "2"])
    assert res.exit_code != 0 and isinstance(res.exception, UserError)
    assert "--rdzv-endpoint" in str(res.exception)
    res = runner.invoke(app, ["ablate", str(RECIPES / "quickstart.yaml"), "--disable", "sot",
                              "--nnodes", "2", "--rdzv-endpoint", "h:1"])
    assert isinstance(res.exception, UserError) and "--launch torchrun" in str(res.exception)


def test_default_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr("ismctl.system.runtime.usable_cores", lambda: 16)
    # Every usable core, whatever the load average says (it lags and counts the command that
    # ran just before: an idle machine looked busy to an eval right after a training run).
    monkeypatch.setattr("os.getloadavg", lambda: (15.0, 15.0, 15.0))
    assert default_threads() == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_threads() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert default_threads() == 1
    # OMP_NUM_THREADS wins over the torchrun share; empty or nonsense values are ignored.
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert default_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "")
    assert default_threads() == 16
    monkeypatch.setenv("OMP_NUM_THREADS", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "x")
    assert default_threads() == 16


def test_usable_cores_is_the_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    from ismctl.system.runtime import usable_cores

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 5, 7}, raising=False)
    assert usable_cores() == 3


def test_threads_option_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        assert set_threads(None) == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_set_threads() -> None:
    before = torch.get_num_threads()
    try:
        assert set_threads(2) == 2 and torch.get_num_threads() == 2
        with pytest.raises(UserError, match="--threads 0"):
            set_threads(0)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("command", ["train", "sample", "eval", "ablate", "bench",
                                     "prepare-latents"])
def test_compute_commands_take_threads(command: str) -> None:
    res = CliRunner().invoke(app, [command, "--help"])
    assert res.exit_code == 0 and "--threads" in res.output
    args = [] if command == "bench" else ["x"]
    res = CliRunner().invoke(app, [command, *args, "--threads", "0"])
    assert isinstance(res.exception, UserError) and "--threads 0" in str(res.exception)
