"""Recipes: one pydantic model for everything a run needs, loaded from YAML.

A recipe is a YAML file or the name of a recipe shipped with the package (``ismctl/recipes``:
``quickstart``, ``ism_xl``, ...); a path to an existing file always wins over a name. A recipe
file may name a parent with ``extends: other.yaml``, resolved relative to the file, else (a bare
name with no such file beside it) among the shipped recipes, and is then deep-merged over it;
``--set a.b=value`` overrides (YAML-parsed values) are applied last. Every field has a default and a one-line description, so
``Recipe()`` alone is the paper's iSM-XL/2 setting (docs/method.md §3.5).
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from ismctl.config.names import LOSS_NAMES, PRESETS
from ismctl.config.plugins import Sampling, get_objective, load_plugins, unknown_objective
from ismctl.utils.errors import UserError
from ismctl.utils.fileio import atomic_write_text
from ismctl.utils.yamlio import safe_load_unique

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def device_error(name: str) -> str | None:
    """Why ``name`` is not a device setting, or None when it is one."""
    if isinstance(name, str) and _DEVICE.fullmatch(name):
        return None
    return f"{name!r} is not a device; choose {DEVICE_CHOICES}"


def orthogonal_wavelets() -> str:
    """The orthogonal discrete PyWavelets wavelets, one range per family."""
    import pywt

    discrete = set(pywt.wavelist(kind="discrete"))
    parts = []
    for family in pywt.families(short=True):
        names = [n for n in pywt.wavelist(family) if n in discrete and pywt.Wavelet(n).orthogonal]
        if len(names) > 2:
            parts.append(f"{names[0]}..{names[-1]}")
        else:
            parts.extend(names)
    return ", ".join(parts)


def check_sampling_steps(steps: list[int], sampling: Sampling, base_steps: int,
                         mode: str | None = None) -> None:
    """Every step count must be one the objective's sampling protocol allows (dyadic samplers:
    N a power of two in [1, base_steps], docs/method.md §2; others any N >= 1)."""
    for n in steps:
        if (why := sampling.step_error(n, base_steps, mode)) is not None:
            raise ValueError(why)


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
    init_from: str | None = Field(None, description="Start a new run from a DiT or SiT checkpoint in their published naming (.pt state dict, optionally under 'ema'/'model', or .safetensors); the d and w embedders start at zero so F(x, t, 0, c, 0) equals the source network. Ignored when resuming.")

    @field_validator("preset")
    @classmethod
    def _preset(cls, value: str) -> str:
        size, sep, patch = value.partition("/")
        if not sep or size not in PRESETS or not patch.isdigit() or int(patch) < 1:
            raise ValueError(f"{value!r} is not a preset; use SIZE/PATCH with SIZE one of "
                             f"{', '.join(PRESETS)} and PATCH a positive integer, e.g. 'XL/2'")
        return value


class DataCfg(Section):
    path: str = Field("data/imagenet-256", description="Folder written by `ismctl prepare-latents` (holds manifest.json).")
    batch_size: int = Field(256, gt=0, description="Global batch size = per-rank micro-batch x ranks x grad_accum.")
    num_workers: int = Field(4, ge=0, description="Data-loader worker processes per rank (the sOT coupler runs there).")
    shuffle_buffer: int = Field(10_000, ge=1, description="Samples held in each worker's shuffle buffer.")
    flip: bool = Field(True, description="Use the stored horizontally flipped latent with probability 1/2.")


class ObjectiveBase(Section):
    """What every objective's settings hold: the mode, the finest step count M of the network's
    jump table, and the modules that register objectives not installed as packages. An
    objective's settings model (``ObjectiveSpec.settings``, ismctl.config.plugins) subclasses it
    and adds its own fields; a recipe's ``objective`` section is validated by the model of its
    mode."""

    mode: str = Field("ism", description="The objective, a registered name: 'ism': intrinsic guidance (docs/method.md §3.1); 'sm': the official shortcut-models algorithm, flow at d = 1/M and CFG in the d = 2/M targets (docs/method.md §2); 'meanflow': continuous jumps, MeanFlow identity target (docs/method.md §4.1, docs/meanflow.md); or a plugin's (docs/extending.md; `ismctl recipe keys` lists them with their settings).")
    base_steps: int = Field(128, description="M, the finest number of steps; jump sizes d = 2^-k down to 1/M (sm/ism; meanflow samples any step count).")
    plugins: list[str] = Field([], description="Modules that register objectives and are not installed as packages, imported before objective.mode is looked up: a module name (importable, or found in the working folder) or a .py file; installed plugins need none (entry points 'ismctl.objectives'). docs/extending.md.")

    @model_validator(mode="before")
    @classmethod
    def _load_plugins(cls, data: Any) -> Any:
        # Before the fields: the mode may be one that a listed module registers.
        _import_plugins(data)
        return data

    @field_validator("mode")
    @classmethod
    def _mode(cls, value: str) -> str:
        try:
            get_objective(value)
        except UserError:
            raise ValueError(unknown_objective(value)) from None
        return value

    @field_validator("base_steps")
    @classmethod
    def _base_steps(cls, value: int) -> int:
        if value < 1 or value & (value - 1):
            raise ValueError(f"must be a power of two, got {value}")
        return value

    @model_validator(mode="after")
    def _own_settings(self) -> ObjectiveBase:
        settings = get_objective(self.mode).settings
        if not isinstance(self, settings):
            raise ValueError(f"objective.mode {self.mode!r} takes its settings from "
                             f"{settings.__module__}.{settings.__name__}, not "
                             f"{type(self).__name__}")
        return self


class _UnknownObjective(ObjectiveBase):
    """Validates the section of a mode nothing registers: its one error is the mode's."""

    model_config = ConfigDict(extra="ignore")


