"""Few-step generation on the built-in digits: SM, iSM, MeanFlow, and MeanFlow with each of
iSM's components, each tuned the same way and compared at 1, 2, 4 and 128 steps (method §4.1,
``docs/few_step_digits.md``).

Every method is the quickstart's network, data, optimiser and schedule (the shipped
recipes ``quickstart``, ``sm_quickstart`` and ``meanflow_digits``) with its
own objective and components:

- ``sm``: the official shortcut-models algorithm (method §2, ``sm_quickstart.yaml``), CFG at
  ``guidance.cfg_scale`` baked into its bootstrap targets, sampled by its authors' protocol
  (the conditional output; at 128 steps also two-pass CFG on the flow).
- ``ism``: the quickstart (every iSM component), w an input of the network.
- ``meanflow``: MeanFlow's objective with its CFG baked into the target (``guidance.omega``,
  kappa 0.5), MSE, independent pairing, targets from the online weights, sampled at w = 0;
  then the same with iSM's components added one at a time and together: within-class sOT
  (``coupling.pool_size=256``), the twin EMA (the 0.95 target EMA computes the JVP and the
  guidance rows), both; and, beyond the six methods run by default, both plus the wavelet
  loss, and both plus intrinsic guidance (w an input, ``objective.meanflow_guidance=intrinsic``).

Each method's guidance knob is tuned with one protocol. A knob baked into training (SM's CFG
scale, MeanFlow's omega) is a grid of training runs; an intrinsic method's w is a grid at
sampling, up to the ``guidance.w_max`` it was trained with. The choice is made per method and
step count on training seed ``seeds[0]`` and sampling seed ``SELECT_SEED``; every reported
number comes from the chosen setting at sampling seed ``REPORT_SEED``, for every training seed:
the choice never sees the samples it is scored on. No choice may sit on an edge of its grid.
A baked knob's grid grows by one value above its top, and MeanFlow's also below its bottom
(below CFG scale 1 its target leans towards the unconditional velocity), by one step or, where
that would reach scale 0 (the unconditional model), half-way to it; an sm recipe takes scales
from 1 up. An intrinsic method's 128-step w grid grows by 0.5, and when the best w is the
largest w trained, a run with a larger ``w_max`` joins the grid. Then the choice is made again
(``MAX_ROUNDS`` times at most; what still sits on an edge is reported). An intrinsic method's
w = 0 is the end of the range it was trained on, not of a grid.

Equal wall-clock: each method's seconds per training step are measured in one sitting once
everything else is done (``TIME_ROUNDS`` interleaved rounds of a ``TIME_STEPS``-step run per
method, one process at a time, so no two methods share the machine's cores and all see the same
machine), and each is evaluated at its last checkpoint (every ``CKPT_EVERY`` steps) within the
fastest method's full training time. The study's own training logs are not used for this: the
runs share the cores two at a time, with each other and with whatever else the machine runs.

Results outlive the machine. Every evaluated point (method, knob value, training seed,
checkpoint step, step count, sampling seed, sampler, w) is one small JSON file under the results
folder (``docs/few_step_digits/results/`` in the repository, committed as it lands), with the
grids, the timing and each run's training record beside them. The runner trains and evaluates
only what has no result there, so a study interrupted anywhere, on any machine, resumes from the
committed files and loses at most the cells in flight; the report reads nothing else.

    python -m ismctl.studies.few_step run runs/few-step --steps 3000 --seeds 0,1,2 \\
        --data data/digits
    python -m ismctl.studies.few_step report --steps 3000 \\
        --markdown docs/few_step_digits/tables.md --plot docs/few_step_digits.png

Any recipe enters the same protocol with ``--method NAME:RECIPE:KEY=V1,V2,...`` (repeatable;
:func:`method_from_spec`): a plugin's objective beside the shipped baselines (``--methods sm
--method ct:ct_digits.yaml:objective.scales=8,16,32``), its knob a grid of training runs when
its guidance is baked, ``guidance.w_max`` when it is intrinsic, widened the same way at both
ends while the recipe accepts the value. Its results are kept like the others', under its name.

Training and evaluation run as ``ismctl`` subprocesses (``--jobs`` at a time, one thread each),
or with ``--launch slurm`` as one SLURM job each (``ismctl.system.slurm``), ``--jobs`` in flight.
Once a run is trained its intermediate checkpoints keep only the inference weights, all an
evaluation reads; run folders (``runs/few-step``) stay out of the repository.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from ismctl.config.recipe import Recipe, load_recipe
from ismctl.sampling.protocol import Point, plan_points, run_sampler
from ismctl.sampling.sampler import TWO_PASS
from ismctl.system.slurm import SlurmOptions, run_and_wait, slurm_options
from ismctl.utils.errors import UserError
from ismctl.utils.fileio import atomic_path, atomic_write_text, write_json

STEPS = (1, 2, 4, 128)
SELECT_SEED, REPORT_SEED = 1, 0
METRICS = ("acc", "fd-digits", "cfd-digits", "spread-digits")
SELECT_BY = "cfd-digits"
NUM_SAMPLES = 1000
CKPT_EVERY = 100   # kept checkpoints: the equal-wall-clock points
# Wall-clock: the few-step counts only (a 128-step point costs as much as ~40 few-step ones).
WALL_STEPS = (1, 2, 4)
W_STEP = 0.25          # the sampling grid of intrinsic methods, as trained
TOP_128 = 1.0          # their first 128-step grid ends here (128-step points are dear)
MAX_ROUNDS = 3
# The timing runs: seconds per step = the median logged interval after the warm-up steps.
TIME_STEPS, TIME_SKIP, TIME_LOG, TIME_ROUNDS = 300, 100, 25, 2
# The picture: one 1-step grid per method from the same noise and labels.
PICTURE_SEED, PICTURE_SAMPLES = 0, 100
RESULTS = Path("docs/few_step_digits/results")
MF = "meanflow_digits"
SOT = ("coupling.pool_size=256",)
TWIN = ("ema.target_enabled=true",)


@dataclass(frozen=True)
class Method:
    """One row of the comparison: a recipe, its overrides and its guidance knob."""

    name: str
    label: str
    recipe: str
    overrides: tuple[str, ...]
    knob: str                      # recipe field of the training runs (one run per value)
    short: str                     # run-name tag of the knob
    values: tuple[float, ...]      # its first grid
    widen: float                   # a grid grows by this step above its top
    widen_down: float = 0.0        # and by this one below its bottom (halving near 0; baked)
    intrinsic: bool = False        # w is a network input: knob = guidance.w_max
    checked: bool = False          # a grid value joins only where the recipe accepts it

    def accepts(self, value: float) -> bool:
        """Whether a training run at knob ``value`` is a valid recipe (always, unchecked)."""
        if not self.checked:
            return True
        try:
            load_recipe(self.recipe, self.train_overrides(value, 0))
        except UserError:
            return False
        return True

    def run_tag(self, value: float, seed: int) -> str:
        return f"{self.short}{value:g}-seed{seed}"

    def run_name(self, value: float, seed: int) -> str:
        return f"{self.name}_{self.run_tag(value, seed)}"

    def train_overrides(self, value: float, seed: int) -> list[str]:
        return [*self.overrides, f"{self.knob}={value:g}", f"train.seed={seed}"]


# CFG scale grids: SM s in {1, 1.5, 2, 3} (an sm recipe takes s >= 1); MeanFlow
# s = omega / (1 - kappa) = 2 omega in {1, 1.5, 2}, widened downwards by s 0.5 (omega 0.25).
# Intrinsic methods start at the quickstart's w_max (1.5).
METHODS = {m.name: m for m in (
    Method("sm", "SM (official algorithm)", "sm_quickstart", (),
           "guidance.cfg_scale", "cfg", (1.0, 1.5, 2.0, 3.0), 1.0),
    Method("ism", "iSM (quickstart)", "quickstart", (),
           "guidance.w_max", "wmax", (1.5,), 1.5, intrinsic=True),
    Method("meanflow", "MeanFlow", MF, (), "guidance.omega", "omega", (0.5, 0.75, 1.0), 0.25,
           0.25),
    Method("meanflow+sot", "MeanFlow + sOT", MF, SOT, "guidance.omega", "omega",
           (0.5, 0.75, 1.0), 0.25, 0.25),
    Method("meanflow+twin-ema", "MeanFlow + twin EMA", MF, TWIN, "guidance.omega", "omega",
           (0.5, 0.75, 1.0), 0.25, 0.25),
    Method("meanflow+sot+twin-ema", "MeanFlow + sOT + twin EMA", MF, SOT + TWIN,
           "guidance.omega", "omega", (0.5, 0.75, 1.0), 0.25, 0.25),
    Method("meanflow+sot+twin-ema+wavelet", "MeanFlow + sOT + twin EMA + wavelet", MF,
           SOT + TWIN + ("loss.name=wavelet",), "guidance.omega", "omega", (0.5, 0.75, 1.0),
           0.25, 0.25),
    Method("meanflow+sot+twin-ema+intrinsic", "MeanFlow + sOT + twin EMA + intrinsic guidance",
           MF, SOT + TWIN + ("objective.meanflow_guidance=intrinsic",), "guidance.w_max", "wmax",
           (1.5,), 1.5, intrinsic=True),
)}
# The study's methods unless --methods says otherwise; the others join when the budget allows.
DEFAULT_METHODS = ("sm", "ism", "meanflow", "meanflow+sot", "meanflow+twin-ema",
                   "meanflow+sot+twin-ema")
# The name of a method given on the command line (--method): it names run and result folders.
_METHOD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+-]*")


def method_from_spec(text: str) -> Method:
    """A method from ``NAME:RECIPE:KEY=V1,V2,...``: any recipe (a file or a shipped recipe's
    name, of any objective) and the grid of its knob, a numeric recipe field. Whether the knob
    is baked (one training run per value, the grid widened at both ends while the recipe
    accepts the value) or the intrinsic w (then the knob is ``guidance.w_max``) comes from the
    recipe's sampling protocol. Every value is checked against the recipe here."""
    name, _, rest = text.partition(":")
    recipe, _, grid = rest.partition(":")
    knob, _, raw = grid.partition("=")
    try:
        values = tuple(sorted({float(v) for v in raw.split(",") if v.strip()}))
    except ValueError:
        values = ()
    if not (_METHOD_NAME.fullmatch(name) and recipe and knob and values):
        raise UserError(f"--method {text!r}: expected NAME:RECIPE:KEY=V1,V2,... with numeric "
                        "values, e.g. ct:ct_digits.yaml:objective.scales=8,16,32")
    if name in METHODS:
        raise UserError(f"--method {name}: the study already has a method of that name "
                        f"({METHODS[name].label}); choose another")
    recipes = [load_recipe(recipe, [f"{knob}={v:g}"]) for v in values]
    intrinsic = run_sampler(recipes[0]) == "intrinsic"
    if intrinsic and knob != "guidance.w_max":
        raise UserError(f"--method {name}: {recipes[0].objective.mode} takes w as a network "
                        "input, so its knob is the w_max it is trained with: guidance.w_max")
    gaps = [b - a for a, b in zip(values, values[1:], strict=False)]
    return Method(name, name, recipe, (), knob, knob.rsplit(".", 1)[-1], values,
                  widen=gaps[-1] if gaps else values[0],
                  widen_down=0.0 if intrinsic else (gaps[0] if gaps else values[0] / 2),
                  intrinsic=intrinsic, checked=True)


