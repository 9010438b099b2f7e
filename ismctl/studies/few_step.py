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
  guidance rows), both, both plus the wavelet loss, and both plus intrinsic guidance (w an
  input, ``objective.meanflow_guidance=intrinsic``).

Each method's guidance knob is tuned with one protocol. A knob baked into training (SM's CFG
scale, MeanFlow's omega) is a grid of training runs; an intrinsic method's w is a grid at
sampling, up to the ``guidance.w_max`` it was trained with. The choice is made per method and
step count on training seed ``seeds[0]`` and sampling seed ``SELECT_SEED``; every reported
number comes from the chosen setting at sampling seed ``REPORT_SEED``, for every training seed:
the choice never sees the samples it is scored on. No choice may sit on an edge of its grid.
A baked knob's grid grows by one value above its top, and MeanFlow's also below its bottom
(below CFG scale 1 its target leans towards the unconditional velocity), by one step or, where
that would reach scale 0 (the unconditional model), half-way to it; an sm recipe takes scales
from 1 up. An intrinsic method's
128-step w grid grows by 0.5, and when the best w is the largest w trained, a run with a larger
``w_max`` joins the grid. Then the choice is made again (``MAX_ROUNDS`` times at most; what
still sits on an edge is reported). An intrinsic method's w = 0 is the end of the range it was
trained on, not of a grid.

Equal wall-clock: each method's seconds per training step are measured in one sitting once
everything else is done (``TIME_ROUNDS`` interleaved rounds of a ``TIME_STEPS``-step run per
method, one process at a time, so no two methods share the machine's cores and all see the same
machine), and each is evaluated at its last checkpoint (every ``CKPT_EVERY`` steps) within the
fastest method's full training time. The study's own training logs are not used for this: the
runs share the cores two at a time, with each other and with whatever else the machine runs.

    python -m ismctl.studies.few_step run runs/few-step --steps 3000 --seeds 0,1,2
    python -m ismctl.studies.few_step report runs/few-step --steps 3000 \\
        --json docs/few_step_digits/results.json --markdown docs/few_step_digits/tables.md \\
        --plot docs/few_step_digits.png

Training and evaluation run as ``ismctl`` subprocesses (``--jobs`` at a time, one thread each);
a run whose final checkpoint exists and an evaluation whose results file exists are reused, so
an interrupted study continues where it stopped. Once a run is trained its intermediate
checkpoints keep only the inference weights, all an evaluation reads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
MF = "meanflow_digits"
SOT = ("coupling.pool_size=256",)
TWIN = ("ema.target_enabled=true",)
# Trained on every seed whatever the choice: the ablation study's baseline and full-iSM rows.
FORCED = {"sm": 1.5, "ism": 1.5}


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

    def run_name(self, value: float, seed: int) -> str:
        return f"{self.name}_{self.short}{value:g}-seed{seed}"

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


def nfe(steps: int, sampler: str) -> int:
    """Network evaluations per sample: two-pass CFG costs 2 per step (method §2)."""
    return steps * (2 if sampler == "flow-cfg" else 1)


