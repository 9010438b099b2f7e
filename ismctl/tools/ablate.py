"""`ismctl ablate`: switch iSM components off (or sweep a field), train and evaluate each
variant over several seeds, compare each variant at its own best guidance.

The five components of method §3 and the recipe fields each one flips when disabled:

    intrinsic-guidance   objective.mode ism -> sm (CFG inside the finest bootstrap targets at
                         guidance.cfg_scale, sampled by its authors' protocol: method §2)
    interval-guidance    guidance.interval_start -> 0
    wavelet              loss.name -> mse
    sot                  coupling.pool_size -> 0 (independent noise-data pairing)
    twin-ema             ema.target_decay -> ema.inference_decay (one EMA in both roles, the
                         pre-twin setting: method §3.4 ablates 0.9999 -> 0.95)

``--disable a,b`` compares the full recipe with one variant that has all the named components
off; ``--cumulative`` rebuilds the paper's table: a baseline, then each component added in the
paper's order, ending at the full iSM recipe. The baseline row is a recipe of its own
(``--baseline RECIPE``; by default the official SM algorithm beside the recipe: ``sm_<size>.yaml``
for ``ism_<size>.yaml``, ``sm_quickstart.yaml`` for the quickstart), or, for a recipe without
one, the recipe with all five components off (``--baseline components-off``). The two differ:
the official SM recipes also set its bootstrap share, time grid, target clipping, interpolation
offset and, on ImageNet, its EMA, weight decay and steps.
``--sweep key=v1,v2`` makes one variant per value of a recipe field (the paper's component
sweeps; a single value adds one variant to compare with an earlier study of the same
settings). With ``--seeds 0,1,2`` every variant is trained once per seed (``train.seed``).
Every run is a
derived recipe saved as YAML in the ablation folder, trained (in this process or under
torchrun) and evaluated with the same evaluation settings: the recipe's ``eval`` section, its
guidance grid included, so each variant is compared at its own best w per step count
(``ismctl/tools/ablate_report.py``). The work is resumable: a run whose final checkpoint exists is
not retrained, an evaluation whose results and settings are on disk is not rerun.

``--method NAME:RECIPE[:KEY=V1,V2,...]`` (repeatable) compares methods instead: any recipes,
a shipped baseline beside a plugin's, each with its own knob grid, one variant per knob value
(``NAME_KEY=V``, or ``NAME`` without a grid), every variant trained and evaluated the same way.
The evaluation settings are the first method's (its step counts must be ones every method can
sample); an intrinsic-guidance method is evaluated over its own recipe's w grid, a baked one at
w = 0 (each by its own protocol). ``--dry-run`` prints the variants and their runs and stops.

A variant is named by what it switches off ("full", "no-wavelet+sot", ..., "baseline"), by
its baseline recipe ("baseline-sm_xl"), by the swept value ("guidance.w_max=2") or by its method
and knob value ("sm_guidance.cfg_scale=1.5"), and a run by its variant and seed ("full-seed1"),
so ``--disable``, ``--cumulative`` and ``--seeds`` runs in one folder share what they have in
common.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape

from ismctl.config.recipe import (
    Recipe,
    apply_override,
    check_sampling_steps,
    find_recipe,
    load_recipe,
    recipe_from_dict,
    save_recipe,
)
from ismctl.objectives import sampling
from ismctl.sampling.protocol import Grid, plan_points, run_sampler
from ismctl.system.launch import Torchrun
from ismctl.system.slurm import Cell, Launcher, SlurmOptions, print_states
from ismctl.tools.ablate_report import aggregate, main_values, markdown, results_table, summarise
from ismctl.tools.ablate_report import write_chart as write_chart
from ismctl.training.resume import check_resumable
from ismctl.utils.console import make_console
from ismctl.utils.errors import UserError
from ismctl.utils.fileio import atomic_write_text, check_writable, write_json

DEFAULT_RECIPE = "ism_xl"  # a shipped recipe
FULL, BASELINE = "full", "baseline"
COMPONENTS_OFF = "components-off"


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


# The paper's order (method §3): the cumulative table adds the components in this order.
COMPONENTS: dict[str, Component] = {c.name: c for c in (
    Component("intrinsic-guidance", "intrinsic guidance", lambda r: {"objective.mode": "sm"}),
    Component("interval-guidance", "interval guidance",
              lambda r: {"guidance.interval_start": 0.0}),
    Component("wavelet", "wavelet loss", lambda r: {"loss.name": "mse"}),
    Component("sot", "sOT", lambda r: {"coupling.pool_size": 0}),
    Component("twin-ema", "twin EMA", lambda r: {"ema.target_decay": r.ema.inference_decay}),
)}
ORDER = tuple(COMPONENTS)

# method §3: FID-50K after 250K iterations of SiT-XL/2 on ImageNet 256, keyed by how many
# components (in the paper's order) are on, then by the number of sampling steps. The
# baseline row (0 components) is not given at 250K iterations.
PAPER_FID: dict[int, dict[int, float]] = {
    1: {1: 9.62, 4: 3.17},
    2: {1: 8.49, 4: 2.81},
    3: {1: 8.12, 4: 2.64},
    4: {1: 7.97, 4: 2.23},
    5: {1: 6.56, 4: 2.16},
}
PAPER_NOTE = ("FID-50K of SiT-XL/2 after 250K iterations (method §3); the SM baseline is reported "
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
                        f"({', '.join(ORDER)}), --cumulative or --sweep KEY=V1,V2")
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


def default_baseline(recipe_path: str) -> str | None:
    """The official SM algorithm beside an iSM recipe: ``sm_<size>.yaml`` for ``ism_<size>.yaml``,
    ``sm_<name>.yaml`` for another ``<name>.yaml`` (``sm_quickstart.yaml``) when it exists; None
    (the components-off baseline) otherwise."""
    path = Path(recipe_path)
    sibling = path.with_name("sm_" + path.name.removeprefix("ism_"))
    return str(sibling) if sibling.is_file() else None


def baseline_recipe(recipe_path: str, baseline: str | None, cumulative: bool) -> str | None:
    """The recipe file of the cumulative table's first row, or None for the recipe with its
    components off. ``baseline``: a recipe file, ``components-off``, or None (the default)."""
    if baseline is not None and not cumulative:
        raise UserError(f"--baseline {baseline}: only with --cumulative (it is the first row "
                        "of the cumulative table)")
    if not cumulative or baseline == COMPONENTS_OFF:
        return None
    if baseline is None:
        return default_baseline(recipe_path)
    try:
        return str(find_recipe(baseline))
    except UserError as exc:
        raise UserError(f"--baseline {exc} (or pass {COMPONENTS_OFF})") from exc


def baseline_variant(path: str, overrides: list[str] | None) -> tuple[str, Recipe]:
    """The baseline recipe as a variant named ``baseline-<file stem>``, with the ablation's
    ``--set`` overrides applied like to every other variant."""
    name = f"{BASELINE}-{Path(path).stem}"
    return name, _named(load_recipe(path, overrides), name)


def _disabled_if(recipe: Recipe, names: list[str]) -> Recipe:
    return disable(recipe, names) if names else recipe


def variant_label(name: str, cumulative: bool) -> str:
    """Row label: the paper's "+ component" wording in the cumulative table."""
    if name.startswith(f"{BASELINE}-"):
        return f"baseline: {name.removeprefix(f'{BASELINE}-')}.yaml"
    disabled = _disabled_of(name)
    if cumulative:
        if name == BASELINE:
            return "baseline (components off)"
        on = len(ORDER) - len(disabled)
        label = f"+ {COMPONENTS[ORDER[on - 1]].label}"
        return f"{label} (= full iSM)" if name == FULL else label
    if name == FULL:
        return "full iSM"
    return "without " + ", ".join(COMPONENTS[c].label for c in disabled)


