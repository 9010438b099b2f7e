"""ismctl's own objectives as plugins: ``sm``, ``ism`` and ``meanflow``, declared in the entry-point
group ``ismctl.objectives`` of ismctl's ``pyproject.toml`` like any other package's.

Their losses live in ``shortcut`` and ``meanflow`` and are named lazily, so that reading a recipe
imports no torch. The three share one settings model, the recipe's historical ``objective``
section (:class:`ismctl.config.recipe.ObjectiveCfg`, which says which field applies to which),
and the ``guidance`` section: the keys recipes and studies have always used.
"""

from __future__ import annotations

from ismctl.config.plugins import Lazy, ObjectiveSpec, Sampling
from ismctl.config.recipe import ObjectiveCfg, Recipe


def _sm_sampling(recipe: Recipe) -> Sampling:
    # The shortcuts carry the CFG of their training targets; the authors' protocol adds two-pass
    # CFG at the training scale on the flow at the finest step count (method §2).
    scale = recipe.guidance.cfg_scale
    return Sampling("baked", "dyadic", flow_cfg=scale - 1.0, baked=f"CFG at scale {scale:g}")


def _ism_sampling(recipe: Recipe) -> Sampling:
    return Sampling("intrinsic", "dyadic")


def _meanflow_sampling(recipe: Recipe) -> Sampling:
    if recipe.objective.meanflow_guidance == "intrinsic":
        return Sampling("intrinsic", "any")
    g = recipe.guidance
    # The fixed point of MeanFlow's guided target (docs/meanflow.md; guidance.baked_scale).
    return Sampling("baked", "any",
                    baked=f"CFG at scale {g.omega / (1.0 - g.kappa):g} (omega / (1 - kappa))")


def _flow_jump_sm(objective: ObjectiveCfg) -> float:
    # The official code trains its flow at the finest jump's embedding (method §2).
    return 1.0 / objective.base_steps


SM = ObjectiveSpec(
    name="sm", fn=Lazy("ismctl.objectives.shortcut:sm_loss"), jump_embedding="table",
    settings=ObjectiveCfg, sampling=_sm_sampling,
    target_passes=Lazy("ismctl.objectives.shortcut:target_passes"), flow_jump=_flow_jump_sm,
    description="A shortcut model (sm baseline: CFG baked into the shortcuts)")

ISM = ObjectiveSpec(
    name="ism", fn=Lazy("ismctl.objectives.shortcut:ism_loss"), jump_embedding="table",
    settings=ObjectiveCfg, sampling=_ism_sampling,
    target_passes=Lazy("ismctl.objectives.shortcut:target_passes"),
    description="An iSM (improved shortcut model, intrinsic guidance: w is a network input)")

MEANFLOW = ObjectiveSpec(
    name="meanflow", fn=Lazy("ismctl.objectives.meanflow:meanflow_loss"),
    jump_embedding="continuous", settings=ObjectiveCfg, sampling=_meanflow_sampling,
    target_passes=Lazy("ismctl.objectives.meanflow:target_passes"),
    description="A MeanFlow model (the average velocity of continuous jumps, MeanFlow identity "
                "targets)")
