"""Objective plugins: the interface a training method implements, and the registry that the
recipe's ``objective.mode`` is checked against.

A method is one :class:`ObjectiveSpec`: its loss, its settings (a pydantic model, the recipe's
``objective`` section when it is the mode), what it needs from the trainer (:class:`Needs`),
how its runs are sampled (:class:`Sampling`) and how its network embeds jump sizes. Everything
else (trainer, sampler, evaluation, export, ablations, studies) reads these declarations and
names no method. A spec enters the registry three ways, all through :func:`register_objective`:

- an installed package declares it in the entry-point group ``ismctl.objectives`` (the name is
  the mode, the value ``module:attribute`` names the spec). ismctl's own ``sm``, ``ism`` and
  ``meanflow`` are declared so in its ``pyproject.toml``. Entry points are listed without being
  imported; one is loaded when a recipe names its mode;
- a module that is not installed is named in the recipe's ``objective.plugins`` (``--plugin``
  on the command line): imported before the mode is looked up, it registers its specs itself;
- code calls :func:`register_objective`.

This module sits in the configuration layer, below the methods, so that the recipe can check
against it; it imports no torch. docs/extending.md describes the interface for method authors.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ismctl.utils.errors import UserError

if TYPE_CHECKING:
    from ismctl.config.recipe import GuidanceCfg, ObjectiveBase, Recipe

ENTRY_POINT_GROUP = "ismctl.objectives"
# A mode names run folders and result files: letters, digits, '_', '-', '.'.
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
JUMP_EMBEDDINGS = ("table", "continuous")


@dataclass(frozen=True)
class Needs:
    """What an objective asks of the trainer.

    ``target_network``: its targets call the no-grad target network (the target EMA, or the
    online weights when ``ema.target_enabled`` is false). Without it the trainer keeps no target
    copy, and a recipe that enables one is refused. ``target_ema``: its targets are defined with
    an EMA of the weights, so a recipe that switches the target EMA off is refused.
    ``null_label``: it trains the null label (class dropout), so two-pass CFG on top of its
    output (``--double-guidance``, the flow-CFG entry) has an unconditional velocity to use.
    """

    target_network: bool = True
    target_ema: bool = False
    null_label: bool = True


@dataclass(frozen=True)
class Sampling:
    """How a run of the objective is sampled (method §1: x <- x + (1/N) F(x, t_i, d_i, c, w)).

    ``guidance``: "intrinsic", w is a network input chosen at sampling time (evaluated over a w
    grid, one pass per step); "baked", any guidance is in the weights and the conditional
    output is sampled at w = 0 (one pass per step). ``steps``: "dyadic", N a power of two in
    [1, objective.base_steps] (networks trained on the jumps 2^-k); "any", any N >= 1.
    ``jumps``: the jump size given at step i, "step" d_i = 1/N (a shortcut of one step) or
    "to_end" d_i = 1 - i/N (the network predicts the data end, as a consistency model does, and
    the sampler moves 1/N of the way there; needs a continuous jump embedding). ``flow_cfg``:
    the w of a separate entry at the finest step count that samples the instantaneous velocity
    with two-pass CFG (sm's authors' protocol, method §2), or None. ``baked``: what the weights
    bake in, for messages. Every sampler takes one network pass per step (NFE = N), two for a
    two-pass CFG entry (ismctl.sampling.protocol.Point.nfe).
    """

    guidance: Literal["intrinsic", "baked"]
    steps: Literal["dyadic", "any"]
    jumps: Literal["step", "to_end"] = "step"
    flow_cfg: float | None = None
    baked: str | None = None

    def __post_init__(self) -> None:
        for name, value, allowed in (("guidance", self.guidance, ("intrinsic", "baked")),
                                     ("steps", self.steps, ("dyadic", "any")),
                                     ("jumps", self.jumps, ("step", "to_end"))):
            if value not in allowed:
                raise ValueError(f"Sampling.{name}: {value!r} is not one of {allowed}")

    def step_error(self, n: int, base_steps: int, mode: str | None = None) -> str | None:
        """Why ``n`` sampling steps are not allowed (``mode`` names the objective), or None."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            return f"step count {n}: must be >= 1"
        if self.steps == "dyadic" and (n & (n - 1) or n > base_steps):
            who = f"objective.mode {mode!r}" if mode else "this objective"
            return (f"step count {n}: {who} samples with jumps of 1/N, so N must be a power of "
                    f"two between 1 and {base_steps} (objective.base_steps)")
        return None


