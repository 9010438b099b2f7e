"""Recipes: one pydantic model for everything a run needs, loaded from YAML.

A recipe file may name a parent with ``extends: other.yaml`` (resolved relative to the
file) and is then deep-merged over it; ``--set a.b=value`` overrides (YAML-parsed values)
are applied last. Every field has a default and a one-line description, so
``Recipe()`` alone is the paper's iSM-XL/2 setting (SPEC section 3.5).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ismctl.errors import UserError
from ismctl.fileio import atomic_write_text


class Section(BaseModel):
    """Strict base: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelCfg(Section):
    preset: str = Field("XL/2", description="Backbone preset: tiny/S/B/L/XL with patch 2/4/8, e.g. 'B/2'.")
    input_size: int | None = Field(None, gt=0, description="Latent/pixel side length; None takes it from the data manifest.")
    in_channels: int | None = Field(None, gt=0, description="Input channels; None takes it from the data manifest.")
    num_classes: int | None = Field(None, gt=0, description="Number of classes; None takes it from the data manifest.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout inside attention/MLP blocks.")
    grad_checkpointing: bool = Field(False, description="Recompute each transformer block in the backward pass instead of storing its activations: far less memory (XL/2 fits its per-GPU batch on smaller cards) for ~1/3 more compute; same gradients.")


class DataCfg(Section):
    path: str = Field("data/imagenet256", description="Folder written by `ismctl prepare-latents` (holds manifest.json).")
    batch_size: int = Field(256, gt=0, description="Global batch size = per-rank micro-batch x ranks x grad_accum.")
    num_workers: int = Field(4, ge=0, description="Data-loader worker processes per rank (the sOT coupler runs there).")
    shuffle_buffer: int = Field(10_000, ge=1, description="Samples held in each worker's shuffle buffer.")
    flip: bool = Field(True, description="Use the stored horizontally flipped latent with probability 1/2.")


class ObjectiveCfg(Section):
    mode: Literal["ism", "sm"] = Field("ism", description="'ism': intrinsic guidance (SPEC 3.1); 'sm': Frans et al. baseline with CFG in the finest targets (SPEC 2).")
    base_steps: int = Field(128, description="M, the finest number of steps; jump sizes d = 2^-k down to 1/M.")
    bootstrap_fraction: float = Field(0.25, gt=0.0, lt=1.0, description="Share of the batch used for self-consistency (bootstrap) targets (paper 1/4, official code 1/8).")
    guidance_fraction: float = Field(0.25, ge=0.0, lt=1.0, description="Share of the batch for the guidance objective (ism only; ignored by sm).")
    class_dropout: float = Field(0.1, ge=0.0, le=1.0, description="Probability of replacing the label by the null class in the velocity/flow part.")
    t_grid: bool = Field(False, description="Draw flow-part t on the 1/M grid (official code) instead of uniformly on [0, 1).")
    target_clip: float | None = Field(None, gt=0.0, description="Clip bootstrap midpoints and targets to [-v, v] (official code uses 4); None disables.")
    velocity_weight: float = Field(1.0, ge=0.0, description="a: weight of L_velocity (flow part).")
    guidance_weight: float = Field(1.0, ge=0.0, description="b: weight of L_guidance (ism only).")
    consistency_weight: float = Field(1.0, ge=0.0, description="g: weight of L_consistency (bootstrap part).")

    @model_validator(mode="after")
    def _check(self) -> ObjectiveCfg:
        if self.base_steps < 1 or self.base_steps & (self.base_steps - 1):
            raise ValueError(f"base_steps must be a power of two, got {self.base_steps}")
        if self.mode == "ism" and self.bootstrap_fraction + self.guidance_fraction >= 1.0:
            raise ValueError("bootstrap_fraction + guidance_fraction must be < 1 (the rest is the velocity part)")
        return self