def _import_plugins(data: Any) -> None:
    """Import the modules an ``objective`` section lists under ``plugins``."""
    if isinstance(data, dict) and isinstance(data.get("plugins"), list):
        try:
            load_plugins([p for p in data["plugins"] if isinstance(p, str)])
        except UserError as exc:
            raise ValueError(str(exc).removeprefix("objective.")) from exc


class ObjectiveCfg(ObjectiveBase):
    """The settings of ismctl's own objectives, sm, ism and meanflow: one section for the three,
    as recipes have always written it; each field says which of them reads it."""

    bootstrap_fraction: float = Field(0.25, gt=0.0, lt=1.0, description="Share of the batch used for self-consistency (bootstrap) targets (paper 1/4, official code 1/8; sm: floor(global batch x this) rows in the official level histogram); meanflow: the share with d > 0 (MeanFlow paper 25%).")
    guidance_fraction: float = Field(0.25, ge=0.0, lt=1.0, description="Share of the batch for the guidance objective (ism only; ignored by sm).")
    class_dropout: float = Field(0.1, ge=0.0, le=1.0, description="Probability of replacing the label by the null class in the velocity/flow part (sm, ism: bootstrap rows keep their labels; meanflow: every row).")
    t_grid: bool = Field(False, description="Draw flow-part t on the 1/M grid (official code) instead of uniformly on [0, 1).")
    target_clip: float | None = Field(None, gt=0.0, description="Clip bootstrap midpoints and targets to [-v, v] (official code uses 4); None disables.")
    sigma_min: float = Field(0.0, ge=0.0, lt=1.0, description="sm/ism: x_t = (1 - (1 - sigma_min) t) x0 + t x1 with velocity x1 - (1 - sigma_min) x0 (official shortcut-models code 1e-5); 0 is the plain linear path.")
    velocity_weight: float = Field(1.0, ge=0.0, description="a: weight of L_velocity (flow part).")
    guidance_weight: float = Field(1.0, ge=0.0, description="b: weight of L_guidance (ism only).")
    consistency_weight: float = Field(1.0, ge=0.0, description="g: weight of L_consistency (bootstrap part).")
    time_mean: float = Field(-0.4, description="meanflow: mean of the logit-normal both jump ends are drawn from, in MeanFlow's time (1 = noise; ours is 1 minus it); paper -0.4.")
    time_std: float = Field(1.0, gt=0.0, description="meanflow: std of that logit-normal; paper 1.0.")
    adaptive_p: float = Field(1.0, ge=0.0, description="meanflow: per-sample loss l weighted by 1 / sg(l + adaptive_c)^p (paper p = 1); 0 disables.")
    adaptive_c: float = Field(0.01, gt=0.0, description="meanflow: c in the adaptive weight, in units of the per-sample squared error summed over all dimensions as MeanFlow defines it (its official JAX code: 0.01; its PyTorch port: 1e-3).")
    meanflow_guidance: Literal["baked", "intrinsic"] = Field("baked", description="meanflow: 'baked' puts CFG into the target (guidance.omega/kappa, sampled at w = 0, MeanFlow's way); 'intrinsic' takes w as an input like ism (guidance.w_max/w_step).")

    @model_validator(mode="after")
    def _check(self) -> ObjectiveCfg:
        if self.mode == "ism" and self.bootstrap_fraction + self.guidance_fraction >= 1.0:
            raise ValueError("bootstrap_fraction + guidance_fraction must be < 1 (the rest is the velocity part)")
        if self.mode == "meanflow" and self.t_grid:
            raise ValueError("t_grid does not apply to meanflow (continuous logit-normal t); set it to false")
        if self.mode == "meanflow" and self.target_clip is not None:
            raise ValueError("target_clip does not apply to meanflow (it clips bootstrap half jumps); set it to null")
        if self.mode == "meanflow" and self.sigma_min:
            raise ValueError("sigma_min does not apply to meanflow (its identity is derived on the plain linear path); set it to 0")
        if self.mode == "sm" and self.base_steps < 2:
            raise ValueError("sm needs base_steps >= 2 (the flow trains at d = 1/M, the bootstrap levels above it)")
        return self