def _disabled_of(name: str) -> list[str]:
    if name == FULL:
        return []
    if name == BASELINE or name.startswith(f"{BASELINE}-"):
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
    """The recipe trains the paper's network with the paper's objective (method §3.5): the
    ``Recipe()`` defaults are that setting, so compare every section the method lives in."""
    paper = Recipe()
    sections = ("model", "objective", "guidance", "loss", "coupling", "ema")
    return all(getattr(recipe, s) == getattr(paper, s) for s in sections)


_METHOD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+-]*")


@dataclass(frozen=True)
class MethodSpec:
    """One method of a comparison: a recipe and its knob grid (none: the recipe alone)."""

    name: str
    recipe: str
    knob: str | None = None
    values: tuple[str, ...] = ()


def parse_method(text: str) -> MethodSpec:
    """``NAME:RECIPE`` or ``NAME:RECIPE:KEY=V1,V2,...`` (values parsed as YAML; brackets keep a
    list value whole, as in ``--sweep``)."""
    name, _, rest = text.partition(":")
    recipe, _, grid = rest.partition(":")
    key, sep, raw = grid.partition("=")
    values = tuple(_split_values(raw))
    if not _METHOD_NAME.fullmatch(name) or not recipe or (grid and not (sep and key and values)):
        raise UserError(f"--method {text!r}: expected NAME:RECIPE or NAME:RECIPE:KEY=V1,V2,... "
                        "(NAME of letters, digits, '.', '+' and '-'), e.g. "
                        "sm:sm_quickstart:guidance.cfg_scale=1,1.5,2")
    return MethodSpec(name, recipe, key or None, values)


