"""How a run is sampled: the sampler and the guidance strength for each step count.

Each objective declares its sampling protocol (``Sampling``, ismctl.config.plugins); this module
turns it into sampling points and names no method:

- "intrinsic" runs take w as a network input (iSM, method §3.1; intrinsic meanflow): any
  w >= 0, one pass per step, and the best w differs per step count (a 1-step jump needs another
  strength than a 128-step path).
- "baked" runs carry their guidance in their weights (sm's shortcuts carry the CFG of their
  training targets, method §2; baked meanflow, method §4.1): every step count samples the
  conditional output alone (w = 0), one pass per step. A protocol may add a separate entry at
  the finest step count with two-pass CFG on the flow velocity (sm's authors' 128-step CFG
  entry). CFG on top of the baked-in guidance (``double_guidance``) guides twice and is only
  reachable on request.

``ismctl eval`` picks the best point per step count and remembers it in the run directory
(``guidance.json``); ``ismctl sample`` without ``--guidance`` uses it, else the recipe's
``eval.default_guidance``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ismctl.config.recipe import Recipe
from ismctl.objectives import get_objective, sampling
from ismctl.sampling.sampler import TWO_PASS
from ismctl.utils.errors import UserError
from ismctl.utils.fileio import atomic_write_text

BEST_FILE = "guidance.json"
# The guidance value that asks for the remembered best point (`--guidance best`).
BEST = "best"
# A guidance grid: one list for every step count, or one list per step count (a 128-step
# point costs 128 times a 1-step one, so a coarser grid there saves most of the time).
Grid = list[float] | dict[int, list[float]]


@dataclass(frozen=True)
class Point:
    """One way to sample: N steps, guidance w (CFG scale 1 + w) and the sampler."""

    steps: int
    guidance: float
    sampler: str

    def tag(self) -> str:
        """File-name tag, e.g. ``4steps-w1`` (the sampler named when it is a two-pass one)."""
        extra = f"-{self.sampler}" if self.sampler in TWO_PASS else ""
        return f"{self.steps}steps-w{self.guidance:g}{extra}"

    def nfe(self) -> int:
        """Network evaluations per sample: one per step, two for a two-pass CFG entry."""
        return self.steps * (2 if self.sampler in TWO_PASS else 1)

    def label(self) -> str:
        return f"{self.steps} step{'s' if self.steps != 1 else ''}, w={self.guidance:g}" + (
            f" ({self.sampler})" if self.sampler in TWO_PASS else "")


def run_sampler(recipe: Recipe, double_guidance: bool = False) -> str:
    """The one-pass sampler of a run, from its objective's protocol: intrinsic guidance, or the
    conditional output of a baked-guidance run; ``double_guidance`` turns the latter into CFG
    on top of the baked-in guidance."""
    protocol = sampling(recipe)
    if protocol.guidance == "intrinsic":
        if double_guidance:
            raise UserError("--double-guidance: only for runs with baked-in guidance (this run "
                            "takes w as a network input; there is nothing baked in to add to)")
        return "intrinsic"
    if double_guidance and not get_objective(recipe.objective.mode).needs.null_label:
        raise UserError(f"--double-guidance: objective {recipe.objective.mode!r} does not train "
                        "the null label, so there is no unconditional velocity for CFG")
    return "cfg" if double_guidance else "conditional"


def _nearest(keys: list[int], steps: int) -> int:
    """The listed step count nearest to ``steps`` on a log2 scale (the coarser on a tie)."""
    return min(keys, key=lambda s: (abs(math.log2(s) - math.log2(steps)), s))


def grid_for(guidance: Grid, steps: int) -> list[float]:
    """The strengths to evaluate at ``steps``: the list, or the nearest step count's list."""
    if isinstance(guidance, dict):
        return [float(w) for w in guidance[_nearest(list(guidance), steps)]]
    return [float(w) for w in guidance]


def all_strengths(guidance: Grid) -> list[float]:
    values = (w for ws in guidance.values() for w in ws) if isinstance(guidance, dict) else guidance
    return sorted({float(w) for w in values})


def describe_grid(guidance: Grid) -> str:
    if isinstance(guidance, dict):
        return "; ".join(f"{s} steps: {', '.join(f'{w:g}' for w in ws)}"
                         for s, ws in sorted(guidance.items(), key=lambda kv: int(kv[0])))
    return ", ".join(f"{w:g}" for w in guidance)


def plan_points(recipe: Recipe, steps: list[int], guidance: Grid,
                double_guidance: bool = False) -> list[Point]:
    """Every (steps, w, sampler) an evaluation samples, in order.

    Baked-guidance runs without ``double_guidance`` accept only w = 0, and get their protocol's
    flow-CFG entry (``Sampling.flow_cfg``, sm's) when the finest step count
    (``objective.base_steps``) is requested.
    """
    sampler = run_sampler(recipe, double_guidance)
    if sampler == "conditional":
        protocol = sampling(recipe)
        if any(w != 0 for w in all_strengths(guidance)):
            baked = protocol.baked or "its guidance, if any,"
            raise UserError(
                f"--guidance {describe_grid(guidance)}: a run of objective.mode "
                f"'{recipe.objective.mode}' is sampled from its conditional output (w = 0; "
                f"{baked} is baked into its jumps); pass --double-guidance to apply CFG on top")
        points = [Point(s, 0.0, "conditional") for s in steps]
        if protocol.flow_cfg is not None and recipe.objective.base_steps in steps:
            points.append(Point(recipe.objective.base_steps, protocol.flow_cfg, "flow-cfg"))
        return points
    return [Point(s, w, sampler) for s in steps for w in grid_for(guidance, s)]