class GuidanceCfg(Section):
    w_max: float = Field(3.5, ge=0.0, description="Largest guidance strength w seen in training (delta convention: CFG scale s = 1 + w).")
    w_step: float = Field(0.25, gt=0.0, description="Training w is drawn from the grid {0, w_step, ..., w_max}.")
    interval_start: float = Field(0.3, ge=0.0, le=1.0, description="No guidance term in targets for t < this (high-noise end); 0 disables interval guidance.")
    cfg_scale: float = Field(1.5, ge=1.0, description="sm mode: classic CFG scale s inside the finest bootstrap targets (w = s - 1).")


class LossCfg(Section):
    name: str = Field("wavelet", description="Loss from the registry: 'mse' or 'wavelet'.")
    wavelet: str = Field("haar", description="Any orthogonal PyWavelets wavelet name (wavelet loss only).")
    levels: int = Field(5, ge=0, description="Decomposition levels L, capped by the input size (wavelet loss only).")
    approx_weight: float = Field(1.0, ge=0.0, description="Weight of the coarsest approximation band (wavelet loss only).")
    detail_weights: float | list[float] = Field(1.0, description="Weight of detail bands: one number, or one per level finest-first (wavelet loss only).")
    energy_norm: bool = Field(True, description="Divide each band's error by the target's energy per coefficient in that band, a batch estimate, so every scale is priced relative to its own signal (wavelet loss only).")


class CouplingCfg(Section):
    pool_batches: int = Field(32, ge=0, description="sOT pool size K in batches: 0 independent pairing, 1 minibatch OT, K>1 pooled (SPEC 3.3).")
    within_class: bool = Field(True, description="Solve the assignment within each class of the pool, so the noise stays independent of the label; False pairs across classes (label-blind).")


class EMACfg(Section):
    target_decay: float = Field(0.95, ge=0.0, lt=1.0, description="Decay of the fast target EMA that builds bootstrap/guidance targets.")
    target_enabled: bool = Field(True, description="False: targets come from the online weights (the ablation without twin EMA).")
    inference_decay: float = Field(0.9999, ge=0.0, lt=1.0, description="Decay of the slow inference EMA used for sampling and evaluation.")
    inference_enabled: bool = Field(True, description="False: sampling uses the online weights.")
    warmup: bool = Field(True, description="Use decay min(decay, (1 + n) / (10 + n)) at update n so short runs move off the initial weights.")


class OptimCfg(Section):
    lr: float = Field(1e-4, gt=0.0, description="AdamW learning rate.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay (the official shortcut code uses 0.1).")
    eps: float = Field(1e-8, gt=0.0, description="AdamW epsilon.")
    grad_clip: float | None = Field(1.0, gt=0.0, description="Clip the global gradient norm to this; None disables.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up steps.")


class TrainCfg(Section):
    steps: int = Field(800_000, gt=0, description="Optimiser steps.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimiser step.")
    precision: Literal["fp32", "bf16"] = Field("bf16", description="Autocast precision of the network calls (online, target EMA, periodic samples), on GPU and CPU alike; weights, gradients, optimiser state, EMA copies, losses and the sampler's state stay fp32. bf16 is fast on GPUs and on CPUs with bf16 units, slow on others.")
    compile: bool = Field(False, description="torch.compile (inductor) the online network, the target-EMA passes and the periodic sampler's network, on any device; the first steps pay the compilation.")
    seed: int = Field(0, description="Global seed (model init, data order, noise).")
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda'.")


class RunCfg(Section):
    root: str = Field("runs", description="Folder holding run directories.")
    name: str | None = Field(None, description="Run directory name; None derives it from the recipe file name.")
    log_every: int = Field(100, gt=0, description="Steps between metric lines in metrics.jsonl.")
    tracker: Literal["tensorboard", "wandb", "none"] = Field("tensorboard", description="Also send metrics and sample grids to TensorBoard (<run>/tensorboard), Weights & Biases (if installed) or nowhere.")
    sample_every: int = Field(10_000, gt=0, description="Steps between PNG sample grids (1 and 4 steps).")
    sample_num: int = Field(64, gt=0, description="Images per periodic sample grid.")
    sample_guidance: float | None = Field(None, ge=0.0, description="Guidance w of periodic grids (CFG scale 1 + w); None takes eval.default_guidance per step count.")
    ckpt_every: int = Field(10_000, gt=0, description="Steps between checkpoints.")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept besides the milestones.")
    keep_every: int = Field(100_000, ge=0, description="Also keep every checkpoint whose step is a multiple of this; 0 keeps none.")


