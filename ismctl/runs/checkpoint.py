"""Checkpoints: weights as safetensors, training state as a torch file, written atomically.

Layout of a run directory::

    runs/<name>/recipe.yaml                  resolved recipe (every field)
    runs/<name>/manifest.json                the data manifest (encoder, scale, shapes)
    runs/<name>/metrics.jsonl                one JSON line per log step
    runs/<name>/samples/step-NNNNNNN-Ns.png  periodic grids
    runs/<name>/checkpoints/step-NNNNNNN/
        online.safetensors  target_ema.safetensors  inference_ema.safetensors
        state.pt            optimiser, EMA counters, step, every rank's RNG, data position
        SHA256SUMS          the sha256 of each file above (``ismctl.runs.integrity``)

A checkpoint folder is assembled under a hidden temporary name and renamed into place, so a
folder named ``step-*`` is always complete; a crash leaves at most a stray temporary folder.
Whatever reads a checkpoint checks the files it uses against ``SHA256SUMS`` first; a resumed
run falls back to the newest intact checkpoint and sets a damaged one aside as
``damaged-step-N``.

Every ``.safetensors`` file says what it is in its metadata (string -> string, readable with
``safetensors.safe_open(...).metadata()`` without loading a tensor): ``ismctl.networks.model`` (the
architecture as JSON, enough to rebuild the network), ``ismctl.role`` (online, target or
inference), ``ismctl.step``, ``ismctl.recipe_sha256`` (of the resolved recipe's canonical
JSON), ``ismctl.version``, and what sampling needs: ``ismctl.config.recipe`` (the resolved recipe)
and ``ismctl.data`` (the data manifest without its shard list: encoder, scale, shapes,
classes). :mod:`ismctl.tools.api` loads such a file alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ismctl
from ismctl.config.recipe import Recipe, load_recipe
from ismctl.data.manifest import Manifest, read_manifest
from ismctl.networks.model import ShortcutDiT, build_model
from ismctl.networks.unwrap import unwrap_model
from ismctl.objectives import one_pass_sampler
from ismctl.runs.integrity import DamagedFile, check_files, write_sums
from ismctl.system.distributed import resolve_device
from ismctl.system.runtime import compile_network
from ismctl.utils.errors import UserError
from ismctl.utils.fileio import give_default_mode

WEIGHT_FILES = {"online": "online.safetensors", "target": "target_ema.safetensors",
                "inference": "inference_ema.safetensors"}
STATE_FILE = "state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _contiguous_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in unwrap_model(module).state_dict().items()}


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:07d}"


def model_config(model: torch.nn.Module) -> dict[str, Any]:
    """The constructor arguments of a :class:`ShortcutDiT` (dropout and activation
    checkpointing aside: they change training, not the function the weights compute)."""
    net = unwrap_model(model)
    config = {"input_size": net.input_size, "in_channels": net.in_channels,
              "num_classes": net.num_classes, "patch_size": net.patch_size,
              "hidden_size": net.hidden_size, "depth": net.depth, "num_heads": net.num_heads,
              "mlp_ratio": net.mlp_hidden / net.hidden_size, "base_steps": net.base_steps}
    if hasattr(net, "jump_embedding"):
        config["jump_embedding"] = net.jump_embedding
    return config


def recipe_sha256(recipe: Recipe | dict[str, Any]) -> str:
    """sha256 of a resolved recipe's canonical JSON (sorted keys, no spaces)."""
    data = recipe.model_dump(mode="json") if isinstance(recipe, Recipe) else recipe
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
                          ).hexdigest()


def data_summary(manifest: Manifest) -> dict[str, Any]:
    """The manifest without its shard list: what decoding and labelling samples need."""
    return manifest.model_dump(mode="json", exclude={"shards", "skipped", "count"})


def weights_metadata(model: torch.nn.Module, role: str, step: int,
                     recipe: Recipe | dict[str, Any] | None,
                     manifest: Manifest | None) -> dict[str, str]:
    """The safetensors metadata of one weights file (see the module docstring); without a
    recipe or manifest, the keys that describe them are left out."""
    meta = {"format": "pt", "ismctl.version": ismctl.__version__, "ismctl.role": role,
            "ismctl.step": str(step)}
    arch = model_config(model)
    if recipe is not None:
        data = recipe.model_dump(mode="json") if isinstance(recipe, Recipe) else recipe
        meta["ismctl.recipe_sha256"] = recipe_sha256(data)
        meta["ismctl.recipe"] = json.dumps(data)
        arch = {"preset": data["model"]["preset"], **arch}
    meta["ismctl.model"] = json.dumps(arch)
    if manifest is not None:
        meta["ismctl.data"] = json.dumps(data_summary(manifest))
    return meta


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a ``.safetensors`` file (empty when it has none)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable safetensors file ({exc})") from exc


