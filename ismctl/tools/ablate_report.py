"""The ablation report: seeds aggregated, each variant at its own best guidance, tables, chart.

Input: per variant, the ``results.json`` of every training seed (``ismctl eval`` with the
same points and evaluation seed for all). Per variant and step count the point (w, sampler)
with the best mean selection metric over the seeds is the variant's own best guidance; every
value is reported there as mean +- sd over the seeds (sample standard deviation, n - 1),
with the difference to the reference variant (the full recipe, or a sweep's first value).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from ismctl.evaluation.plan import HIGHER_IS_BETTER
from ismctl.sampling.protocol import describe_grid
from ismctl.sampling.sampler import TWO_PASS
from ismctl.utils.fileio import atomic_path

FRACTIONS = frozenset({"acc", "precision", "recall"})
# The values shown in the main table, after the selection metric: FID alone on images, the
# three digits values on the built-in dataset.
MAIN_GROUPS = (("fid",), ("cfd-digits", "fd-digits", "acc"), ("fd-dinov2",))


def point_key(point: dict[str, Any]) -> str:
    """``steps@w``, with ``/sampler`` for two-pass samplers (``128@0.5/flow-cfg``)."""
    key = f"{point['steps']}@{point['guidance']:g}"
    return key + (f"/{point['sampler']}" if point.get("sampler") in TWO_PASS else "")


def steps_of(key: str) -> int:
    return int(key.split("@")[0])


def point_title(key: str) -> str:
    steps, rest = key.split("@")
    w, _, sampler = rest.partition("/")
    return f"{steps} step{'s' if steps != '1' else ''}, w={w}" + (f" {sampler}" if sampler else "")


def _mean_sd(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def seed_points(results: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """point key -> value name -> one number per seed (points every seed evaluated)."""
    per_seed = []
    for res in results:
        per_seed.append({point_key(p): {k: float(v) for k, v in p["metrics"].items()
                                        if isinstance(v, int | float) and not isinstance(v, bool)}
                         for p in res.get("points", [])})
    common = [k for k in per_seed[0] if all(k in s for s in per_seed)] if per_seed else []
    return {k: {name: [s[k][name] for s in per_seed] for name in per_seed[0][k]}
            for k in common}


def aggregate(results: list[dict[str, Any]], select: str) -> dict[str, Any]:
    """Mean/sd of every value at every point, and per step count the best point by the mean
    of ``select`` (ties: the smaller w)."""
    values = seed_points(results)
    points = {k: {name: dict(zip(("mean", "sd"), _mean_sd(v), strict=True))
                  for name, v in vals.items()} | {"seeds": vals}
              for k, vals in values.items()}
    sign = -1.0 if select in HIGHER_IS_BETTER else 1.0
    best: dict[str, str] = {}
    for key, stats in points.items():
        mean = stats.get(select, {}).get("mean", math.nan)
        if not math.isfinite(mean):
            continue
        steps = str(steps_of(key))
        cur = best.get(steps)
        if cur is None or (sign * mean, _w(key)) < (sign * points[cur][select]["mean"], _w(cur)):
            best[steps] = key
    return {"points": points, "best": best}


def _w(key: str) -> float:
    return float(key.split("@")[1].split("/")[0])


def main_values(names: list[str], select: str) -> list[str]:
    """The selection metric first, then the rest of its group (FID alone; the digits trio)."""
    for group in MAIN_GROUPS:
        if select in group:
            return [select] + [m for m in group if m != select and m in names]
    return [select]


def summarise(variants: list[dict[str, Any]], reference: str | None) -> dict[str, Any]:
    """Add to each variant its best-point values and the difference to ``reference``."""
    ref = next((v for v in variants if v["name"] == reference), None)
    names: list[str] = []
    for v in variants:
        for stats in v["points"].values():
            names += [k for k in stats if k != "seeds" and k not in names]
    steps = sorted({int(s) for v in variants for s in v["best"]})
    for v in variants:
        v["at_best"], v["delta"] = {}, {}
        for s in map(str, steps):
            key = v["best"].get(s)
            if key is None:
                continue
            stats = v["points"][key]
            v["at_best"][s] = {"point": key, **{n: stats[n] for n in stats if n != "seeds"}}
            ref_key = ref["best"].get(s) if ref else None
            if ref_key is not None:
                rstats = ref["points"][ref_key]
                v["delta"][s] = {n: stats[n]["mean"] - rstats[n]["mean"] for n in stats
                                 if n != "seeds" and n in rstats}
    return {"value_names": names, "steps": steps}


def fmt(value: float | None, metric: str, signed: bool = False) -> str:
    """Shares (accuracy, precision, recall) with 3 decimals, scores and distances with 2."""
    if value is None or not math.isfinite(value):
        return "-"
    digits = 3 if metric in FRACTIONS else 2
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def fmt_stat(stat: dict[str, float] | None, metric: str, seeds: int) -> str:
    if not stat:
        return "-"
    text = fmt(stat["mean"], metric)
    return text + (f" ± {fmt(stat['sd'], metric)}" if seeds > 1 else "")


def _cell(v: dict[str, Any], steps: int, metric: str, seeds: int, reference: str | None) -> str:
    stat = v["at_best"].get(str(steps), {}).get(metric)
    text = fmt_stat(stat, metric, seeds)
    delta = v["delta"].get(str(steps), {}).get(metric)
    if v["name"] != reference and delta is not None and stat:
        text += f" ({fmt(delta, metric, signed=True)})"
    return text


def _best_w(v: dict[str, Any], steps: int) -> str:
    key = v["best"].get(str(steps))
    if key is None:
        return "-"
    sampler = key.partition("/")[2]
    return f"{_w(key):g}" + (f" {sampler}" if sampler else "")


def results_table(report: dict[str, Any]) -> Table:
    seeds = len(report["seeds"])
    table = Table(title=f"ismctl ablate: {escape(str(report['recipe']))} ({report['mode']}), "
                        f"{seeds} seed(s), {report['eval']['num_samples']} samples per point; "
                        f"each variant at its best w by {report['select_by']}")
    # Variants differ only in their names' ends (objective.mode=sm / ism / meanflow): the
    # column is never cut, the numbers give way in a narrow terminal.
    table.add_column("variant", style="bold", overflow="fold",
                     min_width=max((len(v["label"]) for v in report["variants"]), default=7))
    for s in report["steps"]:
        table.add_column(f"{s} step{'s' if s != 1 else ''}\nbest w", justify="right")
        for metric in report["main_metrics"]:
            table.add_column(f"{s} step{'s' if s != 1 else ''}\n{metric}", justify="right")
    for v in report["variants"]:
        row = [escape(v["label"])]
        for s in report["steps"]:
            row.append(_best_w(v, s))
            row += [_cell(v, s, m, seeds, report["reference_variant"])
                    for m in report["main_metrics"]]
        table.add_row(*row)
    if report.get("baseline"):
        table.caption = f"baseline: {report['baseline']['description']}"
    return table


def markdown(report: dict[str, Any], paper_note: str = "") -> str:
    seeds = report["seeds"]
    ev = report["eval"]
    ref = report["reference_variant"]
    lines = [f"# Ablation: {report['recipe']} ({report['mode']})", ""]
    ws = describe_grid(ev["guidance"])
    lines += [
        f"Training seeds {', '.join(map(str, seeds))}; every run evaluated with the same "
        f"settings ({ev['num_samples']} samples per point, evaluation seed {ev['seed']}, "
        f"guidance w in {{{ws}}}, CFG scale 1 + w). Each variant is shown at its own best "
        f"point per step count (lowest mean {report['select_by']} over the seeds"
        + (", highest" if report["select_by"] in HIGHER_IS_BETTER else "")
        + "); values are mean ± sd over the seeds"
        + (f", (delta) = variant - {ref}" if ref else "") + ". Lower is better except "
        + ", ".join(sorted(HIGHER_IS_BETTER)) + ".", ""]
    if report.get("baseline"):
        lines += [f"Baseline (first row): {report['baseline']['description']}.", ""]
    main = report["main_metrics"]
    header = ["variant"]
    for s in report["steps"]:
        header.append(f"{s} step{'s' if s != 1 else ''}: w")
        header += [f"{m}" for m in main]
        if report["paper"] and "fid" in main:
            header.append("paper FID")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for v in report["variants"]:
        row = [escape(v["label"])]
        for s in report["steps"]:
            row.append(_best_w(v, s))
            row += [_cell(v, s, m, len(seeds), ref) for m in main]
            if report["paper"] and "fid" in main:
                row.append(fmt((v.get("paper_fid") or {}).get(s), "fid"))
        lines.append("| " + " | ".join(row) + " |")
    if paper_note:
        lines += ["", paper_note]
    names = report["value_names"]
    lines += ["", "## Every evaluated point", "",
              "| variant | point | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    for v in report["variants"]:
        for key in sorted(v["points"], key=lambda k: (steps_of(k), "/" in k, _w(k))):
            star = " *" if v["best"].get(str(steps_of(key))) == key else ""
            stats = v["points"][key]
            lines.append(f"| {v['label']} | {point_title(key)}{star} | "
                         + " | ".join(fmt_stat(stats.get(n), n, len(seeds)) for n in names)
                         + " |")
    lines += ["", "\\* the variant's best point at that step count.", "", "## Runs", ""]
    for v in report["variants"]:
        lines.append(f"- `{v['name']}` ({v['label']}): recipe `{v['recipe']}`; runs "
                     + ", ".join(f"`{r['run_dir']}`" for r in v["runs"]))
    for note in report["notes"]:
        lines.append(f"- note: {note}")
    return "\n".join(lines) + "\n"


def write_chart(path: Path, report: dict[str, Any]) -> Path:
    """Grouped bars of the main values at each variant's best point: one group per step
    count, one bar per variant, the seed sd as error bars, the paper's FID as black ticks."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    main, steps, variants = report["main_metrics"], report["steps"], report["variants"]
    wide = max(6.0, 0.5 * len(steps) * max(1, len(variants)))
    fig = Figure(figsize=(wide, 3.0 * len(main) + 1.2), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    width = 0.8 / max(1, len(variants))
    paper_labelled = False
    for row, metric in enumerate(main):
        ax = fig.add_subplot(len(main), 1, row + 1)
        for i, v in enumerate(variants):
            xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(steps))]
            stats = [v["at_best"].get(str(s), {}).get(metric) or {} for s in steps]
            ys = [st.get("mean", math.nan) for st in stats]
            err = [st.get("sd", 0.0) for st in stats]
            ax.bar(xs, ys, width, yerr=err if len(report["seeds"]) > 1 else None, capsize=2,
                   label=v["label"] if row == 0 else None, color=f"C{i % 10}")
            paper = v.get("paper_fid") or {}
            ticks = [(x, paper[s]) for x, s in zip(xs, steps, strict=True)
                     if metric == "fid" and s in paper]
            if ticks:
                ax.scatter(*zip(*ticks, strict=True), marker="_", s=150, color="black",
                           zorder=3, label=None if paper_labelled else "paper (method §3)")
                paper_labelled = True
        ax.set_xticks(range(len(steps)), [f"{s} step{'s' if s != 1 else ''}" for s in steps])
        ax.set_ylabel(metric)
        ax.grid(True, axis="y", alpha=0.3)
        if row == 0:
            seeds = len(report["seeds"])
            ax.set_title(f"ablation of {Path(report['recipe']).name} ({report['mode']}), "
                         f"{seeds} seed{'s' if seeds != 1 else ''}, best w per variant")
    fig.legend(loc="outside lower center", ncols=min(3, len(variants) + paper_labelled),
               fontsize="small")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
