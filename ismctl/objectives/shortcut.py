"""The shortcut objectives: ``sm``, the published shortcut-models algorithm, and ``ism``.

Network callables have the signature ``F(x, t, d, y, w) -> velocity`` with x (B, C, H, W),
t, d, w float (B,) and y long (B,), the null label being ``num_classes``.

``sm`` (method §2) reproduces the training targets and loss of the official shortcut-models code
(kvfrans/shortcut-models, ``targets_shortcut.py: get_targets``); ``tests/test_sm_official.py``
holds it against a transcription of that function. A batch is

    [0:nb]   bootstrap  d in {2/M, ..., 1/2, 1} (the official level histogram), t on the d-grid,
                        labels kept, target = mean of two half jumps of F_tgt at d/2; the
                        rows at d = 2/M take CFG at ``guidance.cfg_scale`` in both half jumps
    [nb:]    flow       d = 1/M (the flow shares the finest embedding), t on the 1/M grid,
                        labels dropped with ``class_dropout``, target x1 - (1 - sigma_min) x0

with x_t = (1 - (1 - sigma_min) t) x0 + t x1 and the loss one mean over all rows. CFG enters at
d = 2/M and compounds through the log2(M) - 1 coarser levels (1.5^7 for M = 128). The one
official defect not kept: its flow part reuses the bootstrap part's samples and drops the last
ones (kvfrans/shortcut-models issue 10); here every sample is used exactly once. The level
histogram belongs to the global batch, so each data slot (rank x accumulation step) takes its
share of it: the same method on any number of GPUs.

``ism`` (method §3.1) keeps d = 0 as a level of its own (the instantaneous velocity) with jumps
1/M..1 above it, and splits a batch into three parts, each sample used once:

    [0:nv]          velocity      d = 0, w = 0, labels dropped, target x1 - x0
    [nv:nv+ng]      guidance      d = 0, w on the grid, target v + w sg(F_c - F_null)
    [nv+ng:]        consistency   d = 2^-k, labels kept, target = mean of two half jumps of F_tgt
                                  at the sample's own w (the finest level's from d = 0)

The online network sees the whole batch in one forward pass. The target network (the fast
target EMA, method §3.4) runs twice under no_grad: the guidance cond/null rows fused with the first
half jumps, then the second half jumps, i.e. 2 target rows per guidance sample and per
consistency sample and nothing more (method §5: an ism step costs about 1.33x flow matching).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ismctl.config.recipe import GuidanceCfg, ObjectiveCfg
from ismctl.objectives.guidance import interval_weight, sample_guidance
from ismctl.utils.errors import UserError

Network = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
# (index, count) of this micro-batch among the data slots of one optimiser step.
Slot = tuple[int, int]

# Target-network passes per sample of each part, for the cost model (method §5).
TARGET_PASSES = {"guidance": 2, "consistency": 2}


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """A per-sample (B,) value viewed as (B, 1, 1, 1) to scale images."""
    return v.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def _gen_device(generator: torch.Generator | None, device: torch.device | str) -> torch.device:
    return generator.device if generator is not None else torch.device(device)


def _uniform(n: int, generator: torch.Generator | None, device: torch.device | str) -> Tensor:
    """U[0, 1) float32 drawn on the generator's device, returned on ``device``."""
    u = torch.rand(n, generator=generator, device=_gen_device(generator, device))
    return u.to(device)


def _num_levels(base_steps: int) -> int:
    if base_steps < 1 or base_steps & (base_steps - 1):
        raise UserError(f"objective.base_steps: must be a power of two, got {base_steps}")
    return base_steps.bit_length()


def interpolate(x0: Tensor, x1: Tensor, t: Tensor, sigma_min: float = 0.0
                ) -> tuple[Tensor, Tensor]:
    """(x_t, v): x_t = (1 - (1 - sigma_min) t) x0 + t x1 and its velocity x1 - (1 - sigma_min) x0
    (method §1; sigma_min = 1e-5 in the official shortcut-models code, method §2)."""
    tb = _bcast(t, x0)
    keep = 1.0 - sigma_min
    return (1 - keep * tb) * x0 + tb * x1, x1 - keep * x0