def default_guidance(recipe: Recipe, steps: int) -> float:
    """The recipe's ``eval.default_guidance`` for ``steps``; an unlisted step count takes the
    nearest listed one on a log2 scale (the coarser on a tie)."""
    table = recipe.eval.default_guidance
    return float(table[_nearest(list(table), steps)]) if table else 0.0


def read_best(run_dir: Path) -> dict[int, dict[str, Any]]:
    """The remembered best point per step count (empty when none was chosen yet)."""
    path = Path(run_dir) / BEST_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return {int(k): v for k, v in data["best"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{path}: not a guidance file written by `ismctl eval` ({exc})") from exc


def remember_best(run_dir: Path, best: dict[int, dict[str, Any]]) -> Path:
    """Merge ``best`` (step count -> point record) into the run's remembered choices."""
    merged = read_best(run_dir)
    merged.update(best)
    path = Path(run_dir) / BEST_FILE
    body = {"about": "best guidance per step count, chosen by `ismctl eval`; "
                     "`ismctl sample` uses it when --guidance is not given",
            "best": {str(k): merged[k] for k in sorted(merged)}}
    atomic_write_text(path, json.dumps(body, indent=2) + "\n")
    return path


def remembered_points(run_dir: Path, steps: list[int]) -> list[Point]:
    """The remembered best point of each step count; a step count without one is an error."""
    best = read_best(run_dir)
    if missing := [s for s in steps if s not in best]:
        raise UserError(
            f"--guidance best: {run_dir}/{BEST_FILE} has no best w for "
            f"{', '.join(map(str, missing))} step(s); evaluate a grid first, e.g. "
            f"ismctl eval {run_dir} --steps {','.join(map(str, missing))} --guidance 0:4:0.5")
    return [Point(s, float(best[s]["guidance"]), best[s]["sampler"]) for s in steps]


def choose_point(recipe: Recipe, run_dir: Path, steps: int,
                 guidance: float | str | None = None,
                 double_guidance: bool = False) -> tuple[Point, str]:
    """The point ``ismctl sample`` uses and where it came from: the given w, else the run's
    remembered best for ``steps``, else the recipe default (w = 0 for sm runs). ``"best"``
    asks for the remembered best and is refused when there is none."""
    sampler = run_sampler(recipe, double_guidance)
    if guidance == BEST:
        if double_guidance:
            raise UserError("--guidance best with --double-guidance: the remembered best is "
                            "a point of the run's own protocol; give a w with --double-guidance")
        best = read_best(run_dir).get(steps)
        point = remembered_points(run_dir, [steps])[0]
        return point, f"{BEST_FILE} (best {best['metric']} at step {best['checkpoint_step']})"
    if isinstance(guidance, str):
        raise UserError(f"--guidance {guidance!r}: a strength w >= 0 or 'best'")
    if guidance is not None:
        if not (math.isfinite(guidance) and guidance >= 0):
            raise UserError(f"--guidance {guidance:g}: w must be >= 0 (CFG scale s = 1 + w)")
        return plan_points(recipe, [steps], [guidance], double_guidance)[0], "command line"
    if not double_guidance and (best := read_best(run_dir).get(steps)) is not None:
        return Point(steps, float(best["guidance"]), best["sampler"]), (
            f"{BEST_FILE} (best {best['metric']} at step {best['checkpoint_step']})")
    w = 0.0 if sampler == "conditional" else default_guidance(recipe, steps)
    return Point(steps, w, sampler), "recipe eval.default_guidance"


def extrapolation_note(recipe: Recipe, points: list[Point]) -> str | None:
    """Intrinsic guidance beyond the range the network was trained on (``guidance.w_max``):
    allowed, but the network was never shown such a w, so it is said."""
    w_max = recipe.guidance.w_max
    far = sorted({p.guidance for p in points if p.sampler == "intrinsic" and p.guidance > w_max})
    if not far:
        return None
    return (f"guidance {', '.join(f'{w:g}' for w in far)} above the trained w_max {w_max:g}: "
            "extrapolated")


def best_points(points: list[dict[str, Any]], metric: str, lower_is_better: bool,
                checkpoint_step: int) -> dict[int, dict[str, Any]]:
    """Per step count, the evaluated point with the best ``metric`` (ties: smaller w)."""
    best: dict[int, dict[str, Any]] = {}
    for p in points:
        value = p["metrics"].get(metric)
        if value is None or not math.isfinite(value):
            continue
        score = value if lower_is_better else -value
        cur = best.get(p["steps"])
        if cur is None or (score, p["guidance"]) < (cur["_score"], cur["guidance"]):
            best[p["steps"]] = {"guidance": p["guidance"], "sampler": p["sampler"],
                                "metric": metric, "value": value,
                                "candidates": 0, "checkpoint_step": checkpoint_step,
                                "_score": score}
    for s, rec in best.items():
        rec.pop("_score")
        rec["candidates"] = sum(1 for p in points if p["steps"] == s)
    return best
