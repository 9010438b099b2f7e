"""The objective registry, seen from the methods' layer: ``objective.mode`` -> its
:class:`ObjectiveSpec` (the interface and the registry are ismctl.config.plugins, below the
recipe that checks against them), and what a recipe's objective says about its network and
its sampling.

Every objective's loss has one signature (the trainer calls it through :func:`get_objective`)::

    fn(model, target_model, x0, x1, y, objective, guidance, loss_fn, num_classes,
       generator, slot) -> {"loss": differentiable scalar, <part>: detached scalar, ...}

``model`` is the gradient-carrying online network (DDP-wrapped under torchrun: every
gradient must come from it, so the all-reduce sees it), ``target_model`` the network that
builds targets under no_grad (the target EMA, method §3.4, or the bare online module when
``ema.target_enabled`` is false), ``x0`` noise and ``x1`` data already paired (sOT) and shuffled,
``y`` labels (``num_classes`` is the null label), ``objective`` the recipe's objective section
(an instance of the spec's settings model), ``guidance`` its guidance section, ``loss_fn`` the
recipe's per-sample loss, ``generator`` the micro-batch's own generator (every random draw comes
from it) and ``slot`` the micro-batch's (index, count) among the data slots (ranks x
accumulation steps) of one optimiser step, for objectives whose batch layout belongs to the
global batch (sm's level histogram). The logged parts besides "loss" are the objective's own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ismctl.config.plugins import (
    Needs,
    ObjectiveSpec,
    Sampling,
    available_objectives,
    get_objective,
    register_objective,
)
from ismctl.config.recipe import Recipe

if TYPE_CHECKING:
    from torch import Tensor

Network = Callable[["Tensor", "Tensor", "Tensor", "Tensor", "Tensor"], "Tensor"]
LossFn = Callable[["Tensor", "Tensor"], "Tensor"]

__all__ = ["LossFn", "Needs", "Network", "ObjectiveSpec", "Sampling", "available_objectives",
           "flow_jump", "get_objective", "jump_embedding", "one_pass_sampler",
           "register_objective", "sampling"]


def flow_jump(recipe: Recipe) -> float:
    """The jump size of this recipe's instantaneous velocity (see :class:`ObjectiveSpec`)."""
    return get_objective(recipe.objective.mode).flow_jump(recipe.objective)


def jump_embedding(recipe: Recipe) -> str:
    """How the network of this recipe embeds jump sizes (see ismctl.networks.model)."""
    return get_objective(recipe.objective.mode).jump_embedding


def sampling(recipe: Recipe) -> Sampling:
    """The sampling protocol of this recipe's runs (see :class:`Sampling`)."""
    return get_objective(recipe.objective.mode).sampling(recipe)


def one_pass_sampler(recipe: Recipe) -> str:
    """The one-pass sampler of this recipe's runs: "intrinsic" (w a network input) or
    "conditional" (guidance baked in, sampled at w = 0); see ismctl.sampling.protocol."""
    return "intrinsic" if sampling(recipe).guidance == "intrinsic" else "conditional"
