"""``ismctl recipe show``, ``recipe keys``, ``recipe list`` and ``train --dry-run``: what a
recipe resolves to, what can be set, which recipes are shipped, and what a run would do, without
writing anything.
"""

from __future__ import annotations

import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo
from rich.console import Console

from ismctl.config.plugins import ObjectiveSpec, load_all, load_plugins
from ismctl.config.recipe import (
    ObjectiveBase,
    ObjectiveCfg,
    Recipe,
    canonical_key,
    find_recipe,
    load_recipe,
    read_recipe_file,
    recipe_summary,
    section_model,
    shipped_recipes,
)

DEFAULT = "default"


def recipe_fields(recipe: Recipe | None = None) -> list[tuple[str, str, FieldInfo]]:
    """(section, name, field) of every settable field of ``recipe`` (the ``objective`` section
    is its mode's settings model; without a recipe, ismctl's own), in declaration order; fields
    kept only to read older recipes (excluded from the resolved recipe) are left out."""
    out = []
    for section in Recipe.model_fields:
        for name, info in section_model(section, recipe).model_fields.items():
            if not info.exclude:
                out.append((section, name, info))
    return out


def resolve_with_sources(path: str | Path | None, overrides: list[str] | None = None,
                         plugins: list[str] | None = None) -> tuple[Recipe, dict[str, str]]:
    """The validated recipe and, per ``section.field``, where its value came from: ``default``,
    ``file PATH``, ``extends PATH`` (a parent named by ``extends:``), ``--plugin`` or
    ``--set KEY=VALUE``."""
    recipe = load_recipe(path, overrides, plugins)
    found: dict[str, str] = {}
    top = None
    if path is not None:
        top = str(find_recipe(path))
        read_recipe_file(Path(top), found)
    sources = {k: ("file " if f == top else "extends ") + f for k, f in found.items()}
    if plugins:
        sources["objective.plugins"] = " ".join(f"--plugin {p}" for p in plugins)
    for assignment in overrides or []:
        key = assignment.partition("=")[0]
        parts = key.split(".")
        if len(parts) == 1:
            # A whole section replaced at once: every field of it.
            for section, name, _ in recipe_fields(recipe):
                if section == key:
                    sources[f"{section}.{name}"] = f"--set {assignment}"
        else:
            sources[canonical_key(".".join(parts[:2]))] = f"--set {assignment}"
    return recipe, sources


def _value(value: Any) -> str:
    # JSON is YAML: a value shown here can be pasted into a recipe or a --set.
    return json.dumps(value)


def print_resolved(recipe: Recipe, sources: dict[str, str], console: Console) -> None:
    data = recipe.model_dump(mode="json")
    rows = [(f"{s}.{n}", _value(data[s][n]), sources.get(f"{s}.{n}", DEFAULT))
            for s, n, _ in recipe_fields(recipe)]
    key_w = max(len(r[0]) for r in rows)
    val_w = min(40, max(len(r[1]) for r in rows))
    for key, value, source in rows:
        console.print(f"{key:<{key_w}}  {value:<{val_w}}  # {source}", highlight=False,
                      soft_wrap=True, markup=False)


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join(_type_name(a) for a in args if a is not Ellipsis)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def print_shipped(console: Console) -> None:
    """One line per shipped recipe: the name ``train`` takes, and what the recipe is."""
    recipes = shipped_recipes()
    width = max(len(name) for name in recipes)
    for name, path in recipes.items():
        console.print(f"{name:<{width}}  {recipe_summary(path)}", highlight=False,
                      soft_wrap=True, markup=False)


def print_keys(console: Console, plugins: list[str] | None = None) -> None:
    """One line per settable key: name, type, default and description; then each registered
    objective with settings of its own (installed plugins, and the modules ``plugins`` names),
    its keys marked with its mode."""
    load_plugins(plugins or [])
    defaults = Recipe().model_dump(mode="json")
    for section, name, info in recipe_fields():
        console.print(f"{section}.{name} ({_type_name(info.annotation)}, default "
                      f"{_value(defaults[section][name])}): {info.description}",
                      highlight=False, soft_wrap=True, markup=False)
    for spec in load_all():
        if spec.settings is ObjectiveCfg:
            continue
        own = [(n, i) for n, i in spec.settings.model_fields.items()
               if n not in ObjectiveBase.model_fields and not i.exclude]
        console.print(f"objective.mode {spec.name!r}: {_plugin_line(spec)}", highlight=False,
                      soft_wrap=True, markup=False)
        for name, info in own:
            default = json.dumps(info.get_default(call_default_factory=True), default=str)
            console.print(f"objective.{name} ({_type_name(info.annotation)}, default {default}; "
                          f"objective.mode {spec.name}): {info.description}", highlight=False,
                          soft_wrap=True, markup=False)


def _plugin_line(spec: ObjectiveSpec) -> str:
    where = getattr(spec.fn, "path", None) or getattr(spec.fn, "__module__", "?")
    return f"{spec.description or 'a plugin objective'} ({where}); its own keys:"


@dataclass
class TrainPlan:
    """What ``ismctl train`` would do with a recipe: every number a user checks first."""

    run_dir: str
    run_state: str
    device: str
    world_size: int
    batch_size: int
    grad_accum: int
    batch_per_rank: int
    pool_size: int
    pool_batches_per_rank: float
    steps: int
    samples_seen: int
    epochs: float
    dataset: int
    model: str
    parameters: int
    checkpoints: int
    checkpoints_kept: int
    checkpoint_bytes: int
    disk_bytes: int
    notes: list[str] = field(default_factory=list)


