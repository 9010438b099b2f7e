"""The training-step section: FM, iSM and SM steps interleaved on one model and batch, where their
time goes, each iSM component's cost, the GPU throughput and MFU, and the MeanFlow step ratio
(method §5).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ismctl.config.recipe import GuidanceCfg, LossCfg, ObjectiveCfg
from ismctl.losses import build_loss
from ismctl.networks.model import build_model, forward_flops
from ismctl.objectives.shortcut import shortcut_loss
from ismctl.tools.bench.common import (
    CHANNELS,
    COMPONENT_GOAL,
    NUM_CLASSES,
    RATIO_GOAL,
    LossFn,
    Network,
    Sections,
    device_name,
    median,
    ratio,
    sync,
    time_call,
)
from ismctl.training.ema import TwinEMA
from ismctl.training.monitor import peak_flops


def flow_matching_loss(model: Network, x0: Tensor, x1: Tensor, y: Tensor, loss_fn: LossFn,
                       num_classes: int, class_dropout: float,
                       generator: torch.Generator | None) -> dict[str, Tensor]:
    """Plain flow matching (the reference step of method §5): d = 0, w = 0, labels dropped with
    ``class_dropout``, target x1 - x0; one online forward, no target network."""
    batch, device = x0.shape[0], x0.device
    gen_device = generator.device if generator is not None else device
    t = torch.rand(batch, generator=generator, device=gen_device).to(device)
    drop = torch.rand(batch, generator=generator, device=gen_device).to(device) < class_dropout
    labels = torch.where(drop, torch.full_like(y, num_classes), y)
    tt = t.view(-1, 1, 1, 1)
    x_t = (1 - tt) * x0 + tt * x1
    zeros = torch.zeros(batch, device=device)
    pred = model(x_t, t, zeros, labels, zeros)
    return {"loss": loss_fn(pred, x1 - x0).mean()}


class StepRig:
    """One model, optimiser and batch; runs FM, iSM and SM training steps like the trainer
    (loss -> backward -> clip -> AdamW -> EMA) and returns their timings."""

    KINDS = ("fm", "ism", "sm")

    def __init__(self, preset: str, batch: int, size: int, device: torch.device,
                 seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.device, self.batch = device, batch
        self.model = build_model(preset, size, CHANNELS, NUM_CLASSES).to(device).train()
        cuda = device.type == "cuda"
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=cuda)
        self.twin = TwinEMA(self.model, target_decay=0.95, inference_decay=0.9999)
        # FM and the SM baseline keep one EMA, which is also SM's target network.
        self.single = TwinEMA(self.model, target_decay=0.9999, inference_enabled=False)
        self.losses = {"wavelet": build_loss(LossCfg(), size),
                       "mse": build_loss(LossCfg(name="mse"), size)}
        self.objectives = {"ism": ObjectiveCfg(), "sm": ObjectiveCfg(mode="sm")}
        self.guidance = GuidanceCfg()
        gen = torch.Generator().manual_seed(seed)
        shape = (batch, CHANNELS, size, size)
        self.x0 = torch.randn(shape, generator=gen).to(device)
        self.x1 = torch.randn(shape, generator=gen).to(device)
        self.y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cuda
                         else contextlib.nullcontext())
        self.calls = 0

    def step(self, kind: str, detail: bool) -> dict[str, float]:
        """One training step of ``kind``; "total" always, the sections when ``detail``."""
        s = Sections(self.device, detail)
        ema = self.twin if kind == "ism" else self.single
        loss_fn = s.wrap(self.losses["wavelet" if kind == "ism" else "mse"], "loss")
        online = s.wrap(self.model, "online_forward")
        gen = torch.Generator(self.device).manual_seed(self.calls)
        self.calls += 1
        sync(self.device)
        start = time.perf_counter()
        with self.autocast:
            if kind == "fm":
                parts = flow_matching_loss(online, self.x0, self.x1, self.y, loss_fn,
                                           NUM_CLASSES, 0.1, gen)
            else:
                parts = shortcut_loss(online, s.wrap(ema.target, "target_passes"), self.x0,
                                      self.x1, self.y, self.objectives[kind], self.guidance,
                                      loss_fn, NUM_CLASSES, gen)
        with s.timed("backward"):
            parts["loss"].backward()
        with s.timed("optimizer"):
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        with s.timed("ema_update"):
            ema.update(self.model)
        sync(self.device)
        total = time.perf_counter() - start
        out = {"total": total}
        if detail:
            out.update(s.times)
            out["objective_other"] = max(0.0, total - sum(s.times.values()))
            out["target_rows"] = float(s.rows.get("target_passes", 0))
        return out


def time_steps(rig: StepRig, warmup: int, iters: int) -> dict[str, list[dict[str, float]]]:
    """Interleaved iterations (fm, ism, sm, fm, ...) so slow drifts of a shared machine hit
    every kind alike. On CPU the sections come from the same iterations (no sync needed);
    on CUDA from extra synchronised ones."""
    split_here = rig.device.type != "cuda"
    for _ in range(warmup):
        for kind in rig.KINDS:
            rig.step(kind, detail=False)
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in rig.KINDS}
    for _ in range(iters):
        for kind in rig.KINDS:
            runs[kind].append(rig.step(kind, detail=split_here))
    if not split_here:
        for kind in rig.KINDS:
            for i, sections in enumerate(rig.step(kind, detail=True) for _ in range(3)):
                runs[kind][i] = {**sections, "total": runs[kind][i]["total"]}
    return runs


def summarise(runs: list[dict[str, float]], batch: int) -> dict[str, Any]:
    """Medians over iterations; section shares are taken within each iteration first, which
    keeps them meaningful when other load slows some iterations down."""
    keys = sorted({k for r in runs for k in r} - {"total", "target_rows"})
    total = median([r["total"] for r in runs])
    rows = [r["target_rows"] for r in runs if "target_rows" in r]
    return {"total_s": total, "min_s": min(r["total"] for r in runs), "img_s": batch / total,
            "all_s": [r["total"] for r in runs],
            "sections_s": {k: median([r[k] for r in runs if k in r]) for k in keys},
            "sections_fraction": {k: median([r[k] / r["total"] for r in runs if k in r])
                                  for k in keys},
            "target_rows_per_sample": (rows[0] / batch) if rows else 0.0}


def paired_median(num: list[dict[str, float]], den: list[dict[str, float]],
                  value: Callable[[dict[str, float], dict[str, float]], float]) -> float:
    """Median over interleaved iterations i of ``value(num[i], den[i])``: both members of a
    pair ran back to back, so load that drifts over seconds affects them alike."""
    return median([value(a, b) for a, b in zip(num, den, strict=True)])


def bench_steps(preset: str, batch: int, size: int, device: torch.device, warmup: int,
                iters: int) -> tuple[dict[str, Any], StepRig]:
    rig = StepRig(preset, batch, size, device)
    runs = time_steps(rig, warmup, iters)
    kinds = {k: summarise(v, batch) for k, v in runs.items()}
    flops = forward_flops(rig.model)
    peak = peak_flops(device)
    for summary in kinds.values():
        rows = 3.0 + summary["target_rows_per_sample"]
        summary["forward_equivalents_per_sample"] = rows
        summary["achieved_tflop_s"] = summary["img_s"] * flops * rows / 1e12
        summary["mfu"] = summary["img_s"] * flops * rows / peak if peak else None
    return {
        "batch": batch, "warmup": warmup, "iters": iters,
        "params_m": sum(p.numel() for p in rig.model.parameters()) / 1e6,
        "forward_gflop_per_sample": flops / 1e9,
        **kinds,
        "ratio_ism_over_fm": paired_median(runs["ism"], runs["fm"], ratio),
        # Other load only adds time, so the fastest iterations are the least disturbed.
        "ratio_ism_over_fm_of_minimums": kinds["ism"]["min_s"] / kinds["fm"]["min_s"],
        "ratio_sm_over_fm": paired_median(runs["sm"], runs["fm"], ratio),
        "ratio_ism_over_sm": paired_median(runs["ism"], runs["sm"], ratio),
        "expected_ratio_forward_equivalents": kinds["ism"]["forward_equivalents_per_sample"] / 3,
        # Extra target-network time of intrinsic guidance (ism vs sm targets) per iSM step.
        "guidance_targets_fraction": paired_median(
            [r for r in runs["ism"] if "target_passes" in r],
            [r for r in runs["sm"] if "target_passes" in r],
            lambda a, b: (a["target_passes"] - b["target_passes"]) / a["total"]),
    }, rig


def loss_cost(rig: StepRig, iters: int) -> dict[str, dict[str, float]]:
    """Forward + backward of each loss on the step's (B, C, H, W) prediction and target."""
    pred = torch.randn_like(rig.x0).requires_grad_(True)
    target = torch.randn_like(rig.x0)

    def run(loss_fn: LossFn) -> Callable[[], None]:
        def call() -> None:
            pred.grad = None
            with rig.autocast:
                loss = loss_fn(pred, target).mean()
            loss.backward()
        return call

    return {name: time_call(run(fn), rig.device, iters) for name, fn in rig.losses.items()}


