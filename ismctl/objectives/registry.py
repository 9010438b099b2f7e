"""The objective registry: recipe ``objective.mode`` -> the training objective of that family.

Every objective has one signature (the trainer calls it through :func:`get_objective`)::

    fn(model, target_model, x0, x1, y, objective, guidance, loss_fn, num_classes,
       generator, slot) -> {"loss": differentiable scalar, <part>: detached scalar, ...}

``model`` is the gradient-carrying online network (DDP-wrapped under torchrun: every
gradient must come from it, so the all-reduce sees it), ``target_model`` the network that
builds targets under no_grad (the target EMA, method §3.4), ``slot`` the micro-batch's (index,
count) among the data slots (ranks x accumulation steps) of one optimiser step, for objectives
whose batch layout belongs to the global batch (sm's level histogram). Besides the function,
an entry says how the network embeds jump sizes, which sampler its runs use and what its step
costs; fields that do not apply to a family are refused by the recipe's validation
(ismctl.config.recipe). A new family is one module that calls :func:`register_objective` and is
imported by the package (``ismctl/objectives/__init__.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ismctl.config.recipe import GuidanceCfg, ObjectiveCfg, Recipe
from ismctl.utils.errors import UserError

Network = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
ObjectiveFn = Callable[[Network, Network, Tensor, Tensor, Tensor, ObjectiveCfg, GuidanceCfg,
                        LossFn, int, "torch.Generator | None", tuple[int, int]],
                       dict[str, Tensor]]


@dataclass(frozen=True)
class ObjectiveSpec:
    """One registered family.

    ``jump_embedding``: "table" (d in {0, 2^-k}) or "continuous" (any d in [0, 1]).
    ``sampler(recipe)``: the one-pass sampler of its runs ("intrinsic" takes w as a network
    input, "conditional" samples w = 0 because guidance is baked in), see ismctl.sampling.protocol.
    ``target_passes(objective, guidance)``: target-network forward-pass equivalents per
    training sample (method §5), for the FLOP count.
    ``flow_jump(objective)``: the jump size at which the family trains its instantaneous
    velocity, which two-pass flow CFG samples: 0 (a level of its own), or 1/M for sm, whose
    flow shares the finest jump's embedding as in the official code (method §2).
    """

    name: str
    fn: ObjectiveFn
    jump_embedding: str
    sampler: Callable[[Recipe], str]
    target_passes: Callable[[ObjectiveCfg, GuidanceCfg], float]
    flow_jump: Callable[[ObjectiveCfg], float] = lambda objective: 0.0


_REGISTRY: dict[str, ObjectiveSpec] = {}


def register_objective(spec: ObjectiveSpec) -> ObjectiveSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"objective {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def available_objectives() -> list[str]:
    return sorted(_REGISTRY)


def get_objective(mode: str) -> ObjectiveSpec:
    spec = _REGISTRY.get(mode)
    if spec is None:
        raise UserError(f"objective.mode: unknown objective {mode!r} "
                        f"(choose from {', '.join(available_objectives())})")
    return spec


def flow_jump(recipe: Recipe) -> float:
    """The jump size of this recipe's instantaneous velocity (see :class:`ObjectiveSpec`)."""
    return get_objective(recipe.objective.mode).flow_jump(recipe.objective)


def jump_embedding(recipe: Recipe) -> str:
    """How the network of this recipe embeds jump sizes (see ismctl.networks.model)."""
    return get_objective(recipe.objective.mode).jump_embedding


def one_pass_sampler(recipe: Recipe) -> str:
    """The one-pass sampler of this recipe's runs: "intrinsic" (w a network input) or
    "conditional" (guidance baked in, sampled at w = 0); see ismctl.sampling.protocol."""
    return get_objective(recipe.objective.mode).sampler(recipe)