class EvalCfg(Section):
    steps: list[int] = Field([1, 4, 128], description="Sampling step counts to evaluate.")
    guidance: list[float] | dict[int, list[float]] = Field([1.0], description="Guidance strengths w to evaluate (CFG scale 1 + w): one list, or one per step count (others take the nearest); the best per step count is remembered. sm runs: [0] (guidance is baked in).")
    default_guidance: dict[int, float] = Field({1: 1.0, 4: 1.0, 128: 1.0}, description="Guidance w per step count for `ismctl sample` and training grids until `ismctl eval` has picked one; other step counts take the nearest listed.")
    num_samples: int = Field(50_000, gt=0, description="Samples per (steps, guidance) point (class-balanced).")
    metrics: list[str] = Field(["fid", "isc", "prc"], description="Metrics to compute: fid, isc, prc, fd-dinov2 (digits also: acc, fd-digits).")
    ref: str | None = Field(None, description="Reference statistics: ADM .npz, image folder, or None for the prepared shards.")
    batch_size: int = Field(250, gt=0, description="Sampling batch size per rank.")
    seed: int = Field(0, description="Seed of the evaluation noise and labels.")


class Recipe(Section):
    model: ModelCfg = Field(default_factory=ModelCfg, description="Backbone.")
    data: DataCfg = Field(default_factory=DataCfg, description="Training data.")
    objective: ObjectiveCfg = Field(default_factory=ObjectiveCfg, description="Shortcut objective.")
    guidance: GuidanceCfg = Field(default_factory=GuidanceCfg, description="Guidance in training targets.")
    loss: LossCfg = Field(default_factory=LossCfg, description="Per-sample regression loss.")
    coupling: CouplingCfg = Field(default_factory=CouplingCfg, description="Noise-data pairing.")
    ema: EMACfg = Field(default_factory=EMACfg, description="Twin EMA.")
    optim: OptimCfg = Field(default_factory=OptimCfg, description="Optimiser.")
    train: TrainCfg = Field(default_factory=TrainCfg, description="Training loop.")
    run: RunCfg = Field(default_factory=RunCfg, description="Run directory, logging, checkpoints.")
    eval: EvalCfg = Field(default_factory=EvalCfg, description="Evaluation defaults.")


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise UserError(f"{path}: 'extends' cycle")
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a mapping of sections")
    parent = data.pop("extends", None)
    if parent is not None:
        data = _deep_merge(_read_yaml(path.parent / str(parent), (*seen, path)), data)
    return data


def apply_override(data: dict[str, Any], assignment: str) -> dict[str, Any]:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to a nested dict."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise UserError(f"--set {assignment!r}: expected KEY=VALUE, e.g. optim.lr=2e-4")
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as exc:
        raise UserError(f"--set {assignment!r}: value is not valid YAML") from exc
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {key}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value
    return data


def _validate(data: dict[str, Any], where: str) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        extra = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise UserError(f"{where}: {loc}: {msg}{extra}") from exc


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file (or the defaults when ``path`` is None) and apply overrides."""
    data = _read_yaml(Path(path)) if path is not None else {}
    for assignment in overrides or []:
        data = apply_override(data, assignment)
    return _validate(data, str(path) if path is not None else "recipe")


def recipe_from_dict(data: dict[str, Any], where: str = "recipe") -> Recipe:
    return _validate(data, where)


def save_recipe(recipe: Recipe, path: Path) -> None:
    """Write the fully resolved recipe (every field) as YAML."""
    atomic_write_text(path, yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
