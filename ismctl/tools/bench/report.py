"""The benchmark's report on the terminal: the rich tables of bench.json."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from ismctl.tools.bench.coupler import coupler_table


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def print_report(report: dict[str, Any], console: Console) -> None:
    steps = Table(title=f"training step, median s ({report['device']['name']}, "
                        f"{report['device']['threads']} threads)")
    for col in ("preset", "batch", "FM", "iSM", "SM", "iSM/FM\npaired", "iSM/FM\nfastest",
                "target rows\nper sample"):
        steps.add_column(col, justify="right")
    shares = Table(title="share of the iSM step")
    for col in ("preset", "wavelet", "twin EMA", "sOT (bound)", "guidance targets"):
        shares.add_column(col, justify="right")
    for preset, step in report["steps"].items():
        comp = report["components"][preset]
        steps.add_row(preset, str(step["batch"]), f"{step['fm']['total_s']:.3f}",
                      f"{step['ism']['total_s']:.3f}", f"{step['sm']['total_s']:.3f}",
                      f"{step['ratio_ism_over_fm']:.3f}",
                      f"{step['ratio_ism_over_fm_of_minimums']:.3f}",
                      f"{step['ism']['target_rows_per_sample']:.2f}")
        shares.add_row(preset, *(pct(comp[k]["fraction_of_step"]) for k in
                                 ("wavelet", "twin_ema", "sot", "intrinsic_guidance")))
    console.print(steps)
    console.print(shares)
    split = Table(title="iSM step split, median s")
    split.add_column("section")
    for preset in report["steps"]:
        split.add_column(preset, justify="right")
    names = sorted({k for s in report["steps"].values() for k in s["ism"]["sections_s"]})
    for name in names:
        split.add_row(name, *(f"{s['ism']['sections_s'].get(name, 0.0):.3f}"
                              for s in report["steps"].values()))
    console.print(split)
    sot = report["sot"]
    console.print(f"sOT pool {sot['pool_size']}: extra wait {sot['extra_wait_s'] * 1e3:.2f} ms "
                  f"per batch ({sot['fraction_of_emulated_step']:.1%} of an emulated "
                  f"{sot['emulated_step_s']:g} s step)")
    loader = ", ".join(f"pool {k}: {v['latents_per_s']:.0f}/s"
                       for k, v in report["loader"]["results"].items())
    console.print(f"loader, batch {report['loader']['batch']}, "
                  f"{report['loader']['num_workers']} worker(s): {loader}")
    samp = report["sampling"]
    console.print(f"sampling {samp['preset']}, batch {samp['batch']}: " + ", ".join(
        f"{k} step(s) {v:.1f} img/s" for k, v in samp["img_s"].items()))
    paths = samp["paths"]
    console.print(f"sampling paths {paths['preset']}, batch {paths['batch']}, "
                  f"{paths['steps']} steps, fastest of {paths['rounds']}: " + ", ".join(
                      f"{k} {v:,.0f} sample-steps/s "
                      f"(x{paths['speedup_over_before_fastest'][k]:.2f})"
                      for k, v in paths["sample_steps_per_s_fastest"].items()))
    console.print(coupler_table(report["coupler"]))
    th = report.get("threads")
    if th:
        console.print(f"threads, sampling {th['preset']} batch {th['batch']}: all {th['cores']} "
                      f"cores / 1 thread = x{th['as_is']['ratio_all_over_one']:.2f} as is "
                      f"(load average {th['load_average_start'][0]:.1f}), "
                      f"x{th['busy']['ratio_all_over_one']:.2f} with "
                      f"{th['busy']['busy_processes']} busy process(es) beside")
    for goal in report["goals"]:
        mark = "[green]met[/]" if goal["met"] else "[red]missed[/]"
        console.print(f"goal {goal['name']}: {goal['value']:.3f} <= {goal['limit']:g} {mark}")
    for note in report["notes"]:
        console.print(f"[yellow]note:[/] {note}")
