"""``--launch slurm`` against a real one-node SLURM cluster (``.ci/slurm-up``; the tests skip
with the reason where none is up, and fail instead under ISMCTL_REQUIRE_SLURM=1, as in CI):

1. the quickstart trained by ``ismctl train --launch slurm`` has a local run's weights;
2. the same job, preempted mid-run (SIGUSR2, SLURM's signal before a time limit), checkpoints,
   is requeued and ends with the weights of an uninterrupted run;
3. ``ismctl ablate --launch slurm`` over 2 variants x 2 seeds runs as one job array and writes
   the local runner's report;
4. a failing cell is reported with its log path and reason, and the command run again
   resubmits it alone (it fails once per submission: never requeued in a loop);
5. one rank's failure ends a two-rank job through the scheduler, naming that rank.

Also, without a cluster: the option's parsing, the job's rank environment, the states, and the
one line a user without submitit gets.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ismctl.system import slurm
from ismctl.system.slurm import (
    SUBMITIT_MISSING,
    Cell,
    CellJob,
    Launcher,
    SlurmOptions,
    last_error,
    queued_jobs,
    sbatch_parameter,
    slurm_options,
    time_minutes,
)
from ismctl.utils.errors import UserError

REPO = Path(__file__).resolve().parent.parent
FAULTS = Path(__file__).resolve().parent / "fault_injection"
STEPS = 60
TRAIN = ["run.log_every=2", "run.ckpt_every=20", "run.sample_every=100000", "run.tracker=none",
         "optim.warmup_steps=0"]
ABLATE = ["train.steps=20", "run.log_every=10", "run.ckpt_every=1000", "run.sample_every=100000",
          "run.tracker=none", "optim.warmup_steps=0", "eval.steps=[1]", "eval.guidance=[0.5]",
          "eval.metrics=[acc,fd-digits,cfd-digits]", "eval.batch_size=100"]
WEIGHTS = ("online", "target_ema", "inference_ema")


def wait_for(what: str, check: Callable[[], bool], timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"waited {timeout:.0f} s for {what}")


def left_queue(*jobs: str) -> Callable[[], bool]:
    return lambda: not set(jobs) & set(queued_jobs())


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def same_weights(a: Path, b: Path) -> None:
    for name in WEIGHTS:
        left, right = load_file(a / f"{name}.safetensors"), load_file(b / f"{name}.safetensors")
        assert left.keys() == right.keys(), name
        for key in left:
            assert torch.equal(left[key], right[key]), f"{name}.{key} differs"


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ismctl.data.prepare import prepare_latents

    out = tmp_path_factory.mktemp("data") / "digits"
    prepare_latents("digits", out=out, progress=False)
    return out


@pytest.fixture(scope="module")
def local_run(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quickstart trained here, uninterrupted: the weights every scheduler run must have."""
    from ismctl.config.recipe import load_recipe
    from ismctl.training.trainer import train

    root = tmp_path_factory.mktemp("local")
    recipe = load_recipe("quickstart", [f"data.path={digits}", f"run.root={root}",
                                        "run.name=quickstart", f"train.steps={STEPS}", *TRAIN])
    train(recipe, "quickstart", progress=False)
    return root / "quickstart" / "checkpoints" / f"step-{STEPS:07d}"


def submit_train(ismctl_main: Callable[..., int], digits: Path, root: Path, name: str,
                 *extra: str) -> str:
    code = ismctl_main("train", "quickstart", *sets(f"data.path={digits}", f"run.root={root}",
                                                    f"run.name={name}", f"train.steps={STEPS}",
                                                    *TRAIN),
                       "--launch", "slurm", "--time", "20", *extra)
    assert code == 0
    record = json.loads((root / f"{name}.slurm" / "jobs.json").read_text())
    return record[name]["job_id"]


@pytest.mark.slurm
def test_quickstart_through_slurm_has_the_local_weights(
        slurm_cluster: Path, digits: Path, local_run: Path, tmp_path: Path,
        ismctl_main: Callable[..., int], capsys: pytest.CaptureFixture[str]) -> None:
    job = submit_train(ismctl_main, digits, tmp_path, "quickstart")
    assert "submitted" in capsys.readouterr().out
    wait_for(f"job {job}", left_queue(job))
    same_weights(tmp_path / "quickstart" / "checkpoints" / f"step-{STEPS:07d}", local_run)
    # Run again, the command finds the run finished and submits nothing.
    assert submit_train(ismctl_main, digits, tmp_path, "quickstart") == job
    assert "done" in capsys.readouterr().out


