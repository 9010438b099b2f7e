"""MeanFlow (Geng et al. 2025) in our conventions: continuous jumps, the MeanFlow identity target.

method §4.1; the derivation is docs/meanflow.md. F(x_t, t, d, c, w) is the average velocity of the
jump from t to T = t + d. With the end T held fixed, (T - t) F(x_t, t, T - t) = x_T - x_t;
differentiating in t gives -F + d dF/dt = -v, so

    F(x_t, t, d) = v + d * dF/dt,   dF/dt = v . dF/dx + dF/dt - dF/dd

i.e. one Jacobian-vector product of F with tangent (v, 1, -1) in (x, t, d) and 0 in (c, w).
MeanFlow writes u = v - (t - r) du/dt in its flipped time (t = 1 noise, r < t the end); both
velocities change sign under the flip, which gives the form above (docs/meanflow.md).

One training batch, contiguous rows (the data is already paired and shuffled):

    [0:n0]   d = 0   target v~                       (flow matching, MeanFlow's 75%)
    [n0:]    d > 0   target v~ + d sg(JVP of F_tgt)   (the MeanFlow identity)

Class dropout nulls the labels of the first rows only (``drop_leading_labels``), so only d = 0
rows ever train unconditionally, as in the official code.

v~ is the velocity with guidance baked in (``meanflow_guidance: baked``, MeanFlow's CFG):

    v~ = omega v + kappa F_tgt(x_t, t, 0, c) + (1 - omega - kappa) F_tgt(x_t, t, 0, null)

for rows with a label and t >= interval_start, v~ = v otherwise; its fixed point at d = 0 is CFG
with scale s = omega / (1 - kappa), i.e. w = s - 1 in our delta convention. With
``meanflow_guidance: intrinsic`` w is a network input drawn like ism's and
v~ = v + w_eff sg(F_tgt(x_t, t, 0, c, 0) - F_tgt(x_t, t, 0, null, 0)) (method §3.1).

DDP: the gradient-carrying pass is the one call of ``model`` (the DDP-wrapped online network)
over the whole batch. The JVP and the guidance rows run on ``target_model`` (the target EMA,
or the bare online module when twin EMA is off) under no_grad: they produce constants, so no
gradient can bypass DDP's all-reduce.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ismctl.config.recipe import GuidanceCfg, ObjectiveCfg
from ismctl.objectives.guidance import interval_weight, sample_guidance
from ismctl.objectives.registry import LossFn, Network
from ismctl.objectives.shortcut import (
    _bcast,
    _gen_device,
    _uniform,
    call_fused,
    guidance_inputs,
    split_sizes,
)
from ismctl.system.runtime import math_attention

# Forward-pass equivalents of one JVP (primal plus tangent through every matrix product).
JVP_PASSES = 2.0


def logit_normal_jumps(n: int, mean: float, std: float, generator: torch.Generator | None,
                       device: torch.device | str) -> tuple[Tensor, Tensor]:
    """(t, d) of ``n`` jumps, float32: MeanFlow's time sampler mapped to our time.

    Both ends are drawn from sigmoid(N(mean, std)) in MeanFlow's time (1 = noise); the larger
    is its start t', the smaller its end r'. Ours: t = 1 - t', d = t' - r' (t + d = 1 - r').
    """
    gen_dev = _gen_device(generator, device)
    ends = torch.sigmoid(mean + std * torch.randn(2, n, generator=generator, device=gen_dev))
    start, end = ends.max(dim=0).values, ends.min(dim=0).values
    return (1 - start).to(device), (start - end).to(device)


def total_derivative(net: Network, x: Tensor, t: Tensor, d: Tensor, y: Tensor, w: Tensor,
                     v: Tensor) -> tuple[Tensor, Tensor]:
    """(F, dF/dt) at (x, t, d, y, w): dF/dt along the flow of velocity ``v`` with t + d fixed.

    One forward-mode JVP with tangent (v, 1, -1) in (x, t, d). Attention runs on the math SDPA
    kernel here: the fused kernels have no forward-mode derivative (CPU flash attention raises;
    on CUDA the flash and memory-efficient kernels have none either), the math path is
    composite and does.
    """

    def f(x_: Tensor, t_: Tensor, d_: Tensor) -> Tensor:
        return net(x_, t_, d_, y, w)

    with math_attention():
        return torch.func.jvp(f, (x, t, d), (v.to(x.dtype), torch.ones_like(t),
                                              -torch.ones_like(d)))


def drop_leading_labels(y: Tensor, p: float, null_class: int, rows: int,
                        generator: torch.Generator | None) -> Tensor:
    """MeanFlow's class dropout (method §4.1): how many labels to drop is drawn as one Bernoulli(p)
    per row of the batch, and the *first* that many rows lose theirs, as the official code does.
    The first rows are the d = 0 rows (the batch is already shuffled), so a jump row never
    trains with the null label; the count is capped at those ``rows`` (the official code would
    null jump rows too: at p = 0.1 and batch 64, 48 of them at d = 0, the chance is 3e-36).
    """
    count = (_uniform(y.shape[0], generator, y.device) < p).sum().clamp(max=rows)
    drop = torch.arange(y.shape[0], device=y.device) < count
    return torch.where(drop, torch.full_like(y, null_class), y)


@torch.no_grad()
def meanflow_target(net: Network, x: Tensor, t: Tensor, d: Tensor, y: Tensor, w: Tensor,
                    v: Tensor) -> Tensor:
    """The MeanFlow identity's target v + d sg(dF/dt) (docs/meanflow.md), from ``net``."""
    _, dF = total_derivative(net, x, t, d, y, w, v)
    return v + _bcast(d, v) * dF.to(v.dtype)