def ema_cost(rig: StepRig, iters: int) -> dict[str, dict[str, float]]:
    return {"twin": time_call(lambda: rig.twin.update(rig.model), rig.device, iters),
            "single": time_call(lambda: rig.single.update(rig.model), rig.device, iters)}


def component_costs(step: dict[str, Any], rig: StepRig, quick: bool) -> dict[str, Any]:
    """Each piece's cost as a share of the iSM step. Load from other processes only adds
    time, so least-disturbed estimates are compared: the fastest timed call of each piece
    over the fastest iSM step."""
    ism_step = step["ism"]["min_s"]
    loss = loss_cost(rig, 5 if quick else 20)
    ema = ema_cost(rig, 3 if quick else 10)
    target = {k: step[k]["sections_s"].get("target_passes", 0.0) for k in ("ism", "sm")}
    return {
        "wavelet": {"wavelet": loss["wavelet"], "mse": loss["mse"],
                    "fraction_of_step": (loss["wavelet"]["min_s"] - loss["mse"]["min_s"])
                    / ism_step},
        "twin_ema": {"twin": ema["twin"], "single": ema["single"],
                     "in_step_median_s": step["ism"]["sections_s"].get("ema_update"),
                     "fraction_of_step": ema["twin"]["min_s"] / ism_step,
                     "fraction_vs_single_ema": (ema["twin"]["min_s"] - ema["single"]["min_s"])
                     / ism_step},
        "intrinsic_guidance": {
            "target_passes_ism_median_s": target["ism"],
            "target_passes_sm_median_s": target["sm"],
            "target_rows_per_sample_ism": step["ism"]["target_rows_per_sample"],
            "target_rows_per_sample_sm": step["sm"]["target_rows_per_sample"],
            "fraction_of_step": step["guidance_targets_fraction"],
            "step_ism_over_sm": step["ratio_ism_over_sm"]},
    }