def add_method(method: Method) -> None:
    """Make a method given on the command line known to the study (its cells and results)."""
    if method.name in METHODS and METHODS[method.name] != method:
        raise UserError(f"--method {method.name}: the study already has a method of that name")
    METHODS[method.name] = method


def nfe(steps: int, sampler: str) -> int:
    """Network evaluations per sample: two-pass CFG costs 2 per step (method §2)."""
    return steps * (2 if sampler in TWO_PASS else 1)


@cache
def method_recipe(name: str, value: float) -> Recipe:
    """The recipe a method's runs train at knob ``value`` (the seed changes nothing sampled)."""
    m = METHODS[name]
    return load_recipe(m.recipe, m.train_overrides(value, 0))


@dataclass(frozen=True)
class Cell:
    """One evaluation: a method's run (knob ``value``, training seed) at checkpoint ``step``,
    sampled in ``steps`` steps from sampling seed ``sampling_seed``."""

    method: str
    value: float
    train_seed: int
    step: int
    steps: int
    sampling_seed: int

    def points(self, grid: list[float]) -> list[Point]:
        """The points an evaluation of ``grid`` yields, as the run's protocol plans them (sm's
        128-step flow-CFG entry joins its w = 0)."""
        return plan_points(method_recipe(self.method, self.value), [self.steps], grid)