class GuidanceCfg(Section):
    w_max: float = Field(3.5, ge=0.0, description="Largest guidance strength w seen in training (delta convention: CFG scale s = 1 + w).")
    w_step: float = Field(0.25, gt=0.0, description="Training w is drawn from the grid {0, w_step, ..., w_max}.")
    interval_start: float = Field(0.3, ge=0.0, le=1.0, description="No guidance term in targets for t < this (high-noise end); 0 disables interval guidance. meanflow too: MeanFlow's interval t <= t_end in its time is t >= 1 - t_end here.")
    cfg_scale: float = Field(1.5, ge=1.0, description="sm mode: classic CFG scale s inside the bootstrap targets of the d = 2/M level, whose half jumps are the flow (w = s - 1); 1 is none.")
    omega: float = Field(1.0, ge=0.0, description="meanflow baked: target velocity omega v + kappa F_c + (1 - omega - kappa) F_null at d = 0, i.e. CFG scale s = omega / (1 - kappa), w = s - 1; omega 1, kappa 0: none.")
    kappa: float = Field(0.0, ge=0.0, lt=1.0, description="meanflow baked: MeanFlow's kappa, the weight of the network's own conditional velocity in that target (see omega).")


class LossCfg(Section):
    name: str = Field("wavelet", description="Loss from the registry: 'mse' or 'wavelet'.")
    wavelet: str = Field("haar", description="Any orthogonal PyWavelets wavelet name (wavelet loss only).")
    levels: int = Field(5, ge=0, description="Decomposition levels L, capped by the input size (wavelet loss only).")
    approx_weight: float = Field(1.0, ge=0.0, description="Weight of the coarsest approximation band (wavelet loss only).")
    detail_weights: float | list[float] = Field(1.0, description="Weight of detail bands: one number, or one per level finest-first (wavelet loss only).")
    band_norm: Literal["variance", "energy", "none"] = Field("variance", description="Divide each band's error by the velocity target's per-coefficient variance across samples ('variance'), raw mean square ('energy') or nothing ('none'); measured once from the data set into <run>/band_stats.json, so the loss does not depend on the batch split (wavelet loss only).")
    max_band_ratio: float | None = Field(10.0, ge=1.0, description="Cap on the largest / smallest normalised band weight, so no band (e.g. the per-channel mean) is priced at almost nothing; None: no cap (wavelet loss only).")
    band_stats_samples: int = Field(4096, ge=2, description="Samples of the prepared data (the first in shard order, a fixed random subset) that the band normaliser is measured on (wavelet loss only).")
    energy_norm: bool | None = Field(None, exclude=True, description="Deprecated: read when loading older recipes; true = band_norm 'energy' (then a per-batch estimate, now measured on the data set), false = 'none'.")

    @model_validator(mode="before")
    @classmethod
    def _deprecated_energy_norm(cls, data: Any) -> Any:
        # Runs saved before loss.band_norm still load (to sample, evaluate or resume).
        if not isinstance(data, dict) or data.get("energy_norm") is None:
            return data
        data = dict(data)
        old = data.pop("energy_norm")
        mode = "energy" if old else "none"
        if "band_norm" in data and data["band_norm"] != mode:
            raise ValueError(f"energy_norm={str(old).lower()} (deprecated: band_norm {mode!r}) "
                             f"conflicts with band_norm={data['band_norm']!r}; set only band_norm")
        data["band_norm"] = mode
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if value not in LOSS_NAMES:
            raise ValueError(f"{value!r} is not a registered loss; choose from "
                             f"{', '.join(sorted(LOSS_NAMES))}")
        return value

    @field_validator("wavelet")
    @classmethod
    def _wavelet(cls, value: str) -> str:
        import pywt

        if value not in pywt.wavelist(kind="discrete") or not pywt.Wavelet(value).orthogonal:
            raise ValueError(f"{value!r} is not an orthogonal PyWavelets wavelet; choose from "
                             f"{orthogonal_wavelets()}")
        return value