def split_sizes(batch: int, mode: str, bootstrap_fraction: float,
                guidance_fraction: float) -> tuple[int, int, int]:
    """(n_velocity, n_guidance, n_consistency), summing exactly to ``batch``.

    Largest-remainder rounding, ties to the earlier part; then every part with a positive
    fraction gets at least one sample when the batch has room, taken from the largest part.
    Unlike the official code (kvfrans/shortcut-models issue 10) no sample is reused or dropped.
    """
    if batch < 1:
        raise UserError(f"objective: batch size must be >= 1, got {batch}")
    if mode not in ("ism", "sm"):
        raise UserError(f"objective.mode: expected 'ism' or 'sm', got {mode!r}")
    if not 0.0 < bootstrap_fraction < 1.0:
        raise UserError("objective.bootstrap_fraction: must be in (0, 1), got "
                        f"{bootstrap_fraction}")
    if mode == "sm":
        guidance_fraction = 0.0
    if not 0.0 <= guidance_fraction < 1.0 - bootstrap_fraction:
        raise UserError("objective: bootstrap_fraction + guidance_fraction must be < 1, got "
                        f"{bootstrap_fraction} + {guidance_fraction}")
    fractions = (1.0 - bootstrap_fraction - guidance_fraction, guidance_fraction,
                 bootstrap_fraction)
    exact = [batch * f for f in fractions]
    # The tolerance stops 0.3 * 10 = 3.0000000000000004 style noise from shifting a sample.
    sizes = [math.floor(e + 1e-9) for e in exact]
    order = sorted(range(3), key=lambda i: (-(exact[i] - sizes[i]), i))
    for i in order[: batch - sum(sizes)]:
        sizes[i] += 1
    positive = [i for i in range(3) if fractions[i] > 0]
    if batch >= len(positive):
        for i in positive:
            if sizes[i] == 0:
                sizes[max(range(3), key=lambda j: sizes[j])] -= 1
                sizes[i] = 1
    return sizes[0], sizes[1], sizes[2]