def plan_methods(methods: list[str], overrides: list[str] | None,
                 plugins: list[str] | None = None) -> list[tuple[str, str, Recipe]]:
    """(variant name, label, recipe) of every knob value of every method, in order; each recipe
    with ``overrides`` applied and its ``run.name`` set to the variant's name."""
    specs = [parse_method(m) for m in methods]
    if len({s.name for s in specs}) < len(specs):
        raise UserError(f"--method: two methods share a name ({', '.join(s.name for s in specs)})")
    out = []
    for spec in specs:
        try:
            base = load_recipe(spec.recipe, overrides, plugins)
        except UserError as exc:
            raise UserError(f"--method {spec.name}: {exc}") from exc
        if spec.knob is None:
            out.append((spec.name, spec.name, _named(base, spec.name)))
            continue
        recipes = []
        for value in spec.values:
            name = f"{spec.name}_{spec.knob}={value}"
            data = apply_override(base.model_dump(mode="json"), f"{spec.knob}={value}")
            recipe = recipe_from_dict(data, f"--method {spec.name}: {spec.knob}={value}")
            recipes.append((name, f"{spec.name}, {spec.knob}={value}", _named(recipe, name)))
        dumps = [yaml.safe_dump(r.model_dump(mode="json")) for _, _, r in recipes]
        if len(set(dumps)) < len(recipes):
            raise UserError(f"--method {spec.name}: two values of {spec.knob} give the same "
                            "recipe")
        out += recipes
    return out


def check_methods_sample(variants: list[tuple[str, Recipe]], steps: list[int]) -> None:
    """Every method samples every step count of the evaluation (its own protocol's rule)."""
    for name, recipe in variants:
        try:
            check_sampling_steps(steps, sampling(recipe), recipe.objective.base_steps,
                                 recipe.objective.mode)
        except ValueError as exc:
            raise UserError(f"--method {name}: the evaluation's eval.steps {steps} (the first "
                            f"method's): {exc}") from exc


@dataclass(frozen=True)
class EvalSettings:
    """Identical for every variant, so the table compares like with like (``own_grid``: an
    intrinsic-guidance variant is evaluated over its own recipe's w grid, for methods that
    differ in their recipes)."""

    steps: list[int]
    guidance: Grid
    num_samples: int
    metrics: list[str]
    ref: str | None
    batch_size: int
    seed: int
    device: str
    inception_weights: str | None
    own_grid: bool = False

    def key(self, checkpoint_step: int, guidance: Grid) -> dict[str, Any]:
        """The settings as stored next to a result (JSON round-tripped, so that a stored key
        compares equal to a fresh one)."""
        return json.loads(json.dumps({
            "steps": self.steps, "guidance": guidance, "num_samples": self.num_samples,
            "metrics": self.metrics, "ref": self.ref, "seed": self.seed,
            "inception_weights": self.inception_weights, "checkpoint_step": checkpoint_step}))


def eval_settings(recipe: Recipe, num_samples: int | None,
                  inception_weights: str | None, own_grid: bool = False) -> EvalSettings:
    e = recipe.eval
    return EvalSettings(steps=list(e.steps), guidance=e.guidance,
                        num_samples=e.num_samples if num_samples is None else num_samples,
                        metrics=list(e.metrics),
                        ref=e.ref, batch_size=e.batch_size, seed=e.seed,
                        device=recipe.train.device, inception_weights=inception_weights,
                        own_grid=own_grid)