def save_weights(model: torch.nn.Module, path: Path, metadata: dict[str, str]) -> None:
    save_file(_contiguous_state(model), str(path), metadata=metadata)
    give_default_mode(path)


def save_checkpoint(run_dir: Path, step: int, weights: dict[str, torch.nn.Module],
                    state: dict[str, Any]) -> Path:
    """Write ``weights`` (name in WEIGHT_FILES -> module) and ``state`` as one checkpoint.

    The weights files' metadata comes from ``state["recipe"]`` (the resolved recipe) and the
    run's ``manifest.json`` when present.
    """
    final = checkpoint_dir(run_dir, step)
    tmp = run_dir / "checkpoints" / f".tmp-step-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    recipe = state.get("recipe")
    man_file = run_dir / "manifest.json"
    manifest = read_manifest(man_file) if man_file.is_file() else None
    for name, module in weights.items():
        save_weights(module, tmp / WEIGHT_FILES[name],
                     weights_metadata(module, name, step, recipe, manifest))
    torch.save(state, tmp / "state.pt")
    write_sums(tmp, [*(WEIGHT_FILES[name] for name in weights), STATE_FILE])
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def prune_checkpoints(run_dir: Path, keep_last: int, keep_every: int) -> None:
    """Retention: keep the newest ``keep_last`` and every multiple of ``keep_every``."""
    ckpts = list_checkpoints(run_dir)
    for step, path in ckpts[:-keep_last] if keep_last else ckpts:
        if keep_every and step % keep_every == 0:
            continue
        shutil.rmtree(path, ignore_errors=True)


def load_weights(module: torch.nn.Module, path: Path) -> None:
    try:
        tensors = load_file(str(path))
    except FileNotFoundError as exc:
        raise DamagedFile(path, "missing") from exc
    except Exception as exc:
        # safetensors raises its own error type (header, length, dtype): the file is bad.
        raise DamagedFile(path, f"not a readable safetensors file ({_first_line(exc)})") from exc
    try:
        unwrap_model(module).load_state_dict(tensors)
    except RuntimeError as exc:
        raise UserError(f"{path}: the weights do not fit the network of the run's recipe "
                        f"({_first_line(exc)})") from exc