class Results:
    """The committed results folder: one JSON file per evaluated point, the key in its path.

    ``<method>/<knob><value>-seed<training seed>/step<checkpoint>-<N>steps-sseed<sampling seed>
    -<sampler>-w<w>.json``; ``<method>/<run>/train.json`` records a finished training run;
    ``grids.json`` the grids as widened and ``timing.json`` the timed seconds per step.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def run_folder(self, method: str, value: float, seed: int) -> Path:
        return self.root / method / METHODS[method].run_tag(value, seed)

    def point_file(self, cell: Cell, point: Point) -> Path:
        name = (f"step{cell.step}-{cell.steps}steps-sseed{cell.sampling_seed}-"
                f"{point.sampler}-w{point.guidance:g}.json")
        return self.run_folder(cell.method, cell.value, cell.train_seed) / name

    def train_file(self, method: str, value: float, seed: int) -> Path:
        return self.run_folder(method, value, seed) / "train.json"

    def get(self, cell: Cell, point: Point) -> dict[str, Any] | None:
        path = self.point_file(cell, point)
        return json.loads(path.read_text()) if path.is_file() else None

    def missing(self, cell: Cell, grid: list[float]) -> list[Point]:
        return [p for p in cell.points(grid) if not self.point_file(cell, p).is_file()]

    def metrics(self, cell: Cell, guidance: float, sampler: str) -> dict[str, float] | None:
        found = self.get(cell, Point(cell.steps, guidance, sampler))
        return None if found is None else found["metrics"]

    def json(self, path: Path) -> dict[str, Any]:
        """A results file's content ({} when it does not exist yet)."""
        return json.loads(path.read_text()) if path.is_file() else {}


class Grids:
    """Each method's knob values, its 128-step w ceiling and the widenings so far
    (``grids.json`` in the results: an interrupted study resumes with the grids it reached)."""

    def __init__(self, results: Results) -> None:
        self.path = results.root / "grids.json"
        stored = results.json(self.path)
        self.values = {m.name: sorted(set(stored.get(m.name, {}).get("values", m.values)))
                       for m in METHODS.values()}
        self.top128 = {m.name: float(stored.get(m.name, {}).get("top128", TOP_128))
                       for m in METHODS.values()}
        self.widened: list[list[str]] = stored.get("widened", [])

    def save(self) -> None:
        write_json(self.path, {"widened": self.widened, **{
            name: {"values": self.values[name], "top128": self.top128[name]}
            for name in self.values}})

    def w_grid(self, method: Method, value: float, steps: int) -> list[float]:
        """The sampling strengths of one run at ``steps``: w = 0 for baked methods (SM adds its
        flow-CFG entry at 128 steps itself); 0..top in ``W_STEP`` for intrinsic ones, top being
        the run's w_max (at 128 steps at most the method's ceiling)."""
        if not method.intrinsic:
            return [0.0]
        top = value if steps != 128 else min(value, self.top128[method.name])
        return [round(k * W_STEP, 6) for k in range(int(round(top / W_STEP)) + 1)]