def _no_flow_jump(objective: Any) -> float:
    return 0.0


@dataclass(frozen=True)
class ObjectiveSpec:
    """One training method.

    ``fn(model, target_model, x0, x1, y, objective, guidance, loss_fn, num_classes, generator,
    slot) -> {"loss": differentiable scalar, <part>: detached scalar, ...}`` is one micro-batch
    (ismctl.objectives.registry says what each argument is). ``settings`` is the pydantic model
    of the recipe's ``objective`` section for this mode (a subclass of
    ``ismctl.config.recipe.ObjectiveBase``): ``objective`` is an instance of it. ``sampling``
    and ``needs`` may depend on the recipe (``sampling(recipe) -> Sampling``).
    ``jump_embedding``: "table" (d in {0, 2^-k}) or "continuous" (any d in [0, 1]).
    ``target_passes(objective, guidance)``: target-network forward-pass equivalents per training
    sample, for the FLOP count (method §5). ``flow_jump(objective)``: the jump size at which the
    method trains its instantaneous velocity, which flow CFG samples (0, or 1/M for sm).
    ``description``: one line for model cards and ``recipe keys``.
    """

    name: str
    fn: Callable[..., Any]
    jump_embedding: str
    settings: type[ObjectiveBase]
    sampling: Callable[[Recipe], Sampling]
    target_passes: Callable[[Any, GuidanceCfg], float]
    flow_jump: Callable[[Any], float] = _no_flow_jump
    needs: Needs = Needs()
    description: str = ""


class Lazy:
    """A callable named by ``"module:attribute"``, imported on its first call: a spec can point
    at its loss without importing torch, so reading a recipe stays light."""

    def __init__(self, path: str) -> None:
        module, sep, attr = path.partition(":")
        if not sep or not module or not attr:
            raise ValueError(f"Lazy({path!r}): expected 'module:attribute'")
        self.path = path
        self._target: Callable[..., Any] | None = None

    def resolve(self) -> Callable[..., Any]:
        if self._target is None:
            module, _, attr = self.path.partition(":")
            self._target = getattr(importlib.import_module(module), attr)
        return self._target

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Lazy({self.path!r})"


_REGISTRY: dict[str, ObjectiveSpec] = {}


def _check_spec(spec: ObjectiveSpec) -> None:
    from pydantic import BaseModel

    if not isinstance(spec, ObjectiveSpec):
        raise TypeError(f"register_objective: expected an ObjectiveSpec, got {type(spec).__name__}")
    if not isinstance(spec.name, str) or not _NAME.fullmatch(spec.name):
        raise ValueError(f"objective name {spec.name!r}: letters, digits, '_', '-' and '.', "
                         "starting with a letter")
    if spec.jump_embedding not in JUMP_EMBEDDINGS:
        raise ValueError(f"objective {spec.name!r}: jump_embedding must be one of "
                         f"{', '.join(JUMP_EMBEDDINGS)}, got {spec.jump_embedding!r}")
    settings = spec.settings
    if not (isinstance(settings, type) and issubclass(settings, BaseModel)
            and {"mode", "base_steps", "plugins"} <= set(settings.model_fields)):
        raise TypeError(f"objective {spec.name!r}: settings must be a subclass of "
                        "ismctl.config.recipe.ObjectiveBase")
    if not isinstance(spec.needs, Needs):
        raise TypeError(f"objective {spec.name!r}: needs must be a Needs")


def register_objective(spec: ObjectiveSpec) -> ObjectiveSpec:
    """Add ``spec`` under ``spec.name``. Registering the same spec again does nothing (an
    installed plugin may be imported as a module too); another spec under a taken name is an
    error."""
    _check_spec(spec)
    held = _REGISTRY.get(spec.name)
    if held is not None and held is not spec:
        raise ValueError(f"objective {spec.name!r} is already registered (by "
                         f"{held.fn!r}); choose another name")
    declared = _entry_points().get(spec.name, [])
    if held is None and declared and not any(_loads(ep) is spec for ep in declared):
        # An installed package declares the name: a module may not take it over, whatever
        # was loaded first.
        raise ValueError(f"objective {spec.name!r} is declared by the installed "
                         f"{', '.join(_where(ep) for ep in declared)}; choose another name")
    _REGISTRY[spec.name] = spec
    return spec


