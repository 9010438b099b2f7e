"""Presenting an evaluation: a rich table, ``results.json``, a metric-vs-steps plot.

The table has one row per step count and one column per (guidance, metric value); guidance
is the delta convention ``w`` (CFG scale ``s = 1 + w``). The plot is drawn with matplotlib's
object API on an Agg canvas (no pyplot, no global backend switch), steps on a log2 axis.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ismctl.fileio import atomic_path, write_json

# Values shown per metric, in order; "prc" gives two numbers.
VALUES = {
    "fid": ("fid",),
    "isc": ("isc",),
    "prc": ("precision", "recall"),
    "fd-dinov2": ("fd-dinov2",),
    "acc": ("acc",),
    "fd-digits": ("fd-digits",),
}
PLOT_PREFERENCE = ("fid", "fd-digits", "fd-dinov2")


def value_names(metrics: list[str]) -> list[str]:
    return [v for m in metrics for v in VALUES[m]]


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def results_table(results: dict[str, Any]) -> Table:
    settings = results["settings"]
    names = value_names(results["metrics"])
    table = Table(title=f"ismctl eval: {results['checkpoint']['path']} "
                        f"(step {results['checkpoint']['step']}, "
                        f"{settings['num_samples']} samples per point)",
                  caption="w: guidance strength (delta convention), CFG scale s = 1 + w")
    table.add_column("steps", justify="right", style="bold")
    for w in settings["guidance"]:
        for name in names:
            table.add_column(f"w={w:g}\n{name}", justify="right")
    by_point = {(p["steps"], p["guidance"]): p["metrics"] for p in results["points"]}
    for s in settings["steps"]:
        row = [str(s)]
        for w in settings["guidance"]:
            values = by_point.get((s, w), {})
            row += [_fmt(values.get(name)) for name in names]
        table.add_row(*row)
    return table


def print_results(results: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    console.print(results_table(results))
    for note in results.get("notes", []):
        console.print(f"[yellow]note:[/] {note}")


def write_results_json(path: str | Path, results: dict[str, Any]) -> Path:
    path = Path(path)
    write_json(path, results)
    return path


def plot_metric(results: dict[str, Any]) -> str | None:
    """The metric the plot shows: FID, else fd-digits, else FD-DINOv2 (None: nothing to plot)."""
    return next((m for m in PLOT_PREFERENCE if m in results["metrics"]), None)


def write_plot(path: str | Path, results: dict[str, Any]) -> Path | None:
    """Metric against steps (log2 axis), one line per guidance strength."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric = plot_metric(results)
    if metric is None:
        return None
    steps = results["settings"]["steps"]
    fig = Figure(figsize=(5.5, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for w in results["settings"]["guidance"]:
        pts = sorted((p["steps"], p["metrics"].get(metric)) for p in results["points"]
                     if p["guidance"] == w and p["metrics"].get(metric) is not None)
        if pts:
            ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o",
                    label=f"w={w:g} (CFG {1 + w:g})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(metric.upper() if metric == "fid" else metric)
    ax.set_title(f"{metric} vs steps, {results['settings']['num_samples']} samples")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