class CouplingCfg(Section):
    pool_size: int = Field(8192, ge=0, description="sOT pool in samples: each rank's loader solves one assignment per pool_size samples of its own stream, the same on any number of GPUs, grad_accum and loader workers (paper: 32 batches x 256 = 8192); 0 pairs noise and data independently (docs/method.md §3.3).")
    mode: Literal["blind", "within_class", "hybrid"] = Field("within_class", description="'blind': one assignment over the pool, labels ignored (the paper); 'within_class': one per class, so the noise stays independent of the label; 'hybrid': within class for classes with at least min_group samples in the pool, the rest in one label-blind assignment.")
    min_group: int = Field(2, ge=1, description="hybrid mode: classes with fewer samples than this in a pool share one label-blind assignment.")
    pool_batches: int | None = Field(None, ge=0, exclude=True, description="Deprecated spelling of pool_size in global batches (pool_size = pool_batches x data.batch_size); read when loading older recipes.")
    within_class: bool | None = Field(None, exclude=True, description="Deprecated spelling of mode: true = 'within_class', false = 'blind'; read when loading older recipes.")


class EMACfg(Section):
    target_decay: float = Field(0.95, ge=0.0, lt=1.0, description="Decay of the fast target EMA that builds bootstrap/guidance targets.")
    target_enabled: bool = Field(True, description="False: targets come from the online weights (the ablation without twin EMA).")
    inference_decay: float = Field(0.9999, ge=0.0, lt=1.0, description="Decay of the slow inference EMA used for sampling and evaluation.")
    inference_enabled: bool = Field(True, description="False: sampling uses the online weights.")
    warmup: bool = Field(False, description="EMA warm-up: decay min(decay, (1 + n) / (10 + n)) at update n, which reaches 0.999 after ~9,000 and 0.9999 after ~90,000 updates; False (the paper) uses the recipe's decay from the first update.")


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
    device: str = Field("auto", description="'auto' (a GPU if one is visible), 'cpu', 'cuda' (under torchrun: the rank's local GPU) or 'cuda:N'.")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if (why := device_error(value)) is not None:
            raise ValueError(why)
        return value


class RunCfg(Section):
    root: str = Field("runs", description="Folder holding run directories.")
    name: str | None = Field(None, description="Run directory name; None derives it from the recipe file name.")
    log_every: int = Field(100, gt=0, description="Steps between metric lines in metrics.jsonl.")
    tracker: Literal["tensorboard", "wandb", "none"] = Field("tensorboard", description="Also send metrics and sample grids to TensorBoard (<run>/tensorboard), Weights & Biases (if installed) or nowhere.")
    sample_every: int = Field(10_000, gt=0, description="Steps between PNG sample grids (1 and 4 steps).")
    sample_num_samples: int = Field(64, gt=0, validation_alias=AliasChoices("sample_num_samples", "sample_num"), description="Images per periodic sample grid (old name: sample_num).")
    sample_guidance: float | None = Field(None, ge=0.0, description="Guidance w of periodic grids (CFG scale 1 + w); None takes eval.default_guidance per step count.")
    ckpt_every: int = Field(10_000, gt=0, description="Steps between checkpoints.")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept besides the milestones.")
    keep_every: int = Field(100_000, ge=0, description="Also keep every checkpoint whose step is a multiple of this; 0 keeps none.")

    @property
    def sample_num(self) -> int:
        """The old name of ``sample_num_samples``, read-only, kept for one release."""
        return self.sample_num_samples