class Study:
    """The runs (``out``, scratch) and results (``results``, kept) of one study."""

    def __init__(self, out: Path, train_steps: int, seeds: list[int], jobs: int,
                 ismctl: list[str], data: str | None = None, results: Path = RESULTS,
                 methods: Iterable[str] = DEFAULT_METHODS,
                 launch: SlurmOptions | None = None) -> None:
        self.out, self.train_steps, self.seeds, self.jobs = out, train_steps, seeds, jobs
        self.launch = launch
        self.ismctl, self.data = ismctl, data
        self.results = Results(results)
        self.methods = [METHODS[name] for name in methods]
        self.grids = Grids(self.results)

    def run_dir(self, method: Method, value: float, seed: int) -> Path:
        return self.out / method.run_name(value, seed)

    def checkpoint(self, run_dir: Path, step: int) -> Path:
        return run_dir / "checkpoints" / f"step-{step:07d}"

    def _call(self, args: list[str], log: Path) -> None:
        if self.launch is not None:
            # One SLURM job per command (``--jobs`` of them in flight), waited for here.
            run_and_wait(self.out / "slurm", self.launch, log.stem,
                         [*args, "--threads", "1"], self.out)
            return
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as fh:
            done = subprocess.run([*self.ismctl, *args, "--threads", "1"], stdout=fh,
                                  stderr=subprocess.STDOUT, env=env, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"`ismctl {' '.join(args)}` failed ({done.returncode}): see {log}")

    def train_args(self, method: Method, value: float, seed: int, run_dir: Path,
                   extra: Iterable[str]) -> list[str]:
        sets = [*method.train_overrides(value, seed), *extra, f"run.root={run_dir.parent}",
                f"run.name={run_dir.name}", *([f"data.path={self.data}"] if self.data else [])]
        return ["train", method.recipe, *[a for s in sets for a in ("--set", s)], "--no-progress"]

    def ensure_checkpoint(self, method: Method, value: float, seed: int, step: int) -> Path:
        """The run's checkpoint at ``step``, training the run (or resuming it) when it is
        missing; a finished run whose kept checkpoint is gone is trained again. A finished run
        leaves its training record in the results."""
        run_dir = self.run_dir(method, value, seed)
        ckpt = self.checkpoint(run_dir, step)
        extra = [f"train.steps={self.train_steps}", f"run.ckpt_every={CKPT_EVERY}",
                 f"run.keep_every={CKPT_EVERY}"]
        if not (ckpt / "inference_ema.safetensors").is_file():
            if self.checkpoint(run_dir, self.train_steps).is_dir():
                shutil.rmtree(run_dir)
            self._call([*self.train_args(method, value, seed, run_dir, extra), "--auto-resume"],
                       self.out / "logs" / f"train-{run_dir.name}.log")
            slim_checkpoints(run_dir, self.train_steps)
        record = self.results.train_file(method.name, value, seed)
        if not record.is_file() and self.checkpoint(run_dir, self.train_steps).is_dir():
            write_json(record, {"method": method.name, "recipe": method.recipe,
                                "overrides": [*method.train_overrides(value, seed), *extra],
                                "train_steps": self.train_steps,
                                "logged_train_s": train_seconds(run_dir), "finished": _now()})
        return ckpt

    def evaluate(self, cell: Cell, grid: list[float]) -> None:
        """Evaluate the points of ``grid`` that have no result yet, and keep each result."""
        missing = self.results.missing(cell, grid)
        if not missing:
            return
        method = METHODS[cell.method]
        ckpt = self.ensure_checkpoint(method, cell.value, cell.train_seed, cell.step)
        ask = [w for w in grid if set(cell.points([w])) & set(missing)]
        out = ckpt.parent.parent / "few-step" / (
            f"step{cell.step}-{cell.steps}steps-sseed{cell.sampling_seed}.json")
        args = ["eval", str(ckpt), "--steps", str(cell.steps),
                "--guidance", ",".join(f"{w:g}" for w in ask), "--seed", str(cell.sampling_seed),
                "--num-samples", str(NUM_SAMPLES), "--metrics", ",".join(METRICS),
                "--select-by", SELECT_BY, "--no-remember", "--out", str(out)]
        out.unlink(missing_ok=True)   # scratch of an earlier, interrupted evaluation
        self._call(args, self.out / "logs" / f"eval-{ckpt.parent.parent.name}-{out.stem}.log")
        evaluated = json.loads(out.read_text())
        for p in evaluated["points"]:
            point = Point(p["steps"], p["guidance"], p["sampler"])
            if point in missing:
                write_json(self.results.point_file(cell, point), {
                    "method": method.name, "recipe": method.recipe,
                    "overrides": method.train_overrides(cell.value, cell.train_seed),
                    "knob": method.knob, "value": cell.value, "train_seed": cell.train_seed,
                    "checkpoint_step": cell.step,
                    "checkpoint_sha256": evaluated["checkpoint"]["sha256"],
                    "steps": cell.steps, "guidance": point.guidance, "sampler": point.sampler,
                    "nfe": nfe(cell.steps, point.sampler), "sampling_seed": cell.sampling_seed,
                    "num_samples": p["num_samples"], "metrics": p["metrics"],
                    "ismctl": evaluated["ismctl_version"], "torch": evaluated["torch"],
                    "created": evaluated["created"], "command": "ismctl " + " ".join(args)})

    def run_cells(self, cells: Iterable[tuple[Cell, list[float]]]) -> None:
        """Evaluate every cell that lacks a result: one task per training run (its cells in
        turn, so no run is trained twice at once), ``jobs`` tasks at a time."""
        per_run: dict[tuple[str, float, int], list[tuple[Cell, list[float]]]] = {}
        for cell, grid in cells:
            if self.results.missing(cell, grid):
                per_run.setdefault((cell.method, cell.value, cell.train_seed), []).append(
                    (cell, grid))
        self.parallel(lambda todo=todo: [self.evaluate(c, g) for c, g in todo]
                      for todo in per_run.values())

    def parallel(self, tasks: Iterable[Callable[[], Any]]) -> list[Any]:
        with ThreadPoolExecutor(self.jobs) as pool:
            return [f.result() for f in [pool.submit(t) for t in tasks]]


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def slim_checkpoints(run_dir: Path, final: int) -> None:
    """Keep only the inference weights in every checkpoint but the final one (evaluations read
    nothing else; a study's 30 full checkpoints per run would take ~0.8 GB)."""
    for ckpt in sorted((run_dir / "checkpoints").glob("step-*")):
        if ckpt.name == f"step-{final:07d}" or not (ckpt / "inference_ema.safetensors").is_file():
            continue
        for name in ("state.pt", "online.safetensors", "target_ema.safetensors"):
            (ckpt / name).unlink(missing_ok=True)


