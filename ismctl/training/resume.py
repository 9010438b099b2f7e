"""Whether a run directory may be continued with a given recipe.

A checkpoint belongs to the recipe that trained it. Resuming with a recipe that changes what
is trained (model, data, objective, optimiser, seed, ...) would silently continue one run's
weights under another run's settings and overwrite its ``recipe.yaml``, so it is refused.
Safe to change are the fields that only decide how long, where, how fast or how visibly the
same computation runs:

- ``train.steps`` (extend or shorten a run), ``train.grad_accum`` (keep the global batch on
  fewer GPUs), ``train.device``, ``train.precision``, ``train.compile``;
- ``data.num_workers``, and ``data.path`` when it holds the same dataset (a copy moved to
  local disk: its ``manifest.json`` lists the same shards with the same checksums);
- everything under ``run`` (logging, sample grids, checkpoint intervals and retention,
  tracker, run folder) and ``eval`` (evaluation defaults, not used by training).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ismctl.config.recipe import Recipe, load_recipe
from ismctl.utils.errors import UserError

SAFE_FIELDS = frozenset({"train.steps", "train.grad_accum", "train.device", "train.precision",
                         "train.compile", "data.num_workers",
                         # Read only when a run starts: a resumed run continues its own weights.
                         "model.init_from"})
SAFE_SECTIONS = ("run.", "eval.")
SHOWN = 5


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_fields(old: Recipe, new: Recipe) -> list[str]:
    """Dotted paths whose value differs between two resolved recipes, sorted."""
    a, b = flatten(old.model_dump(mode="json")), flatten(new.model_dump(mode="json"))
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def _same_dataset(run_dir: Path, data_path: str) -> bool:
    """The run's stored manifest and the one at ``data_path`` list the same shards."""
    try:
        old = json.loads((run_dir / "manifest.json").read_text())
        new = json.loads((Path(data_path) / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    keys = ("count", "num_classes", "encoder", "scale_factor", "resolution", "shards")
    return all(old.get(k) == new.get(k) for k in keys)


def unsafe_changes(run_dir: Path, stored: Recipe, recipe: Recipe) -> list[str]:
    """The changed fields that make ``recipe`` a different run from ``stored``."""
    out = []
    for name in changed_fields(stored, recipe):
        if name in SAFE_FIELDS or name.startswith(SAFE_SECTIONS):
            continue
        if name == "data.path" and _same_dataset(run_dir, recipe.data.path):
            continue
        out.append(name)
    return out


def check_resumable(run_dir: Path, recipe: Recipe) -> None:
    """Raise a one-line UserError naming the fields if ``recipe`` may not continue the run
    in ``run_dir`` (whose ``recipe.yaml`` is the recipe its checkpoints were trained with)."""
    stored_path = run_dir / "recipe.yaml"
    if not stored_path.is_file():
        raise UserError(f"{stored_path}: missing, so the checkpoints in {run_dir} cannot be "
                        "matched to this recipe; restore it or start over with --overwrite")
    stored = load_recipe(stored_path)
    bad = unsafe_changes(run_dir, stored, recipe)
    if not bad:
        return
    flat_old, flat_new = flatten(stored.model_dump(mode="json")), flatten(
        recipe.model_dump(mode="json"))
    shown = ", ".join(f"{k} {flat_old.get(k)!r} -> {flat_new.get(k)!r}" for k in bad[:SHOWN])
    more = f" and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
    raise UserError(f"{run_dir}: cannot resume with a different recipe ({shown}{more}); "
                    "only train.steps, train.grad_accum, train.device, train.precision, "
                    "train.compile, data.num_workers, the data location, run.* and eval.* may "
                    "change. Use another run.name, or --overwrite to start over")


RUN_FILES = ("recipe.yaml", "metrics.jsonl")


def holds_run(run_dir: Path) -> bool:
    """Whether a folder already holds a run: its recipe, its metrics or a checkpoint, even
    one stopped before its first checkpoint."""
    from ismctl.runs.checkpoint import list_checkpoints

    return any((run_dir / name).is_file() for name in RUN_FILES) or bool(
        list_checkpoints(run_dir))


def check_run_start(run_dir: Path, recipe: Recipe, resume: bool | str,
                    overwrite: bool) -> list[tuple[int, Path]]:
    """Refuse a start the run directory does not allow; return its checkpoints.

    ``resume``: False (a new run; refused over an existing run unless ``overwrite``), True
    (continue; refused without a run or with an unsafe recipe change; a run stopped before
    its first checkpoint restarts at step 0 in its folder) or "auto". Only reads: the
    trainer and ``train --dry-run`` share it.
    """
    from ismctl.runs.checkpoint import list_checkpoints

    ckpts = list_checkpoints(run_dir)
    existing = holds_run(run_dir)
    if resume and overwrite:
        raise UserError("--resume/--auto-resume and --overwrite: choose one")
    if resume is True and not existing:
        raise UserError(f"{run_dir}: no checkpoint to resume from; --auto-resume starts a new "
                        "run when there is none")
    if existing and not (resume or overwrite):
        what = "a run" if ckpts else "a run stopped before its first checkpoint"
        raise UserError(f"{run_dir}: already holds {what}; pass --resume to continue it "
                        "or --overwrite to start over")
    if existing and resume:
        check_resumable(run_dir, recipe)
    return ckpts
