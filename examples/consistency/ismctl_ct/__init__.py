"""Discrete-time consistency training (CT; Song, Dhariwal, Chen and Sutskever 2023, "Consistency
Models", Algorithm 3) as an ismctl objective, in ismctl's conventions (docs/method.md §1: t = 0
is noise, t = 1 data, x_t = (1 - t) x0 + t x1).

The network F(x_t, t, d, c, w) is asked for the jump to the data end, d = 1 - t, which makes the
consistency function

    f(x_t, t) = x_t + (1 - t) F(x_t, t, 1 - t, c, 0).

Its boundary condition f(x, 1) = x holds by construction (the paper's skip parameterisation
with c_skip = 1, c_out = 1 - t, here on the straight path). A batch draws one level n per row,
uniformly from 0..N-1, on the grid t_n = 1 - (1 - n / N)^rho, and regresses f at (x_{t_n}, t_n)
on the target network's f at the next level, both points on the same straight path between
the same noise and data (CT's one-sample estimate of the ODE step, in place of a teacher):

    loss = d(f_online(x_{t_n}, t_n), sg f_target(x_{t_{n+1}}, t_{n+1})),

d the recipe's per-sample loss (``loss.name``). At the last level the target is the data itself
(f(x_1, 1) = x_1). Labels become the null class with probability ``class_dropout``. The target
network is ismctl's target EMA (``ema.target_decay``; the online weights when it is off, as in
improved CT), one pass per sample.

Sampling, ``jumps: to_end``: x <- x + (1/N) F(x, i/N, 1 - i/N, c, 0). Each step predicts the data
end x + (1 - t) F and moves 1/N of the way to it: one step is the consistency model's one-step
sample, N steps a deterministic multistep one (no fresh noise, so sample i depends only on its
seed). No guidance is trained into the weights; w = 0.

Installed (``pip install ./examples/consistency``), the entry point ``ct = ismctl_ct:CT`` registers
it; not installed, ``--plugin ismctl_ct`` (or ``objective.plugins``) imports this module, which
registers it itself. Nothing in ismctl names it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from ismctl.config.plugins import Needs, ObjectiveSpec, Sampling, register_objective
from ismctl.config.recipe import GuidanceCfg, ObjectiveBase, Recipe

# The recipe this package ships: the quickstart with the ct objective (ismctl train RECIPE).
RECIPE = Path(__file__).resolve().parent / "ct_digits.yaml"


class CTSettings(ObjectiveBase):
    """The recipe's ``objective`` section when ``objective.mode`` is ``ct``."""

    scales: int = Field(16, ge=1, description=(
        "N, the number of steps between the levels t_0 = 0 < ... < t_N = 1 (the paper's "
        "discretisation; more levels: a less biased target, slower to learn)."))
    rho: float = Field(1.0, gt=0.0, description=(
        "Level spacing t_n = 1 - (1 - n/N)^rho: 1 is uniform, > 1 puts more levels near the "
        "data end."))
    class_dropout: float = Field(0.1, ge=0.0, le=1.0, description=(
        "Probability of the null label per row (the unconditional model that CFG on top "
        "needs)."))


def level_times(scales: int, rho: float) -> Tensor:
    """The N + 1 levels t_n = 1 - (1 - n / N)^rho, float32: t_0 = 0 (noise), t_N = 1 (data)."""
    n = torch.arange(scales + 1, dtype=torch.float64)
    return (1.0 - (1.0 - n / scales) ** rho).float()


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def consistency_function(net: Any, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
    """f(x, t) = x + (1 - t) F(x, t, 1 - t, y, 0): the data end that ``net`` predicts."""
    jump = 1.0 - t
    return x + _bcast(jump, x) * net(x, t, jump, y, torch.zeros_like(t)).to(x.dtype)


def ct_loss(model: Any, target_model: Any, x0: Tensor, x1: Tensor, y: Tensor,
            objective: CTSettings, guidance: GuidanceCfg, loss_fn: Any, num_classes: int,
            generator: torch.Generator | None = None,
            slot: tuple[int, int] = (0, 1)) -> dict[str, Tensor]:
    """One micro-batch of consistency training (module docstring). Returns "loss" (the mean of
    the per-sample losses, differentiable through ``model`` alone) and "consistency" (the same,
    detached). Every draw comes from ``generator`` and depends on the batch size alone: the
    same on any number of GPUs (``slot`` plays no part)."""
    batch, device = x0.shape[0], x0.device
    gen_device = generator.device if generator is not None else device
    level = torch.randint(objective.scales, (batch,), generator=generator, device=gen_device)
    drop = torch.rand(batch, generator=generator, device=gen_device) < objective.class_dropout
    level, drop = level.to(device), drop.to(device)
    grid = level_times(objective.scales, objective.rho).to(device)
    t, t_next = grid[level], grid[level + 1]
    labels = torch.where(drop, torch.full_like(y, num_classes), y)

    def on_path(s: Tensor) -> Tensor:
        return (1 - _bcast(s, x0)) * x0 + _bcast(s, x0) * x1

    with torch.no_grad():
        target = consistency_function(target_model, on_path(t_next), t_next, labels)
    pred = consistency_function(model, on_path(t), t, labels)
    loss = loss_fn(pred, target).mean()
    return {"loss": loss, "consistency": loss.detach()}


def _sampling(recipe: Recipe) -> Sampling:
    return Sampling("baked", "any", jumps="to_end")


def _target_passes(objective: CTSettings, guidance: GuidanceCfg) -> float:
    return 1.0


CT = ObjectiveSpec(
    name="ct", fn=ct_loss, jump_embedding="continuous", settings=CTSettings,
    sampling=_sampling, target_passes=_target_passes,
    needs=Needs(target_network=True, target_ema=False, null_label=True),
    description="A consistency model (discrete-time consistency training, Song et al. 2023)")

register_objective(CT)