Chosen = dict[str, dict[int, dict[str, Any]]]


def selection_cells(study: Study, method: Method, n: int) -> list[tuple[Cell, list[float]]]:
    """The tuning evaluations of one method at ``n`` steps: every knob value of its grid on the
    first training seed, sampling seed ``SELECT_SEED``."""
    return [(Cell(method.name, value, study.seeds[0], study.train_steps, n, SELECT_SEED),
             study.grids.w_grid(method, value, n)) for value in study.grids.values[method.name]]


def choose(study: Study) -> Chosen:
    """Per method and step count, the knob value, w and sampler with the lowest selection
    metric among the selection evaluations of the current grids (all of them must exist)."""
    chosen: Chosen = {}
    for method in study.methods:
        chosen[method.name] = {}
        for n in STEPS:
            candidates = []
            for cell, grid in selection_cells(study, method, n):
                for point in cell.points(grid):
                    found = study.results.metrics(cell, point.guidance, point.sampler)
                    if found is None:
                        raise RuntimeError(f"no result for {cell} at {point}: run the study")
                    candidates.append({"value": cell.value, "guidance": point.guidance,
                                       "sampler": point.sampler, SELECT_BY: found[SELECT_BY]})
            best = min(candidates, key=lambda c: c[SELECT_BY])
            chosen[method.name][n] = {**best, "candidates": len(candidates)}
    return chosen


def edges(study: Study, chosen: Chosen) -> list[str]:
    """Grow every grid whose chosen point sits on its edge; returns what was grown."""
    grown: list[str] = []
    g = study.grids
    for method in study.methods:
        values = g.values[method.name]
        for n, c in chosen[method.name].items():
            if not method.intrinsic:
                # One step down, or half-way to 0 where a step would reach it (scale 0 is the
                # unconditional model).
                low = min(values) - method.widen_down
                low = round(low if low > 0 else min(values) / 2, 6)
                if c["value"] == min(values) and method.widen_down and method.accepts(low):
                    values.insert(0, low)
                    grown.append(f"{method.name}: {method.knob} {low:g} ({n} steps chose the "
                                 "lower edge)")
                edge = c["value"] == max(values)
            elif c["guidance"] < max(g.w_grid(method, c["value"], n)):
                continue
            elif n == 128 and g.top128[method.name] < c["value"]:
                g.top128[method.name] += 0.5
                grown.append(f"{method.name}: 128-step w up to {g.top128[method.name]:g}")
                continue
            else:
                edge = c["value"] == max(values)
            if edge:
                new = round(max(values) + method.widen, 6)
                if new not in values and method.accepts(new):
                    values.append(new)
                    grown.append(f"{method.name}: {method.knob} {new:g} ({n} steps chose the "
                                 "edge)")
    return grown


def tune(study: Study) -> Chosen:
    """Evaluate the first seed over the grids, choose, grow the grids whose choice sits on an
    edge, and choose again (``MAX_ROUNDS`` widenings at most, counted across resumptions)."""
    g = study.grids
    while True:
        study.run_cells(c for m in study.methods for n in STEPS
                        for c in selection_cells(study, m, n))
        chosen = choose(study)
        if len(g.widened) >= MAX_ROUNDS:
            return chosen
        grown = edges(study, chosen)
        if not grown:
            return chosen
        g.widened.append(grown)
        g.save()