def goals(steps: dict[str, Any], components: dict[str, Any]) -> list[dict[str, Any]]:
    goals = []
    for preset, step in steps.items():
        goals.append({"name": f"{preset} iSM step / FM step (fastest of each)",
                      "value": step["ratio_ism_over_fm_of_minimums"], "limit": RATIO_GOAL,
                      "median_of_paired_ratios": step["ratio_ism_over_fm"]})
        for name in ("wavelet", "twin_ema", "sot"):
            value = components[preset][name]["fraction_of_step"]
            if value is not None:
                goals.append({"name": f"{preset} {name} share of the iSM step", "value": value,
                              "limit": COMPONENT_GOAL})
    for goal in goals:
        goal["met"] = bool(goal["value"] <= goal["limit"])
    return goals


def gpu_section(steps: dict[str, Any], dev: torch.device, notes: list[str]) -> dict[str, Any]:
    if dev.type != "cuda":
        notes.append("MFU skipped on CPU (no bf16 peak to compare with); see gpu.skipped")
        return {"skipped": "no CUDA device: img/s and MFU for B/2 and XL/2 in bf16 need a GPU "
                           "(run the same command there)"}
    peak = peak_flops(dev)
    if peak is None:
        notes.append(f"{device_name(dev)}: not in training.monitor.PEAK_BF16_FLOPS, MFU not "
                     "computed")
    return {"name": device_name(dev), "peak_bf16_flops": peak, "precision": "bf16 autocast",
            "img_s": {p: {k: s[k]["img_s"] for k in StepRig.KINDS} for p, s in steps.items()},
            "mfu": {p: {k: s[k]["mfu"] for k in StepRig.KINDS} for p, s in steps.items()}}