def _loads(ep: EntryPoint) -> Any:
    try:
        return ep.load()
    except Exception:
        return None


@cache
def _entry_points() -> dict[str, list[EntryPoint]]:
    found: dict[str, list[EntryPoint]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, []).append(ep)
    return found


def available_objectives() -> list[str]:
    """Every mode a recipe may name: the registered ones and the installed entry points (not
    imported for this)."""
    return sorted(set(_REGISTRY) | set(_entry_points()))


def _where(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"'{ep.name} = {ep.value}'" + (f" of {dist.name}" if dist is not None else "")


def _load_entry_point(mode: str, eps: list[EntryPoint]) -> ObjectiveSpec:
    if len({ep.value for ep in eps}) > 1:
        raise UserError(f"objective.mode: {mode!r} is declared by several installed packages "
                        f"({', '.join(_where(ep) for ep in eps)}); uninstall one")
    ep = eps[0]
    try:
        spec = ep.load()
    except Exception as exc:
        raise UserError(f"objective.mode: the plugin {_where(ep)} failed to load "
                        f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(spec, ObjectiveSpec) or spec.name != mode:
        raise UserError(f"objective.mode: the entry point {_where(ep)} must name an "
                        f"ObjectiveSpec called {mode!r}, got {spec!r}")
    try:
        return register_objective(spec)
    except (TypeError, ValueError) as exc:
        raise UserError(f"objective.mode: the plugin {_where(ep)}: {exc}") from exc


def unknown_objective(mode: str) -> str:
    """The message for a mode nothing registers: the closest name and every registered one."""
    names = available_objectives()
    close = difflib.get_close_matches(str(mode), names, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    text = f"unknown objective {mode!r}{hint}; registered: {', '.join(names) or 'none'}"
    own = [ep for eps in _entry_points().values() for ep in eps
           if getattr(getattr(ep, "dist", None), "name", None) == "ismctl"]
    if not own:
        text += (" (ismctl's own objectives are missing from its installed metadata, an install "
                 "older than its source: reinstall it, e.g. `pip install -e .` or `make install`)")
    return text + ("; a module that is not installed is named with --plugin or "
                   "objective.plugins")


def get_objective(mode: str) -> ObjectiveSpec:
    """The spec registered as ``mode``, loading its entry point on first use."""
    spec = _REGISTRY.get(mode)
    if spec is not None:
        return spec
    eps = _entry_points().get(mode)
    if eps is None:
        raise UserError(f"objective.mode: {unknown_objective(mode)}")
    return _load_entry_point(mode, eps)


def load_all() -> list[ObjectiveSpec]:
    """Every registered objective, each entry point loaded (``recipe keys`` lists them all)."""
    return [get_objective(name) for name in available_objectives()]


def _import_file(path: Path) -> None:
    name = f"ismctl_plugin_{path.stem}"
    if sys.modules.get(name) is not None:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"objective.plugins: {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def load_plugin(ref: str) -> None:
    """Import one ``objective.plugins`` entry: a module name (importable as installed, or from
    the working folder) or the path of a ``.py`` file. The module registers its objectives."""
    if not isinstance(ref, str) or not ref.strip():
        raise UserError(f"objective.plugins: {ref!r} is not a module name or a .py file")
    try:
        if ref.endswith(".py") or os.sep in ref:
            path = Path(ref)
            if not path.is_file():
                raise UserError(f"objective.plugins: {ref}: file not found")
            _import_file(path.resolve())
            return
        try:
            importlib.import_module(ref)
        except ModuleNotFoundError as exc:
            # The console script does not put the working folder on sys.path; `python -m` does.
            here = os.getcwd()
            if exc.name != ref.split(".")[0] or here in sys.path:
                raise
            sys.path.append(here)
            importlib.import_module(ref)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"objective.plugins: cannot import {ref!r} "
                        f"({type(exc).__name__}: {exc})") from exc


def load_plugins(refs: list[str] | tuple[str, ...]) -> None:
    for ref in refs:
        load_plugin(ref)