@pytest.mark.slurm
def test_preempted_job_requeues_and_ends_with_uninterrupted_weights(
        slurm_cluster: Path, digits: Path, local_run: Path, tmp_path: Path,
        ismctl_main: Callable[..., int]) -> None:
    job = submit_train(ismctl_main, digits, tmp_path, "pre")
    metrics = tmp_path / "pre" / "metrics.jsonl"
    wait_for("the first steps", lambda: metrics.is_file() and len(
        metrics.read_text().splitlines()) >= 2)
    # What SLURM sends --signal's lead time before the limit, or when it preempts the job.
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
    log = Path(json.loads((tmp_path / "pre.slurm" / "jobs.json").read_text())["pre"]["log"])
    wait_for("the requeue", lambda: "requeued" in log.read_text())
    wait_for(f"job {job}", left_queue(job))
    text = log.read_text()
    stopped = int(text.split("stopped at step ")[1].split()[0])
    assert 0 < stopped < STEPS and text.count("Starting with JobEnvironment") == 2
    same_weights(tmp_path / "pre" / "checkpoints" / f"step-{STEPS:07d}", local_run)


@pytest.mark.slurm
def test_ablation_as_a_job_array_writes_the_local_report(
        slurm_cluster: Path, digits: Path, tmp_path: Path,
        ismctl_main: Callable[..., int]) -> None:
    from ismctl.tools.ablate import run_ablation

    args = ["quickstart", "--disable", "wavelet", "--seeds", "0,1",
            *sets(f"data.path={digits}", *ABLATE), "--eval-num-samples", "100"]
    assert ismctl_main("ablate", *args, "--out", str(tmp_path / "slurm"), "--launch",
                       "slurm", "--time", "20") == 0
    record = json.loads((tmp_path / "slurm" / "slurm" / "jobs.json").read_text())
    jobs = [record[r]["job_id"] for r in ("full-seed0", "full-seed1", "no-wavelet-seed0",
                                          "no-wavelet-seed1")]
    # One array: one job id, four tasks.
    assert len({j.split("_")[0] for j in jobs}) == 1 and len(set(jobs)) == 4
    report = tmp_path / "slurm" / "ablation.json"
    wait_for("the report of the last cell", report.is_file, timeout=600)
    local = run_ablation("quickstart", ["wavelet"], False, overrides=[f"data.path={digits}",
                         *ABLATE], out=tmp_path / "local", eval_num_samples=100,
                         progress=False, seeds=[0, 1])
    remote = json.loads(report.read_text())
    assert [v["name"] for v in remote["variants"]] == [v["name"] for v in local["variants"]]
    for mine, theirs in zip(remote["variants"], local["variants"], strict=True):
        for key in ("points", "best", "at_best", "delta"):
            assert mine[key] == json.loads(json.dumps(theirs[key])), (mine["name"], key)
    assert (tmp_path / "slurm" / "ablation.md").is_file()


@pytest.mark.slurm
def test_a_failing_cell_is_reported_and_resubmitted_alone(
        slurm_cluster: Path, digits: Path, tmp_path: Path,
        ismctl_main: Callable[..., int]) -> None:
    from ismctl.tools.ablate import run_ablation

    # A batch of 60 does not divide the sOT pool of 256: a recipe the trainer refuses in the
    # job, while the other cell trains and is evaluated.
    args = ["quickstart", "--sweep", "data.batch_size=64,60",
            *sets(f"data.path={digits}", *ABLATE), "--eval-num-samples", "100",
            "--out", str(tmp_path), "--launch", "slurm", "--time", "20"]
    assert ismctl_main("ablate", *args) == 0
    record = json.loads((tmp_path / "slurm" / "jobs.json").read_text())
    good, bad = record["full"]["job_id"], record["data.batch_size=60"]["job_id"]
    wait_for("both cells", left_queue(good, bad))
    # --status: the states, and the report of what has finished.
    status = run_ablation("quickstart", None, False, overrides=[f"data.path={digits}", *ABLATE],
                          out=tmp_path, eval_num_samples=100, progress=False,
                          sweep="data.batch_size=64,60", launch="slurm",
                          slurm=SlurmOptions(time="20"), submit=False)
    states = {c["name"]: c for c in status["cells"]}
    assert states["full"]["state"] == "done"
    assert [v["name"] for v in status["variants"]] == ["full"]
    assert status["unfinished"] == ["data.batch_size=60"]
    failed = states["data.batch_size=60"]
    assert failed["state"] == "failed" and failed["log"] == record["data.batch_size=60"]["log"]
    # The scheduler's verdict and the trainer's one-line reason.
    assert failed["reason"].startswith("FAILED, exit code 1:0; error: coupling.pool_size=256")
    assert "micro-batches of 60 samples" in failed["reason"]
    # Failed once: never requeued.
    assert Path(failed["log"]).read_text().count("Starting with JobEnvironment") == 1
    # Run again: the failed cell alone is submitted, as a job of its own.
    assert ismctl_main("ablate", *args) == 0
    again = json.loads((tmp_path / "slurm" / "jobs.json").read_text())
    assert again["full"]["job_id"] == good
    new = again["data.batch_size=60"]["job_id"]
    assert new != bad and "_" not in new
    wait_for(f"job {new}", left_queue(new))
    assert "micro-batches of 60" in (last_error(Path(again["data.batch_size=60"]["log"])) or "")