def meanflow_step_ratio(preset: str, batch: int, size: int, device: torch.device, warmup: int,
                        iters: int, compiled: bool = False) -> dict[str, Any]:
    """A MeanFlow training step (method §4.1: JVP target on the d > 0 quarter of the batch, baked
    CFG rows, adaptive weight, MSE) against a flow-matching step on the same continuous-jump
    backbone, batch, optimiser and EMA, interleaved; the ratio is the median of per-iteration
    ratios. bf16 autocast on CUDA, fp32 elsewhere; ``compiled`` compiles the online network and
    the target passes as the trainer does."""
    from ismctl.objectives.meanflow import meanflow_loss, target_passes
    from ismctl.system.runtime import compile_network

    torch.manual_seed(0)
    model = build_model(preset, size, CHANNELS, NUM_CLASSES,
                        jump_embedding="continuous").to(device).train()
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=cuda)
    # MeanFlow's targets come from the online weights; one EMA for sampling, as FM.
    ema = TwinEMA(model, target_decay=0.9999, target_enabled=False, inference_decay=0.9999)
    online = compile_network(model, compiled)
    objective = ObjectiveCfg(mode="meanflow")
    guidance = GuidanceCfg(omega=1.0, kappa=0.5)   # MeanFlow-B/2's guidance (meanflow_b.yaml)
    loss_fn = build_loss(LossCfg(name="mse"), size)
    gen = torch.Generator().manual_seed(0)
    shape = (batch, CHANNELS, size, size)
    x0 = torch.randn(shape, generator=gen).to(device)
    x1 = torch.randn(shape, generator=gen).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def step(kind: str, seed: int) -> float:
        step_gen = torch.Generator(device).manual_seed(seed)
        sync(device)
        start = time.perf_counter()
        with amp:
            if kind == "fm":
                parts = flow_matching_loss(online, x0, x1, y, loss_fn, NUM_CLASSES, 0.1, step_gen)
            else:
                parts = meanflow_loss(online, online, x0, x1, y, objective, guidance, loss_fn,
                                      NUM_CLASSES, step_gen)
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model)
        sync(device)
        if not math.isfinite(float(parts["loss"].detach())):
            raise RuntimeError(f"meanflow bench: non-finite {kind} loss")
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"fm": [], "meanflow": []}
    for i in range(warmup + iters):
        for kind in times:
            elapsed = step(kind, i)
            if i >= warmup:
                times[kind].append(elapsed)
    ratios = [m / f for m, f in zip(times["meanflow"], times["fm"], strict=True)]
    return {"preset": preset, "batch": batch, "compiled": compiled,
            "precision": "bf16" if cuda else "fp32", "warmup": warmup, "iters": iters,
            "fm_step_s": median(times["fm"]), "meanflow_step_s": median(times["meanflow"]),
            "ratio_meanflow_over_fm": median(ratios),
            "expected_ratio_forward_equivalents": (3 + target_passes(objective, guidance)) / 3}