def jump_levels(n: int, base_steps: int, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu") -> Tensor:
    """ism's jump sizes d = 2^-k (k = 0..log2 M) for ``n`` consistency samples, float32 (n,).

    Each level appears floor(n / L) or floor(n / L) + 1 times, the levels getting the extra
    sample chosen at random, then the whole is shuffled: a part smaller than L still mixes
    levels (the official code gives every sample d = 1 then, method §2).
    """
    levels = _num_levels(base_steps)
    gen_dev = _gen_device(generator, "cpu")
    counts = torch.full((levels,), n // levels, dtype=torch.long, device=gen_dev)
    extra = torch.randperm(levels, generator=generator, device=gen_dev)[: n % levels]
    counts[extra] += 1
    sizes = torch.pow(2.0, -torch.arange(levels, dtype=torch.float32, device=gen_dev))
    d = sizes.repeat_interleave(counts, output_size=n)
    d = d[torch.randperm(n, generator=generator, device=gen_dev)]
    return d.to(device)


def official_levels(n: int, base_steps: int) -> Tensor:
    """The official level histogram of a bootstrap part of ``n`` rows, float32 (n,), in its order.

    The L = log2(M) bootstrap levels are d = 2/M, ..., 1/2, 1 (the finest, 1/M, is the flow's
    own embedding). Each takes n // L rows, finest first, and d = 1 also takes the remainder:
    for M = 128 and n = 32 that is 4 rows at each of 1/64..1/2 and 8 at d = 1; with n < L every
    row is d = 1 and no row takes CFG (method §2).
    """
    levels = _num_levels(base_steps) - 1
    if levels == 0:
        raise UserError("objective.base_steps: sm needs base_steps >= 2 (the flow takes d = 1/M "
                        "and the bootstrap levels lie above it)")
    per = n // levels
    exps = torch.arange(levels - 1, -1, -1, dtype=torch.float32).repeat_interleave(per)
    exps = torch.cat([exps, torch.zeros(n - exps.numel())])
    return torch.pow(2.0, -exps)


def slot_levels(micro: int, fraction: float, base_steps: int, slot: Slot) -> Tensor:
    """This data slot's share of the global batch's official level list (:func:`official_levels`).

    The global bootstrap part is floor(global batch x fraction) rows (the official code's
    batch // bootstrap_every); slot ``index`` of ``count`` takes every count-th level from its
    index on, so the slots together train exactly the global histogram whatever the number of
    ranks and accumulation steps.
    """
    index, count = slot
    if not 0 <= index < count:
        raise ValueError(f"slot {index} of {count}")
    # The tolerance keeps 256 x 0.125 = 32 exact against float noise.
    n = math.floor(micro * count * fraction + 1e-9)
    return official_levels(n, base_steps)[index::count]


def grid_times(d: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """t uniform on the multiples of each sample's d with t + d <= 1 (method §2)."""
    positions = torch.round(1.0 / d)
    u = _uniform(d.shape[0], generator, d.device)
    k = torch.minimum(torch.floor(u * positions), positions - 1)
    return k * d


@dataclass(frozen=True)
class NetInputs:
    """The five inputs of one group of rows in a network call."""

    x: Tensor
    t: Tensor
    d: Tensor
    y: Tensor
    w: Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    @staticmethod
    def cat(groups: list[NetInputs]) -> NetInputs:
        if len(groups) == 1:
            return groups[0]
        return NetInputs(*(torch.cat(field) for field in
                           zip(*((g.x, g.t, g.d, g.y, g.w) for g in groups), strict=True)))


def call_fused(net: Network, groups: list[NetInputs]) -> list[Tensor]:
    """Run ``net`` once over the concatenated row groups and split its output back.

    Fewer, larger calls keep an accelerator busy; an all-empty request makes no call.
    """
    sizes = [len(g) for g in groups]
    if sum(sizes) == 0:
        return [g.x.new_empty(g.x.shape) for g in groups]
    full = NetInputs.cat([g for g in groups if len(g)])
    out = net(full.x, full.t, full.d, full.y, full.w)
    return list(out.split(sizes))


@dataclass(frozen=True)
class BootstrapPlan:
    """The two half jumps of a self-consistency target (method §2):

        v1 = F(x_t, t, h);  x_mid = x_t + (d/2) v1;  v2 = F(x_mid, t + d/2, h)
        target = (v1 + v2) / 2

    where h, the jump size the half jumps are asked for, is d/2, except in ism at the finest
    level d = 1/M, whose half jumps take the d = 0 velocity (:meth:`ism`). In sm the rows at
    d = 2/M take classic CFG v_null + s (v_c - v_null) from a label row and a null row in both
    half jumps (:meth:`sm`): the compounding guidance of method §2, kept on purpose. ism passes
    the sample's own w to both half jumps, so every level is trained at the same strength and
    guidance does not compound (method §3.1).
    """

    x_t: Tensor
    t: Tensor
    y: Tensor
    w: Tensor
    half: Tensor
    d_half: Tensor
    cfg_rows: Tensor
    null_class: int
    cfg_scale: float | None
    clip: float | None

    @classmethod
    def ism(cls, x_t: Tensor, t: Tensor, d: Tensor, y: Tensor, w: Tensor, base_steps: int,
            null_class: int, clip: float | None = None) -> BootstrapPlan:
        half = d / 2
        # d * M is exactly 1 at the finest level; the margin only guards float input.
        finest = d * base_steps < 1.5
        d_half = torch.where(finest, torch.zeros_like(half), half)
        none = torch.empty(0, dtype=torch.long, device=d.device)
        return cls(x_t, t, y, w, half, d_half, none, null_class, None, clip)

    @classmethod
    def sm(cls, x_t: Tensor, t: Tensor, d: Tensor, y: Tensor, base_steps: int, null_class: int,
           cfg_scale: float | None, clip: float | None = None) -> BootstrapPlan:
        half = d / 2
        w = torch.zeros_like(t)
        if cfg_scale is None or cfg_scale == 1.0:
            # Scale 1 is the conditional velocity itself: no null rows needed.
            cfg_rows = torch.empty(0, dtype=torch.long, device=d.device)
        else:
            # Rows whose label is already null need no second call: CFG leaves v_null as is.
            cfg_level = d * base_steps < 3.0
            cfg_rows = torch.nonzero(cfg_level & (y != null_class)).squeeze(1)
        return cls(x_t, t, y, w, half, half, cfg_rows, null_class, cfg_scale, clip)

    def _inputs(self, x: Tensor, t: Tensor) -> NetInputs:
        rows = NetInputs(x, t, self.d_half, self.y, self.w)
        if self.cfg_rows.numel() == 0:
            return rows
        r = self.cfg_rows
        null = torch.full_like(self.y[r], self.null_class)
        return NetInputs.cat([rows, NetInputs(x[r], t[r], self.d_half[r], null, self.w[r])])

    def first(self) -> NetInputs:
        return self._inputs(self.x_t, self.t)

    def second(self, x_mid: Tensor) -> NetInputs:
        return self._inputs(x_mid, self.t + self.half)

    def velocity(self, out: Tensor) -> Tensor:
        """One half jump's velocity per sample from the rows of :meth:`first`/:meth:`second`."""
        n = self.t.shape[0]
        v = out[:n]
        if self.cfg_rows.numel() == 0 or self.cfg_scale is None:
            return v
        v_null = out[n:]
        # The official form v_null + s (v_c - v_null), for rounding-level agreement with it.
        guided = v_null + self.cfg_scale * (v[self.cfg_rows] - v_null)
        return v.index_copy(0, self.cfg_rows, guided)

    def _clamp(self, x: Tensor) -> Tensor:
        return x if self.clip is None else x.clamp(-self.clip, self.clip)

    def midpoint(self, v1: Tensor) -> Tensor:
        return self._clamp(self.x_t + _bcast(self.half, self.x_t) * v1)

    def target(self, v1: Tensor, v2: Tensor) -> Tensor:
        return self._clamp((v1 + v2) / 2)


@torch.no_grad()
def run_plan(F_tgt: Network, plan: BootstrapPlan) -> Tensor:
    """The target of a :class:`BootstrapPlan`: one network call per half jump."""
    (out1,) = call_fused(F_tgt, [plan.first()])
    v1 = plan.velocity(out1)
    (out2,) = call_fused(F_tgt, [plan.second(plan.midpoint(v1))])
    return plan.target(v1, plan.velocity(out2))


def bootstrap_target(F_tgt: Network, x_t: Tensor, t: Tensor, d: Tensor, y: Tensor, w: Tensor,
                     base_steps: int, null_class: int, clip: float | None = None) -> Tensor:
    """ism's self-consistency target of jump size ``d``: the mean of two half jumps of ``F_tgt``
    at the sample's own w, the finest level's from the d = 0 velocity. ``clip`` clamps the
    midpoint and the target to [-clip, clip] (the official code uses 4)."""
    return run_plan(F_tgt, BootstrapPlan.ism(x_t, t, d, y, w, base_steps, null_class, clip))


def sm_bootstrap_target(F_tgt: Network, x_t: Tensor, t: Tensor, d: Tensor, y: Tensor,
                        base_steps: int, null_class: int, cfg_scale: float | None = None,
                        clip: float | None = None) -> Tensor:
    """sm's bootstrap target (method §2): half jumps at d/2, CFG at ``cfg_scale`` in the rows at
    d = 2/M (whose half jumps are the flow, d = 1/M)."""
    return run_plan(F_tgt, BootstrapPlan.sm(x_t, t, d, y, base_steps, null_class, cfg_scale,
                                            clip))


def guidance_inputs(x_t: Tensor, t: Tensor, y: Tensor, null_class: int) -> NetInputs:
    """Rows of the guidance term: conditional then null, both at d = 0 and w = 0."""
    zeros = torch.zeros_like(t)
    null = torch.full_like(y, null_class)
    return NetInputs(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([zeros, zeros]),
                     torch.cat([y, null]), torch.cat([zeros, zeros]))


def guidance_finish(out: Tensor, v: Tensor, t: Tensor, w: Tensor,
                    interval_start: float) -> Tensor:
    """v + w_eff (F_c - F_null) from the 2n rows of :func:`guidance_inputs`."""
    n = v.shape[0]
    v_cond, v_null = out[:n], out[n:]
    w_eff = interval_weight(t, w, interval_start)
    return v + _bcast(w_eff, v) * (v_cond - v_null)


@torch.no_grad()
def guidance_target(F_tgt: Network, x_t: Tensor, t: Tensor, y: Tensor, w: Tensor, v: Tensor,
                    null_class: int, interval_start: float) -> Tensor:
    """Intrinsic-guidance target v + w_eff sg(F(x_t, t, 0, c, 0) - F(x_t, t, 0, null, 0)).

    The paper does not publish its guidance term; this form is ours (method §3.1). Since
    E[x1 - x0 | x_t, c] = v_c, its regression optimum is v_c + w (v_c - v_null): the guided
    velocity in the delta convention, learned at d = 0 and carried to larger jumps by the
    consistency part. ``w_eff`` is zero for t < interval_start (interval guidance). The cond
    and null rows go through the network in one call of 2n rows.
    """
    (out,) = call_fused(F_tgt, [guidance_inputs(x_t, t, y, null_class)])
    return guidance_finish(out, v, t, w, interval_start)


def _drop_labels(y: Tensor, p: float, null_class: int,
                 generator: torch.Generator | None) -> Tensor:
    drop = _uniform(y.shape[0], generator, y.device) < p
    return torch.where(drop, torch.full_like(y, null_class), y)


def _part_mean(per_sample: Tensor, rows: slice) -> Tensor:
    return per_sample[rows].mean() if rows.stop > rows.start else per_sample.new_zeros(())


def sm_loss(model: Network, target_model: Network, x0: Tensor, x1: Tensor, y: Tensor,
            objective: ObjectiveCfg, guidance: GuidanceCfg, loss_fn: LossFn, num_classes: int,
            generator: torch.Generator | None = None, slot: Slot = (0, 1)) -> dict[str, Tensor]:
    """One training batch of the official shortcut-models objective (method §2; module docstring).

    ``slot`` is this micro-batch's (index, count) among the data slots of the step: the level
    histogram is the global batch's (:func:`slot_levels`). Returns "loss" (one mean of the
    per-sample losses over all rows, the bootstrap rows weighted by ``consistency_weight`` and
    the flow rows by ``velocity_weight``, both 1 in the official code) and the unweighted mean
    of each part, detached: "velocity" (flow) and "consistency" (bootstrap).
    """
    batch, device, null = x0.shape[0], x0.device, num_classes
    steps = objective.base_steps
    d_b = slot_levels(batch, objective.bootstrap_fraction, steps, slot).to(device)
    nb = d_b.shape[0]
    boot, flow = slice(0, nb), slice(nb, batch)

    t_b = grid_times(d_b, generator)
    t_f = _uniform(batch - nb, generator, device)
    if objective.t_grid:
        t_f = torch.floor(t_f * steps) / steps
    y_f = _drop_labels(y[flow], objective.class_dropout, null, generator)

    t = torch.cat([t_b, t_f])
    d = torch.cat([d_b, torch.full((batch - nb,), 1.0 / steps, device=device)])
    labels = torch.cat([y[boot], y_f])
    w = torch.zeros(batch, device=device)
    x_t, v = interpolate(x0, x1, t, objective.sigma_min)

    with torch.no_grad():
        plan = BootstrapPlan.sm(x_t[boot], t_b, d_b, y[boot], steps, null, guidance.cfg_scale,
                                objective.target_clip)
        target = torch.cat([run_plan(target_model, plan).to(v.dtype), v[flow]])

    pred = model(x_t, t, d, labels, w)
    per_sample = loss_fn(pred, target)
    weight = torch.cat([per_sample.new_full((nb,), objective.consistency_weight),
                        per_sample.new_full((batch - nb,), objective.velocity_weight)])
    return {"loss": (weight * per_sample).mean(),
            "velocity": _part_mean(per_sample, flow).detach(),
            "consistency": _part_mean(per_sample, boot).detach()}


def ism_loss(model: Network, target_model: Network, x0: Tensor, x1: Tensor, y: Tensor,
             objective: ObjectiveCfg, guidance: GuidanceCfg, loss_fn: LossFn, num_classes: int,
             generator: torch.Generator | None = None, slot: Slot = (0, 1)) -> dict[str, Tensor]:
    """One training batch of iSM (method §3.1; module docstring).

    ``x0`` noise and ``x1`` data are already paired (sOT) and shuffled, so the parts are
    contiguous slices. Returns "loss" = a L_velocity + b L_guidance + g L_consistency
    (differentiable) and each part's mean loss, detached: "velocity", "guidance" and
    "consistency". A part with no samples contributes 0. ``slot`` plays no part: every split
    here is a share of the micro-batch, the same in expectation on any number of slots.
    """
    batch, device, null = x0.shape[0], x0.device, num_classes
    nv, ng, nc = split_sizes(batch, "ism", objective.bootstrap_fraction,
                             objective.guidance_fraction)
    sv, sg, sc = slice(0, nv), slice(nv, nv + ng), slice(nv + ng, batch)
    steps = objective.base_steps

    t_v = _uniform(nv, generator, device)
    if objective.t_grid:
        t_v = torch.floor(t_v * steps) / steps
    y_v = _drop_labels(y[sv], objective.class_dropout, null, generator)

    t_g = _uniform(ng, generator, device)
    w_g = sample_guidance(ng, guidance.w_max, guidance.w_step, generator, device)

    d_c = jump_levels(nc, steps, generator, device)
    t_c = grid_times(d_c, generator)
    # Consistency rows keep their labels, as the guidance rows and the official code's
    # bootstrap rows do: only the velocity part trains the null label.
    y_c = y[sc]
    w_c = sample_guidance(nc, guidance.w_max, guidance.w_step, generator, device)
    w_c = torch.where(y_c == null, torch.zeros_like(w_c), w_c)

    t = torch.cat([t_v, t_g, t_c])
    d = torch.cat([torch.zeros(nv + ng, device=device), d_c])
    labels = torch.cat([y_v, y[sg], y_c])
    w = torch.cat([torch.zeros(nv, device=device), w_g, w_c])
    x_t, v = interpolate(x0, x1, t, objective.sigma_min)

    with torch.no_grad():
        plan = BootstrapPlan.ism(x_t[sc], t_c, d_c, y_c, w_c, steps, null,
                                 clip=objective.target_clip)
        # First target call: guidance cond/null rows together with the first half jumps.
        out_g, out_1 = call_fused(target_model,
                                  [guidance_inputs(x_t[sg], t_g, y[sg], null), plan.first()])
        v1 = plan.velocity(out_1)
        (out_2,) = call_fused(target_model, [plan.second(plan.midpoint(v1))])
        target_g = guidance_finish(out_g, v[sg], t_g, w_g, guidance.interval_start)
        target_c = plan.target(v1, plan.velocity(out_2))
        target = torch.cat([v[sv], target_g.to(v.dtype), target_c.to(v.dtype)])

    pred = model(x_t, t, d, labels, w)
    per_sample = loss_fn(pred, target)

    total = per_sample.new_zeros(())
    out: dict[str, Tensor] = {}
    for name, rows, weight in (("velocity", sv, objective.velocity_weight),
                               ("guidance", sg, objective.guidance_weight),
                               ("consistency", sc, objective.consistency_weight)):
        part = _part_mean(per_sample, rows)
        total = total + weight * part
        out[name] = part.detach()
    out["loss"] = total
    return out


def shortcut_loss(model: Network, target_model: Network, x0: Tensor, x1: Tensor, y: Tensor,
                  objective: ObjectiveCfg, guidance: GuidanceCfg, loss_fn: LossFn,
                  num_classes: int, generator: torch.Generator | None = None,
                  slot: Slot = (0, 1)) -> dict[str, Tensor]:
    """The shortcut objective of ``objective.mode``: :func:`sm_loss` or :func:`ism_loss`."""
    if objective.mode not in ("sm", "ism"):
        raise UserError(f"objective.mode: expected 'ism' or 'sm', got {objective.mode!r}")
    fn = sm_loss if objective.mode == "sm" else ism_loss
    return fn(model, target_model, x0, x1, y, objective, guidance, loss_fn, num_classes,
              generator, slot)


def target_passes(objective: ObjectiveCfg, guidance: GuidanceCfg | None = None) -> float:
    """Target-network forward passes per training sample (method §5): two half jumps per
    consistency sample and, in ism mode, the cond and null rows per guidance sample (sm's
    extra null rows at d = 2/M, 1/log2(M) of its bootstrap part, are left out)."""
    extra = TARGET_PASSES["consistency"] * objective.bootstrap_fraction
    if objective.mode == "ism":
        extra += TARGET_PASSES["guidance"] * objective.guidance_fraction
    return extra