def report_cells(study: Study, chosen: Chosen, steps: Iterable[int],
                 step_of: Callable[[Method, int], int]) -> list[tuple[Cell, list[float]]]:
    """The reported evaluations: the chosen setting of each method and step count, every
    training seed, at checkpoint ``step_of(method, seed)``, sampling seed ``REPORT_SEED``. A
    baked knob samples at w = 0 (sm adds its flow-CFG entry at 128 steps by itself)."""
    cells = []
    for method in study.methods:
        for n in steps:
            c = chosen[method.name][n]
            grid = [c["guidance"] if method.intrinsic else 0.0]
            cells += [(Cell(method.name, c["value"], s, step_of(method, s), n, REPORT_SEED), grid)
                      for s in study.seeds]
    return cells


def run_study(study: Study) -> None:
    chosen = tune(study)
    study.run_cells(report_cells(study, chosen, STEPS, lambda m, s: study.train_steps))
    budget = wall_budget(study, chosen)
    if budget is None:
        raise RuntimeError("the timing is incomplete after measuring it")
    study.run_cells(report_cells(study, chosen, WALL_STEPS,
                                 lambda m, s: budget["step"][m.name][str(s)]))
    draw_samples(study, chosen)


def _logged_rates(run_dir: Path) -> list[tuple[int, float]]:
    """(step, it/s over the steps since the line before) of each metrics line."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    return sorted((r["step"], r["it_s"]) for r in rows if r.get("it_s"))


def train_seconds(run_dir: Path) -> float:
    """The run's logged training time in seconds (other jobs on the machine included)."""
    total, last = 0.0, 0
    for step, rate in _logged_rates(run_dir):
        total, last = total + (step - last) / rate, step
    return total


def timed_seconds(run_dir: Path) -> float:
    """Seconds per step of a timing run: the median of its logged intervals after the first
    ``TIME_SKIP`` steps (start-up, the first sOT pool, allocator warm-up)."""
    per_step = [1.0 / rate for step, rate in _logged_rates(run_dir) if step > TIME_SKIP]
    if not per_step:
        raise RuntimeError(f"{run_dir}: no metrics line after step {TIME_SKIP}")
    return statistics.median(per_step)


def time_methods(study: Study, chosen: Chosen, measure: bool = True) -> dict[str, float] | None:
    """Seconds per training step of every method, measured in one sitting: a ``TIME_STEPS``-step
    run of its chosen setting (at 1 step; the knob's value does not change the cost), one
    process at a time, methods interleaved over ``TIME_ROUNDS`` rounds so that a slow spell of
    the machine falls on all of them; the median over the rounds. Each measurement is kept in
    the results' ``timing.json`` as it is made, so this resumes too. ``measure=False`` (the
    report) only reads: None while a measurement is missing."""
    path = study.results.root / "timing.json"
    have: dict[str, float] = study.results.json(path)
    root = study.out / "timing"
    for r in range(TIME_ROUNDS):
        for method in study.methods:
            key = f"{method.name}/round{r}"
            if key in have:
                continue
            if not measure:
                return None
            run_dir = root / f"{method.name}-round{r}"
            shutil.rmtree(run_dir, ignore_errors=True)
            extra = [f"train.steps={TIME_STEPS}", f"run.log_every={TIME_LOG}",
                     f"run.ckpt_every={TIME_STEPS}", f"run.sample_every={TIME_STEPS}"]
            study._call(study.train_args(method, chosen[method.name][1]["value"],
                                         study.seeds[0], run_dir, extra),
                        study.out / "logs" / f"time-{run_dir.name}.log")
            have[key] = timed_seconds(run_dir)
            write_json(path, have)
            shutil.rmtree(run_dir)
    return {m.name: statistics.median(have[f"{m.name}/round{r}"] for r in range(TIME_ROUNDS))
            for m in study.methods}


def wall_budget(study: Study, chosen: Chosen, measure: bool = True) -> dict[str, Any] | None:
    """Seconds per step of each method (``time_methods``), the budget (the fastest method's
    full run) and, per method and seed, the last kept checkpoint within it; beside them each
    method's logged training time (median over its reported runs, other jobs included). None
    when ``measure`` is False and the timing is not complete."""
    per_step = time_methods(study, chosen, measure)
    if per_step is None:
        return None
    logged: dict[str, float | None] = {}
    for method in study.methods:
        records = [study.results.json(study.results.train_file(method.name, value, seed))
                   for value in {c["value"] for c in chosen[method.name].values()}
                   for seed in study.seeds]
        seconds = [r["logged_train_s"] for r in records if r]
        logged[method.name] = statistics.median(seconds) if seconds else None
    budget = min(per_step.values()) * study.train_steps
    reached = {name: CKPT_EVERY * math.floor(budget / sec / CKPT_EVERY + 1e-9)
               for name, sec in per_step.items()}
    step = {name: {str(s): min(study.train_steps, max(CKPT_EVERY, n)) for s in study.seeds}
            for name, n in reached.items()}
    return {"seconds_per_step": per_step, "logged_train_s": logged, "budget_s": budget,
            "step": step}


def picture_dir(study: Study) -> Path:
    return study.results.root.parent / "samples"


