"""`ismctl ablate`: switch iSM components off, train and evaluate each variant, compare.

The five components of SPEC 3 and the recipe fields each one flips when disabled:

    intrinsic-guidance   objective.mode ism -> sm (CFG inside the finest bootstrap targets at
                         guidance.cfg_scale, two-pass CFG at sampling: the SPEC 2 baseline)
    interval-guidance    guidance.interval_start -> 0
    wavelet              loss.name -> mse
    sot                  coupling.pool_batches -> 0 (independent noise-data pairing)
    twin-ema             ema.target_decay -> ema.inference_decay (one EMA in both roles, the
                         pre-twin setting: SPEC 3.4 ablates 0.9999 -> 0.95)

``--disable a,b`` compares the full recipe with one variant that has all the named components
off; ``--cumulative`` rebuilds the paper's table: the baseline with all five off, then each
component added in the paper's order, ending at the full iSM recipe. Every variant is a
derived recipe saved as YAML in the ablation folder, trained (in this process or under
torchrun) and evaluated with the same evaluation settings and seeds. The work is resumable:
a variant whose final checkpoint exists is not retrained, an evaluation whose results and
settings are on disk is not rerun.

A variant is named by what it switches off ("full", "no-wavelet+sot", ..., "baseline"), so
``--disable`` and ``--cumulative`` runs in the same folder share the variants they have in
common.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ismctl.errors import UserError
from ismctl.fileio import atomic_path, atomic_write_text, write_json
from ismctl.recipe import Recipe, load_recipe, recipe_from_dict, save_recipe

DEFAULT_RECIPE = "recipes/ism_xl.yaml"
FULL, BASELINE = "full", "baseline"
# Metrics where larger is better; every other metric (FID and the other distances) is lower.
HIGHER_IS_BETTER = frozenset({"isc", "acc", "precision", "recall"})
FRACTIONS = frozenset({"acc", "precision", "recall"})
MAIN_METRICS = (("fid",), ("fd-digits", "acc"), ("fd-dinov2",))


@dataclass(frozen=True)
class Component:
    """One iSM improvement and the recipe edits (dotted path -> value) that switch it off."""

    name: str
    label: str
    off: Callable[[Recipe], dict[str, Any]]

    def is_on(self, recipe: Recipe) -> bool:
        """On when switching it off would change the recipe."""
        return any(get_field(recipe, path) != value for path, value in self.off(recipe).items())


def get_field(recipe: Recipe, path: str) -> Any:
    node: Any = recipe
    for part in path.split("."):
        node = getattr(node, part)
    return node


# The paper's order (SPEC 3): the cumulative table adds the components in this order.
COMPONENTS: dict[str, Component] = {c.name: c for c in (
    Component("intrinsic-guidance", "intrinsic guidance", lambda r: {"objective.mode": "sm"}),
    Component("interval-guidance", "interval guidance",
              lambda r: {"guidance.interval_start": 0.0}),
    Component("wavelet", "wavelet loss", lambda r: {"loss.name": "mse"}),
    Component("sot", "sOT", lambda r: {"coupling.pool_batches": 0}),
    Component("twin-ema", "twin EMA", lambda r: {"ema.target_decay": r.ema.inference_decay}),
)}
ORDER = tuple(COMPONENTS)

# SPEC 3: FID-50K after 250K iterations of SiT-XL/2 on ImageNet 256, keyed by how many
# components (in the paper's order) are on, then by the number of sampling steps. The
# baseline row (0 components) is not given at 250K iterations.
PAPER_FID: dict[int, dict[int, float]] = {
    1: {1: 9.62, 4: 3.17},
    2: {1: 8.49, 4: 2.81},
    3: {1: 8.12, 4: 2.64},
    4: {1: 7.97, 4: 2.23},
    5: {1: 6.56, 4: 2.16},
}
PAPER_NOTE = ("FID-50K of SiT-XL/2 after 250K iterations (SPEC 3); the SM baseline is reported "
              "only at 800K iterations (1 step 10.60, 4 steps 7.80)")


def parse_components(names: list[str] | str | None) -> list[str]:
    """Component names (comma-separated strings accepted) in the paper's order, deduplicated."""
    if names is None:
        return []
    if isinstance(names, str):
        names = [names]
    wanted: set[str] = set()
    for entry in names:
        for raw in entry.split(","):
            name = raw.strip().lower().replace("_", "-")
            if not name:
                continue
            if name not in COMPONENTS:
                raise UserError(f"--disable {raw.strip()}: unknown component; choose from "
                                f"{', '.join(ORDER)}")
            wanted.add(name)
    return [c for c in ORDER if c in wanted]


