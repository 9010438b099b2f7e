"""Few-step generation on the built-in digits: SM, iSM, MeanFlow, and MeanFlow with iSM's sOT
and twin EMA, each tuned the same way and compared at 1, 2, 4 and 128 steps (SPEC 4.1,
``docs/few_step_digits.md``).

Every method is the quickstart's network, data, optimiser and schedule (``recipes/
quickstart.yaml``, ``recipes/meanflow_digits.yaml``) with its own objective:

- ``sm``: the shortcut-model baseline (SPEC 2): CFG at ``guidance.cfg_scale`` baked into the
  finest bootstrap targets, MSE, independent pairing, one 0.999 EMA, sampled by its authors'
  protocol (the conditional output; at 128 steps also two-pass CFG on the d = 0 flow).
- ``ism``: the quickstart (every iSM component), w an input of the network.
- ``meanflow``: MeanFlow's objective with its CFG baked into the target (``guidance.omega``,
  kappa 0.5), MSE, independent pairing, targets from the online weights, sampled at w = 0.
- ``meanflow+sot+twin-ema``: the same with the quickstart's within-class sOT pools and its
  0.95 target EMA as the network of the JVP target.

Each method's guidance knob is tuned with the same protocol. A knob baked into training
(SM's CFG scale, MeanFlow's omega) is a grid of training runs; iSM's w is a grid at sampling.
The knob is chosen per method and step count on training seed ``seeds[0]`` and sampling seed
``SELECT_SEED``, and every reported number comes from the chosen setting at sampling seed
``REPORT_SEED``, for every training seed: the choice never sees the samples it is scored on.
Equal wall-clock: the methods' training times per step are read from their logs, and each is
also evaluated at the last kept checkpoint within the fastest method's full training time.

    python -m ismctl.studies.few_step run runs/few-step --steps 1000 --seeds 0,1,2
    python -m ismctl.studies.few_step report runs/few-step \\
        --json docs/few_step_digits/results.json --markdown docs/few_step_digits/tables.md \\
        --plot docs/few_step_digits.png

Training and evaluation run as ``ismctl`` subprocesses (``--jobs`` at a time, one thread each);
a run whose final checkpoint exists and an evaluation whose results file exists are reused, so
an interrupted study continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ismctl.fileio import atomic_path, atomic_write_text, write_json

STEPS = (1, 2, 4, 128)
SELECT_SEED, REPORT_SEED = 1, 0
METRICS = ("acc", "fd-digits", "cfd-digits")
SELECT_BY = "cfd-digits"
NUM_SAMPLES = 1000
CKPT_EVERY = 250   # kept checkpoints: the equal-wall-clock points
# Wall-clock: the few-step counts only (a 128-step point costs as much as ~40 few-step ones).
WALL_STEPS = (1, 2, 4)
SM_OFF = ("objective.mode=sm", "guidance.interval_start=0", "loss.name=mse",
          "coupling.pool_size=0", "ema.target_decay=0.999")
ISM_W = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]


@dataclass(frozen=True)
class Method:
    """One row of the comparison: a recipe, its overrides and its guidance knob."""

    name: str
    label: str
    recipe: str
    overrides: tuple[str, ...] = ()
    knob: str | None = None        # recipe field baked into training, one run per value
    short: str = ""                # run-name tag of the knob
    values: tuple[float, ...] = ()
    w_grid: dict[int, list[float]] = field(default_factory=dict)   # sampling grid per N

    def grid(self, steps: int) -> list[float]:
        return self.w_grid.get(steps, [0.0])

    def run_name(self, value: float | None, seed: int) -> str:
        tag = "" if self.knob is None else f"_{self.short}{value:g}"
        return f"{self.name}{tag}-seed{seed}"

    def train_overrides(self, value: float | None, seed: int) -> list[str]:
        knob = [] if self.knob is None else [f"{self.knob}={value:g}"]
        return [*self.overrides, *knob, f"train.seed={seed}"]


# CFG scale s in {1, 1.5, 2} for both baked methods (MeanFlow: s = omega / (1 - kappa),
# kappa 0.5), and the quickstart's w grid for iSM (w = s - 1 in {0, ..., 1.5}).
METHODS = {m.name: m for m in (
    Method("sm", "SM (authors' protocol)", "recipes/quickstart.yaml", SM_OFF,
           "guidance.cfg_scale", "cfg", (1.0, 1.5, 2.0)),
    Method("ism", "iSM (quickstart)", "recipes/quickstart.yaml",
           w_grid={1: ISM_W, 2: ISM_W, 4: ISM_W, 128: [0.0, 0.25, 0.5]}),
    Method("meanflow", "MeanFlow", "recipes/meanflow_digits.yaml", (),
           "guidance.omega", "omega", (0.5, 0.75, 1.0)),
    Method("meanflow+sot+twin-ema", "MeanFlow + sOT + twin EMA", "recipes/meanflow_digits.yaml",
           ("coupling.pool_size=256", "ema.target_enabled=true"),
           "guidance.omega", "omega", (0.5, 0.75, 1.0)),
)}


def nfe(method: Method, steps: int, sampler: str) -> int:
    """Network evaluations per sample: two-pass CFG costs 2 per step (SPEC 2)."""
    return steps * (2 if sampler == "flow-cfg" else 1)


class Study:
    """The runs and evaluations of one study folder."""

    def __init__(self, out: Path, train_steps: int, seeds: list[int], jobs: int,
                 ismctl: list[str]) -> None:
        self.out, self.train_steps, self.seeds, self.jobs = out, train_steps, seeds, jobs
        self.ismctl = ismctl
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def run_dir(self, method: Method, value: float | None, seed: int) -> Path:
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

    def train(self, method: Method, value: float | None, seed: int) -> None:
        run_dir = self.run_dir(method, value, seed)
        if self.trained(run_dir):
            return
        sets = [*method.train_overrides(value, seed), f"train.steps={self.train_steps}",
                f"run.ckpt_every={CKPT_EVERY}", f"run.keep_every={CKPT_EVERY}",
                f"run.root={self.out}", f"run.name={run_dir.name}"]
        args = ["train", method.recipe, *[a for s in sets for a in ("--set", s)],
                "--auto-resume", "--no-progress"]
        self._call(args, self.out / "logs" / f"train-{run_dir.name}.log")

    def eval_file(self, run_dir: Path, step: int, steps: int, seed: int) -> Path:
        return run_dir / "few-step" / f"step{step}-{steps}steps-seed{seed}.json"

    def evaluate(self, run_dir: Path, step: int, steps: int, grid: list[float],
                 seed: int) -> dict[str, Any]:
        out = self.eval_file(run_dir, step, steps, seed)
        if not out.is_file():
            args = ["eval", str(self.checkpoint(run_dir, step)), "--steps", str(steps),
                    "--guidance", ",".join(f"{w:g}" for w in grid), "--seed", str(seed),
                    "--num-samples", str(NUM_SAMPLES), "--metrics", ",".join(METRICS),
                    "--select-by", SELECT_BY, "--no-remember", "--out", str(out)]
            self._call(args, self.out / "logs" / f"eval-{run_dir.name}-{out.stem}.log")
        return json.loads(out.read_text())

    def parallel(self, tasks: Iterable[Callable[[], Any]]) -> list[Any]:
        with ThreadPoolExecutor(self.jobs) as pool:
            return [f.result() for f in [pool.submit(t) for t in tasks]]


def points(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in results["points"] if SELECT_BY in p["metrics"]]


def choose(study: Study) -> dict[str, dict[int, dict[str, Any]]]:
    """Per method and step count, the knob value, w and sampler with the lowest selection
    metric on training seed ``seeds[0]`` and sampling seed ``SELECT_SEED``."""
    seed = study.seeds[0]
    chosen: dict[str, dict[int, dict[str, Any]]] = {}
    for method in METHODS.values():
        chosen[method.name] = {}
        for n in STEPS:
            candidates = []
            for value in method.values or (None,):
                run_dir = study.run_dir(method, value, seed)
                res = json.loads(study.eval_file(run_dir, study.train_steps, n,
                                                 SELECT_SEED).read_text())
                candidates += [{"value": value, "guidance": p["guidance"],
                                "sampler": p["sampler"], SELECT_BY: p["metrics"][SELECT_BY]}
                               for p in points(res)]
            best = min(candidates, key=lambda c: c[SELECT_BY])
            chosen[method.name][n] = {**best, "candidates": len(candidates)}
    return chosen


def run_study(study: Study) -> None:
    first, rest = study.seeds[0], study.seeds[1:]
    grid_runs = [(m, v, first) for m in METHODS.values() for v in (m.values or (None,))]
    free_runs = [(m, None, s) for m in METHODS.values() if m.knob is None for s in rest]
    study.parallel(lambda r=r: study.train(*r) for r in grid_runs + free_runs)
    study.parallel(lambda m=m, v=v, n=n: study.evaluate(study.run_dir(m, v, first),
                                                         study.train_steps, n, m.grid(n),
                                                         SELECT_SEED)
                   for m, v, _ in grid_runs for n in STEPS)
    chosen = choose(study)
    write_json(study.out / "chosen.json", chosen)
    needed = sorted({(name, c["value"], s) for name, per in chosen.items()
                     for c in per.values() for s in rest if c["value"] is not None})
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
    grid = [c["guidance"]] if method.knob is None else method.grid(n)
    return study.evaluate(run_dir, step, n, grid, REPORT_SEED)


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


def step_seconds(run_dir: Path) -> float:
    """Seconds per step on an undisturbed machine, estimated from the log: the mean of the
    fastest quarter of the logged intervals (the first, which holds the start-up, left out).
    Other jobs only ever slow a step down, so the fastest intervals are the least disturbed."""
    per_step = sorted(1.0 / rate for _, rate in _logged_rates(run_dir)[1:])
    return statistics.fmean(per_step[:max(1, len(per_step) // 4)])


def wall_budget(study: Study, chosen: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """Seconds per step of each method (median of ``step_seconds`` over its reported runs), the
    budget (the fastest method's full run) and, per method and seed, the last kept checkpoint
    within it."""
    per_step: dict[str, float] = {}
    logged: dict[str, float] = {}
    for method in METHODS.values():
        runs = [study.run_dir(method, value, seed)
                for value in {c["value"] for c in chosen[method.name].values()}
                for seed in study.seeds]
        per_step[method.name] = statistics.median(step_seconds(r) for r in runs)
        logged[method.name] = statistics.median(train_seconds(r) for r in runs)
    budget = min(per_step.values()) * study.train_steps
    reached = {name: CKPT_EVERY * math.floor(budget / sec / CKPT_EVERY)
               for name, sec in per_step.items()}
    step = {name: {str(s): min(study.train_steps, max(CKPT_EVERY, n)) for s in study.seeds}
            for name, n in reached.items()}
    return {"seconds_per_step": per_step, "logged_train_s": logged, "budget_s": budget,
            "step": step}


def _mean_sd(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def summarise(study: Study) -> dict[str, Any]:
    chosen = {m: {int(n): c for n, c in per.items()}
              for m, per in json.loads((study.out / "chosen.json").read_text()).items()}
    budget = wall_budget(study, chosen)
    tables: dict[str, Any] = {"equal_steps": {}, "equal_wall_clock": {}}
    for table, step_counts in (("equal_steps", STEPS), ("equal_wall_clock", WALL_STEPS)):
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
                if table == "equal_wall_clock" and not all(f.is_file() for f in files):
                    continue   # not evaluated (yet): the row is left out, not guessed
                for file in files:
                    res = json.loads(file.read_text())
                    point = next(p for p in res["points"] if p["sampler"] == c["sampler"]
                                 and p["guidance"] == c["guidance"])
                    for k in METRICS:
                        values[k].append(point["metrics"][k])
                rows[str(n)] = {"knob": c["value"], "guidance": c["guidance"],
                                "sampler": c["sampler"], "nfe": nfe(method, n, c["sampler"]),
                                "train_steps": steps_used, "candidates": c["candidates"],
                                **{k: _mean_sd(v) for k, v in values.items()}}
            tables[table][method.name] = rows
    return {"train_steps": study.train_steps, "seeds": study.seeds, "steps": list(STEPS),
            "select": {"by": SELECT_BY, "training_seed": study.seeds[0],
                       "sampling_seed": SELECT_SEED},
            "report_sampling_seed": REPORT_SEED, "num_samples": NUM_SAMPLES,
            "methods": {m.name: {"label": m.label, "recipe": m.recipe,
                                 "overrides": list(m.overrides), "knob": m.knob,
                                 "values": list(m.values), "w_grid": m.w_grid}
                        for m in METHODS.values()},
            "wall_clock": budget, "chosen": {m: {str(n): c for n, c in per.items()}
                                             for m, per in chosen.items()},
            **tables}


def _fmt(stat: dict[str, float], digits: int) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"


def markdown(summary: dict[str, Any]) -> str:
    lines: list[str] = []
    knob_name = {"guidance.cfg_scale": "s", "guidance.omega": "omega"}
    for table, title in (("equal_steps", f"Equal training steps ({summary['train_steps']:,})"),
                         ("equal_wall_clock", "Equal wall-clock (budget "
                          f"{summary['wall_clock']['budget_s']:.0f} s of training)")):
        step_counts = sorted({int(n) for rows in summary[table].values() for n in rows})
        for n in step_counts:
            lines += [f"### {title}, {n} step{'s' if n > 1 else ''}", "",
                      "| method | knob | w | NFE | train steps | acc | fd-digits | cfd-digits |",
                      "|---|---|---|---|---|---|---|---|"]
            for name, rows in summary[table].items():
                if str(n) not in rows:
                    continue
                r = rows[str(n)]
                meta = summary["methods"][name]
                knob = ("-" if meta["knob"] is None
                        else f"{knob_name.get(meta['knob'], meta['knob'])} = {r['knob']:g}")
                sampler = " (flow CFG)" if r["sampler"] == "flow-cfg" else ""
                steps_used = sorted(set(r["train_steps"]))
                lines.append(f"| {meta['label']} | {knob} | {r['guidance']:g}{sampler} | "
                             f"{r['nfe']} | {'/'.join(map(str, steps_used))} | "
                             f"{_fmt(r['acc'], 3)} | {_fmt(r['fd-digits'], 1)} | "
                             f"{_fmt(r['cfd-digits'], 1)} |")
            lines.append("")
    wall = summary["wall_clock"]
    lines += ["### Training time (median over the reported runs)", "",
              "| method | s/step, undisturbed | steps within the budget | logged s per run |",
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

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
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
    axes[0].legend(fontsize=8)
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
        p.add_argument("--steps", type=int, default=1000, help="training steps per run")
        p.add_argument("--seeds", default="0,1,2", help="training seeds; the first tunes")
    run.add_argument("--jobs", type=int, default=2, help="subprocesses at a time")
    rep.add_argument("--json", type=Path, help="write the summary here")
    rep.add_argument("--markdown", type=Path, help="write the tables here")
    rep.add_argument("--plot", type=Path, help="write the cfd-digits plot here (PNG)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    ismctl = [sys.executable, "-m", "ismctl"]
    study = Study(args.out, args.steps, seeds, getattr(args, "jobs", 1), ismctl)
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
