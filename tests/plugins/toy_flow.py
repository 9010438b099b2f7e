"""A test plugin, loaded from its file (``objective.plugins: [tests/plugins/toy_flow.py]``):
plain flow matching at d = 0, which builds no target with a network. It exercises what the
shipped objectives do not: an objective without a target network, settings of its own, and a
registration by file path."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from ismctl.config.plugins import Needs, ObjectiveSpec, Sampling, register_objective
from ismctl.config.recipe import GuidanceCfg, ObjectiveBase, Recipe

CALLS: list[dict[str, Any]] = []


class ToyFlowSettings(ObjectiveBase):
    label_drop: float = Field(0.0, ge=0.0, le=1.0, description="Probability of the null label.")
    weight: float = Field(1.0, gt=0.0, description="Factor on the loss.")


def toy_flow_loss(model: Any, target_model: Any, x0: Tensor, x1: Tensor, y: Tensor,
                  objective: ToyFlowSettings, guidance: GuidanceCfg, loss_fn: Any,
                  num_classes: int, generator: torch.Generator | None = None,
                  slot: tuple[int, int] = (0, 1)) -> dict[str, Tensor]:
    n = x0.shape[0]
    t = torch.rand(n, generator=generator, device=x0.device)
    drop = torch.rand(n, generator=generator, device=x0.device) < objective.label_drop
    labels = torch.where(drop, torch.full_like(y, num_classes), y)
    tb = t.view(-1, 1, 1, 1)
    zeros = torch.zeros_like(t)
    CALLS.append({"target_is_model": target_model is model, "slot": slot})
    flow = loss_fn(model((1 - tb) * x0 + tb * x1, t, zeros, labels, zeros), x1 - x0).mean()
    return {"loss": objective.weight * flow, "flow": flow.detach()}


def _sampling(recipe: Recipe) -> Sampling:
    return Sampling("baked", "dyadic")


TOY = register_objective(ObjectiveSpec(
    name="toy-flow", fn=toy_flow_loss, jump_embedding="table", settings=ToyFlowSettings,
    sampling=_sampling, target_passes=lambda objective, guidance: 0.0,
    needs=Needs(target_network=False, null_label=False), description="flow matching (a test)"))