def draw_samples(study: Study, chosen: Chosen) -> None:
    """One 1-step grid per method (its chosen setting, training seed ``seeds[0]``), all from
    the same noise and labels (sampling seed ``PICTURE_SEED``); a grid already drawn is kept."""
    for method in study.methods:
        out = picture_dir(study) / f"{method.name}.png"
        if out.is_file():
            continue
        c = chosen[method.name][1]
        ckpt = study.ensure_checkpoint(method, c["value"], study.seeds[0], study.train_steps)
        out.parent.mkdir(parents=True, exist_ok=True)
        study._call(["sample", str(ckpt), "--steps", "1", "--guidance", f"{c['guidance']:g}",
                     "--seed", str(PICTURE_SEED), "--num-samples", str(PICTURE_SAMPLES),
                     "--out", str(out)], study.out / "logs" / f"sample-{method.name}.log")


def _mean_sd(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def summarise(study: Study) -> dict[str, Any]:
    """The tables, from the results folder alone (a row still missing a seed is left out)."""
    chosen = choose(study)
    budget = wall_budget(study, chosen, measure=False)
    tables: dict[str, Any] = {"equal_steps": {}, "equal_wall_clock": {}}
    for table, step_counts in (("equal_steps", STEPS), ("equal_wall_clock", WALL_STEPS)):
        if table == "equal_wall_clock" and budget is None:
            continue   # not timed yet: no wall-clock table
        for method in study.methods:
            rows = {}
            for n in step_counts:
                c = chosen[method.name][n]
                steps_used = [study.train_steps if table == "equal_steps"
                              else budget["step"][method.name][str(seed)]
                              for seed in study.seeds]
                found = [study.results.metrics(Cell(method.name, c["value"], seed, step, n,
                                                    REPORT_SEED), c["guidance"], c["sampler"])
                         for seed, step in zip(study.seeds, steps_used, strict=True)]
                if any(f is None for f in found):
                    continue   # not evaluated (yet): the row is left out, not guessed
                rows[str(n)] = {"knob": c["value"], "guidance": c["guidance"],
                                "sampler": c["sampler"], "nfe": nfe(n, c["sampler"]),
                                "train_steps": steps_used, "candidates": c["candidates"],
                                **{k: _mean_sd([f[k] for f in found]) for k in METRICS}}
            tables[table][method.name] = rows
    return {"train_steps": study.train_steps, "seeds": study.seeds, "steps": list(STEPS),
            "select": {"by": SELECT_BY, "training_seed": study.seeds[0],
                       "sampling_seed": SELECT_SEED},
            "report_sampling_seed": REPORT_SEED, "num_samples": NUM_SAMPLES,
            "methods": {m.name: {"label": m.label, "recipe": m.recipe,
                                 "overrides": list(m.overrides), "knob": m.knob,
                                 "intrinsic": m.intrinsic}
                        for m in study.methods},
            "grids": {m.name: {"values": study.grids.values[m.name],
                               "top128": study.grids.top128[m.name]} for m in study.methods},
            "widened": study.grids.widened,
            "wall_clock": budget, "chosen": {m: {str(n): c for n, c in per.items()}
                                             for m, per in chosen.items()},
            **tables}


def _fmt(stat: dict[str, float], digits: int) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"


KNOB_NAMES = {"guidance.cfg_scale": "s", "guidance.omega": "omega", "guidance.w_max": "w_max"}


def markdown(summary: dict[str, Any]) -> str:
    lines: list[str] = ["### Grids (after widening)", "",
                        "| method | knob | values trained on seed 0 | 128-step w up to |",
                        "|---|---|---|---|"]
    for name, meta in summary["methods"].items():
        grid = summary["grids"][name]
        top = f"{grid['top128']:g}" if meta["intrinsic"] else "-"
        lines.append(f"| {meta['label']} | {KNOB_NAMES.get(meta['knob'], meta['knob'])} | "
                     f"{', '.join(f'{v:g}' for v in grid['values'])} | {top} |")
    lines.append("")
    wall = summary["wall_clock"]
    titles = [("equal_steps", f"Equal training steps ({summary['train_steps']:,})")]
    if wall is not None:
        titles.append(("equal_wall_clock",
                       f"Equal wall-clock (budget {wall['budget_s']:.0f} s of training)"))
    for table, title in titles:
        step_counts = sorted({int(n) for rows in summary[table].values() for n in rows})
        for n in step_counts:
            lines += [f"### {title}, {n} step{'s' if n > 1 else ''}", "",
                      "| method | knob | w | NFE | train steps | acc | fd-digits | cfd-digits "
                      "| spread |", "|---|---|---|---|---|---|---|---|---|"]
            for name, rows in summary[table].items():
                if str(n) not in rows:
                    continue
                r = rows[str(n)]
                meta = summary["methods"][name]
                knob = f"{KNOB_NAMES.get(meta['knob'], meta['knob'])} = {r['knob']:g}"
                sampler = " (flow CFG)" if r["sampler"] == "flow-cfg" else ""
                steps_used = sorted(set(r["train_steps"]))
                lines.append(f"| {meta['label']} | {knob} | {r['guidance']:g}{sampler} | "
                             f"{r['nfe']} | {'/'.join(map(str, steps_used))} | "
                             f"{_fmt(r['acc'], 3)} | {_fmt(r['fd-digits'], 1)} | "
                             f"{_fmt(r['cfd-digits'], 1)} | {_fmt(r['spread-digits'], 3)} |")
            lines.append("")
    if wall is None:
        return "\n".join(lines) + "\n"
    lines += ["### Training time (per step: timed alone; per run: logged, median over the "
              "reported runs)", "",
              "| method | s/step, timed alone | steps within the budget | logged s per run |",
              "|---|---|---|---|"]
    for name, sec in wall["seconds_per_step"].items():
        steps_used = sorted(set(wall["step"][name].values()))
        logged = wall["logged_train_s"][name]
        lines.append(f"| {summary['methods'][name]['label']} | {sec:.3f} | "
                     f"{'/'.join(map(str, steps_used))} | "
                     f"{'-' if logged is None else f'{logged:.0f}'} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    """cfd-digits (mean and sd over the seeds) against step count, one line per method: equal
    training steps left, equal wall-clock right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, table, title in ((axes[0], "equal_steps", f"{summary['train_steps']:,} steps each"),
                             (axes[1], "equal_wall_clock", "equal wall-clock")):
        for name, rows in summary[table].items():
            ns = sorted(int(n) for n in rows)
            if not ns:
                continue
            mean = [rows[str(n)][SELECT_BY]["mean"] for n in ns]
            sd = [rows[str(n)][SELECT_BY]["sd"] for n in ns]
            ax.errorbar(ns, mean, yerr=sd, marker="o", capsize=3,
                        label=summary["methods"][name]["label"])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sampling steps")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel(f"{SELECT_BY} (lower is better), mean ± sd")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def picture(study: Study, summary: dict[str, Any], path: Path) -> bool:
    """The methods' 1-step grids side by side (False while one is missing)."""
    grids = [(m, picture_dir(study) / f"{m.name}.png") for m in study.methods]
    if not all(p.is_file() for _, p in grids):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(grids), figsize=(2.6 * len(grids), 3.1))
    for ax, (method, png) in zip(axes, grids, strict=True):
        c = summary["chosen"][method.name]["1"]
        knob = KNOB_NAMES.get(method.knob, method.knob)
        setting = f"w = {c['guidance']:g}" if method.intrinsic else f"{knob} = {c['value']:g}"
        ax.imshow(plt.imread(png), cmap="gray")
        ax.set_title(f"{method.label}\n{setting}", fontsize=7)
        ax.axis("off")
    fig.suptitle("1 step, training seed 0, the same noise and labels for every method",
                 fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ismctl.studies.few_step",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and evaluate what has no result yet (resumable)")
    rep = sub.add_parser("report", help="the tables, from the results folder alone")
    for p in (run, rep):
        p.add_argument("--steps", type=int, default=3000, help="training steps per run")
        p.add_argument("--seeds", default="0,1,2", help="training seeds; the first tunes")
        p.add_argument("--results", type=Path, default=RESULTS,
                       help="the results folder (kept in the repository)")
        p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                       help=f"comma-separated, of: {', '.join(METHODS)}")
        p.add_argument("--method", action="append", default=[],
                       help="another method, NAME:RECIPE:KEY=V1,V2,... (repeatable): any "
                            "recipe and its knob grid, compared by the same protocol")
    run.add_argument("out", nargs="?", type=Path, default=Path("runs/few-step"),
                     help="run folders (scratch: checkpoints, logs)")
    run.add_argument("--jobs", type=int, default=2,
                     help="subprocesses (with --launch slurm: SLURM jobs) at a time")
    run.add_argument("--launch", choices=["slurm"],
                     help="run each training and evaluation as a SLURM job")
    run.add_argument("--launch-config", type=Path,
                     help="--launch slurm: a YAML file with a 'launch:' block (partition, "
                     "time, gpus_per_node, sbatch lines, ...)")
    run.add_argument("--data", help="prepared digits (default: the recipes' data/digits, "
                     "relative to the working folder)")
    rep.add_argument("--json", type=Path, help="write the summary here")
    rep.add_argument("--markdown", type=Path, help="write the tables here")
    rep.add_argument("--plot", type=Path, help="write the cfd-digits plot here (PNG)")
    rep.add_argument("--picture", type=Path, help="write the 1-step grids side by side (PNG)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    try:
        extra = [method_from_spec(spec) for spec in args.method]
    except UserError as exc:
        parser.error(str(exc))
    for method in extra:
        add_method(method)
    methods += [m.name for m in extra if m.name not in methods]
    if unknown := [m for m in methods if m not in METHODS]:
        parser.error(f"--methods: unknown {', '.join(unknown)} (known: {', '.join(METHODS)})")
    ismctl = [sys.executable, "-m", "ismctl"]
    launch = (slurm_options(args.launch_config) if getattr(args, "launch", None) == "slurm"
              else None)
    study = Study(getattr(args, "out", Path("runs/few-step")), args.steps, seeds,
                  getattr(args, "jobs", 1), ismctl, getattr(args, "data", None), args.results,
                  methods, launch)
    if args.command == "run":
        run_study(study)
    summary = summarise(study)
    text = markdown(summary)
    if args.command == "report":
        if args.json:
            write_json(args.json, summary)
        if args.markdown:
            atomic_write_text(args.markdown, text)
        if args.plot:
            plot(summary, args.plot)
        if args.picture and not picture(study, summary, args.picture):
            print(f"--picture: not every method's grid is in {picture_dir(study)} yet")
    print(text)


if __name__ == "__main__":
    main()