def disable(recipe: Recipe, components: list[str]) -> Recipe:
    """The recipe with the named components switched off (pure: ``recipe`` is unchanged)."""
    data = recipe.model_dump()
    for name in parse_components(components):
        for path, value in COMPONENTS[name].off(recipe).items():
            *sections, key = path.split(".")
            node = data
            for section in sections:
                node = node[section]
            node[key] = value
    return recipe_from_dict(data, "ablation variant")


def variant_name(disabled: list[str]) -> str:
    if not disabled:
        return FULL
    if len(disabled) == len(ORDER):
        return BASELINE
    return "no-" + "+".join(c for c in ORDER if c in disabled)


def _named(recipe: Recipe, name: str) -> Recipe:
    return recipe.model_copy(update={"run": recipe.run.model_copy(update={"name": name})})


def _disabled_sets(disable_list: list[str] | None, cumulative: bool) -> list[list[str]]:
    names = parse_components(disable_list)
    if cumulative and names:
        raise UserError("--cumulative and --disable are exclusive: the cumulative table already "
                        "switches every component off and on")
    if cumulative:
        return [list(ORDER[k:]) for k in range(len(ORDER) + 1)]
    if not names:
        raise UserError(f"ablate: nothing to compare; pass --disable COMPONENT[,COMPONENT...] "
                        f"({', '.join(ORDER)}) or --cumulative")
    return [[], names]


def plan_variants(recipe: Recipe, disable: list[str] | None,
                  cumulative: bool) -> list[tuple[str, Recipe]]:
    """(name, recipe) per variant, each recipe carrying its own ``run.name``.

    ``--disable``: [full, the variant with the named components off]. ``--cumulative``: six
    variants, baseline (all five off) first, then one more component on per row in the
    paper's order, the last being the full recipe. A component already off in the recipe
    would make two variants identical, so it is an error.
    """
    sets = _disabled_sets(disable, cumulative)
    for name in sorted({c for s in sets for c in s}, key=ORDER.index):
        comp = COMPONENTS[name]
        if not comp.is_on(recipe):
            fields = ", ".join(f"{p} = {get_field(recipe, p)!r}" for p in comp.off(recipe))
            raise UserError(f"ablate: component {name} is already off in this recipe "
                            f"({fields}); nothing to compare")
    return [(variant_name(s), _named(_disabled_if(recipe, s), variant_name(s))) for s in sets]


def _disabled_if(recipe: Recipe, names: list[str]) -> Recipe:
    return disable(recipe, names) if names else recipe


def variant_label(name: str, cumulative: bool) -> str:
    """Row label: the paper's "+ component" wording in the cumulative table."""
    disabled = _disabled_of(name)
    if cumulative:
        if name == BASELINE:
            return "baseline (SM)"
        on = len(ORDER) - len(disabled)
        label = f"+ {COMPONENTS[ORDER[on - 1]].label}"
        return f"{label} (= full iSM)" if name == FULL else label
    if name == FULL:
        return "full iSM"
    return "without " + ", ".join(COMPONENTS[c].label for c in disabled)


def _disabled_of(name: str) -> list[str]:
    if name == FULL:
        return []
    if name == BASELINE:
        return list(ORDER)
    return name.removeprefix("no-").split("+")