class EvalCfg(Section):
    steps: list[int] = Field([1, 4, 128], min_length=1, description="Sampling step counts to evaluate: powers of two up to objective.base_steps for the shortcut modes (ism, sm).")
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
    objective: SerializeAsAny[ObjectiveBase] = Field(default_factory=ObjectiveCfg, description="Training objective: objective.mode and that objective's own settings.")
    guidance: GuidanceCfg = Field(default_factory=GuidanceCfg, description="Guidance in training targets.")
    loss: LossCfg = Field(default_factory=LossCfg, description="Per-sample regression loss.")
    coupling: CouplingCfg = Field(default_factory=CouplingCfg, description="Noise-data pairing.")
    ema: EMACfg = Field(default_factory=EMACfg, description="Twin EMA.")
    optim: OptimCfg = Field(default_factory=OptimCfg, description="Optimiser.")
    train: TrainCfg = Field(default_factory=TrainCfg, description="Training loop.")
    run: RunCfg = Field(default_factory=RunCfg, description="Run directory, logging, checkpoints.")
    eval: EvalCfg = Field(default_factory=EvalCfg, description="Evaluation defaults.")

    @model_validator(mode="before")
    @classmethod
    def _deprecated_coupling(cls, data: Any) -> Any:
        # Recipes saved before coupling.pool_size gave the pool in global batches; here, not in
        # CouplingCfg, because the translation needs data.batch_size.
        if not isinstance(data, dict) or data.get("coupling") is None:
            return data
        coupling = data["coupling"]
        if isinstance(coupling, BaseModel):
            coupling = {k: getattr(coupling, k) for k in coupling.model_fields_set}
        if not isinstance(coupling, dict):
            return data
        coupling = dict(coupling)
        k, within = coupling.get("pool_batches"), coupling.get("within_class")
        section = data.get("data") or {}
        if isinstance(section, BaseModel):
            section = {"batch_size": section.batch_size}
        batch = (section.get("batch_size", DataCfg.model_fields["batch_size"].default)
                 if isinstance(section, dict) else None)
        if _count(k) and _count(batch) and batch > 0:
            size = k * batch
            if "pool_size" in coupling and coupling["pool_size"] != size:
                raise ValueError(f"coupling.pool_batches={k} (deprecated: {k} x data.batch_size "
                                 f"{batch} = {size} samples) conflicts with coupling.pool_size="
                                 f"{coupling['pool_size']}; set only coupling.pool_size")
            coupling["pool_size"] = size
            del coupling["pool_batches"]
        if isinstance(within, bool):
            mode = "within_class" if within else "blind"
            if "mode" in coupling and coupling["mode"] != mode:
                raise ValueError(f"coupling.within_class={str(within).lower()} (deprecated: "
                                 f"mode {mode!r}) conflicts with coupling.mode="
                                 f"{coupling['mode']!r}; set only coupling.mode")
            coupling["mode"] = mode
            del coupling["within_class"]
        return {**data, "coupling": coupling}

    @field_validator("objective", mode="before")
    @classmethod
    def _objective_settings(cls, value: Any) -> Any:
        # The section is validated by the settings model of its mode (ObjectiveSpec.settings);
        # an unknown mode to a model whose one error names the registered ones.
        if isinstance(value, ObjectiveBase):
            value = value.model_dump()
        if not isinstance(value, dict):
            return value
        _import_plugins(value)
        mode = value.get("mode", ObjectiveBase.model_fields["mode"].default)
        return objective_model(mode).model_validate(value)

    @model_validator(mode="after")
    def _objective_needs(self) -> Recipe:
        # Here, not in the sections: which steps and EMA settings are valid depends on the
        # objective's sampling protocol and needs (ismctl.config.plugins).
        spec = get_objective(self.objective.mode)
        try:
            check_sampling_steps(self.eval.steps, spec.sampling(self), self.objective.base_steps,
                                 spec.name)
        except ValueError as exc:
            raise ValueError(f"eval.steps: {exc}") from exc
        needs = spec.needs
        if not needs.target_network and self.ema.target_enabled:
            raise ValueError(f"ema.target_enabled: objective {spec.name!r} builds no targets "
                             "with a network, so there is no target EMA to keep; set it to false")
        if needs.target_ema and not self.ema.target_enabled:
            raise ValueError(f"ema.target_enabled: objective {spec.name!r} builds its targets "
                             "with an EMA of the weights; set it to true")
        return self