def guidance_active(objective: ObjectiveCfg, guidance: GuidanceCfg) -> bool:
    """Whether targets need the cond/null rows of the target network (known from the recipe,
    so the step's work never depends on the data)."""
    if objective.meanflow_guidance == "intrinsic":
        return guidance.w_max > 0
    return guidance.omega != 1.0 or guidance.kappa != 0.0


def baked_velocity(v: Tensor, v_cond: Tensor, v_null: Tensor, apply: Tensor, omega: float,
                   kappa: float) -> Tensor:
    """MeanFlow's guided velocity omega v + kappa F_c + (1 - omega - kappa) F_null where
    ``apply`` (labelled rows inside the guidance interval), v elsewhere."""
    guided = omega * v + kappa * v_cond + (1.0 - omega - kappa) * v_null
    return torch.where(_bcast(apply, v).bool(), guided, v)


def adaptive_weighted(per_sample: Tensor, dims: int, c: float, p: float) -> Tensor:
    """MeanFlow's adaptively weighted loss l / sg(l + c)^p per sample, l in MeanFlow's units.

    ``per_sample`` is the loss of ``loss.name`` averaged over the ``dims`` dimensions of a sample
    (MSE, or the wavelet loss in the same units); MeanFlow's l is the squared error *summed* over
    them, so l = dims x per_sample and c is in those units (official JAX code c = 0.01, method
    §4.1). The weighted value and its gradient are the official ones exactly; c applied to the
    per-dimension mean would be dims times larger in effect (4,096x on ImageNet latents). p = 1
    makes each sample's gradient that of log(l + c), so large-error samples do not dominate.
    """
    summed = per_sample * dims
    return summed / (summed.detach() + c).pow(p)


def meanflow_loss(model: Network, target_model: Network, x0: Tensor, x1: Tensor, y: Tensor,
                  objective: ObjectiveCfg, guidance: GuidanceCfg, loss_fn: LossFn,
                  num_classes: int, generator: torch.Generator | None = None,
                  slot: tuple[int, int] = (0, 1)) -> dict[str, Tensor]:
    """One training batch of MeanFlow (method §4.1). Returns "loss" (differentiable: the mean of
    the adaptively weighted per-sample losses), and the unweighted mean per-sample loss of the
    d = 0 rows ("velocity") and the d > 0 rows ("consistency"), detached."""
    batch, device, null = x0.shape[0], x0.device, num_classes
    n0, _, n1 = split_sizes(batch, "sm", objective.bootstrap_fraction, 0.0)
    jumps = slice(n0, batch)

    t, d = logit_normal_jumps(batch, objective.time_mean, objective.time_std, generator, device)
    d = torch.cat([torch.zeros(n0, device=device), d[jumps]])
    labels = drop_leading_labels(y, objective.class_dropout, null, n0, generator)
    if objective.meanflow_guidance == "intrinsic":
        w = sample_guidance(batch, guidance.w_max, guidance.w_step, generator, device)
        w = torch.where(labels == null, torch.zeros_like(w), w)
    else:
        w = torch.zeros(batch, device=device)
    x_t = (1 - _bcast(t, x0)) * x0 + _bcast(t, x0) * x1
    v = x1 - x0

    with torch.no_grad():
        if guidance_active(objective, guidance):
            (out,) = call_fused(target_model, [guidance_inputs(x_t, t, labels, null)])
            v_cond, v_null = out.to(v.dtype).chunk(2)
            if objective.meanflow_guidance == "intrinsic":
                w_eff = interval_weight(t, w, guidance.interval_start)
                v_tilde = v + _bcast(w_eff, v) * (v_cond - v_null)
            else:
                apply = (labels != null) & (t >= guidance.interval_start)
                v_tilde = baked_velocity(v, v_cond, v_null, apply, guidance.omega,
                                         guidance.kappa)
        else:
            v_tilde = v
        target = v_tilde
        if n1:
            jump_target = meanflow_target(target_model, x_t[jumps], t[jumps], d[jumps],
                                          labels[jumps], w[jumps], v_tilde[jumps])
            target = torch.cat([v_tilde[:n0], jump_target])

    pred = model(x_t, t, d, labels, w)
    per_sample = loss_fn(pred, target)
    weighted = adaptive_weighted(per_sample, x0[0].numel(), objective.adaptive_c,
                                 objective.adaptive_p)
    part_weight = torch.cat([per_sample.new_full((n0,), objective.velocity_weight),
                             per_sample.new_full((n1,), objective.consistency_weight)])
    zero = per_sample.new_zeros(())
    return {
        "loss": (part_weight * weighted).mean(),
        "velocity": per_sample[:n0].mean().detach() if n0 else zero,
        "consistency": per_sample[jumps].mean().detach() if n1 else zero,
    }


def target_passes(objective: ObjectiveCfg, guidance: GuidanceCfg) -> float:
    """Target-network forward-pass equivalents per sample: the cond and null rows of every
    sample when guidance is in the target, and one JVP per d > 0 sample (method §5)."""
    return (2.0 * guidance_active(objective, guidance)
            + JVP_PASSES * objective.bootstrap_fraction)