def paper_fid(name: str) -> dict[int, float] | None:
    """The paper's FID for a variant whose enabled components are a prefix of the paper's
    order (the rows of its cumulative table), else None."""
    disabled = _disabled_of(name)
    on = len(ORDER) - len(disabled)
    if disabled != list(ORDER[on:]):
        return None
    return PAPER_FID.get(on)


def is_paper_setting(recipe: Recipe) -> bool:
    """The recipe trains the paper's network with the paper's objective (SPEC 3.5): the
    ``Recipe()`` defaults are that setting, so compare every section the method lives in."""
    paper = Recipe()
    sections = ("model", "objective", "guidance", "loss", "coupling", "ema")
    return all(getattr(recipe, s) == getattr(paper, s) for s in sections)


@dataclass(frozen=True)
class EvalSettings:
    """Identical for every variant, so the table compares like with like."""

    steps: list[int]
    guidance: list[float]
    num_samples: int
    metrics: list[str]
    ref: str | None
    batch_size: int
    seed: int
    device: str
    inception_weights: str | None

    def key(self, checkpoint_step: int) -> dict[str, Any]:
        return {"steps": self.steps, "guidance": self.guidance, "num_samples": self.num_samples,
                "metrics": self.metrics, "ref": self.ref, "seed": self.seed,
                "inception_weights": self.inception_weights, "checkpoint_step": checkpoint_step}


def eval_settings(recipe: Recipe, num_samples: int | None,
                  inception_weights: str | None) -> EvalSettings:
    e = recipe.eval
    return EvalSettings(steps=list(e.steps), guidance=list(e.guidance),
                        num_samples=num_samples or e.num_samples, metrics=list(e.metrics),
                        ref=e.ref, batch_size=e.batch_size, seed=e.seed,
                        device=recipe.train.device, inception_weights=inception_weights)