def objective_model(mode: Any) -> type[ObjectiveBase]:
    """The settings model of a mode (for a mode nothing registers, a model whose only error is
    that)."""
    try:
        return get_objective(mode).settings if isinstance(mode, str) else _UnknownObjective
    except UserError:
        return _UnknownObjective


def section_model(section: str, recipe: Recipe | dict[str, Any] | None = None) -> type[BaseModel]:
    """The model of a recipe section: ``objective`` is the settings model of the recipe's mode
    (ObjectiveCfg, ismctl's own, when no recipe is given)."""
    if section != "objective":
        return Recipe.model_fields[section].annotation
    if isinstance(recipe, Recipe):
        return type(recipe.objective)
    if isinstance(recipe, dict) and isinstance(recipe.get("objective"), dict):
        mode = recipe["objective"].get("mode", ObjectiveBase.model_fields["mode"].default)
        return objective_model(mode)
    return ObjectiveCfg


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def canonical_key(key: str) -> str:
    """``section.old_name...`` -> ``section.name...`` for a field's old spelling (a
    validation alias), so a file and a ``--set`` that use different spellings of one field
    merge into one value instead of two keys."""
    section, _, rest = key.partition(".")
    name, dot, tail = rest.partition(".")
    sfield = Recipe.model_fields.get(section)
    if sfield is None or not name:
        return key
    for fname, info in sfield.annotation.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices) and name in alias.choices:
            return f"{section}.{fname}{dot}{tail}"
    return key