def load_state(path: Path) -> dict[str, Any]:
    """A checkpoint's ``state.pt`` (optimiser, EMA counters, generators, data position)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError as exc:
        raise DamagedFile(path, "missing") from exc
    except Exception as exc:
        # torch.load raises RuntimeError, EOFError, pickle errors, ... on a damaged file.
        raise DamagedFile(path, f"not a readable torch file ({_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def checkpoint_files(recipe: Recipe) -> list[str]:
    """The files of a checkpoint that resuming ``recipe`` reads (an EMA switched off in the
    recipe is not saved: the online weights stand in for it)."""
    names = [WEIGHT_FILES["online"], STATE_FILE]
    if recipe.ema.target_enabled:
        names.append(WEIGHT_FILES["target"])
    if recipe.ema.inference_enabled:
        names.append(WEIGHT_FILES["inference"])
    return names


def newest_intact(ckpts: list[tuple[int, Path]], names: list[str]
                  ) -> tuple[tuple[int, Path] | None, list[DamagedFile]]:
    """The newest checkpoint whose ``names`` pass their check, and the damage found in the
    newer ones (newest first)."""
    damaged = []
    for step, path in reversed(ckpts):
        try:
            check_files(path, names)
        except DamagedFile as exc:
            damaged.append(exc)
            continue
        return (step, path), damaged
    return None, damaged


def set_aside(checkpoint: Path) -> Path:
    """Rename a damaged checkpoint so that nothing picks it as the latest (it is kept, for a
    look or a repair, as ``damaged-step-N``)."""
    target = checkpoint.with_name(f"damaged-{checkpoint.name}")
    n = 1
    while target.exists():
        n += 1
        target = checkpoint.with_name(f"damaged{n}-{checkpoint.name}")
    os.replace(checkpoint, target)
    return target


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def find_latest_run(root: str | Path = "runs") -> Path:
    root = Path(root)
    runs = [p for p in root.glob("*") if list_checkpoints(p)] if root.is_dir() else []
    if not runs:
        raise UserError(f"{root}/: no run with a checkpoint found (train one with `ismctl train`)")
    return max(runs, key=lambda p: list_checkpoints(p)[-1][1].stat().st_mtime)


def resolve_checkpoint(path: str | Path | None) -> tuple[Path, Path]:
    """A run dir, a checkpoint dir or None (latest run) -> (run_dir, checkpoint_dir)."""
    p = find_latest_run() if path is None else Path(path)
    if not p.exists():
        raise UserError(f"{p}: not found")
    if _STEP_DIR.match(p.name) and p.parent.name == "checkpoints":
        return p.parent.parent, p
    ckpts = list_checkpoints(p)
    if not ckpts:
        raise UserError(f"{p}: no checkpoint in this run (expected {p}/checkpoints/step-*)")
    return p, ckpts[-1][1]


def model_from_recipe(recipe: Recipe, manifest: Manifest) -> ShortcutDiT:
    from ismctl.objectives import flow_jump, jump_embedding

    m = recipe.model
    return build_model(
        m.preset,
        input_size=m.input_size or manifest.latent_size,
        in_channels=m.in_channels or manifest.channels,
        num_classes=m.num_classes or manifest.num_classes,
        base_steps=recipe.objective.base_steps,
        dropout=m.dropout,
        grad_checkpointing=m.grad_checkpointing,
        jump_embedding=jump_embedding(recipe),
        flow_jump=flow_jump(recipe),
    )


@dataclass
class LoadedRun:
    model: torch.nn.Module
    recipe: Recipe
    manifest: Manifest
    run_dir: Path
    checkpoint: Path
    step: int
    sha256: str
    mode: str
    device: torch.device


def run_recipe(path: str | Path | None) -> Recipe:
    """The resolved recipe saved with a run (``path`` as in :func:`resolve_checkpoint`)."""
    run_dir, _ = resolve_checkpoint(path)
    return load_recipe(run_dir / "recipe.yaml")


def load_for_sampling(path: str | Path | None, which: str = "inference",
                      device: str | None = "auto", compile: bool = False) -> LoadedRun:
    """Load a run's weights for sampling: the inference EMA by default (method §3.4).
    ``device`` None takes the recipe's ``train.device``; ``compile``: the run's ``model`` is
    the torch.compile'd network (same weights).
    """
    if which not in WEIGHT_FILES:
        raise UserError(f"--which {which!r}: choose from {', '.join(WEIGHT_FILES)}")
    run_dir, ckpt = resolve_checkpoint(path)
    recipe = load_recipe(run_dir / "recipe.yaml")
    manifest = read_manifest(run_dir / "manifest.json")
    weights = ckpt / WEIGHT_FILES[which]
    if not weights.is_file():
        # An EMA switched off in the recipe is not saved: its role falls to the online weights.
        weights = ckpt / WEIGHT_FILES["online"]
    dev = resolve_device(recipe.train.device if device is None else device)
    sha256 = verified_weights(run_dir, ckpt, weights)
    model = model_from_recipe(recipe, manifest)
    load_weights(model, weights)
    model.to(dev).eval().requires_grad_(False)
    model = compile_network(model, compile)
    return LoadedRun(
        model=model, recipe=recipe, manifest=manifest, run_dir=run_dir, checkpoint=ckpt,
        step=int(_STEP_DIR.match(ckpt.name).group(1)), sha256=sha256,
        mode=one_pass_sampler(recipe), device=dev,
    )


def verified_weights(run_dir: Path, ckpt: Path, weights: Path) -> str:
    """Check one weights file of a checkpoint before it is loaded; returns its sha256. A bad
    file is named in one line, with the checkpoint before it as the way out."""
    try:
        digest = check_files(ckpt, [weights.name])[weights.name]
    except DamagedFile as exc:
        older = [p for _, p in list_checkpoints(run_dir) if p.name < ckpt.name]
        hint = f"; the previous checkpoint is {older[-1]}" if older else ""
        raise DamagedFile(exc.path, exc.why + hint) from exc
    return digest or file_sha256(weights)