class Grids:
    """Each method's knob values and its 128-step w ceiling, as widened so far (``grids.json``:
    an interrupted study resumes with the grids it had reached)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        stored = json.loads(path.read_text()) if path.is_file() else {}
        self.values = {m.name: sorted(set(stored.get(m.name, {}).get("values", m.values)))
                       for m in METHODS.values()}
        self.top128 = {m.name: float(stored.get(m.name, {}).get("top128", TOP_128))
                       for m in METHODS.values()}

    def save(self) -> None:
        write_json(self.path, {name: {"values": self.values[name], "top128": self.top128[name]}
                               for name in self.values})

    def w_grid(self, method: Method, value: float, steps: int) -> list[float]:
        """The sampling strengths of one run at ``steps``: w = 0 for baked methods (SM adds its
        flow-CFG entry at 128 steps itself); 0..top in ``W_STEP`` for intrinsic ones, top being
        the run's w_max (at 128 steps at most the method's ceiling)."""
        if not method.intrinsic:
            return [0.0]
        top = value if steps != 128 else min(value, self.top128[method.name])
        return [round(k * W_STEP, 6) for k in range(int(round(top / W_STEP)) + 1)]


class Study:
    """The runs and evaluations of one study folder."""

    def __init__(self, out: Path, train_steps: int, seeds: list[int], jobs: int,
                 ismctl: list[str], data: str | None = None) -> None:
        self.out, self.train_steps, self.seeds, self.jobs = out, train_steps, seeds, jobs
        self.ismctl, self.data = ismctl, data
        (out / "logs").mkdir(parents=True, exist_ok=True)
        self.grids = Grids(out / "grids.json")

    def run_dir(self, method: Method, value: float, seed: int) -> Path:
        return self.out / method.run_name(value, seed)

    def checkpoint(self, run_dir: Path, step: int) -> Path:
        return run_dir / "checkpoints" / f"step-{step:07d}"

    def trained(self, run_dir: Path) -> bool:
        return self.checkpoint(run_dir, self.train_steps).is_dir()

    def _call(self, args: list[str], log: Path) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with log.open("w") as fh:
            done = subprocess.run([*self.ismctl, *args, "--threads", "1"], stdout=fh,
                                  stderr=subprocess.STDOUT, env=env, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"`ismctl {' '.join(args)}` failed ({done.returncode}): see {log}")

    def train(self, method: Method, value: float, seed: int) -> None:
        run_dir = self.run_dir(method, value, seed)
        if not self.trained(run_dir):
            sets = [*method.train_overrides(value, seed), f"train.steps={self.train_steps}",
                    f"run.ckpt_every={CKPT_EVERY}", f"run.keep_every={CKPT_EVERY}",
                    f"run.root={self.out}", f"run.name={run_dir.name}",
                    *([f"data.path={self.data}"] if self.data else [])]
            args = ["train", method.recipe, *[a for s in sets for a in ("--set", s)],
                    "--auto-resume", "--no-progress"]
            self._call(args, self.out / "logs" / f"train-{run_dir.name}.log")
        slim_checkpoints(run_dir, self.train_steps)

    def eval_file(self, run_dir: Path, step: int, steps: int, seed: int) -> Path:
        return run_dir / "few-step" / f"step{step}-{steps}steps-seed{seed}.json"

    def evaluate(self, run_dir: Path, step: int, steps: int, grid: list[float],
                 seed: int) -> dict[str, Any]:
        """The evaluation of ``grid`` at one checkpoint, step count and sampling seed; a file
        that lacks a requested w (the grid has grown since) is extended, not redone."""
        out = self.eval_file(run_dir, step, steps, seed)
        have = json.loads(out.read_text()) if out.is_file() else None
        done = {p["guidance"] for p in have["points"]} if have else set()
        missing = [w for w in grid if w not in done]
        if not missing:
            return have
        part = out.with_name(out.stem + f"-part{len(done)}.json")
        args = ["eval", str(self.checkpoint(run_dir, step)), "--steps", str(steps),
                "--guidance", ",".join(f"{w:g}" for w in missing), "--seed", str(seed),
                "--num-samples", str(NUM_SAMPLES), "--metrics", ",".join(METRICS),
                "--select-by", SELECT_BY, "--no-remember", "--out", str(part)]
        self._call(args, self.out / "logs" / f"eval-{run_dir.name}-{part.stem}.log")
        new = json.loads(part.read_text())
        if have:
            # Points with a sampler of their own (SM's flow CFG) are evaluated once.
            seen = {(p["guidance"], p["sampler"]) for p in have["points"]}
            new["points"] = have["points"] + [p for p in new["points"]
                                              if (p["guidance"], p["sampler"]) not in seen]
        write_json(out, new)
        part.unlink()
        return new

    def parallel(self, tasks: Iterable[Callable[[], Any]]) -> list[Any]:
        with ThreadPoolExecutor(self.jobs) as pool:
            return [f.result() for f in [pool.submit(t) for t in tasks]]


def slim_checkpoints(run_dir: Path, final: int) -> None:
    """Keep only the inference weights in every checkpoint but the final one (evaluations read
    nothing else; a study's 30 full checkpoints per run would take ~0.8 GB)."""
    for ckpt in sorted((run_dir / "checkpoints").glob("step-*")):
        if ckpt.name == f"step-{final:07d}" or not (ckpt / "inference_ema.safetensors").is_file():
            continue
        for name in ("state.pt", "online.safetensors", "target_ema.safetensors"):
            (ckpt / name).unlink(missing_ok=True)


def points(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in results["points"] if SELECT_BY in p["metrics"]]


def choose(study: Study) -> dict[str, dict[int, dict[str, Any]]]:
    """Per method and step count, the knob value, w and sampler with the lowest selection
    metric on training seed ``seeds[0]`` and sampling seed ``SELECT_SEED``, among the points of
    the current grids."""
    seed = study.seeds[0]
    chosen: dict[str, dict[int, dict[str, Any]]] = {}
    for method in METHODS.values():
        chosen[method.name] = {}
        for n in STEPS:
            candidates = []
            for value in study.grids.values[method.name]:
                run_dir = study.run_dir(method, value, seed)
                res = json.loads(study.eval_file(run_dir, study.train_steps, n,
                                                 SELECT_SEED).read_text())
                grid = set(study.grids.w_grid(method, value, n))
                candidates += [{"value": value, "guidance": p["guidance"],
                                "sampler": p["sampler"], SELECT_BY: p["metrics"][SELECT_BY]}
                               for p in points(res)
                               if p["guidance"] in grid or p["sampler"] == "flow-cfg"]
            best = min(candidates, key=lambda c: c[SELECT_BY])
            chosen[method.name][n] = {**best, "candidates": len(candidates)}
    return chosen


def edges(study: Study, chosen: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
    """Grow every grid whose chosen point sits on its edge; returns what was grown."""
    grown: list[str] = []
    g = study.grids
    for method in METHODS.values():
        values = g.values[method.name]
        for n, c in chosen[method.name].items():
            if not method.intrinsic:
                # One step down, or half-way to 0 where a step would reach it (scale 0 is the
                # unconditional model).
                low = min(values) - method.widen_down
                low = round(low if low > 0 else min(values) / 2, 6)
                if c["value"] == min(values) and method.widen_down:
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
                if new not in values:
                    values.append(new)
                    grown.append(f"{method.name}: {method.knob} {new:g} ({n} steps chose the "
                                 "edge)")
    g.save()
    return grown


def tune(study: Study) -> dict[str, Any]:
    """Train and evaluate the first seed over the grids, choose, grow the grids whose choice
    sits on an edge, and choose again (``MAX_ROUNDS`` at most)."""
    first = study.seeds[0]
    history: list[list[str]] = []
    for _ in range(MAX_ROUNDS + 1):
        g = study.grids
        runs = [(m, v) for m in METHODS.values() for v in g.values[m.name]]
        study.parallel(lambda r=r: study.train(r[0], r[1], first) for r in runs)
        study.parallel(lambda m=m, v=v, n=n, w=g.w_grid(m, v, n): study.evaluate(
            study.run_dir(m, v, first), study.train_steps, n, w, SELECT_SEED)
            for m, v in runs for n in STEPS)
        chosen = choose(study)
        if len(history) == MAX_ROUNDS:
            break
        grown = edges(study, chosen)
        if not grown:
            break
        history.append(grown)
    return {"chosen": chosen, "widened": history, "grids": {
        name: {"values": study.grids.values[name], "top128": study.grids.top128[name]}
        for name in study.grids.values}}


def run_study(study: Study) -> None:
    tuned = tune(study)
    chosen = tuned["chosen"]
    write_json(study.out / "chosen.json", tuned)
    rest = study.seeds[1:]
    needed = sorted({(name, c["value"], s) for name, per in chosen.items()
                     for c in per.values() for s in rest}
                    | {(name, value, s) for name, value in FORCED.items() for s in rest})
    study.parallel(lambda r=r: study.train(METHODS[r[0]], r[1], r[2]) for r in needed)
    study.parallel(lambda m=m, n=n, s=s: report_eval(study, chosen, m, n, s, study.train_steps)
                   for m in METHODS.values() for n in STEPS for s in study.seeds)
    budget = wall_budget(study, chosen)
    study.parallel(lambda m=m, n=n, s=s: report_eval(study, chosen, m, n, s,
                                                     budget["step"][m.name][str(s)])
                   for m in METHODS.values() for n in WALL_STEPS for s in study.seeds)


def report_eval(study: Study, chosen: dict[str, dict[int, dict[str, Any]]], method: Method,
                n: int, seed: int, step: int) -> dict[str, Any]:
    c = chosen[method.name][n]
    run_dir = study.run_dir(method, c["value"], seed)
    # A baked knob samples at w = 0 (sm adds its flow-CFG entry at 128 steps by itself).
    return study.evaluate(run_dir, step, n, [c["guidance"] if method.intrinsic else 0.0],
                          REPORT_SEED)


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


def time_methods(study: Study, chosen: dict[str, dict[int, dict[str, Any]]],
                 measure: bool = True) -> dict[str, float] | None:
    """Seconds per training step of every method, measured in one sitting: a ``TIME_STEPS``-step
    run of its chosen setting (at 1 step; the knob's value does not change the cost), one
    process at a time, methods interleaved over ``TIME_ROUNDS`` rounds so that a slow spell of
    the machine falls on all of them; the median over the rounds. Each measurement is kept in
    ``timing.json`` as it is made (the timing run itself is deleted), so this resumes too.
    ``measure=False`` (the report) only reads: None while a measurement is missing."""
    path = study.out / "timing.json"
    have: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}
    root = study.out / "timing"
    for r in range(TIME_ROUNDS):
        for method in METHODS.values():
            key = f"{method.name}/round{r}"
            if key in have:
                continue
            if not measure:
                return None
            run_dir = root / f"{method.name}-round{r}"
            shutil.rmtree(run_dir, ignore_errors=True)
            sets = [*method.train_overrides(chosen[method.name][1]["value"], study.seeds[0]),
                    f"train.steps={TIME_STEPS}", f"run.log_every={TIME_LOG}",
                    f"run.ckpt_every={TIME_STEPS}", f"run.sample_every={TIME_STEPS}",
                    f"run.root={root}", f"run.name={run_dir.name}",
                    *([f"data.path={study.data}"] if study.data else [])]
            study._call(["train", method.recipe, *[a for s in sets for a in ("--set", s)],
                         "--no-progress"], study.out / "logs" / f"time-{run_dir.name}.log")
            have[key] = timed_seconds(run_dir)
            write_json(path, have)
            shutil.rmtree(run_dir)
    return {name: statistics.median(have[f"{name}/round{r}"] for r in range(TIME_ROUNDS))
            for name in METHODS}


def wall_budget(study: Study, chosen: dict[str, dict[int, dict[str, Any]]],
                measure: bool = True) -> dict[str, Any] | None:
    """Seconds per step of each method (``time_methods``), the budget (the fastest method's
    full run) and, per method and seed, the last kept checkpoint within it; beside them each
    method's logged training time (median over its reported runs, other jobs included). None
    when ``measure`` is False and the timing is not complete."""
    per_step = time_methods(study, chosen, measure)
    if per_step is None:
        return None
    logged: dict[str, float] = {}
    for method in METHODS.values():
        runs = [study.run_dir(method, value, seed)
                for value in {c["value"] for c in chosen[method.name].values()}
                for seed in study.seeds]
        logged[method.name] = statistics.median(train_seconds(r) for r in runs)
    budget = min(per_step.values()) * study.train_steps
    reached = {name: CKPT_EVERY * math.floor(budget / sec / CKPT_EVERY + 1e-9)
               for name, sec in per_step.items()}
    step = {name: {str(s): min(study.train_steps, max(CKPT_EVERY, n)) for s in study.seeds}
            for name, n in reached.items()}
    return {"seconds_per_step": per_step, "logged_train_s": logged, "budget_s": budget,
            "step": step}


def _mean_sd(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def summarise(study: Study) -> dict[str, Any]:
    tuned = json.loads((study.out / "chosen.json").read_text())
    chosen = {m: {int(n): c for n, c in per.items()} for m, per in tuned["chosen"].items()}
    budget = wall_budget(study, chosen, measure=False)
    tables: dict[str, Any] = {"equal_steps": {}, "equal_wall_clock": {}}
    for table, step_counts in (("equal_steps", STEPS), ("equal_wall_clock", WALL_STEPS)):
        if table == "equal_wall_clock" and budget is None:
            continue   # not timed yet: no wall-clock table
        for method in METHODS.values():
            rows = {}
            for n in step_counts:
                c = chosen[method.name][n]
                values: dict[str, list[float]] = {k: [] for k in METRICS}
                steps_used = [study.train_steps if table == "equal_steps"
                              else budget["step"][method.name][str(seed)]
                              for seed in study.seeds]
                files = [study.eval_file(study.run_dir(method, c["value"], seed), step, n,
                                         REPORT_SEED)
                         for seed, step in zip(study.seeds, steps_used, strict=True)]
                if not all(f.is_file() for f in files):
                    continue   # not evaluated (yet): the row is left out, not guessed
                for file in files:
                    res = json.loads(file.read_text())
                    point = next(p for p in res["points"] if p["sampler"] == c["sampler"]
                                 and p["guidance"] == c["guidance"])
                    for k in METRICS:
                        values[k].append(point["metrics"][k])
                rows[str(n)] = {"knob": c["value"], "guidance": c["guidance"],
                                "sampler": c["sampler"], "nfe": nfe(n, c["sampler"]),
                                "train_steps": steps_used, "candidates": c["candidates"],
                                **{k: _mean_sd(v) for k, v in values.items()}}
            tables[table][method.name] = rows
    return {"train_steps": study.train_steps, "seeds": study.seeds, "steps": list(STEPS),
            "select": {"by": SELECT_BY, "training_seed": study.seeds[0],
                       "sampling_seed": SELECT_SEED},
            "report_sampling_seed": REPORT_SEED, "num_samples": NUM_SAMPLES,
            "methods": {m.name: {"label": m.label, "recipe": m.recipe,
                                 "overrides": list(m.overrides), "knob": m.knob,
                                 "intrinsic": m.intrinsic}
                        for m in METHODS.values()},
            "grids": tuned["grids"], "widened": tuned["widened"],
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
        lines.append(f"| {summary['methods'][name]['label']} | {sec:.3f} | "
                     f"{'/'.join(map(str, steps_used))} | {wall['logged_train_s'][name]:.0f} |")
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ismctl.studies.few_step",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and evaluate every method (resumable)")
    rep = sub.add_parser("report", help="tables of a finished study")
    for p in (run, rep):
        p.add_argument("out", nargs="?", type=Path, default=Path("runs/few-step"))
        p.add_argument("--steps", type=int, default=3000, help="training steps per run")
        p.add_argument("--seeds", default="0,1,2", help="training seeds; the first tunes")
    run.add_argument("--jobs", type=int, default=2, help="subprocesses at a time")
    run.add_argument("--data", help="prepared digits (default: the recipes' data/digits, "
                     "relative to the working folder)")
    rep.add_argument("--json", type=Path, help="write the summary here")
    rep.add_argument("--markdown", type=Path, help="write the tables here")
    rep.add_argument("--plot", type=Path, help="write the cfd-digits plot here (PNG)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    ismctl = [sys.executable, "-m", "ismctl"]
    study = Study(args.out, args.steps, seeds, getattr(args, "jobs", 1), ismctl,
                  getattr(args, "data", None))
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
    print(text)


if __name__ == "__main__":
    main()