@pytest.mark.slurm
def test_one_rank_failure_ends_the_job_through_the_scheduler(
        slurm_cluster: Path, digits: Path, tmp_path: Path, ismctl_main: Callable[..., int],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The job inherits this environment (sbatch exports it): rank 1's loss is non-finite at
    # step 3 of a run that would otherwise train for hours.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FAULTS), str(REPO)]))
    monkeypatch.setenv("ISMCTL_TEST_FAULT", "1:3")
    code = ismctl_main("train", "quickstart", *sets(
        f"data.path={digits}", f"run.root={tmp_path}", "run.name=fault", "train.steps=100000",
        "run.log_every=1", "run.sample_every=100000", "run.tracker=none"),
        "--launch", "slurm", "--nproc-per-node", "2", "--time", "20")
    assert code == 0
    record = json.loads((tmp_path / "fault.slurm" / "jobs.json").read_text())["fault"]
    # Task 0's log (the cell's) names rank 1's error; rank 1's own log has its line too.
    log, because = Path(record["log"]), "because rank 1: step 4: non-finite loss"
    wait_for("rank 1's failure", lambda: log.is_file() and because in log.read_text(),
             timeout=300)
    failed_at = time.monotonic()
    wait_for(f"job {record['job_id']}", left_queue(record["job_id"]), timeout=60)
    print(f"the job left the queue {time.monotonic() - failed_at:.1f} s after rank 0 "
          "learnt of rank 1's failure")
    rank1 = log.with_name(log.name.replace("_0_log", "_1_log")).read_text()
    assert "error: rank 1 of 2 failed: step 4: non-finite loss" in rank1
    state = Launcher(tmp_path / "fault.slurm", SlurmOptions(), "t").states(
        [Cell("fault", [], tmp_path / "fault", False)])[0]
    assert state.state == "failed" and because in state.reason


def test_time_limits_in_minutes() -> None:
    assert [time_minutes(t) for t in ("90", "1:30", "01:00:00", "1-0", "2-01:30:01",
                                      "0:30")] == [90, 2, 60, 1440, 2971, 1]
    for bad in ("", "1h", "-5", "0"):
        with pytest.raises(ValueError):
            time_minutes(bad)


def test_sbatch_lines_and_the_launch_file(tmp_path: Path) -> None:
    assert sbatch_parameter("--constraint=a100") == ("constraint", "a100")
    assert sbatch_parameter("--exclusive") == ("exclusive", True)
    with pytest.raises(ValueError):
        sbatch_parameter("constraint=a100")
    config = tmp_path / "cluster.yaml"
    config.write_text("launch:\n  partition: gpu\n  gpus_per_node: 8\n  time: '2-00:00:00'\n"
                      "  sbatch: ['--constraint=h100']\n  setup: ['module load cuda']\n")
    opts = slurm_options(config, partition="debug", sbatch=["--exclusive"], qos=None)
    assert (opts.partition, opts.gpus_per_node, opts.time) == ("debug", 8, "2-00:00:00")
    assert opts.sbatch == ["--constraint=h100", "--exclusive"] and opts.world_size == 1
    config.write_text("launch:\n  nodes: 0\n")
    with pytest.raises(UserError, match=r"cluster.yaml launch.nodes"):
        slurm_options(config)
    config.write_text("launch:\n  gpus: 8\n")
    with pytest.raises(UserError, match="launch.gpus"):
        slurm_options(config)
    with pytest.raises(UserError, match="--time"):
        slurm_options(None, time="soon")
    with pytest.raises(UserError, match="not found"):
        slurm_options(tmp_path / "missing.yaml")


def test_each_task_is_one_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    job = CellJob("c", [["train", "r.yaml"]], "/tmp/c")
    for key, value in {"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
                       "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]",
                       "SLURM_JOB_ID": "1234"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(slurm, "_first_host", lambda nodes: "gpu07")
    first, second = job._rank_env(0), job._rank_env(1)
    assert {k: first[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                  "MASTER_ADDR")} == {
        "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "gpu07"}
    assert first["MASTER_PORT"] != second["MASTER_PORT"]
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.delenv("RANK", raising=False)
    assert "RANK" not in job._rank_env(0)


def test_states_from_disk_queue_and_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    launcher = Launcher(tmp_path, SlurmOptions(), "t")
    log = tmp_path / "9_0_log.out"
    log.write_text("submitit INFO - Starting\nerror: data.batch_size=60: not divisible\n"
                   "Traceback (most recent call last):\nRuntimeError: c: `ismctl train` failed "
                   "with exit code 2; its reason is above\nsubmitit ERROR - Submitted job "
                   "triggered an exception\n")
    (tmp_path / "jobs.json").write_text(json.dumps({
        "a": {"job_id": "9_0", "log": str(log)}, "b": {"job_id": "9_1", "log": "x"},
        "c": {"job_id": "9_2", "log": "y"}}))
    monkeypatch.setattr(slurm, "queued_jobs", lambda: {"9_1": "PENDING", "9_2": "RUNNING"})
    monkeypatch.setattr(slurm, "final_state", lambda job: "FAILED, exit code 1:0")
    cells = [Cell(n, [], tmp_path, n == "d") for n in "abcde"]
    got = {s.name: s for s in launcher.states(cells)}
    assert {n: s.state for n, s in got.items()} == {
        "a": "failed", "b": "pending", "c": "running", "d": "done", "e": "new"}
    assert got["a"].reason == "FAILED, exit code 1:0; error: data.batch_size=60: not divisible"
    log.write_text("Traceback (most recent call last):\nValueError: bad\nsubmitit ERROR - x\n")
    assert last_error(log) == "ValueError: bad"


def test_no_scheduler_answer_submits_nothing(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "jobs.json").write_text(json.dumps({"a": {"job_id": "9", "log": "x"}}))
    monkeypatch.setattr(slurm, "QUERY_TIMEOUT_S", 0.5)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    squeue = bin_dir / "squeue"
    squeue.write_text("#!/bin/sh\nexec sleep 30\n")
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    started = time.monotonic()
    with pytest.raises(UserError, match="did not answer in 0.5 s"):
        Launcher(tmp_path, SlurmOptions(), "t").sync([Cell("a", [], tmp_path, False)])
    assert time.monotonic() - started < 10


def test_without_submitit_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   ismctl_main: Callable[..., int],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    import builtins

    real_import = builtins.__import__

    def no_submitit(name: str, *args: object, **kwargs: object) -> object:
        if name == "submitit" or name.startswith("submitit."):
            raise ImportError("No module named 'submitit'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_submitit)
    monkeypatch.setattr(slurm, "queued_jobs", lambda: {})
    with pytest.raises(UserError) as err:
        Launcher(tmp_path, SlurmOptions(), "t").submit([Cell("a", [["train"]], tmp_path,
                                                             False)])
    assert str(err.value) == SUBMITIT_MISSING
    code = ismctl_main("ablate", "quickstart", "--disable", "wavelet", "--out",
                       str(tmp_path / "abl"), "--launch", "slurm", "--set",
                       f"run.root={tmp_path}")
    err_text = capsys.readouterr().err
    assert code == 2 and "pip install 'ismctl[slurm]'" in err_text
    assert len(err_text.strip().splitlines()) == 1


def test_slurm_flags_need_the_slurm_launch(ismctl_main: Callable[..., int],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert ismctl_main("train", "quickstart", "--partition", "gpu") == 2
    assert "--partition: only with --launch slurm" in capsys.readouterr().err
    assert ismctl_main("ablate", "quickstart", "--disable", "sot", "--status") == 2
    assert "--status: only with --launch slurm" in capsys.readouterr().err
    assert ismctl_main("train", "quickstart", "--launch", "slurm", "--overwrite") == 2
    assert "--overwrite with --launch slurm" in capsys.readouterr().err


@pytest.mark.slurm
def test_a_driver_waits_for_one_command_as_a_job(slurm_cluster: Path, tmp_path: Path) -> None:
    from ismctl.system.slurm import run_and_wait

    log = run_and_wait(tmp_path, SlurmOptions(time="5"), "list", ["recipe", "list"], tmp_path,
                       poll_s=0.5)
    assert "quickstart" in Path(log).read_text()
    with pytest.raises(RuntimeError, match=r"did not succeed: error: .*no-such-recipe"):
        run_and_wait(tmp_path, SlurmOptions(time="5"), "bad", ["train", "no-such-recipe"],
                     tmp_path, poll_s=0.5)


def test_study_commands_become_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ismctl.studies.few_step as few_step

    calls: list[tuple] = []
    monkeypatch.setattr(few_step, "run_and_wait", lambda *a: calls.append(a))
    opts = SlurmOptions(partition="gpu")
    study = few_step.Study(tmp_path, 10, [0], 2, ["ismctl"], launch=opts)
    study._call(["eval", "run"], tmp_path / "logs" / "eval-run-x.log")
    assert calls == [(tmp_path / "slurm", opts, "eval-run-x", ["eval", "run", "--threads", "1"],
                      tmp_path)]
