"""Presenting an evaluation: a rich table, ``results.json``, a metric-vs-guidance plot.

The table has one row per evaluated point (steps, guidance w, sampler) and one column per
metric value; the best point of each step count (by the selection metric) is starred.
Guidance is the delta convention ``w`` (CFG scale ``s = 1 + w``). The plot shows the
selection metric against w, one curve per step count, drawn with matplotlib's object API on
an Agg canvas (no pyplot, no global backend switch).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ismctl.sampling.sampler import TWO_PASS
from ismctl.utils.console import make_console
from ismctl.utils.fileio import atomic_path, write_json

# Values shown per metric, in order; "prc" gives two numbers.
VALUES = {
    "fid": ("fid",),
    "isc": ("isc",),
    "prc": ("precision", "recall"),
    "fd-dinov2": ("fd-dinov2",),
    "acc": ("acc",),
    "fd-digits": ("fd-digits",),
    "cfd-digits": ("cfd-digits",),
    "spread-digits": ("spread-digits",),
}


def value_names(metrics: list[str]) -> list[str]:
    return [v for m in metrics for v in VALUES[m]]


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def is_best(results: dict[str, Any], point: dict[str, Any]) -> bool:
    best = results.get("best", {}).get(str(point["steps"]))
    return bool(best) and (best["guidance"], best["sampler"]) == (point["guidance"],
                                                                  point["sampler"])


def results_table(results: dict[str, Any]) -> Table:
    settings = results["settings"]
    names = value_names(results["metrics"])
    table = Table(title=f"ismctl eval: {results['checkpoint']['path']} "
                        f"(step {results['checkpoint']['step']}, "
                        f"{settings['num_samples']} samples per point)",
                  caption="w: guidance strength (delta convention), CFG scale s = 1 + w; "
                          f"* best {results.get('select_by', '')} per step count")
    table.add_column("steps", justify="right", style="bold")
    table.add_column("w", justify="right")
    table.add_column("sampler")
    for name in names:
        table.add_column(name, justify="right")
    for p in sorted(results["points"], key=lambda p: (p["steps"], p["sampler"], p["guidance"])):
        star = "*" if is_best(results, p) else ""
        table.add_row(str(p["steps"]), f"{p['guidance']:g}{star}", p["sampler"],
                      *[_fmt(p["metrics"].get(name)) for name in names],
                      style="bold" if star else None)
    return table


def print_results(results: dict[str, Any], console: Console | None = None) -> None:
    console = console or make_console()
    console.print(results_table(results))
    for note in results.get("notes", []):
        console.print(f"[yellow]note:[/] {escape(note)}")


def write_results_json(path: str | Path, results: dict[str, Any]) -> Path:
    path = Path(path)
    write_json(path, results)
    return path


def write_plot(path: str | Path, results: dict[str, Any]) -> Path | None:
    """The selection metric against w, one line per step count (two-pass entries as
    separate markers); the best point of each step count is ringed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric = results.get("select_by")
    if metric is None:
        return None
    fig = Figure(figsize=(5.5, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, steps in enumerate(results["settings"]["steps"]):
        for sampler in sorted({p["sampler"] for p in results["points"]}):
            pts = sorted((p["guidance"], p["metrics"].get(metric), is_best(results, p))
                         for p in results["points"]
                         if p["steps"] == steps and p["sampler"] == sampler
                         and p["metrics"].get(metric) is not None)
            if not pts:
                continue
            two_pass = sampler in TWO_PASS
            label = f"{steps} step{'s' if steps != 1 else ''}" + (f" ({sampler})" if two_pass
                                                                  else "")
            ax.plot([w for w, _, _ in pts], [v for _, v, _ in pts], color=f"C{i % 10}",
                    marker="s" if two_pass else "o", linestyle=":" if two_pass else "-",
                    label=label)
            ax.scatter([w for w, _, b in pts if b], [v for _, v, b in pts if b], s=160,
                       facecolors="none", edgecolors=f"C{i % 10}", zorder=3)
    ax.set_xlabel("guidance w (CFG scale 1 + w)")
    ax.set_ylabel(metric.upper() if metric == "fid" else metric)
    ax.set_title(f"{metric} vs guidance, {results['settings']['num_samples']} samples")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