def _changed_paths(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _changed_paths(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out


def _check_stored_recipe(path: Path, recipe: Recipe, run_dir: Path) -> None:
    """Refuse to resume a variant whose stored recipe differs (other than a longer run)."""
    if not path.is_file() or not (run_dir / "checkpoints").is_dir():
        return
    old = load_recipe(path).model_dump(mode="json")
    changed = _changed_paths(old, recipe.model_dump(mode="json"))
    if changed == ["train.steps"] and recipe.train.steps >= old["train"]["steps"]:
        return
    if changed:
        raise UserError(f"{path}: variant {recipe.run.name} was trained with a different recipe "
                        f"({', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''} changed); "
                        "use another --out folder or delete it")


def _final_step(run_dir: Path) -> int | None:
    from ismctl.checkpoint import list_checkpoints

    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][0] if ckpts else None


def _run_subprocess(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        raise UserError(f"{what}: `{' '.join(cmd)}` failed with exit code {done.returncode}")


def _torchrun(nproc_per_node: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc_per_node}", "-m", "ismctl"]


def _train_variant(recipe: Recipe, yaml_path: Path, launch: str | None, nproc: int,
                   progress: bool) -> None:
    if launch == "torchrun":
        flag = "--progress" if progress else "--no-progress"
        _run_subprocess([*_torchrun(nproc), "train", str(yaml_path), "--resume", flag],
                        f"train {recipe.run.name}")
        return
    from ismctl.trainer import train

    train(recipe, str(yaml_path), resume=True, overwrite=False, progress=progress)


def _eval_variant(run_dir: Path, out: Path, cfg: EvalSettings, launch: str | None, nproc: int,
                  progress: bool) -> dict[str, Any]:
    if launch == "torchrun":
        cmd = [*_torchrun(nproc), "eval", str(run_dir), "--steps", ",".join(map(str, cfg.steps)),
               "--guidance", ",".join(f"{w:g}" for w in cfg.guidance),
               "--num-samples", str(cfg.num_samples), "--metrics", ",".join(cfg.metrics),
               "--out", str(out), "--batch-size", str(cfg.batch_size), "--seed", str(cfg.seed),
               "--device", cfg.device]
        if cfg.ref:
            cmd += ["--ref", cfg.ref]
        if cfg.inception_weights:
            cmd += ["--inception-weights", cfg.inception_weights]
        _run_subprocess(cmd, f"eval {run_dir.name}")
        return json.loads(out.read_text())
    from ismctl.evaluation import evaluate

    return evaluate(str(run_dir), cfg.steps, cfg.guidance, cfg.num_samples, cfg.ref,
                    cfg.metrics, out, cfg.inception_weights, False, cfg.batch_size, cfg.seed,
                    device=cfg.device, progress=progress)


def point_metrics(results: dict[str, Any]) -> dict[tuple[int, float], dict[str, float]]:
    """(steps, guidance) -> {value name: number} from an evaluation's results dict."""
    out: dict[tuple[int, float], dict[str, float]] = {}
    for point in results.get("points", []):
        values = {k: float(v) for k, v in point["metrics"].items()
                  if isinstance(v, int | float) and not isinstance(v, bool)}
        out[(int(point["steps"]), float(point["guidance"]))] = values
    return out


def main_metrics(names: list[str]) -> list[str]:
    """FID when present; for digits fd-digits and acc; else the first metric."""
    for group in MAIN_METRICS:
        if group[0] in names:
            return [m for m in group if m in names]
    return names[:1]


def _point_key(steps: int, w: float) -> str:
    return f"{steps}@{w:g}"


def summarise(variants: list[dict[str, Any]], cfg: EvalSettings, paper: bool) -> dict[str, Any]:
    """Add each variant's differences to the full recipe; pick the main metric(s)."""
    full = next((v for v in variants if v["name"] == FULL), None)
    names: list[str] = []
    for v in variants:
        for values in v["metrics"].values():
            names += [k for k in values if k not in names]
    for v in variants:
        v["delta"] = {}
        for point, values in v["metrics"].items():
            ref = full["metrics"].get(point, {}) if full else {}
            v["delta"][point] = {k: values[k] - ref[k] for k in values
                                 if k in ref and math.isfinite(values[k] - ref[k])}
        v["paper_fid"] = paper_fid(v["name"]) if paper else None
    return {"main_metrics": main_metrics(names), "metric_names": names,
            "points": [_point_key(s, w) for s in cfg.steps for w in cfg.guidance]}


def _fmt(value: float | None, metric: str, signed: bool = False) -> str:
    """Shares (accuracy, precision, recall) with 4 decimals, scores and distances with 2."""
    if value is None or not math.isfinite(value):
        return "-"
    digits = 4 if metric in FRACTIONS else 2
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _steps_of(point: str) -> int:
    return int(point.split("@")[0])


def _guidance_of(point: str) -> str:
    return point.split("@")[1]


def _point_title(point: str) -> str:
    steps, w = point.split("@")
    return f"{steps} step{'s' if steps != '1' else ''}, w={w}"


def results_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"ismctl ablate: {report['recipe']} ({report['mode']}), "
                        f"{report['eval']['num_samples']} samples per point; "
                        "delta = variant - full iSM")
    table.add_column("variant", style="bold")
    cols = [(p, m) for p in report["points"] for m in report["main_metrics"]]
    for point, metric in cols:
        table.add_column(f"{_point_title(point)}\n{metric} (delta)", justify="right")
    for v in report["variants"]:
        row = [v["label"]]
        for point, metric in cols:
            value = v["metrics"].get(point, {}).get(metric)
            delta = v["delta"].get(point, {}).get(metric)
            text = _fmt(value, metric)
            if v["name"] != FULL and delta is not None:
                text += f" ({_fmt(delta, metric, signed=True)})"
            row.append(text)
        table.add_row(*row)
    return table


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Ablation: {report['recipe']} ({report['mode']})", ""]
    ev = report["eval"]
    ws = ", ".join(f"{w:g} (CFG scale {1 + w:g})" for w in ev["guidance"])
    lines += [f"Every variant evaluated with the same settings: {ev['num_samples']} samples per "
              f"point, seed {ev['seed']}, guidance w = {ws}; delta = variant - full iSM "
              f"(lower is better except {', '.join(sorted(HIGHER_IS_BETTER))}).", ""]
    main = report["main_metrics"]
    header = ["variant"]
    for point in report["points"]:
        for metric in main:
            header += [f"{_point_title(point)} {metric}", "delta"]
            if report["paper"] and metric == "fid":
                header.append("paper")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for v in report["variants"]:
        row = [v["label"]]
        for point in report["points"]:
            for metric in main:
                row.append(_fmt(v["metrics"].get(point, {}).get(metric), metric))
                delta = None if v["name"] == FULL else v["delta"].get(point, {}).get(metric)
                row.append(_fmt(delta, metric, signed=True))
                if report["paper"] and metric == "fid":
                    paper = (v["paper_fid"] or {}).get(_steps_of(point))
                    row.append(_fmt(paper, metric))
        lines.append("| " + " | ".join(row) + " |")
    if report["paper"]:
        lines += ["", f"Paper column: {PAPER_NOTE}; this run: train.steps = "
                      f"{report['train_steps']}."]
    lines += ["", "## All metrics", ""]
    names = report["metric_names"]
    lines += ["| variant | steps | w | " + " | ".join(names) + " |",
              "|" + "---|" * (len(names) + 3)]
    for v in report["variants"]:
        for point in report["points"]:
            values = v["metrics"].get(point, {})
            lines.append(f"| {v['label']} | {_steps_of(point)} | {_guidance_of(point)} | "
                         + " | ".join(_fmt(values.get(n), n) for n in names) + " |")
    lines += ["", "## Variants", ""]
    for v in report["variants"]:
        off = ", ".join(v["disabled"]) or "none"
        lines.append(f"- `{v['name']}` ({v['label']}): off = {off}; recipe `{v['recipe']}`, "
                     f"results `{v['results']}`")
    for note in report["notes"]:
        lines.append(f"- note: {note}")
    return "\n".join(lines) + "\n"


def write_chart(path: Path, report: dict[str, Any]) -> Path:
    """Grouped bars of the main metric(s): one group per (steps, w), one bar per variant,
    the paper's FID as black ticks where it exists; the legend sits below the plots."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    main, points, variants = report["main_metrics"], report["points"], report["variants"]
    wide = max(6.0, 0.45 * len(points) * max(1, len(variants)))
    fig = Figure(figsize=(wide, 3.2 * len(main) + 1.0), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    width = 0.8 / max(1, len(variants))
    paper_labelled = False
    for row, metric in enumerate(main):
        ax = fig.add_subplot(len(main), 1, row + 1)
        for i, v in enumerate(variants):
            xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(points))]
            ys = [v["metrics"].get(p, {}).get(metric, math.nan) for p in points]
            ax.bar(xs, ys, width, label=v["label"] if row == 0 else None, color=f"C{i % 10}")
            paper = v.get("paper_fid") or {}
            ticks = [(x, paper[_steps_of(p)]) for x, p in zip(xs, points, strict=True)
                     if metric == "fid" and _steps_of(p) in paper]
            if ticks:
                ax.scatter(*zip(*ticks, strict=True), marker="_", s=150, color="black",
                           zorder=3, label=None if paper_labelled else "paper (SPEC 3)")
                paper_labelled = True
        ax.set_xticks(range(len(points)), [_point_title(p) for p in points])
        ax.set_ylabel(metric)
        ax.grid(True, axis="y", alpha=0.3)
        if row == 0:
            ax.set_title(f"ablation of {Path(report['recipe']).name} ({report['mode']})")
    fig.legend(loc="outside lower center", ncols=min(3, len(variants) + paper_labelled),
               fontsize="small")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def run_ablation(recipe_path: str | None, disable: list[str] | None, cumulative: bool,
                 launch: str | None = None, nproc_per_node: int = 1,
                 overrides: list[str] | None = None, out: str | Path | None = None,
                 eval_num_samples: int | None = None, progress: bool = True,
                 inception_weights: str | None = None) -> dict[str, Any]:
    """Plan, train, evaluate and compare the ablation variants; returns the report dict
    (also written as ``ablation.json``, ``ablation.md`` and ``ablation.png`` in the folder)."""
    if launch not in (None, "torchrun"):
        raise UserError(f"--launch {launch}: expected 'torchrun' (or nothing: in this process)")
    if nproc_per_node < 1:
        raise UserError(f"--nproc-per-node {nproc_per_node}: must be >= 1")
    path = recipe_path or DEFAULT_RECIPE
    base = load_recipe(path, overrides)
    variants = plan_variants(base, disable, cumulative)
    folder = Path(out) if out is not None else Path(base.run.root) / f"ablate-{Path(path).stem}"
    cfg = eval_settings(base, eval_num_samples, inception_weights)
    paper = is_paper_setting(base)
    console = Console()
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for index, (name, recipe) in enumerate(variants, start=1):
        recipe = recipe.model_copy(update={"run": recipe.run.model_copy(
            update={"root": str(folder)})})
        yaml_path, run_dir = folder / f"{name}.yaml", folder / name
        _check_stored_recipe(yaml_path, recipe, run_dir)
        save_recipe(recipe, yaml_path)
        label = variant_label(name, cumulative)
        head = f"[bold]ablate[/] {index}/{len(variants)} {name} ({label})"
        if _final_step(run_dir) == recipe.train.steps:
            console.print(f"{head}: trained, final checkpoint found")
        else:
            console.print(f"{head}: training")
            _train_variant(recipe, yaml_path, launch, nproc_per_node, progress)
        results_path = run_dir / "eval" / "results.json"
        key_path = run_dir / "eval" / "ablation-settings.json"
        key = cfg.key(recipe.train.steps)
        if (results_path.is_file() and key_path.is_file()
                and json.loads(key_path.read_text()) == key):
            console.print(f"{head}: evaluated, {results_path} found")
            results = json.loads(results_path.read_text())
        else:
            console.print(f"{head}: evaluating")
            results = _eval_variant(run_dir, results_path, cfg, launch, nproc_per_node, progress)
            atomic_write_text(key_path, json.dumps(key, indent=2) + "\n")
        notes += [n for n in results.get("notes", []) if n not in notes]
        metrics = point_metrics(results)
        rows.append({"name": name, "label": label, "disabled": _disabled_of(name),
                     "recipe": str(yaml_path), "run_dir": str(run_dir),
                     "results": str(results_path),
                     "metrics": {_point_key(s, w): v for (s, w), v in metrics.items()}})
    report: dict[str, Any] = {
        "recipe": str(path), "mode": "cumulative" if cumulative else "disable",
        "disabled": parse_components(disable), "folder": str(folder), "paper": paper,
        "train_steps": base.train.steps, "overrides": list(overrides or []),
        "eval": {"steps": cfg.steps, "guidance": cfg.guidance, "num_samples": cfg.num_samples,
                 "metrics": cfg.metrics, "ref": cfg.ref, "seed": cfg.seed},
        "reference_variant": FULL, "notes": notes, "variants": rows,
    }
    report.update(summarise(rows, cfg, paper))
    write_json(folder / "ablation.json", report)
    atomic_write_text(folder / "ablation.md", markdown(report))
    write_chart(folder / "ablation.png", report)
    console.print(results_table(report))
    for note in notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"[green]wrote[/] {folder}/ablation.{{json,md,png}}")
    return report