def checkpoint_steps(steps: int, every: int) -> list[int]:
    """The steps a run checkpoints at: every ``every`` steps and at the last one."""
    out = list(range(every, steps + 1, every))
    return out if out and out[-1] == steps else [*out, steps]


def kept_checkpoints(saved: list[int], keep_last: int, keep_every: int) -> list[int]:
    """What ``prune_checkpoints`` leaves after the last save: the newest ``keep_last`` and
    every multiple of ``keep_every``."""
    last = set(saved[-keep_last:]) if keep_last else set()
    return sorted(last | {s for s in saved if keep_every and s % keep_every == 0})


def _model_sizes(recipe: Recipe, manifest: Any) -> tuple[int, int, int]:
    """(parameters, bytes of one weights file, bytes of the AdamW state), from the network
    built on the meta device: no memory, no initialisation cost."""
    import torch

    from ismctl.runs.checkpoint import model_from_recipe

    with torch.device("meta"):
        model = model_from_recipe(recipe, manifest)
    params = sum(p.numel() for p in model.parameters())
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    # AdamW keeps two moments per parameter, in the parameter's dtype.
    adam = sum(2 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return params, weights, adam


def _run_state(start: Any, overwrite: bool) -> str:
    """What the run would do with its folder, from the trainer's own checks."""
    if start.resume_from is not None:
        return f"resume from step {start.resume_from[0]}"
    if start.restart_in_place:
        return "restart at step 0 in the existing folder (no checkpoint yet)"
    if overwrite and start.run_dir.exists():
        return "existing run replaced (--overwrite)"
    return "new"


def plan_training(recipe: Recipe, recipe_path: str | None, resume: bool | str = False,
                  overwrite: bool = False) -> TrainPlan:
    """Check everything ``train`` checks before its first step (the same function,
    ``ismctl.training.preflight.check_start``) and plan the run; writes nothing. The world size is
    torchrun's ``WORLD_SIZE`` (1 without torchrun)."""
    from ismctl.system.distributed import resolve_device
    from ismctl.training.preflight import check_start

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(recipe.train.device, int(os.environ.get("LOCAL_RANK", "0")))
    cfg, data = recipe.train, recipe.data
    start = check_start(recipe, recipe_path, resume, overwrite, world)
    manifest, micro, run_dir = start.manifest, start.micro, start.run_dir
    params, weights_bytes, adam_bytes = _model_sizes(recipe, manifest)
    state = _run_state(start, overwrite)

    coupling = recipe.coupling
    pool = getattr(coupling, "pool_size", None)
    if pool is None:
        pool = getattr(coupling, "pool_batches", 0) * data.batch_size
    copies = 1 + int(recipe.ema.target_enabled) + int(recipe.ema.inference_enabled)
    per_ckpt = copies * weights_bytes + adam_bytes
    saved = checkpoint_steps(cfg.steps, recipe.run.ckpt_every)
    kept = kept_checkpoints(saved, recipe.run.keep_last, recipe.run.keep_every)
    notes = start.notes()
    if manifest.count < data.batch_size:
        notes.append(f"the data set ({manifest.count} samples) is smaller than one batch "
                     f"({data.batch_size})")
    return TrainPlan(
        run_dir=str(run_dir), run_state=state, device=str(device), world_size=world,
        batch_size=data.batch_size, grad_accum=cfg.grad_accum, batch_per_rank=micro,
        pool_size=int(pool), pool_batches_per_rank=pool / micro, steps=cfg.steps,
        samples_seen=cfg.steps * data.batch_size,
        epochs=cfg.steps * data.batch_size / max(1, manifest.count), dataset=manifest.count,
        model=recipe.model.preset, parameters=params, checkpoints=len(saved),
        checkpoints_kept=len(kept), checkpoint_bytes=per_ckpt,
        # The newest checkpoint is written in full before the oldest is pruned.
        disk_bytes=per_ckpt * (len(kept) + 1), notes=notes)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} TB"


def print_plan(plan: TrainPlan, console: Console) -> None:
    lines = [
        ("run", f"{plan.run_dir} ({plan.run_state})"),
        ("device", f"{plan.device}, {plan.world_size} rank(s)"),
        ("batch", f"{plan.batch_size} global = {plan.batch_per_rank} per rank x "
                  f"{plan.world_size} rank(s) x {plan.grad_accum} accumulation step(s)"),
        ("sOT pool", f"{plan.pool_size} samples ({plan.pool_batches_per_rank:g} "
                     "per-rank batches)" if plan.pool_size else "0 (independent pairing)"),
        ("steps", f"{plan.steps:,} ({plan.samples_seen:,} samples, {plan.epochs:,.1f} epochs "
                  f"of {plan.dataset:,})"),
        ("model", f"{plan.model}, {plan.parameters:,} parameters"),
        ("checkpoints", f"{plan.checkpoints} written, {plan.checkpoints_kept} kept, "
                        f"{_size(plan.checkpoint_bytes)} each"),
        ("disk", f"up to {_size(plan.disk_bytes)} of checkpoints"),
    ]
    width = max(len(k) for k, _ in lines)
    for key, text in lines:
        console.print(f"{key:<{width}}  {text}", highlight=False, soft_wrap=True, markup=False)
    for note in plan.notes:
        console.print(f"note: {note}", highlight=False, soft_wrap=True, markup=False)
    console.print("dry run: nothing written", highlight=False, markup=False)