def _check_stored_recipe(recipe: Recipe, run_dir: Path) -> None:
    """Refuse to continue a run whose checkpoints were trained with another recipe (fields
    that only change how long, how fast or how visibly it runs may differ:
    ``ismctl.training.resume``)."""
    if (run_dir / "checkpoints").is_dir():
        check_resumable(run_dir, recipe)


def _final_step(run_dir: Path) -> int | None:
    from ismctl.runs.checkpoint import list_checkpoints

    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][0] if ckpts else None


def _run_subprocess(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        raise UserError(f"{what}: `{' '.join(cmd)}` failed with exit code {done.returncode}")


def _threads_args(threads: int | None) -> list[str]:
    return [] if threads is None else ["--threads", str(threads)]


def _train_args(yaml_path: Path, progress: bool, threads: int | None) -> list[str]:
    """The ``ismctl train`` arguments of a variant's run (torchrun and SLURM jobs)."""
    flag = "--progress" if progress else "--no-progress"
    return ["train", str(yaml_path), "--auto-resume", flag, *_threads_args(threads)]


def _train_variant(recipe: Recipe, yaml_path: Path, torchrun: Torchrun | None, progress: bool,
                   threads: int | None = None) -> None:
    if torchrun is not None:
        _run_subprocess([*torchrun.command(f"train-{recipe.run.name}"),
                         *_train_args(yaml_path, progress, threads)],
                        f"train {recipe.run.name}")
        return
    from ismctl.training.trainer import train

    train(recipe, str(yaml_path), resume="auto", overwrite=False, progress=progress)


def _replaces(out: Path) -> bool:
    """Results stored at ``out`` under other settings are this ablation's own earlier ones
    (its settings key did not match): the new evaluation replaces them."""
    return out.is_file()


def _eval_args(run_dir: Path, out: Path, cfg: EvalSettings, guidance: Grid,
               threads: int | None) -> list[str]:
    """The ``ismctl eval`` arguments of a variant's run (torchrun and SLURM jobs)."""
    # A per-step-count grid cannot be said on the command line: the run's recipe holds it.
    grid = [] if isinstance(guidance, dict) else [
        "--guidance", ",".join(f"{w:g}" for w in guidance)]
    cmd = ["eval", str(run_dir), "--steps", ",".join(map(str, cfg.steps)),
           *grid, "--num-samples", str(cfg.num_samples), "--metrics", ",".join(cfg.metrics),
           "--out", str(out), "--batch-size", str(cfg.batch_size), "--seed", str(cfg.seed),
           "--device", cfg.device, *(["--overwrite"] if _replaces(out) else [])]
    if cfg.ref:
        cmd += ["--ref", cfg.ref]
    if cfg.inception_weights:
        cmd += ["--inception-weights", cfg.inception_weights]
    return [*cmd, *_threads_args(threads)]


def _eval_variant(run_dir: Path, out: Path, cfg: EvalSettings, guidance: Grid,
                  torchrun: Torchrun | None, progress: bool,
                  threads: int | None = None) -> dict[str, Any]:
    if torchrun is not None:
        _run_subprocess([*torchrun.command(f"eval-{run_dir.name}"),
                         *_eval_args(run_dir, out, cfg, guidance, threads)],
                        f"eval {run_dir.name}")
        # Rank 0 of the job wrote the results; only the main node reads and reports them.
        return json.loads(out.read_text()) if torchrun.is_main_node else {}
    from ismctl.evaluation import evaluate

    return evaluate(str(run_dir), cfg.steps, guidance, cfg.num_samples, cfg.ref,
                    cfg.metrics, out, cfg.inception_weights, False, cfg.batch_size, cfg.seed,
                    device=cfg.device, progress=progress, overwrite=_replaces(out))


def plan_sweep(recipe: Recipe, sweep: str) -> list[tuple[str, Recipe]]:
    """One variant per value of ``KEY=V1,V2,...`` (values parsed as YAML, each checked by the
    recipe schema), named ``KEY=V``; a YAML list value is written in brackets:
    ``loss.detail_weights=[4,2,1],2``. The value the recipe already has gives the recipe
    itself, named ``full`` like in the other modes, so a sweep in the folder of an earlier
    ablation reuses its runs."""
    key, sep, raw = sweep.partition("=")
    values = _split_values(raw)
    if not sep or not key or not values:
        raise UserError(f"--sweep {sweep!r}: expected KEY=V1[,V2,...], e.g. "
                        "guidance.w_max=2,3.5,5")
    out = []
    for value in values:
        name = f"{key}={value}"
        data = apply_override(recipe.model_dump(mode="json"), name)
        out.append((name, recipe_from_dict(data, f"--sweep {name}")))
    dumps = [yaml.safe_dump(r.model_dump(mode="json")) for _, r in out]
    if len(set(dumps)) < len(out):
        raise UserError(f"--sweep {sweep!r}: two values give the same recipe")
    own = yaml.safe_dump(recipe.model_dump(mode="json"))
    out = [(FULL if d == own else name, r) for (name, r), d in zip(out, dumps, strict=True)]
    return [(name, _named(r, name)) for name, r in out]


def _split_values(raw: str) -> list[str]:
    """Comma-separated values, commas inside brackets kept: ``[4,2,1],2`` -> two values."""
    values, depth, cur = [], 0, ""
    for ch in raw:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            values.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        values.append(cur.strip())
    return values


def run_name(variant: str, seed: int, seeds: list[int] | None) -> str:
    """A run of one variant: ``variant`` alone when no seeds were asked for."""
    return variant if seeds is None else f"{variant}-seed{seed}"


def _point_guidance(recipe: Recipe, cfg: EvalSettings) -> Grid:
    # Each variant is sampled by its objective's protocol (ismctl.sampling.protocol): a baked
    # one from the conditional output (sm adds its flow-CFG entry at 128 steps), its guidance
    # fixed by its training; an intrinsic one (ism, intrinsic meanflow) over the w grid.
    grid = recipe.eval.guidance if cfg.own_grid else cfg.guidance
    return grid if run_sampler(recipe) == "intrinsic" else [0.0]


def run_ablation(recipe_path: str | None, disable: list[str] | None, cumulative: bool,
                 launch: str | None = None, nproc_per_node: int = 1,
                 overrides: list[str] | None = None, out: str | Path | None = None,
                 eval_num_samples: int | None = None, progress: bool = True,
                 inception_weights: str | None = None, seeds: list[int] | None = None,
                 sweep: str | None = None, nodes: Torchrun | None = None,
                 threads: int | None = None, report_name: str = "ablation",
                 baseline: str | None = None, slurm: SlurmOptions | None = None,
                 submit: bool = True, report_mode: str = "all",
                 methods: list[str] | None = None, plugins: list[str] | None = None,
                 dry_run: bool = False) -> dict[str, Any]:
    """Plan, train, evaluate and compare the ablation variants; returns the report dict
    (also written as ``<report_name>.json``, ``.md`` and ``.png`` in the folder, so several
    studies can share one folder and the runs they have in common).

    ``baseline`` (``--cumulative`` only): the first row's recipe file, ``components-off``, or
    None for the default (:func:`baseline_recipe`); the report names it. ``methods``
    (``--method``): compare these recipes and knob grids instead (:func:`plan_methods`);
    ``plugins``: modules that register objectives (``--plugin``); ``dry_run``: print the
    variants and their runs, train nothing and return the plan.

    ``nodes``: the multi-node part of the torchrun launch (nnodes, node rank, rendezvous); every
    node runs the same command, and only node 0 writes the report (empty dict elsewhere).

    ``launch="slurm"``: every run (variant x seed) is one cell of :mod:`ismctl.system.slurm`, one
    SLURM job (one job array for the cells submitted together) that trains and evaluates it on
    the allocation ``slurm`` describes. The call returns at once with the cells' states
    (``{"cells": [...]}``); the cells neither done nor queued are submitted (``submit``), and
    the report is written by the last cell to finish (or by a call that finds every cell done).
    ``submit=False`` only looks: it writes the report of the variants finished so far.
    ``report_mode``: ``all`` trains and evaluates what is missing; ``finished`` reports the
    variants whose every run is done and leaves the others out; ``complete`` writes the report
    only when every run is done (else returns an empty dict), training nothing.
    """
    if launch not in (None, "torchrun", "slurm"):
        raise UserError(f"--launch {launch}: expected 'torchrun' or 'slurm' (or nothing: in "
                        "this process)")
    report_args: dict[str, Any] = dict(
        recipe_path=recipe_path, disable=disable, cumulative=cumulative, overrides=overrides,
        out=out, eval_num_samples=eval_num_samples, progress=False,
        inception_weights=inception_weights, seeds=seeds, sweep=sweep, threads=threads,
        report_name=report_name, baseline=baseline, methods=methods, plugins=plugins)
    if launch == "slurm":
        slurm = slurm or SlurmOptions(nproc_per_node=nproc_per_node)
    if not report_name or "/" in report_name:
        raise UserError(f"--report {report_name!r}: a file name stem, e.g. ablation")
    if nproc_per_node < 1:
        raise UserError(f"--nproc-per-node {nproc_per_node}: must be >= 1")
    if nodes is not None and nodes.multi_node and launch != "torchrun":
        raise UserError("--nnodes / --rdzv-endpoint: need --launch torchrun")
    torchrun = None
    if launch == "torchrun":
        torchrun = replace(nodes or Torchrun(), nproc_per_node=nproc_per_node)
    main_node = torchrun is None or torchrun.is_main_node
    if seeds is not None and (not seeds or len(set(seeds)) != len(seeds)):
        raise UserError(f"--seeds {seeds}: give distinct seeds, e.g. 0,1,2")
    labels: dict[str, str] = {}
    if methods:
        if recipe_path is not None or disable or cumulative or sweep is not None or baseline:
            raise UserError("--method compares whole recipes: give no RECIPE, --disable, "
                            "--cumulative, --sweep or --baseline with it")
        planned = plan_methods(methods, overrides, plugins)
        variants = [(name, recipe) for name, _, recipe in planned]
        labels = {name: label for name, label, _ in planned}
        path = str(find_recipe(parse_method(methods[0]).recipe))
        base, mode, reference = variants[0][1], "compare", variants[0][0]
        check_methods_sample(variants, base.eval.steps)
    else:
        # The file itself (a shipped recipe's name resolved), so that sm_<size>.yaml beside it
        # is found.
        path = str(find_recipe(recipe_path or DEFAULT_RECIPE))
        report_args["recipe_path"] = path
        base = load_recipe(path, overrides, plugins)
        if sweep is not None:
            if disable or cumulative:
                raise UserError("--sweep is exclusive with --disable and --cumulative")
            variants, mode = plan_sweep(base, sweep), "sweep"
            names = [name for name, _ in variants]
            reference = FULL if FULL in names else names[0]
        else:
            variants = plan_variants(base, disable, cumulative)
            mode, reference = ("cumulative" if cumulative else "disable"), FULL
    baseline_path = baseline_recipe(path, baseline, cumulative and sweep is None)
    if baseline_path is not None:
        variants[0] = baseline_variant(baseline_path, overrides)
    for name, _ in variants:
        if name not in labels:
            labels[name] = (_sweep_label(base, sweep, name) if sweep is not None
                            else variant_label(name, cumulative))
    stem = ("compare-" + "-".join(parse_method(m).name for m in methods) if methods
            else f"ablate-{Path(path).stem}")
    folder = Path(out) if out is not None else Path(base.run.root) / stem
    check_writable(folder, "--out", folder=True)
    cfg = eval_settings(base, eval_num_samples, inception_weights, own_grid=mode == "compare")
    paper = is_paper_setting(base) and sweep is None and not methods
    train_seeds = seeds if seeds is not None else [base.train.seed]
    console = make_console()
    if dry_run:
        return print_ablation_plan(variants, labels, folder, cfg, train_seeds, seeds, console)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    total = len(variants) * len(train_seeds)
    select = None
    cells: list[Cell] = []
    unfinished: list[str] = []
    report_args["out"] = str(folder)
    for v_index, (name, recipe) in enumerate(variants):
        label = labels[name]
        runs, results_list = [], []
        for s_index, seed in enumerate(train_seeds):
            rname = run_name(name, seed, seeds)
            run = recipe.model_copy(update={
                "run": recipe.run.model_copy(update={"root": str(folder), "name": rname}),
                "train": recipe.train.model_copy(update={"seed": seed})})
            yaml_path, run_dir = folder / f"{rname}.yaml", folder / rname
            _check_stored_recipe(run, run_dir)
            save_recipe(run, yaml_path)
            head = (f"ablate {v_index * len(train_seeds) + s_index + 1}/{total} "
                    f"{rname} ({label})")
            if launch == "slurm" or report_mode != "all":
                done = _run_done(run, run_dir, cfg)
                if launch == "slurm":
                    results_path = run_dir / "eval" / "results.json"
                    guidance = _point_guidance(run, cfg)
                    after = functools.partial(
                        _cell_finished, str(run_dir), cfg.key(run.train.steps, guidance),
                        report_args)
                    cells.append(Cell(rname, [
                        _train_args(yaml_path, False, threads),
                        _eval_args(run_dir, results_path, cfg, guidance, threads)],
                        run_dir, done, after))
                    continue
                if not done:
                    unfinished.append(rname)
                    if report_mode == "complete":
                        return {}
                    continue
            if _final_step(run_dir) == run.train.steps:
                console.print(f"{head}: trained, final checkpoint found", markup=False)
            else:
                console.print(f"{head}: training", markup=False)
                _train_variant(run, yaml_path, torchrun, progress, threads)
            results = _evaluated(run, run_dir, cfg, torchrun, progress, console, head, threads)
            if not main_node:
                continue
            notes += [n for n in results.get("notes", []) if n not in notes]
            select = select or results.get("select_by")
            runs.append({"seed": seed, "run_dir": str(run_dir), "recipe": str(yaml_path),
                         "results": str(run_dir / "eval" / "results.json")})
            results_list.append(results)
        if not main_node or launch == "slurm" or not runs or len(runs) < len(train_seeds):
            continue
        rows.append({"name": name, "label": label,
                     "disabled": [] if mode in ("sweep", "compare") else _disabled_of(name),
                     "recipe": runs[0]["recipe"], "runs": runs,
                     **aggregate(results_list, select)})
        if paper:
            rows[-1]["paper_fid"] = paper_fid(name)
    if launch == "slurm":
        return _on_slurm(cells, folder, slurm, submit, report_args, report_name, console)
    if not main_node:
        console.print(f"node {torchrun.node_rank}: every variant done; node 0 writes the report")
        return {}
    report: dict[str, Any] = {
        "recipe": str(path), "mode": mode, "disabled": parse_components(disable),
        "methods": list(methods or []),
        "sweep": sweep, "folder": str(folder), "paper": paper, "seeds": train_seeds,
        "train_steps": base.train.steps, "overrides": list(overrides or []),
        "eval": {"steps": cfg.steps, "guidance": cfg.guidance, "num_samples": cfg.num_samples,
                 "metrics": cfg.metrics, "ref": cfg.ref, "seed": cfg.seed},
        "select_by": select, "reference_variant": reference, "notes": notes, "variants": rows,
        "baseline": _baseline_info(mode, baseline_path),
        "unfinished": unfinished,
    }
    report.update(summarise(rows, reference))
    report["main_metrics"] = main_values(report["value_names"], select)
    write_json(folder / f"{report_name}.json", report)
    note = (f"Paper FID: {PAPER_NOTE}; this run: train.steps = {base.train.steps}."
            if paper else "")
    atomic_write_text(folder / f"{report_name}.md", markdown(report, note))
    write_chart(folder / f"{report_name}.png", report)
    console.print(results_table(report))
    for n in notes:
        console.print(f"[yellow]note:[/] {escape(n)}")
    console.print(f"[green]wrote[/] {escape(f'{folder}/{report_name}')}.{{json,md,png}}")
    return report


def print_ablation_plan(variants: list[tuple[str, Recipe]], labels: dict[str, str], folder: Path,
                        cfg: EvalSettings, train_seeds: list[int], seeds: list[int] | None,
                        console: Console) -> dict[str, Any]:
    """``--dry-run``: every variant, its runs and the points each is evaluated at; nothing is
    written. Returns the plan."""
    plan = []
    console.print(f"ablation folder {folder}; evaluation: steps {cfg.steps}, "
                  f"{cfg.num_samples} samples per point, metrics {', '.join(cfg.metrics)}",
                  markup=False, highlight=False, soft_wrap=True)
    for name, recipe in variants:
        runs = [run_name(name, seed, seeds) for seed in train_seeds]
        grid = _point_guidance(recipe, cfg)
        points = [p.label() for p in plan_points(recipe, cfg.steps, grid)]
        plan.append({"name": name, "label": labels[name], "mode": recipe.objective.mode,
                     "runs": runs, "train_steps": recipe.train.steps, "points": points})
        console.print(f"{name} ({labels[name]}): objective {recipe.objective.mode}, "
                      f"{recipe.train.steps} steps, runs {', '.join(runs)}; evaluated at "
                      f"{'; '.join(points)}", markup=False, highlight=False, soft_wrap=True)
    console.print("dry run: nothing trained or written", markup=False, highlight=False)
    return {"dry_run": True, "folder": str(folder), "variants": plan}


def _run_done(recipe: Recipe, run_dir: Path, cfg: EvalSettings) -> bool:
    """Trained to its last step and evaluated with these settings."""
    key_path = run_dir / "eval" / "ablation-settings.json"
    if _final_step(run_dir) != recipe.train.steps or not key_path.is_file():
        return False
    try:
        stored = json.loads(key_path.read_text())
    except ValueError:
        return False
    return ((run_dir / "eval" / "results.json").is_file()
            and stored == cfg.key(recipe.train.steps, _point_guidance(recipe, cfg)))


def _cell_finished(run_dir: str, key: dict[str, Any], report_args: dict[str, Any]) -> None:
    """The end of a SLURM cell (its job's task 0): mark its evaluation as made with the
    ablation's settings, and write the report if it was the last cell to finish."""
    atomic_write_text(Path(run_dir) / "eval" / "ablation-settings.json",
                      json.dumps(key, indent=2) + "\n")
    run_ablation(**report_args, report_mode="complete")


def _on_slurm(cells: list[Cell], folder: Path, options: SlurmOptions, submit: bool,
              report_args: dict[str, Any], report_name: str,
              console: Console) -> dict[str, Any]:
    """Submit the cells neither done nor queued and show every cell's state; the report when
    every cell is done (with ``submit=False``, of the variants finished so far)."""
    launcher = Launcher(folder / "slurm", options, f"ismctl-ablate-{folder.name}")
    states = launcher.sync(cells, submit=submit)
    print_states(states, console, f"ismctl ablate --launch slurm: {folder}")
    out: dict[str, Any] = {"cells": [vars(s) for s in states]}
    if all(s.state == "done" for s in states):
        return run_ablation(**report_args) | out
    if not submit and any(s.state == "done" for s in states):
        return run_ablation(**report_args, report_mode="finished") | out
    waiting = sum(s.state in ("pending", "running", "submitted") for s in states)
    console.print(f"{waiting} of {len(states)} cells queued; the last to finish writes "
                  f"{folder}/{report_name}.{{json,md,png}} (--status shows the cells and "
                  "reports the finished ones)", markup=False, highlight=False)
    return out


def _baseline_info(mode: str, path: str | None) -> dict[str, Any] | None:
    """What the cumulative table's first row is, for the report."""
    if mode != "cumulative":
        return None
    if path is None:
        return {"kind": COMPONENTS_OFF, "recipe": None,
                "description": "the recipe with all five iSM components switched off (not a "
                               "published SM configuration; --baseline RECIPE compares with one)"}
    return {"kind": "recipe", "recipe": path,
            "description": f"{path}, trained and evaluated like the other rows (its own "
                           "recipe, its own best guidance, sampled by its own protocol)"}


def _sweep_label(base: Recipe, sweep: str, name: str) -> str:
    if name != FULL:
        return name
    key = sweep.partition("=")[0]
    return f"{key}={json.dumps(get_field(base, key))} (the recipe's own)"


def _evaluated(recipe: Recipe, run_dir: Path, cfg: EvalSettings, torchrun: Torchrun | None,
               progress: bool, console: Console, head: str,
               threads: int | None = None) -> dict[str, Any]:
    """The run's evaluation results, computed unless stored with the same settings."""
    results_path = run_dir / "eval" / "results.json"
    key_path = run_dir / "eval" / "ablation-settings.json"
    guidance = _point_guidance(recipe, cfg)
    key = cfg.key(recipe.train.steps, guidance)
    if (results_path.is_file() and key_path.is_file()
            and json.loads(key_path.read_text()) == key):
        console.print(f"{head}: evaluated, {results_path} found", markup=False)
        return json.loads(results_path.read_text())
    console.print(f"{head}: evaluating", markup=False)
    results = _eval_variant(run_dir, results_path, cfg, guidance, torchrun, progress, threads)
    if torchrun is None or torchrun.is_main_node:
        atomic_write_text(key_path, json.dumps(key, indent=2) + "\n")
    return results
