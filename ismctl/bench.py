"""`ismctl bench` / `make bench`: where the time of an iSM training step goes -> bench.json.

SPEC 5 is the budget. A flow-matching (FM) step costs 3 forward equivalents per sample
(forward + backward); iSM adds no-grad passes of the target EMA, 2 rows per consistency
sample and 2 per guidance sample, so with 1/4 + 1/4 of the batch about 4: an iSM step should
cost ~1.33x an FM step on the same backbone and batch (goal here: <= 1.40), and the wavelet
loss, the twin EMA and sOT should each add at most a few percent (goal: <= 3% each).

What is measured, all in one process so that every ratio compares numbers taken under the
same load (the machine may be shared):

- ``steps``: the FM step (d = 0, w = 0, MSE, one EMA), the full iSM step (ism objective,
  wavelet loss, twin EMA) and the SM baseline step (sm objective, MSE, one EMA), run
  interleaved on the same model and batch; the median of several warm iterations, split into
  online forward, target passes, loss, backward, optimiser (incl. gradient clipping), EMA
  update and the rest of the objective (sampling t, d, w; building inputs). The sections are
  timed by wrapping the networks and the loss the real ``shortcut_loss`` calls; on a GPU the
  split comes from separate synchronised iterations so that the totals stay unperturbed.
- ``components``: each iSM piece alone as a fraction of the iSM step: wavelet vs MSE loss
  (forward + backward), twin-EMA update vs none, intrinsic-guidance target passes (ism vs sm
  objective), and sOT pools of 32 batches as seen by the step: the mean wait for the next
  batch from a ``TrainLoader`` with workers prefetching, against independent pairing. The step
  is emulated by a sleep (as on an accelerator, the CPU is free for the workers); the emulated
  step is shorter than the real one, so the fraction is an upper bound.
- ``loader``: latents/s of ``TrainLoader`` (pairing included) with pools of 0, 1, 8 and 32
  batches.
- ``coupler``: whether sOT keeps up at ImageNet scale. One pool of 8,192 pairs of 4x32x32
  latents (1,000 classes) is paired on one CPU core in each ``coupling.mode`` (cost matrix,
  exact assignment, statistics); with the loader's own time to read and draw a pool, that is
  one worker's time per pool. A pool feeds ``pool_size / (img/s per GPU)`` seconds of
  training, so ``ceil(worker time per pool x img/s per GPU / pool_size)`` loader workers per
  GPU keep up (``workers_to_keep_up``), given for reference GPU throughputs.
- ``sampling``: img/s at 1, 4 and 128 steps (intrinsic guidance: one pass per step), and
  ``sampling.paths``: sample-steps/s of the quickstart's evaluation sampling before (no_grad and
  a read back from the device per network call), with inference mode, and compiled.
- ``gpu``: on CUDA the same step code runs in bf16 for B/2 and XL/2 and reports img/s and
  MFU = img/s x forward FLOPs x (3 + target rows per sample) / peak bf16 FLOP/s.
- ``meanflow``: the MeanFlow step (SPEC 4.1) as a ratio to a flow-matching step on the same
  continuous-jump backbone and batch (first preset), interleaved, one run.
- ``threads``: on a CPU, the quickstart's evaluation sampling with every usable core (the
  default thread count) against one thread, as a ratio, on the machine as it is and with
  ``cores - 1`` busy processes started beside it (another job holding all cores but one):
  the case for and against the default. Seconds, not minutes.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor

import ismctl
from ismctl.distributed import resolve_device
from ismctl.ema import TwinEMA
from ismctl.errors import UserError
from ismctl.fileio import json_safe, write_json
from ismctl.losses import build_loss
from ismctl.model import build_model, forward_flops, parse_preset
from ismctl.objective import shortcut_loss
from ismctl.progress import progress_bar
from ismctl.recipe import GuidanceCfg, LossCfg, ObjectiveCfg
from ismctl.runtime import default_threads
from ismctl.trainer import PEAK_BF16_FLOPS

LossFn = Callable[[Tensor, Tensor], Tensor]
Network = Callable[..., Tensor]

NUM_CLASSES = 1000
CHANNELS = 4
# Per-step batch per preset size: a real CPU training batch, and a real per-GPU batch that
# fits an 80 GB card in bf16 without activation checkpointing.
BATCH = {"cpu": {"tiny": 32, "S": 32, "B": 16, "L": 8, "XL": 8},
         "cuda": {"tiny": 256, "S": 256, "B": 256, "L": 128, "XL": 64}}
# (warm-up, timed) iterations per step kind: big CPU models take ~10-30 s per step.
ITERS = {"cpu": {"tiny": (3, 15), "S": (1, 5), "B": (1, 5), "L": (1, 3), "XL": (1, 3)},
         "cuda": {"tiny": (5, 20), "S": (5, 20), "B": (5, 20), "L": (3, 10), "XL": (3, 10)}}
RATIO_GOAL, COMPONENT_GOAL = 1.40, 0.03
LOADER_POOLS = (0, 1, 8, 32)
SAMPLING_STEPS = (1, 4, 128)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


class Sections:
    """Wall time per named section of one step; disabled, it times nothing and adds no sync."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.device, self.enabled = device, enabled
        self.times: dict[str, float] = {}
        self.rows: dict[str, int] = {}

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        _sync(self.device)
        start = time.perf_counter()
        yield
        _sync(self.device)
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start

    def wrap(self, fn: Callable[..., Tensor], name: str) -> Callable[..., Tensor]:
        """``fn`` timed under ``name``, counting the rows (samples) of every call."""

        def timed_call(*args: Tensor) -> Tensor:
            self.rows[name] = self.rows.get(name, 0) + args[0].shape[0]
            with self.timed(name):
                return fn(*args)

        return timed_call


