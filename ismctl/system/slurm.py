"""``--launch slurm``: ismctl's work as SLURM jobs, submitted through submitit.

A *cell* is one unit of work with its own run folder (one training run, or one ablation
variant x seed: train, then evaluate): a list of ``ismctl`` command lines run one after the
other on one allocation. :class:`Launcher` submits the cells that are neither done nor queued
(several at once as one job array), keeps their job ids and log paths in ``jobs.json`` in its
folder, and tells each cell's state: ``done`` (the caller says so from what is on disk),
``pending`` / ``running`` (from ``squeue``), ``failed`` (submitted, no longer queued, not done:
with its log path and the last error line in it) or ``new``. States come from ``squeue`` and
``scontrol``, never from ``sacct`` (clusters without accounting have none), and every call to
them has a time limit: nothing here waits on the scheduler for long.

Inside a job, every SLURM task is one rank (``nodes x nproc_per_node`` tasks, laid out like
torchrun's processes: ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` from SLURM's task ids, rank 0's
node as ``MASTER_ADDR``); each task runs the cell's commands as child processes
(:class:`CellJob`). Before the time limit, or when preempted, SLURM sends SIGUSR2 (``--signal``
``USR2@signal_lead_s``, submitit's convention). submitit's handler calls
:meth:`CellJob.checkpoint` in task 0: it passes SIGUSR1 to its child, the trainer finishes the
step in flight, checkpoints and exits with 75 (``ismctl.system.preemption``), and the job is
requeued; the requeued job runs the same commands, ``train --auto-resume`` continues from that
checkpoint exactly. A job is requeued only when its attempt made progress (a new file in the
cell's folder: a checkpoint, a finished evaluation chunk); a command that fails for any other
reason (bad recipe, corrupt data) fails the job once, with its one-line reason in the log.
The children ignore SIGUSR2 itself, so that the signal, which SLURM sends to every process of
the job, reaches them only once, as SIGUSR1 from the driver.

submitit is an optional dependency (``pip install 'ismctl[slurm]'``); local runs never import it.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ismctl.system.preemption import PREEMPTED_EXIT_CODE
from ismctl.utils.errors import UserError
from ismctl.utils.fileio import atomic_write_text

SUBMITIT_MISSING = ("--launch slurm needs the submitit package, which is not installed: "
                    "pip install 'ismctl[slurm]'")
# How long a call to squeue, scontrol or sbatch may take before it counts as no answer.
QUERY_TIMEOUT_S = 30
# squeue's states of a job that still holds or waits for an allocation.
RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "RESIZING"}
RECORD = "jobs.json"
# ismctl's own one-line reasons first, then a Python exception's last line.
ISMCTL_LINE = re.compile(r"^(error: |stopping: )")
EXCEPTION_LINE = re.compile(r"^[A-Za-z_.]*(Error|Exception)\b")


class SlurmOptions(BaseModel):
    """The allocation of each job: flags of ``--launch slurm``, or the ``launch:`` block of a
    YAML file (``--launch-config``); a flag wins over the file."""

    model_config = ConfigDict(extra="forbid")

    nodes: int = Field(1, ge=1, description="Nodes per job.")
    nproc_per_node: int = Field(1, ge=1, description="Ranks per node (one per GPU), each a SLURM task; the job's world size is nodes x nproc_per_node.")
    gpus_per_node: int = Field(0, ge=0, description="GPUs to request per node (0: none, a CPU job).")
    cpus_per_task: int | None = Field(None, ge=1, description="CPU cores per rank (default: the partition's).")
    mem: str | None = Field(None, description="Memory per node, e.g. 64G (default: the partition's).")
    time: str = Field("24:00:00", description="Time limit per job: minutes, HH:MM:SS or D-HH:MM:SS; a job stopped by it checkpoints and is requeued.")
    partition: str | None = Field(None, description="SLURM partition (default: the cluster's).")
    account: str | None = Field(None, description="SLURM account to charge.")
    qos: str | None = Field(None, description="SLURM quality of service.")
    sbatch: list[str] = Field(default_factory=list, description="Extra #SBATCH options, e.g. --constraint=a100 or --exclusive.")
    setup: list[str] = Field(default_factory=list, description="Shell lines run in the job before ismctl starts (module load ..., source venv/bin/activate).")
    signal_lead_s: int = Field(300, ge=10, description="Seconds before the time limit at which SLURM signals the job to checkpoint (a step plus a checkpoint must fit).")

    @field_validator("time")
    @classmethod
    def _time(cls, value: str) -> str:
        time_minutes(value)
        return value

    @field_validator("sbatch")
    @classmethod
    def _sbatch(cls, value: list[str]) -> list[str]:
        for line in value:
            sbatch_parameter(line)
        return value

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node


def time_minutes(text: str | int) -> int:
    """SLURM's time formats (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in whole
    minutes, rounded up."""
    raw = str(text).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", raw)
    if not m:
        raise ValueError(f"time {raw!r}: expected minutes, HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = (int(g) if g else None for g in m.groups())
    if days is None:
        if b is None:
            seconds = a * 60
        elif c is None:
            seconds = a * 60 + b
        else:
            seconds = a * 3600 + b * 60 + c
    else:
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if seconds <= 0:
        raise ValueError(f"time {raw!r}: must be positive")
    return -(-seconds // 60)


def sbatch_parameter(line: str) -> tuple[str, str | bool]:
    """``--key=value`` or ``--flag`` (an ``#SBATCH`` option) as submitit's (key, value)."""
    m = re.fullmatch(r"--([A-Za-z][A-Za-z0-9-]*)(?:[= ](.+))?", line.strip())
    if not m:
        raise ValueError(f"sbatch option {line!r}: expected --key=value or --flag")
    return m.group(1), True if m.group(2) is None else m.group(2).strip()


def slurm_options(config: Path | None = None, **flags: Any) -> SlurmOptions:
    """The options of ``config``'s ``launch:`` block, with every flag that is not None on top
    (``sbatch`` lines are added to the file's)."""
    data: dict[str, Any] = {}
    if config is not None:
        if not config.is_file():
            raise UserError(f"--launch-config {config}: file not found")
        try:
            loaded = yaml.safe_load(config.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"--launch-config {config}: not valid YAML ({exc})") from exc
        if not isinstance(loaded, dict) or not isinstance(loaded.get("launch"), dict):
            raise UserError(f"--launch-config {config}: expected a 'launch:' mapping, e.g. "
                            "launch: {partition: gpu, gpus_per_node: 8, time: '24:00:00'}")
        data = dict(loaded["launch"])
    for key, value in flags.items():
        if value is None or (key == "sbatch" and not value):
            continue
        data[key] = [*data.get("sbatch", []), *value] if key == "sbatch" else value
    try:
        return SlurmOptions(**data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "launch"
        source = f"{config} launch.{where}" if config else f"--{where.replace('_', '-')}"
        raise UserError(f"{source}: {err['msg']}") from exc


def _import_submitit() -> Any:
    try:
        import submitit
    except ImportError as exc:
        raise UserError(SUBMITIT_MISSING) from exc
    return submitit


def _query(cmd: list[str]) -> str:
    """A SLURM command's output; a UserError when it is missing, fails or does not answer in
    ``QUERY_TIMEOUT_S`` seconds."""
    if shutil.which(cmd[0]) is None:
        raise UserError(f"--launch slurm: {cmd[0]} not found; run this on a SLURM cluster's "
                        "login node (or leave --launch out to run here)")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        raise UserError(f"`{shlex.join(cmd)}` did not answer in {QUERY_TIMEOUT_S} s: the "
                        "scheduler is unreachable, so nothing was submitted") from exc
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()
        raise UserError(f"--launch slurm: `{shlex.join(cmd)}` failed ({why[-1] if why else done.returncode}); "
                        "run this where SLURM answers (a login node; SLURM_CONF names the "
                        "cluster's slurm.conf)")
    return done.stdout


def queued_jobs() -> dict[str, str]:
    """Every job of this user that SLURM still holds, ``{job id: state}``; array tasks as
    ``<array id>_<index>``, one line each."""
    out = _query(["squeue", "--me", "--noheader", "--array", "--format=%i|%T"])
    jobs = {}
    for line in out.splitlines():
        job, _, state = line.strip().partition("|")
        if job:
            jobs[job] = state
    return jobs


def final_state(job_id: str) -> str | None:
    """What ``scontrol`` says of a job that left the queue (``FAILED``, ``TIMEOUT``, ...), while
    the controller still remembers it (``MinJobAge``); None otherwise."""
    try:
        out = _query(["scontrol", "--oneliner", "show", "job", job_id])
    except UserError:
        return None
    m = re.search(r"\bJobState=(\S+)", out)
    code = re.search(r"\bExitCode=(\S+)", out)
    if not m:
        return None
    return m.group(1) + (f", exit code {code.group(1)}" if code else "")


def last_error(log: Path) -> str | None:
    """The last error line of a job's log: ismctl's one-line ``error:``, another rank's
    ``stopping:`` line, or a Python exception's last line."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for pattern in (ISMCTL_LINE, EXCEPTION_LINE):
        for line in reversed(lines):
            if pattern.match(line.strip()):
                return line.strip()
    return None


@dataclass
class Cell:
    """One unit of work: a name, its ``ismctl`` command lines, the folder it writes (whose new
    files are its progress) and whether it is done (from what is on disk)."""

    name: str
    commands: list[list[str]]
    folder: Path
    done: bool
    after: Callable[[], Any] | None = None


@dataclass
class CellState:
    name: str
    state: str
    job_id: str | None = None
    log: str | None = None
    reason: str | None = None


def _progress(folder: Path) -> set[str]:
    if not folder.is_dir():
        return set()
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _ignore_usr2() -> None:
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


@dataclass
class CellJob:
    """What each SLURM task of a cell's job runs (pickled by submitit): the commands as
    children of this process, one rank each; see the module docstring for the signals."""

    name: str
    commands: list[list[str]]
    folder: str
    after: Callable[[], Any] | None = None
    python: str = field(default_factory=lambda: sys.executable)
    _child: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _code: int | None = field(default=None, init=False, repr=False)
    _before: set[str] = field(default_factory=set, init=False, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_child=None, _code=None, _before=set())
        return state

    def __call__(self) -> str:
        task = int(os.environ.get("SLURM_PROCID", "0"))
        self._before = _progress(Path(self.folder))
        for index, args in enumerate(self.commands):
            code = self._run(args, self._rank_env(index))
            if code == 0:
                continue
            if code == PREEMPTED_EXIT_CODE and task != 0:
                # Every rank stopped at the same step after a checkpoint; task 0 decides
                # whether the job is requeued.
                return f"{self.name}: stopped after a checkpoint"
            what = shlex.join(["ismctl", *args])
            if code == PREEMPTED_EXIT_CODE:
                raise RuntimeError(f"{self.name}: `{what}` stopped after a checkpoint on a "
                                   "signal from the scheduler (SIGTERM: preempted or "
                                   "cancelled); rerunning the submitting command continues it")
            raise RuntimeError(f"{self.name}: `{what}` failed with exit code {code}; its "
                               "reason is above")
        if task == 0 and self.after is not None:
            self.after()
        return f"{self.name}: done"

    def _rank_env(self, index: int) -> dict[str, str]:
        env = dict(os.environ)
        world = int(env.get("SLURM_NTASKS", "1"))
        if world > 1:
            nodes = int(env.get("SLURM_JOB_NUM_NODES", "1"))
            hosts = _first_host(env.get("SLURM_JOB_NODELIST", ""))
            job = int(env.get("SLURM_JOB_ID", "0"))
            env.update(RANK=env["SLURM_PROCID"], LOCAL_RANK=env.get("SLURM_LOCALID", "0"),
                       WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world // max(1, nodes)),
                       MASTER_ADDR=hosts or "127.0.0.1",
                       # One port per job and command, so consecutive commands never meet.
                       MASTER_PORT=str(20000 + (job * 8 + index) % 30000))
        return env

    def _run(self, args: list[str], env: dict[str, str]) -> int:
        self._code = None
        self._child = subprocess.Popen([self.python, "-m", "ismctl", *args], env=env,
                                       preexec_fn=_ignore_usr2)
        child = self._child
        # A thread reaps the child, so that the signal handler below, which runs on this
        # thread, never waits on a lock this thread holds.
        threading.Thread(target=lambda: setattr(self, "_code", child.wait()),
                         daemon=True).start()
        while self._code is None:
            time.sleep(0.2)
        return self._code

    def checkpoint(self) -> Any:
        """submitit calls this in task 0 on SIGUSR2: stop the command at a checkpoint; the
        same cell again when that worked and made progress, else None (not requeued)."""
        import submitit

        child = self._child
        if child is not None and self._code is None:
            print(f"{self.name}: the scheduler asks to stop; passing SIGUSR1 to the running "
                  "command", file=sys.stderr, flush=True)
            os.kill(child.pid, signal.SIGUSR1)
            while self._code is None:
                time.sleep(0.2)
        code = self._code
        if code not in (None, 0, PREEMPTED_EXIT_CODE, -signal.SIGUSR1):
            print(f"{self.name}: not requeued: the command ended with exit code {code}",
                  file=sys.stderr, flush=True)
            return None
        if _progress(Path(self.folder)) <= self._before:
            print(f"{self.name}: not requeued: no new checkpoint or evaluation chunk since "
                  "this attempt started (raise --time or signal_lead_s)", file=sys.stderr,
                  flush=True)
            return None
        print(f"{self.name}: stopped at a checkpoint; requeued", file=sys.stderr, flush=True)
        return submitit.helpers.DelayedSubmission(self)


def _first_host(nodelist: str) -> str | None:
    if not nodelist:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=QUERY_TIMEOUT_S, check=True).stdout.split()
        return out[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return nodelist.split(",")[0].split("[")[0]


class Launcher:
    """Submits cells and tells their states; ``folder`` holds the job scripts, logs and
    ``jobs.json`` (the cells' job ids)."""

    def __init__(self, folder: Path, options: SlurmOptions, job_name: str) -> None:
        self.folder, self.options, self.job_name = Path(folder), options, job_name

    def record(self) -> dict[str, dict[str, str]]:
        """``{cell: {job_id, log, submitted}}`` of every cell submitted from this folder."""
        path = self.folder / RECORD
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except ValueError as exc:
            raise UserError(f"{path}: not readable JSON ({exc}); delete it to forget the "
                            "submitted jobs") from exc

    def states(self, cells: list[Cell]) -> list[CellState]:
        record = self.record()
        pending = [c for c in cells if not c.done and c.name in record]
        queue = queued_jobs() if pending else {}
        out = []
        for cell in cells:
            job = record.get(cell.name, {})
            state = CellState(cell.name, "new", job.get("job_id"), job.get("log"))
            if cell.done:
                state.state = "done"
            elif state.job_id is None:
                pass
            elif state.job_id in queue:
                state.state = "running" if queue[state.job_id] in RUNNING else "pending"
                state.reason = queue[state.job_id].lower()
            else:
                state.state = "failed"
                log = Path(state.log) if state.log else None
                final = final_state(state.job_id)
                reason = last_error(log) if log else None
                state.reason = "; ".join(r for r in (final, reason) if r) or (
                    "left the queue without finishing")
            out.append(state)
        return out

    def submit(self, cells: list[Cell]) -> list[str]:
        """Submit ``cells`` (one job, or a job array for several); returns their job ids."""
        if not cells:
            return []
        submitit = _import_submitit()
        # A scheduler that does not answer says so in one line here, before sbatch would.
        queued_jobs()
        self.folder.mkdir(parents=True, exist_ok=True)
        opts = self.options
        try:
            executor = submitit.SlurmExecutor(folder=self.folder, max_num_timeout=1000)
        except RuntimeError as exc:
            raise UserError(f"--launch slurm: {exc}") from exc
        params: dict[str, Any] = {
            "job_name": self.job_name, "time": time_minutes(opts.time), "nodes": opts.nodes,
            "ntasks_per_node": opts.nproc_per_node, "signal_delay_s": opts.signal_lead_s,
            "stderr_to_stdout": True, "srun_args": ["--kill-on-bad-exit=1"],
            "additional_parameters": dict(sbatch_parameter(s) for s in opts.sbatch),
        }
        for key in ("cpus_per_task", "partition", "account", "qos", "mem"):
            if getattr(opts, key) is not None:
                params[key] = getattr(opts, key)
        if opts.gpus_per_node:
            params["gpus_per_node"] = opts.gpus_per_node
        if opts.setup:
            params["setup"] = list(opts.setup)
        executor.update_parameters(**params)
        jobs_ = [CellJob(c.name, c.commands, str(c.folder), c.after) for c in cells]
        try:
            if len(jobs_) == 1:
                jobs = [executor.submit(jobs_[0])]
            else:
                with executor.batch():
                    jobs = [executor.submit(j) for j in jobs_]
        except Exception as exc:  # sbatch's refusal, whatever submitit wraps it in
            lines = str(exc).strip().splitlines()
            raise UserError(f"sbatch refused the job: {lines[-1] if lines else exc}") from exc
        record = self.record()
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        for cell, job in zip(cells, jobs, strict=True):
            record[cell.name] = {"job_id": str(job.job_id), "log": str(job.paths.stdout),
                                 "submitted": now}
        atomic_write_text(self.folder / RECORD, json.dumps(record, indent=1) + "\n")
        return [str(j.job_id) for j in jobs]

    def sync(self, cells: list[Cell], submit: bool = True) -> list[CellState]:
        """The cells' states after submitting those neither done nor queued (``submit``)."""
        states = self.states(cells)
        todo = [c for c, s in zip(cells, states, strict=True) if s.state in ("new", "failed")]
        if submit and todo:
            ids = dict(zip((c.name for c in todo), self.submit(todo), strict=True))
            record = self.record()
            for s in states:
                if s.name in ids:
                    s.state, s.job_id, s.log = "submitted", ids[s.name], record[s.name]["log"]
                    s.reason = None
        return states


def print_states(states: list[CellState], console: Any, title: str) -> None:
    """One table row per cell: state, job id, log or reason."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title)
    for col in ("cell", "state", "job", "log / reason"):
        table.add_column(col, overflow="fold")
    colour = {"done": "green", "failed": "red", "running": "cyan", "submitted": "cyan"}
    for s in states:
        where = s.log or ""
        if s.state == "failed":
            where = f"{s.reason} (log: {s.log})"
        style = colour.get(s.state)
        table.add_row(escape(s.name), f"[{style}]{s.state}[/]" if style else s.state,
                      s.job_id or "-", escape(where))
    console.print(table)


def run_and_wait(folder: Path, options: SlurmOptions, name: str, args: list[str],
                 watch: Path, poll_s: float = 5.0) -> str:
    """Run one ``ismctl`` command line as a SLURM job and wait until it leaves the queue (for a
    driver that keeps several such jobs in flight, one thread each); returns its log path.
    Each look at the queue has its time limit; a job that did not succeed is a RuntimeError
    naming its log and last error line."""
    launcher = Launcher(folder, options, f"ismctl-{name}")
    cell = Cell(name, [args], watch, False)
    job = launcher.submit([cell])[0]
    log = launcher.record()[name]["log"]
    while job in queued_jobs():
        time.sleep(poll_s)
    result = Path(folder) / f"{job}_0_result.pkl"
    status = None
    if result.is_file():
        import pickle

        with open(result, "rb") as fh:
            status = pickle.load(fh)[0]
    if status != "success":
        why = last_error(Path(log)) or final_state(job) or "no result"
        raise RuntimeError(f"job {job} (`ismctl {shlex.join(args)}`) did not succeed: {why}; "
                           f"log: {log}")
    return log