def _canonical_names(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for section, fields in data.items():
        if isinstance(fields, dict):
            fields = {canonical_key(f"{section}.{k}").partition(".")[2]: v
                      for k, v in fields.items()}
        out[section] = fields
    return out


def _yaml_error(path: Path, exc: yaml.YAMLError) -> UserError:
    """One line with the file, line and column of a YAML syntax error."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if mark is None:
        return UserError(f"{path}: not valid YAML ({problem})")
    return UserError(f"{path}:{mark.line + 1}:{mark.column + 1}: not valid YAML ({problem})")


def shipped_recipe_dir() -> Path:
    """The recipes installed with the package. Wheels install unzipped, so this is a folder."""
    return Path(__file__).resolve().parent.parent / "recipes"


def shipped_recipes() -> dict[str, Path]:
    """Name (file stem) -> file of every shipped recipe, sorted by name."""
    return {p.stem: p for p in sorted(shipped_recipe_dir().glob("*.yaml"))}


def _recipe_name(ref: str) -> str | None:
    """The shipped-recipe name that ``ref`` spells (``quickstart`` or ``quickstart.yaml``), or
    None when ``ref`` has a folder part: ``./x.yaml`` and ``runs/a/recipe.yaml`` are paths only."""
    if not ref or Path(ref).name != ref or ref in (".", ".."):
        return None
    for suffix in (".yaml", ".yml"):
        if ref.endswith(suffix):
            return ref[: -len(suffix)]
    return ref


def _name_hint(ref: str) -> str:
    """' (did you mean X?)' for the shipped recipes closest to ``ref``, or ''."""
    names = list(shipped_recipes())
    stem = Path(ref).name
    for suffix in (".yaml", ".yml"):
        stem = stem.removesuffix(suffix)
    if stem in names:
        # A path such as recipes/quickstart.yaml used outside a clone: the name works anywhere.
        return f" (the shipped recipe of that name is {stem!r})"
    close = difflib.get_close_matches(stem, names, n=3, cutoff=0.5)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def find_recipe(ref: str | Path, extended_by: Path | None = None) -> Path:
    """The recipe file that ``ref`` names, resolved.

    ``ref`` is a path (relative to the working folder, or for ``extended_by``'s ``extends:`` to
    that file's folder) or the name of a shipped recipe; an existing file wins over a name, so a
    user's own ``ism_xl.yaml`` beside their recipe shadows the shipped one. A recipe that
    ``extends`` its own file name (``ism_xl.yaml`` extending ``ism_xl.yaml``) means the shipped
    recipe of that name: a file cannot extend itself.
    """
    text = str(ref)
    # Absolute but not symlink-resolved: messages and the run's records keep the user's
    # spelling (a clone's recipes/ links into the package). Identity compares resolved paths.
    path = Path(os.path.abspath(extended_by.parent / text if extended_by is not None else text))
    itself = extended_by is not None and path.resolve() == extended_by.resolve()
    if path.is_file() and not itself:
        return path
    name = _recipe_name(text)
    shipped = shipped_recipes().get(name) if name is not None else None
    if shipped is not None and not (extended_by and shipped == extended_by.resolve()):
        return shipped
    if extended_by is not None:
        if itself:
            raise UserError(f"{extended_by}: 'extends: {text}' names the file itself")
        raise UserError(f"{path}: recipe file not found (named by 'extends' in {extended_by})"
                        f"{_name_hint(text)}")
    if name is not None and not path.exists():
        raise UserError(f"{text}: recipe file not found and no shipped recipe of that name"
                        f"{_name_hint(text)}; `ismctl recipe list` shows them")
    raise UserError(f"{path}: recipe file not found{_name_hint(text)}")


SUMMARY_WIDTH = 110


def recipe_summary(path: Path, width: int = SUMMARY_WIDTH) -> str:
    """One line on what a recipe is: the first sentence or clause of its leading comment, cut
    at a clause boundary (', ' or ' (' outside parentheses) to at most ``width`` characters."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    depth, breaks = 0, []
    # A header starts with what the recipe is, then details after ': ' or '. '
    # ("iSM with the B/2 backbone (~130M params): the same recipe as ...").
    for i, ch in enumerate(text):
        if depth == 0 and ch in ":." and text[i + 1:i + 2] in (" ", ""):
            text = text[:i]
            break
        if depth == 0 and text[i:i + 2] in (", ", " ("):
            breaks.append(i)
        depth += {"(": 1, ")": -1}.get(ch, 0)
    if len(text) <= width:
        return text
    fits = [i for i in breaks if i <= width]
    return text[:fits[-1]] if fits else text[:width - 3] + "..."


def read_recipe_file(path: Path, sources: dict[str, str] | None = None,
                     seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe file merged over its ``extends`` parents. ``sources``, when given, receives
    ``section.field -> file`` for every field a file sets (the last file in the chain wins).
    ``path`` is a file or a shipped recipe's name (:func:`find_recipe`)."""
    path = find_recipe(path) if not seen else path
    if path.resolve() in {p.resolve() for p in seen}:
        raise UserError(f"{path}: 'extends' cycle")
    try:
        data = safe_load_unique(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise _yaml_error(path, exc) from exc
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a mapping of sections")
    parent = data.pop("extends", None)
    data = _canonical_names(data)
    own = {f"{section}.{name}": str(path) for section, fields in data.items()
           if isinstance(fields, dict) for name in fields}
    if parent is not None:
        base = read_recipe_file(find_recipe(str(parent), extended_by=path), sources,
                                (*seen, path))
        data = _deep_merge(_inherited(base, data.get("objective")), data)
    if sources is not None:
        sources.update(own)
    return data


def _inherited(data: dict[str, Any], objective: Any) -> dict[str, Any]:
    """``data`` as seen by a recipe (or ``--set``) that sets ``objective``: when that names a
    mode whose settings model is another than the inherited mode's, the inherited objective keys
    the new model does not have are dropped (another method's settings), the rest kept."""
    old = data.get("objective")
    if not (isinstance(old, dict) and isinstance(objective, dict) and "mode" in objective):
        return data
    default = ObjectiveBase.model_fields["mode"].default
    listed = [p for section in (old, objective) if isinstance(section.get("plugins"), list)
              for p in section["plugins"]]
    try:
        _import_plugins({"plugins": listed})
    except ValueError:
        return data   # validation names the module that does not import
    new_model = objective_model(objective["mode"])
    if new_model is _UnknownObjective or new_model is objective_model(old.get("mode", default)):
        return data
    kept = {k: v for k, v in old.items() if k in new_model.model_fields}
    return {**data, "objective": kept}


def apply_override(data: dict[str, Any], assignment: str) -> dict[str, Any]:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to a nested dict."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise UserError(f"--set {assignment!r}: expected KEY=VALUE, e.g. optim.lr=2e-4")
    try:
        value = safe_load_unique(raw) if raw else None
    except yaml.YAMLError as exc:
        raise UserError(f"--set {assignment!r}: value is not valid YAML") from exc
    parts = canonical_key(key).split(".")
    if parts == ["objective", "mode"]:
        data = _inherited(data, {"mode": value})
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {key}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value
    return data


def settable_names(section: type[BaseModel]) -> list[str]:
    """Field names of a recipe section, old names (validation aliases) included."""
    names = []
    for name, field in section.model_fields.items():
        names.append(name)
        if isinstance(field.validation_alias, AliasChoices):
            names += [a for a in field.validation_alias.choices if isinstance(a, str)]
    return names


def _closest(loc: tuple[Any, ...], data: dict[str, Any] | None = None) -> str:
    """' (did you mean X?)' for an unknown section or field, or ''."""
    if len(loc) == 1:
        known, prefix = settable_names(Recipe), ""
    elif len(loc) == 2 and str(loc[0]) in Recipe.model_fields:
        known, prefix = settable_names(section_model(str(loc[0]), data)), f"{loc[0]}."
    else:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _message(exc: ValidationError, where: str, data: dict[str, Any] | None = None) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        msg = "unknown key" + _closest(err["loc"], data)
    else:
        msg = err["msg"].removeprefix("Value error, ")
    extra = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {loc + ': ' if loc else ''}{msg}{extra}"


def _validate(data: dict[str, Any], where: str) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise UserError(_message(exc, where, data)) from exc


def with_plugins(data: dict[str, Any], plugins: list[str] | None) -> dict[str, Any]:
    """``data`` with ``plugins`` (``--plugin``) appended to ``objective.plugins``, each once."""
    if not plugins:
        return data
    section = data.get("objective")
    if section is not None and not isinstance(section, dict):
        return data
    have = list((section or {}).get("plugins") or [])
    added = [*have, *[p for p in plugins if p not in have]]
    return {**data, "objective": {**(section or {}), "plugins": added}}


def load_recipe(path: str | Path | None, overrides: list[str] | None = None,
                plugins: list[str] | None = None) -> Recipe:
    """Read a recipe (a file or a shipped recipe's name; the defaults when ``path`` is None),
    add ``plugins`` to its ``objective.plugins`` and apply overrides.

    An error names its cause: the file when the file alone is already invalid, else the first
    ``--set`` after which the recipe is.
    """
    where = str(path) if path is not None else "recipe"
    data = with_plugins(read_recipe_file(Path(path)) if path is not None else {}, plugins)
    merged = copy.deepcopy(data)
    for assignment in overrides or []:
        merged = apply_override(merged, assignment)
    try:
        return Recipe.model_validate(merged)
    except ValidationError as exc:
        first = exc
    try:
        Recipe.model_validate(data)
    except ValidationError:
        raise UserError(_message(first, where, merged)) from first
    partial = copy.deepcopy(data)
    for assignment in overrides or []:
        partial = apply_override(partial, assignment)
        try:
            Recipe.model_validate(partial)
        except ValidationError as exc:
            raise UserError(_message(exc, f"--set {assignment}", partial)) from exc
    raise UserError(_message(first, where, merged)) from first


def recipe_from_dict(data: dict[str, Any], where: str = "recipe") -> Recipe:
    return _validate(data, where)


def save_recipe(recipe: Recipe, path: Path) -> None:
    """Write the fully resolved recipe (every field) as YAML."""
    atomic_write_text(path, yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