def flow_matching_loss(model: Network, x0: Tensor, x1: Tensor, y: Tensor, loss_fn: LossFn,
                       num_classes: int, class_dropout: float,
                       generator: torch.Generator | None) -> dict[str, Tensor]:
    """Plain flow matching (the reference step of SPEC 5): d = 0, w = 0, labels dropped with
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
        _sync(self.device)
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
        _sync(self.device)
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


def _summary(runs: list[dict[str, float]], batch: int) -> dict[str, Any]:
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


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def bench_steps(preset: str, batch: int, size: int, device: torch.device, warmup: int,
                iters: int) -> tuple[dict[str, Any], StepRig]:
    rig = StepRig(preset, batch, size, device)
    runs = time_steps(rig, warmup, iters)
    kinds = {k: _summary(v, batch) for k, v in runs.items()}
    flops = forward_flops(rig.model)
    peak = _peak_flops(device)
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
        "ratio_ism_over_fm": paired_median(runs["ism"], runs["fm"], _ratio),
        # Other load only adds time, so the fastest iterations are the least disturbed.
        "ratio_ism_over_fm_of_minimums": kinds["ism"]["min_s"] / kinds["fm"]["min_s"],
        "ratio_sm_over_fm": paired_median(runs["sm"], runs["fm"], _ratio),
        "ratio_ism_over_sm": paired_median(runs["ism"], runs["sm"], _ratio),
        "expected_ratio_forward_equivalents": kinds["ism"]["forward_equivalents_per_sample"] / 3,
        # Extra target-network time of intrinsic guidance (ism vs sm targets) per iSM step.
        "guidance_targets_fraction": paired_median(
            [r for r in runs["ism"] if "target_passes" in r],
            [r for r in runs["sm"] if "target_passes" in r],
            lambda a, b: (a["target_passes"] - b["target_passes"]) / a["total"]),
    }, rig


def _ratio(a: dict[str, float], b: dict[str, float]) -> float:
    return a["total"] / b["total"]


def _time_call(fn: Callable[[], Any], device: torch.device, iters: int) -> dict[str, float]:
    """Median and minimum of ``iters`` timed calls after one untimed call."""
    fn()
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"median_s": median(times), "min_s": min(times)}


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

    return {name: _time_call(run(fn), rig.device, iters) for name, fn in rig.losses.items()}


def ema_cost(rig: StepRig, iters: int) -> dict[str, dict[str, float]]:
    return {"twin": _time_call(lambda: rig.twin.update(rig.model), rig.device, iters),
            "single": _time_call(lambda: rig.single.update(rig.model), rig.device, iters)}


def loader_wait(path: Path, batch: int, pool_size: int, workers: int, step_s: float,
                num_batches: int) -> dict[str, float]:
    """Mean and max wait of the training step for its next batch, the step emulated by a
    sleep of ``step_s``; measured after every worker has delivered its first pool."""
    from ismctl.data.loader import TrainLoader

    loader = TrainLoader(path, batch_size=batch, pool_size=pool_size, seed=0,
                         num_workers=workers, shuffle_buffer=1000, flip=False)
    it = iter(loader)
    for _ in range(max(1, pool_size // batch) * max(1, workers)):
        next(it)
    waits = []
    for _ in range(num_batches):
        time.sleep(step_s)
        start = time.perf_counter()
        next(it)
        waits.append(time.perf_counter() - start)
    del it, loader
    return {"mean_wait_s": statistics.fmean(waits), "max_wait_s": max(waits),
            "batches": float(num_batches)}


# Per-GPU training throughput the keep-up rule is stated for: DiT-XL/2 at 256 px on one A100
# (the fast-DiT reference, bf16) and an H100 at about 3x that.
REFERENCE_IMG_S = {"A100": 107.5, "H100": 322.5}
COUPLER_POOL, COUPLER_QUICK_POOL = 8192, 512
# Between-class share of the synthetic latents' variance (the class pattern's weight): weak
# structure, as in latent space; the solve time hardly depends on it.
COUPLER_STRUCTURE = 0.2


def workers_to_keep_up(worker_s_per_pool: float, pool_size: int, img_s_per_gpu: float) -> int:
    """Loader workers per GPU that build pools as fast as training consumes them: a pool of
    ``pool_size`` samples feeds ``pool_size / img_s_per_gpu`` seconds of training and costs
    one worker ``worker_s_per_pool`` seconds; the workers build pools in parallel, and with a
    pool of batches in flight per worker (``TrainLoader``) each has that long to build its
    next."""
    return max(1, math.ceil(worker_s_per_pool * img_s_per_gpu / pool_size))


def coupler_throughput(pool_size: int = COUPLER_POOL, shape: tuple[int, ...] = (CHANNELS, 32, 32),
                       num_classes: int = NUM_CLASSES, modes: tuple[str, ...] | None = None,
                       min_group: int = 2, seed: int = 0) -> dict[str, Any]:
    """Seconds to pair one pool of ``pool_size`` noise/data pairs on one CPU thread, per
    ``coupling.mode``: ``pair_pool`` (cost matrices and exact assignments) and
    ``coupling_stats``, as a loader worker runs them. Data: uniform random labels, each latent
    ``sqrt(s) pattern[label] + sqrt(1 - s) noise`` with ``s = COUPLER_STRUCTURE``; also the
    class groups' sizes and the memory of the blind mode's cost matrix. Times are the
    process's CPU seconds (one thread: what a worker's core spends, however loaded the machine
    is), with the wall-clock seconds beside them (``*_wall_s``)."""
    from ismctl.coupling import MODES, coupling_stats, pair_pool

    modes = tuple(modes or MODES)
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (pool_size,), generator=gen)
    patterns = torch.randn(num_classes, *shape, generator=gen)
    s = COUPLER_STRUCTURE
    x1 = math.sqrt(s) * patterns[y] + math.sqrt(1 - s) * torch.randn(pool_size, *shape,
                                                                      generator=gen)
    x0 = torch.randn(pool_size, *shape, generator=gen)
    counts = torch.bincount(y, minlength=num_classes)
    present = counts[counts > 0]
    out: dict[str, Any] = {
        "pool_size": pool_size, "latent": list(shape), "num_classes": num_classes,
        "structure": s, "min_group": min_group, "threads": 1,
        "classes_in_pool": int(len(present)), "mean_group": float(present.float().mean()),
        "alone_in_class_fraction": float((counts == 1).sum()) / pool_size,
        "cost_matrix_bytes": pool_size**2 * 8, "pool_bytes_x0_x1": 2 * x0.numel() * 4,
        "modes": {}}
    with num_threads(1):
        for mode in modes:
            wall, start = time.perf_counter(), time.process_time()
            matched = pair_pool(x0, x1, y, mode=mode, min_group=min_group)
            solved = time.process_time()
            stats = coupling_stats(x0, matched, x1, y)
            done = time.process_time()
            out["modes"][mode] = {"pair_s": solved - start, "stats_s": done - solved,
                                  "total_s": done - start,
                                  "total_wall_s": time.perf_counter() - wall, **stats}
    return out


def coupler_keep_up(coupler: dict[str, Any], load_s_per_sample: float,
                    img_s: dict[str, float]) -> dict[str, Any]:
    """Per mode: one worker's seconds per pool (pairing + reading and drawing the pool's
    latents at the loader's measured rate) and the workers per GPU that keep up at each
    throughput of ``img_s``; the seconds of training one pool feeds at each."""
    pool = coupler["pool_size"]
    load_s = load_s_per_sample * pool
    rows = {}
    for mode, m in coupler["modes"].items():
        worker_s = m["total_s"] + load_s
        rows[mode] = {"worker_s_per_pool": worker_s,
                      "workers_per_gpu": {g: workers_to_keep_up(worker_s, pool, r)
                                          for g, r in img_s.items()}}
    return {"img_s_per_gpu": img_s, "load_s_per_pool": load_s,
            "training_s_per_pool": {g: pool / r for g, r in img_s.items()}, "modes": rows}


def sampling_throughput(preset: str, size: int, batch: int, device: torch.device,
                        steps_list: tuple[int, ...]) -> dict[str, Any]:
    from ismctl.sampler import sample

    torch.manual_seed(0)
    model = build_model(preset, size, CHANNELS, NUM_CLASSES).to(device).eval()
    noise = torch.randn(batch, CHANNELS, size, size, device=device)
    labels = torch.arange(batch, device=device) % NUM_CLASSES
    dtype = torch.bfloat16 if device.type == "cuda" else None
    img_s = {}
    for steps in steps_list:
        seconds = _time_call(lambda s=steps: sample(model, noise, labels, s, guidance=1.0,
                                                    autocast_dtype=dtype), device, 1)
        img_s[str(steps)] = batch / seconds["min_s"]
    return {"preset": preset, "batch": batch, "latent": [CHANNELS, size, size],
            "mode": "intrinsic (one pass per step)", "img_s": img_s}


@torch.no_grad()
def sample_before(model: torch.nn.Module, noise: Tensor, labels: Tensor, steps: int,
                  guidance: float, base_steps: int = 128) -> Tensor:
    """The sampling loop as it used to run, kept as the reference of ``sampling.paths``:
    autograd's no_grad instead of inference mode, and the jump sizes checked against the
    table with a read back from the device on every network call (the model's forward did
    that). Same arithmetic as :func:`ismctl.sampler.sample`, so the same images."""
    from ismctl.model import check_jump_sizes

    batch = noise.shape[0]
    d = torch.full((batch,), 1.0 / steps, device=noise.device)
    w = torch.full((batch,), float(guidance), device=noise.device)
    x = noise.clone()
    for i in range(steps):
        t = torch.full((batch,), i / steps, device=noise.device)
        check_jump_sizes(d, base_steps)
        x = x + (1.0 / steps) * model(x, t, d, labels, w).to(x.dtype)
    return x


def sampling_paths(device: torch.device, quick: bool) -> dict[str, Any]:
    """Sample-steps per second along the sampler's paths, interleaved in one process.

    The setting is the quickstart's evaluation on a CPU (tiny/2 on 8x8x1 digits, 10 classes,
    ``eval.batch_size`` 500) and B/2 at batch 256 on a GPU, with random weights (the
    zero-initialised layers too, so that outputs differ between paths if the arithmetic does).
    Paths: ``before`` (:func:`sample_before`), ``inference_mode`` (``ismctl.sampler.sample``),
    ``compiled`` (the same with the torch.compile'd network; compilation timed apart, skipped
    by the quick run) and, on a CPU with more cores than threads, ``inference_mode_all_cores``.
    Rates are given from the median and from the fastest of the rounds (load from other
    processes only adds time), and the largest output difference of each path from ``before``.
    """
    from ismctl.runtime import compile_network, usable_cores
    from ismctl.sampler import sample

    on_gpu = device.type == "cuda"
    preset, shape, classes = ("B/2", (CHANNELS, 32, 32), NUM_CLASSES) if on_gpu else \
        ("tiny/2", (1, 8, 8), 10)
    batch = 32 if quick else (256 if on_gpu else 500)
    steps, rounds = (2, 2) if quick else (8, 7)
    torch.manual_seed(0)
    model = build_model(preset, shape[-1], shape[0], classes).to(device).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    noise = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    labels = (torch.arange(batch) % classes).to(device)
    dtype = torch.bfloat16 if on_gpu else None

    def run(net: torch.nn.Module) -> Callable[[], Tensor]:
        return lambda: sample(net, noise, labels, steps, 1.0, autocast_dtype=dtype)

    paths: dict[str, Callable[[], Tensor]] = {
        "before": lambda: sample_before(model, noise, labels, steps, 1.0),
        "inference_mode": run(model),
    }
    threads, cores = torch.get_num_threads(), usable_cores()
    if not on_gpu and cores > threads:
        def all_cores() -> Tensor:
            with num_threads(cores):
                return run(model)()
        paths["inference_mode_all_cores"] = all_cores
    compile_s = None
    if not quick:
        compiled = compile_network(model)
        start = time.perf_counter()
        run(compiled)()
        _sync(device)
        compile_s = time.perf_counter() - start
        paths["compiled"] = run(compiled)
    outputs = {name: fn() for name, fn in paths.items()}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    work = batch * steps
    rate = {name: work / median(t) for name, t in times.items()}
    best = {name: work / min(t) for name, t in times.items()}
    return {
        "preset": preset, "batch": batch, "shape": list(shape), "steps": steps,
        "rounds": rounds, "threads": threads, "all_cores": cores,
        "sample_steps_per_s": rate, "sample_steps_per_s_fastest": best,
        "speedup_over_before": {name: r / rate["before"] for name, r in rate.items()},
        "speedup_over_before_fastest": {name: r / best["before"] for name, r in best.items()},
        "max_abs_diff_from_before": {
            name: float((out.float() - outputs["before"].float()).abs().max())
            for name, out in outputs.items()},
        "compile_s": compile_s,
        "projected_s_1000_samples_128_steps": {name: 1000 * 128 / r for name, r in best.items()},
    }


BUSY_LOOP = "import time\nend = time.monotonic() + {limit}\nwhile time.monotonic() < end: pass"


@contextlib.contextmanager
def busy_processes(count: int, limit_s: float = 120.0) -> Iterator[None]:
    """``count`` processes that each keep one core busy (a Python loop; no torch), as another
    job on a shared machine would. Each also stops by itself after ``limit_s`` seconds, so an
    interrupted bench leaves nothing running."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP.format(limit=limit_s)])
             for _ in range(count)]
    try:
        time.sleep(0.2)  # let them start and take their cores
        yield
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def thread_scaling(quick: bool) -> dict[str, Any] | None:
    """Sampling speed with every usable core over one thread, on this machine as it is and with
    ``cores - 1`` busy processes beside it; None with a single usable core.

    The setting is the quickstart's evaluation sampling (tiny/2 on 8x8x1 digits, 10 classes,
    random weights), one and all-core calls interleaved; each rate is from the fastest round
    (other load only adds time). ``ratio_all_over_one`` above 1 means the default thread count
    (every core) is the faster choice; the busy case reproduces the measurement that once made
    the default subtract the load average (two threads at half the speed of one).
    """
    from ismctl.runtime import usable_cores
    from ismctl.sampler import sample

    cores = usable_cores()
    if cores < 2:
        return None
    batch, steps, rounds = (32, 1, 2) if quick else (128, 2, 5)
    budget_s = 1.0 if quick else 8.0  # per case: on a loaded machine one all-core call is slow
    torch.manual_seed(0)
    model = build_model("tiny/2", 8, 1, 10).eval()
    noise = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(batch) % 10

    def rate(n: int) -> float:
        with num_threads(n):
            start = time.perf_counter()
            sample(model, noise, labels, steps, 1.0)
            return batch * steps / (time.perf_counter() - start)

    def measure() -> dict[str, float]:
        rate(1), rate(cores)  # warm-up: allocations, thread pool start
        one: list[float] = []
        every: list[float] = []
        start = time.perf_counter()
        while len(one) < rounds and (len(one) < 2 or time.perf_counter() - start < budget_s):
            one.append(rate(1))
            every.append(rate(cores))
        return {"rounds": len(one), "one_thread_sample_steps_per_s": max(one),
                "all_cores_sample_steps_per_s": max(every),
                "ratio_all_over_one": max(every) / max(one)}

    load_start = list(os.getloadavg())
    as_is = measure()
    with busy_processes(cores - 1):
        busy = measure()
    return {"preset": "tiny/2", "batch": batch, "steps": steps, "max_rounds": rounds,
            "cores": cores, "load_average_start": load_start, "as_is": as_is,
            "busy": {"busy_processes": cores - 1, **busy}}


