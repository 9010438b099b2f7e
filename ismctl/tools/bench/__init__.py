"""`ismctl bench` / `make bench`: where the time of an iSM training step goes -> bench.json.

method §5 is the budget. A flow-matching (FM) step costs 3 forward equivalents per sample
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
- ``meanflow``: the MeanFlow step (method §4.1) as a ratio to a flow-matching step on the same
  continuous-jump backbone and batch (first preset), interleaved, one run.
- ``threads``: on a CPU, the quickstart's evaluation sampling with every usable core (the
  default thread count) against one thread, as a ratio, on the machine as it is and with
  ``cores - 1`` busy processes started beside it (another job holding all cores but one):
  the case for and against the default. Seconds, not minutes.
"""

from __future__ import annotations

import math
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

import ismctl
from ismctl.networks.model import parse_preset
from ismctl.system.distributed import resolve_device
from ismctl.system.runtime import default_threads
from ismctl.tools.bench.common import (
    BATCH,
    CHANNELS,
    ITERS,
    NUM_CLASSES,
    Sections,
    device_name,
    num_threads,
)
from ismctl.tools.bench.coupler import (
    COUPLER_POOL,
    COUPLER_QUICK_POOL,
    LOADER_POOLS,
    REFERENCE_IMG_S,
    bench_loader,
    bench_sot,
    coupler_keep_up,
    coupler_table,
    coupler_throughput,
    workers_to_keep_up,
)
from ismctl.tools.bench.report import print_report
from ismctl.tools.bench.sampling import SAMPLING_STEPS, sampling_paths, sampling_throughput
from ismctl.tools.bench.step import (
    bench_steps,
    component_costs,
    flow_matching_loss,
    goals,
    gpu_section,
    meanflow_step_ratio,
)
from ismctl.tools.bench.threads import thread_scaling
from ismctl.utils.console import make_console
from ismctl.utils.errors import UserError
from ismctl.utils.fileio import json_safe, write_json
from ismctl.utils.progress import progress_bar

# The names other modules and the tests use, one import away.
__all__ = ["CHANNELS", "NUM_CLASSES", "Sections", "coupler_keep_up", "coupler_table",
           "coupler_throughput", "flow_matching_loss", "meanflow_step_ratio", "run_bench",
           "workers_to_keep_up"]


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
            components[preset] = component_costs(steps[preset], rig, quick)
            del rig
            bar.advance()
        bar.update("sOT as seen by the step")
        sot = bench_sot(tmp, steps, presets[-1], kind, quick)
        for preset in presets:
            components[preset]["sot"] = {"fraction_of_step": sot["fraction_of_step"][preset],
                                         "fraction_of_emulated_step":
                                             sot["fraction_of_emulated_step"]}
        bar.advance()
        bar.update("loader throughput")
        loader = bench_loader(tmp, quick)
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
    gpu = gpu_section(steps, dev, notes)
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
        "device": {"type": dev.type, "threads": threads, "name": device_name(dev)},
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
    report["goals"] = goals(steps, components)
    report["notes"] = notes
    # MeanFlow's step against flow matching on the first preset (method §4.1, docs/meanflow.md).
    mf_name = parse_preset(presets[0])[0]
    report["meanflow"] = meanflow_step_ratio(
        presets[0], 8 if quick else BATCH[kind][mf_name], size, dev,
        *((1, 2) if quick else ITERS[kind][mf_name]))
    report = json_safe(report)
    write_json(out, report)
    print_report(report, make_console())
    make_console().print(f"[green]wrote[/] {out}")
    return report
