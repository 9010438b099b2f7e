"""The data sections: TrainLoader throughput with sOT pools, the wait a step sees, and whether the
sOT coupler keeps up at ImageNet scale (method §3.3).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from ismctl.tools.bench.common import CHANNELS, NUM_CLASSES, num_threads

LOADER_POOLS = (0, 1, 8, 32)

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
    from ismctl.data.coupling import MODES, coupling_stats, pair_pool

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

def sot_wait(path: Path, batch: int, pool: int, workers: int, step_s: float, batches: int,
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

def bench_sot(tmp: Path, steps: dict[str, Any], last: str, kind: str,
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
    return sot_wait(tmp / "sot", step["batch"], pool, workers, emulated, pool * workers,
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

def bench_loader(tmp: Path, quick: bool) -> dict[str, Any]:
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