def _components(step: dict[str, Any], rig: StepRig, quick: bool) -> dict[str, Any]:
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


def _sot(path: Path, batch: int, pool: int, workers: int, step_s: float, batches: int,
         ism_totals: dict[str, float]) -> dict[str, Any]:
    """Extra wait per step with pools of ``pool`` batches over independent pairing. Measured
    with an emulated step of ``step_s``; a longer real step leaves the workers more time, so
    relative to any real step at least that long the share is an upper bound (None for
    shorter steps)."""
    waits = {str(k): loader_wait(path, batch, k, workers, step_s, batches)
             for k in (0, pool * batch)}
    extra = max(0.0, waits[str(pool * batch)]["mean_wait_s"] - waits["0"]["mean_wait_s"])
    return {"batch": batch, "pool_size": pool * batch, "num_workers": workers,
            "emulated_step_s": step_s, "wait": waits, "extra_wait_s": extra,
            "fraction_of_emulated_step": extra / step_s,
            "fraction_of_step": {p: extra / t if t >= step_s else None
                                 for p, t in ism_totals.items()}}


def _goals(steps: dict[str, Any], components: dict[str, Any]) -> list[dict[str, Any]]:
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


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _print(report: dict[str, Any], console: Console) -> None:
    steps = Table(title=f"training step, median s ({report['device']['name']}, "
                        f"{report['device']['threads']} threads)")
    for col in ("preset", "batch", "FM", "iSM", "SM", "iSM/FM\npaired", "iSM/FM\nfastest",
                "target rows\nper sample"):
        steps.add_column(col, justify="right")
    shares = Table(title="share of the iSM step")
    for col in ("preset", "wavelet", "twin EMA", "sOT (bound)", "guidance targets"):
        shares.add_column(col, justify="right")
    for preset, step in report["steps"].items():
        comp = report["components"][preset]
        steps.add_row(preset, str(step["batch"]), f"{step['fm']['total_s']:.3f}",
                      f"{step['ism']['total_s']:.3f}", f"{step['sm']['total_s']:.3f}",
                      f"{step['ratio_ism_over_fm']:.3f}",
                      f"{step['ratio_ism_over_fm_of_minimums']:.3f}",
                      f"{step['ism']['target_rows_per_sample']:.2f}")
        shares.add_row(preset, *(_pct(comp[k]["fraction_of_step"]) for k in
                                 ("wavelet", "twin_ema", "sot", "intrinsic_guidance")))
    console.print(steps)
    console.print(shares)
    split = Table(title="iSM step split, median s")
    split.add_column("section")
    for preset in report["steps"]:
        split.add_column(preset, justify="right")
    names = sorted({k for s in report["steps"].values() for k in s["ism"]["sections_s"]})
    for name in names:
        split.add_row(name, *(f"{s['ism']['sections_s'].get(name, 0.0):.3f}"
                              for s in report["steps"].values()))
    console.print(split)
    sot = report["sot"]
    console.print(f"sOT pool {sot['pool_size']}: extra wait {sot['extra_wait_s'] * 1e3:.2f} ms "
                  f"per batch ({sot['fraction_of_emulated_step']:.1%} of an emulated "
                  f"{sot['emulated_step_s']:g} s step)")
    loader = ", ".join(f"pool {k}: {v['latents_per_s']:.0f}/s"
                       for k, v in report["loader"]["results"].items())
    console.print(f"loader, batch {report['loader']['batch']}, "
                  f"{report['loader']['num_workers']} worker(s): {loader}")
    samp = report["sampling"]
    console.print(f"sampling {samp['preset']}, batch {samp['batch']}: " + ", ".join(
        f"{k} step(s) {v:.1f} img/s" for k, v in samp["img_s"].items()))
    paths = samp["paths"]
    console.print(f"sampling paths {paths['preset']}, batch {paths['batch']}, "
                  f"{paths['steps']} steps, fastest of {paths['rounds']}: " + ", ".join(
                      f"{k} {v:,.0f} sample-steps/s "
                      f"(x{paths['speedup_over_before_fastest'][k]:.2f})"
                      for k, v in paths["sample_steps_per_s_fastest"].items()))
    console.print(coupler_table(report["coupler"]))
    th = report.get("threads")
    if th:
        console.print(f"threads, sampling {th['preset']} batch {th['batch']}: all {th['cores']} "
                      f"cores / 1 thread = x{th['as_is']['ratio_all_over_one']:.2f} as is "
                      f"(load average {th['load_average_start'][0]:.1f}), "
                      f"x{th['busy']['ratio_all_over_one']:.2f} with "
                      f"{th['busy']['busy_processes']} busy process(es) beside")
    for goal in report["goals"]:
        mark = "[green]met[/]" if goal["met"] else "[red]missed[/]"
        console.print(f"goal {goal['name']}: {goal['value']:.3f} <= {goal['limit']:g} {mark}")
    for note in report["notes"]:
        console.print(f"[yellow]note:[/] {note}")


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads. The quick run uses one: on a busy machine the tiny
    model's small ops spend more time synchronising threads than computing."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _bench_sot(tmp: Path, steps: dict[str, Any], last: str, kind: str,
               quick: bool) -> dict[str, Any]:
    """sOT as the step sees it, with the last (largest) preset's batch. On a CPU the real
    step is far longer than the emulated one; on a GPU the emulated step is the real one."""
    from ismctl.data.bench import make_synthetic_latents

    step = steps[last]
    pool, workers = (8, 1) if quick else (32, min(4, max(2, (os.cpu_count() or 2) // 2)))
    emulated = min(step["ism"]["min_s"], 0.02 if quick else 0.1 if kind == "cpu" else 2.0)
    make_synthetic_latents(tmp / "sot", count=step["batch"] * pool * workers * 2,
                           num_classes=NUM_CLASSES, flip=False)
    # One more pool per worker after the warm-up: every worker rebuilds once, in turn.
    return _sot(tmp / "sot", step["batch"], pool, workers, emulated, pool * workers,
                {p: s["ism"]["min_s"] for p, s in steps.items()})


def coupler_table(coupler: dict[str, Any]) -> Table:
    """The keep-up table: per mode, one worker's time per pool and the workers per GPU."""
    keep = coupler["keep_up"]
    gpus = list(keep["img_s_per_gpu"])
    table = Table(title=f"sOT coupler: one pool of {coupler['pool_size']:,} x "
                        f"{'x'.join(map(str, coupler['latent']))} on 1 CPU core "
                        f"({coupler['num_classes']} classes, mean group "
                        f"{coupler['mean_group']:.1f}); pool load "
                        f"{keep['load_s_per_pool']:.1f} s")
    for col in ("mode", "pair s", "stats s", "worker s\nper pool", "cost\nreduction",
                *(f"workers/GPU\n{g} {keep['img_s_per_gpu'][g]:g} img/s" for g in gpus)):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for mode, m in coupler["modes"].items():
        k = keep["modes"][mode]
        table.add_row(mode, f"{m['pair_s']:.2f}", f"{m['stats_s']:.2f}",
                      f"{k['worker_s_per_pool']:.1f}", f"{m['cost_reduction']:.3f}",
                      *(str(k["workers_per_gpu"][g]) for g in gpus))
    return table


def _bench_loader(tmp: Path, quick: bool) -> dict[str, Any]:
    """``benchmark_loader`` with pools of 0, 1, 8 and 32 batches on 4x32x32 latents; results
    keyed by the pool in samples."""
    from ismctl.data.bench import benchmark_loader, make_synthetic_latents

    batch, workers = (32, 0) if quick else (256, 1)
    make_synthetic_latents(tmp / "loader", count=batch * 32, num_classes=NUM_CLASSES,
                           flip=False)
    results = {str(k * batch): benchmark_loader(
        tmp / "loader", batch_size=batch, pool_size=k * batch,
        num_batches=max(8, k) if quick else 32, num_workers=workers)
        for k in LOADER_POOLS}
    # Worker time per batch spent on pairing: what the workers must hide behind the step.
    per_batch = {k: batch / r["latents_per_s_per_worker"] for k, r in results.items()}
    return {"batch": batch, "num_workers": workers, "latent": [CHANNELS, 32, 32],
            "results": results,
            "sot_worker_s_per_batch": {k: v - per_batch["0"] for k, v in per_batch.items()}}


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _gpu_section(steps: dict[str, Any], dev: torch.device, notes: list[str]) -> dict[str, Any]:
    if dev.type != "cuda":
        notes.append("MFU skipped on CPU (no bf16 peak to compare with); see gpu.skipped")
        return {"skipped": "no CUDA device: img/s and MFU for B/2 and XL/2 in bf16 need a GPU "
                           "(run the same command there)"}
    peak = _peak_flops(dev)
    if peak is None:
        notes.append(f"{_device_name(dev)}: not in trainer.PEAK_BF16_FLOPS, MFU not computed")
    return {"name": _device_name(dev), "peak_bf16_flops": peak, "precision": "bf16 autocast",
            "img_s": {p: {k: s[k]["img_s"] for k in StepRig.KINDS} for p, s in steps.items()},
            "mfu": {p: {k: s[k]["mfu"] for k in StepRig.KINDS} for p, s in steps.items()}}


def run_bench(out: str | Path = "bench.json", presets: list[str] | None = None,
              quick: bool = False, device: str = "auto", progress: bool = True,
              threads: int | None = None) -> dict:
    """Run the benchmarks, print them as tables, write ``out`` (JSON) and return the dict.

    ``quick``: the tiny preset on 16x16 latents with few iterations and small loader pools
    (well under a minute on a CPU), for tests. ``presets`` default: tiny/2 on CPU (B/2 adds
    about 10 minutes on 2 cores: ``presets=["tiny/2", "B/2"]``), B/2 and XL/2 on CUDA.
    ``threads``: torch intra-op threads (default: ``runtime.default_threads``; the quick run
    uses 1).
    """
    load_start = list(os.getloadavg())
    dev = resolve_device(device)
    kind = "cuda" if dev.type == "cuda" else "cpu"
    if presets is None:
        presets = ["B/2", "XL/2"] if kind == "cuda" else ["tiny/2"]
    if not presets:
        raise UserError("bench: --presets is empty")
    for preset in presets:
        parse_preset(preset)
    if threads is not None and threads < 1:
        raise UserError(f"bench: --threads {threads}: must be >= 1")
    threads = threads or (1 if quick else default_threads())
    size = 16 if quick else 32
    steps: dict[str, Any] = {}
    components: dict[str, Any] = {}
    with progress_bar("bench", total=len(presets) + 5, enabled=progress) as bar, \
            tempfile.TemporaryDirectory(prefix="ismctl-bench-") as folder, \
            num_threads(threads):
        tmp = Path(folder)
        for preset in presets:
            bar.update(f"training steps {preset}")
            name = parse_preset(preset)[0]
            batch = 8 if quick else BATCH[kind][name]
            warmup, iters = (1, 2) if quick else ITERS[kind][name]
            steps[preset], rig = bench_steps(preset, batch, size, dev, warmup, iters)
            components[preset] = _components(steps[preset], rig, quick)
            del rig
            bar.advance()
        bar.update("sOT as seen by the step")
        sot = _bench_sot(tmp, steps, presets[-1], kind, quick)
        for preset in presets:
            components[preset]["sot"] = {"fraction_of_step": sot["fraction_of_step"][preset],
                                         "fraction_of_emulated_step":
                                             sot["fraction_of_emulated_step"]}
        bar.advance()
        bar.update("loader throughput")
        loader = _bench_loader(tmp, quick)
        bar.advance()
        bar.update("sOT coupler at ImageNet scale")
        coupler = coupler_throughput(COUPLER_QUICK_POOL if quick else COUPLER_POOL)
        # A worker's own time to read and draw a pool: the loader's rate without pairing.
        independent = loader["results"]["0"]["latents_per_s_per_worker"]
        coupler["keep_up"] = coupler_keep_up(coupler, 1.0 / independent, REFERENCE_IMG_S)
        bar.advance()
        bar.update("sampling throughput")
        on_gpu = kind == "cuda" and not quick
        sampling = sampling_throughput("B/2" if on_gpu else "tiny/2", size,
                                       8 if quick else (256 if on_gpu else 16), dev,
                                       SAMPLING_STEPS)
        sampling["paths"] = sampling_paths(dev, quick)
        bar.advance()
        bar.update("threads: all cores against one")
        threads_report = None if dev.type == "cuda" else thread_scaling(quick)
        bar.advance()

    notes: list[str] = []
    gpu = _gpu_section(steps, dev, notes)
    notes.append(f"sOT: the step is emulated by a {sot['emulated_step_s']:g} s sleep (as on a "
                 "GPU, the CPU is free for the workers); relative to longer real steps the share "
                 "is an upper bound")
    cost = loader["sot_worker_s_per_batch"][str(LOADER_POOLS[-1] * loader["batch"])]
    notes.append(f"sOT pools of {LOADER_POOLS[-1]} batches at batch {loader['batch']}: "
                 f"{cost:.3f} s of worker time per batch; hidden only with at least that many "
                 f"seconds of step time per worker (e.g. {max(1, math.ceil(cost / 0.5))} "
                 "worker(s) for a 0.5 s step)")
    for mode, k in coupler["keep_up"]["modes"].items():
        need = ", ".join(f"{n} on an {g}" for g, n in k["workers_per_gpu"].items())
        notes.append(f"sOT {mode} at pool {coupler['pool_size']:,}: {k['worker_s_per_pool']:.1f}"
                     f" s of one worker per pool; loader workers per GPU to keep up: {need}")
    report = {
        "ismctl_version": ismctl.__version__, "torch": torch.__version__,
        "python": platform.python_version(), "quick": quick,
        "device": {"type": dev.type, "threads": threads, "name": _device_name(dev)},
        "latent": [CHANNELS, size, size], "num_classes": NUM_CLASSES,
        "method": "FM/iSM/SM steps interleaved in one process over warm iterations; step "
                  "times are medians, ratio_ism_over_fm the median of per-iteration ratios. "
                  "Other load only adds time, so the goals compare the least disturbed "
                  "estimates: ratio_ism_over_fm_of_minimums, fastest component call over "
                  "fastest iSM step",
        "load_average": {"start": load_start, "end": list(os.getloadavg())},
        "steps": steps, "components": components, "sot": sot, "loader": loader,
        "coupler": coupler,
        "sampling": sampling, "gpu": gpu, "threads": threads_report,
    }
    report["goals"] = _goals(steps, components)
    report["notes"] = notes
    # MeanFlow's step against flow matching on the first preset (SPEC 4.1, docs/meanflow.md).
    mf_name = parse_preset(presets[0])[0]
    report["meanflow"] = meanflow_step_ratio(
        presets[0], 8 if quick else BATCH[kind][mf_name], size, dev,
        *((1, 2) if quick else ITERS[kind][mf_name]))
    report = json_safe(report)
    write_json(out, report)
    _print(report, Console())
    Console().print(f"[green]wrote[/] {out}")
    return report


def meanflow_step_ratio(preset: str, batch: int, size: int, device: torch.device, warmup: int,
                        iters: int, compiled: bool = False) -> dict[str, Any]:
    """A MeanFlow training step (SPEC 4.1: JVP target on the d > 0 quarter of the batch, baked
    CFG rows, adaptive weight, MSE) against a flow-matching step on the same continuous-jump
    backbone, batch, optimiser and EMA, interleaved; the ratio is the median of per-iteration
    ratios. bf16 autocast on CUDA, fp32 elsewhere; ``compiled`` compiles the online network and
    the target passes as the trainer does."""
    from ismctl.objectives.meanflow import meanflow_loss, target_passes
    from ismctl.runtime import compile_network

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
        _sync(device)
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
        _sync(device)
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
