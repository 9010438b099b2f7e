"""``make gpu-check`` (``ismctl bench --full --device cuda``): the fast path, measured on one GPU.

For B/2 and XL/2 at the recipes' per-GPU batch (a global batch of 256 over 8 GPUs: 32), each of
eager / compiled x fp32 / bf16 runs the real iSM training step (the full objective, wavelet
loss, clipping, fused AdamW, twin EMA) on synthetic latents and reports img/s, the split of
the step (online forward + backward, target-EMA passes, optimiser, EMA update), peak memory and
MFU against the card's dense bf16 peak. Model FLOPs follow method §5: a forward pass counted from
the shapes (``forward_flops``) times 3 for the online forward and backward plus one per target
row (1 per sample in iSM), nanoGPT-style. Then a 200-step B/2 iSM run through the real trainer
(loader, sOT, compile, bf16, checkpoint and sample grids) checks that the losses fall and stay
finite. Last, the sOT coupler pairs one pool of ``coupling.pool_size`` = 8,192 latents per
``coupling.mode`` on one CPU core; set against the training time such a pool feeds at the
fastest measured step, this says how many loader workers per GPU keep up, and whether the
recipe's 8 do.

Every path runs even when an earlier one fails; the report (``gpu-check.json`` and a table) is
written first, then :class:`CheckFailed` names the failed paths (the CLI exits non-zero).

What the step does for speed, aiming at XL/2 bf16 compiled >= 40% MFU on an H100: bf16
autocast (flash scaled-dot-product attention, head dim 72 for XL), the online network and the
target passes compiled once each, fused AdamW, one fused lerp per EMA, TF32 for the fp32 rows,
and no read back to the host inside the step (losses are checked once, after the timing).
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import ismctl
from ismctl.config.recipe import GuidanceCfg, LossCfg, ObjectiveCfg, Recipe
from ismctl.losses import build_loss
from ismctl.networks.model import build_model, forward_flops, parse_preset
from ismctl.objectives.shortcut import shortcut_loss
from ismctl.system.distributed import resolve_device
from ismctl.system.runtime import autocast, autocast_dtype, compile_counters, compile_network
from ismctl.tools.bench import (
    CHANNELS,
    NUM_CLASSES,
    Sections,
    coupler_table,
    meanflow_step_ratio,
)
from ismctl.training.ema import TwinEMA
from ismctl.training.monitor import PEAK_BF16_FLOPS
from ismctl.utils.console import make_console
from ismctl.utils.errors import UserError
from ismctl.utils.fileio import json_safe, write_json

PRESETS = ("B/2", "XL/2")
PER_GPU_BATCH = 32  # recipes/ism_xl.yaml: data.batch_size 256 over 8 GPUs
MODES = (("eager", "fp32"), ("eager", "bf16"), ("compiled", "fp32"), ("compiled", "bf16"))
SMOKE_STEPS = 200
SOT_POOL = 8192  # recipes/ism_xl.yaml: coupling.pool_size
SOT_WORKERS = 8  # recipes/ism_xl.yaml: data.num_workers, loader workers per GPU
# The smoke run passes when its last logged losses are this much below its first ones.
SMOKE_MIN_DROP = 0.05


class CheckFailed(Exception):
    """One or more paths of the check raised or misbehaved; the report is already written."""


@dataclass(frozen=True)
class StepConfig:
    preset: str
    mode: str  # "eager" or "compiled"
    precision: str  # "fp32" or "bf16"

    @property
    def name(self) -> str:
        return f"{self.preset} {self.mode} {self.precision}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bf16_flops(device: torch.device) -> tuple[str, float | None]:
    """The device's name and its dense bf16 peak FLOP/s (None when unknown or not CUDA)."""
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def measure_step(cfg: StepConfig, batch: int, size: int, device: torch.device, warmup: int,
                 iters: int, split_iters: int) -> dict[str, Any]:
    """Time the iSM training step of ``cfg``: warm-up (compilation included), ``iters`` steps
    with one synchronisation at the end, then ``split_iters`` steps synchronised per section."""
    torch.manual_seed(0)
    model = build_model(cfg.preset, size, CHANNELS, NUM_CLASSES).to(device).train()
    ema = TwinEMA(model, target_decay=0.95, inference_decay=0.9999)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    loss_fn = build_loss(LossCfg(), size)
    objective, guidance = ObjectiveCfg(), GuidanceCfg()
    online = compile_network(model, cfg.mode == "compiled")
    target = compile_network(ema.target, cfg.mode == "compiled")
    amp = autocast(device, autocast_dtype(cfg.precision))
    gen = torch.Generator().manual_seed(0)
    shape = (batch, CHANNELS, size, size)
    x0, x1 = (torch.randn(shape, generator=gen).to(device) for _ in range(2))
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)
    step_gen = torch.Generator(device)
    losses: list[torch.Tensor] = []
    at_start = compile_counters()

    def step(sections: Sections) -> None:
        step_gen.manual_seed(len(losses))
        with sections.timed("online_fwd_bwd"):
            with amp:
                parts = shortcut_loss(online, sections.wrap(target, "target_passes"), x0, x1, y,
                                      objective, guidance, loss_fn, NUM_CLASSES, step_gen)
            parts["loss"].backward()
        with sections.timed("optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        with sections.timed("ema_update"):
            ema.update(model)
        losses.append(parts["loss"].detach())

    quiet = Sections(device, enabled=False)
    _sync(device)
    start = time.perf_counter()
    step(quiet)
    _sync(device)
    first_step_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        step(quiet)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    compiled_before = compile_counters()
    rows_before = quiet.rows.get("target_passes", 0)
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step(quiet)
    _sync(device)
    step_s = (time.perf_counter() - start) / iters
    compiled_after = compile_counters()
    rows = (quiet.rows.get("target_passes", 0) - rows_before) / iters / batch
    peak_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    splits = []
    for _ in range(split_iters):
        sections = Sections(device, enabled=True)
        step(sections)
        times = dict(sections.times)
        times["online_fwd_bwd"] -= times.get("target_passes", 0.0)
        splits.append(times)
    split = {k: statistics.median(s[k] for s in splits) for k in splits[0]} if splits else {}
    finite = bool(torch.stack(losses).isfinite().all())

    flops = forward_flops(model) * (3.0 + rows)
    _, peak = peak_bf16_flops(device)
    img_s = batch / step_s
    result = {
        "preset": cfg.preset, "mode": cfg.mode, "precision": cfg.precision, "batch": batch,
        "step_s": step_s, "img_s": img_s, "first_step_s": first_step_s,
        "compile_s": max(0.0, first_step_s - step_s) if cfg.mode == "compiled" else None,
        "split_s": split, "peak_memory_gib": None if peak_mem is None else peak_mem / 2**30,
        "target_rows_per_sample": rows, "model_tflop_per_step": flops * batch / 1e12,
        "achieved_tflop_s": img_s * flops / 1e12, "mfu": img_s * flops / peak if peak else None,
        "recompiles_while_timed": compiled_after["frames"] - compiled_before["frames"],
        "graph_breaks": compiled_after["graph_breaks"] - at_start["graph_breaks"],
        "losses_finite": finite, "last_loss": float(losses[-1]),
    }
    problems = []
    if not finite:
        problems.append("non-finite loss")
    if result["recompiles_while_timed"]:
        problems.append(f"{result['recompiles_while_timed']} recompilation(s) after warm-up")
    if result["graph_breaks"] and cfg.mode == "compiled":
        problems.append(f"{result['graph_breaks']} graph break(s)")
    if problems:
        result["error"] = "; ".join(problems)
    return result


def smoke_run(folder: Path, device: torch.device, steps: int = SMOKE_STEPS,
              preset: str = "B/2", batch: int = PER_GPU_BATCH, size: int = 32,
              compiled: bool = True, precision: str = "bf16", lr: float = 1e-4,
              num_workers: int = 4, pool_size: int = SOT_POOL) -> dict[str, Any]:
    """``steps`` of the real trainer (iSM recipe with ``preset``) on synthetic class-patterned
    latents; checks that every logged loss is finite and that the mean of the last tenth of the
    logged losses is below the first tenth's by at least SMOKE_MIN_DROP."""
    from ismctl.data.bench import make_synthetic_latents
    from ismctl.training.trainer import train

    data = folder / "latents"
    # Ten classes, each mostly one fixed pattern: learnable in a few hundred steps.
    make_synthetic_latents(data, count=max(2048, 8 * batch), size=size, num_classes=10,
                           flip=False, structure=0.9)
    log_every = max(1, steps // 20)
    recipe = Recipe.model_validate({
        "model": {"preset": preset},
        "data": {"path": str(data), "batch_size": batch, "num_workers": num_workers,
                 "shuffle_buffer": 1000, "flip": False},
        "coupling": {"pool_size": pool_size},
        "optim": {"lr": lr},
        "train": {"steps": steps, "compile": compiled, "precision": precision,
                  "device": device.type, "seed": 0},
        "run": {"root": str(folder / "runs"), "name": "smoke", "log_every": log_every,
                "sample_every": steps, "sample_num_samples": 16, "ckpt_every": steps,
                "keep_every": 0},
    })
    start = time.perf_counter()
    run_dir = train(recipe, progress=False)
    wall = time.perf_counter() - start
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    loss = [ln["loss"] for ln in lines]
    tenth = max(1, len(loss) // 10)
    first, last = statistics.fmean(loss[:tenth]), statistics.fmean(loss[-tenth:])
    finite = all(v is not None and math.isfinite(v) for v in loss)
    result = {"preset": preset, "batch": batch, "steps": steps, "compiled": compiled,
              "precision": precision, "lr": lr, "wall_s": wall, "losses": loss,
              "first_tenth_mean": first, "last_tenth_mean": last,
              "relative_drop": (first - last) / first if first else None,
              "it_s_last": lines[-1].get("it_s"), "mfu_last": lines[-1].get("mfu")}
    if not finite:
        result["error"] = "non-finite loss in metrics.jsonl"
    elif result["relative_drop"] is None or result["relative_drop"] < SMOKE_MIN_DROP:
        result["error"] = (f"loss did not fall: first tenth {first:.4f}, last tenth {last:.4f} "
                           f"(need a drop of {SMOKE_MIN_DROP:.0%})")
    return result


def coupler_check(rows: list[dict[str, Any]], folder: Path, pool_size: int, workers: int,
                  size: int) -> dict[str, Any]:
    """sOT against the measured steps: one pool of ``pool_size`` latents paired on one CPU
    core per ``coupling.mode`` (``bench.coupler_throughput``), plus the loader's own time to
    read and draw it, against the training time a pool feeds at the fastest measured step of
    each preset; whether ``workers`` loader workers per GPU keep up."""
    from ismctl.data.bench import benchmark_loader, make_synthetic_latents
    from ismctl.tools.bench import coupler_keep_up, coupler_throughput

    make_synthetic_latents(folder / "sot", count=2048, size=size, flip=False)
    load = benchmark_loader(folder / "sot", batch_size=PER_GPU_BATCH, pool_size=0,
                            num_batches=32, num_workers=0)
    coupler = coupler_throughput(pool_size, (CHANNELS, size, size))
    fastest: dict[str, dict[str, Any]] = {}
    for r in rows:
        if "error" not in r and r["img_s"] > fastest.get(r["preset"], {}).get("img_s", 0.0):
            fastest[r["preset"]] = r
    img_s = {f"{p} {r['mode']} {r['precision']}": r["img_s"] for p, r in fastest.items()}
    coupler["keep_up"] = coupler_keep_up(coupler, 1.0 / load["latents_per_s"], img_s)
    coupler["workers_per_gpu"] = workers
    coupler["keeps_up"] = {mode: {path: need <= workers for path, need in
                                  k["workers_per_gpu"].items()}
                           for mode, k in coupler["keep_up"]["modes"].items()}
    return coupler


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"


def _free(device: torch.device) -> None:
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_gpu_check(out: str | Path = "gpu-check.json", presets: Iterable[str] = PRESETS,
                  device: str = "cuda", batch: int = PER_GPU_BATCH, size: int = 32,
                  modes: Iterable[tuple[str, str]] = MODES, warmup: int = 3, iters: int = 20,
                  split_iters: int = 5, smoke: dict[str, Any] | None = None,
                  require_cuda: bool = True, console: Console | None = None,
                  sot_pool: int = SOT_POOL, sot_workers: int = SOT_WORKERS) -> dict[str, Any]:
    """Run the check, print the table, write ``out``; raise CheckFailed if any path failed.

    ``require_cuda=False``, a small ``smoke`` (keyword arguments of :func:`smoke_run`, or
    ``{"steps": 0}`` to skip it) and a small ``sot_pool`` let the tests drive the same code on
    a CPU. ``sot_workers``: the loader workers per GPU the sOT verdict is given for.
    """
    dev = resolve_device(device)
    if require_cuda and (dev.type != "cuda" or not torch.cuda.is_available()):
        raise UserError("gpu-check: no CUDA device (torch.cuda.is_available() is False); run "
                        "it on a machine with an NVIDIA GPU")
    presets, modes = list(presets), list(modes)
    for preset in presets:
        parse_preset(preset)
    console = console or make_console()
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name, peak = peak_bf16_flops(dev)
    rows: list[dict[str, Any]] = []
    for preset in presets:
        for mode, precision in modes:
            cfg = StepConfig(preset, mode, precision)
            console.print(f"gpu-check: {cfg.name}, batch {batch}")
            try:
                rows.append(measure_step(cfg, batch, size, dev, warmup, iters, split_iters))
            except Exception as exc:  # every path is reported, then the check fails
                rows.append({"preset": preset, "mode": mode, "precision": precision,
                             "batch": batch, "error": _error_text(exc)})
            _free(dev)
    smoke_args = {"steps": SMOKE_STEPS, **(smoke or {})}
    smoke_result: dict[str, Any] | None = None
    if smoke_args["steps"] > 0:
        console.print(f"gpu-check: {smoke_args['steps']}-step iSM run on synthetic latents")
        with tempfile.TemporaryDirectory(prefix="ismctl-gpu-check-") as folder:
            try:
                smoke_result = smoke_run(Path(folder), dev, **smoke_args)
            except Exception as exc:
                smoke_result = {**smoke_args, "error": _error_text(exc)}
        _free(dev)
    # MeanFlow (method §4.1): its step (JVP on the math attention kernel) against flow matching,
    # compiled when the compiled paths are checked.
    mf_compiled = any(mode == "compiled" for mode, _ in modes)
    console.print(f"gpu-check: MeanFlow vs flow-matching step, {presets[0]}"
                  f"{' compiled' if mf_compiled else ''}")
    try:
        meanflow: dict[str, Any] = meanflow_step_ratio(presets[0], batch, size, dev, warmup,
                                                       iters, compiled=mf_compiled)
    except Exception as exc:
        meanflow = {"preset": presets[0], "error": _error_text(exc)}
    _free(dev)
    console.print(f"gpu-check: sOT coupler, one pool of {sot_pool} on one CPU core")
    with tempfile.TemporaryDirectory(prefix="ismctl-gpu-check-") as folder:
        try:
            coupler: dict[str, Any] = coupler_check(rows, Path(folder), sot_pool, sot_workers,
                                                    size)
        except Exception as exc:
            coupler = {"pool_size": sot_pool, "error": _error_text(exc)}
    failed = [f"{r['preset']} {r['mode']} {r['precision']}: {r['error']}"
              for r in rows if "error" in r]
    if "error" in coupler:
        failed.append(f"sOT coupler: {coupler['error']}")
    if smoke_result is not None and "error" in smoke_result:
        failed.append(f"smoke run: {smoke_result['error']}")
    if "error" in meanflow:
        failed.append(f"meanflow step: {meanflow['error']}")
    report = json_safe({
        "ismctl_version": ismctl.__version__, "torch": torch.__version__,
        "cuda": torch.version.cuda, "device": {"type": dev.type, "name": name,
                                               "peak_bf16_flops": peak},
        "batch_per_gpu": batch, "latent": [CHANNELS, size, size],
        "method": "step_s: mean of the timed steps after warm-up, one synchronisation at the "
                  "end; split_s: medians of extra steps synchronised at every section",
        "steps": rows, "smoke_run": smoke_result, "coupler": coupler, "meanflow": meanflow,
        "failed": failed,
        "ok": not failed,
    })
    write_json(out, report)
    console.print(report_table(report))
    if smoke_result is not None and "error" not in smoke_result:
        console.print(f"smoke run: loss {smoke_result['first_tenth_mean']:.4f} -> "
                      f"{smoke_result['last_tenth_mean']:.4f} over {smoke_result['steps']} steps")
    if "error" not in coupler:
        console.print(coupler_table(coupler))
        for mode, verdict in coupler["keeps_up"].items():
            k = coupler["keep_up"]["modes"][mode]
            for path, ok in verdict.items():
                console.print(
                    f"sOT {mode}: {k['worker_s_per_pool']:.1f} s per pool of {sot_pool} against "
                    f"{coupler['keep_up']['training_s_per_pool'][path]:.1f} s of {path} "
                    f"training: needs {k['workers_per_gpu'][path]} loader worker(s) per GPU, "
                    + ("[green]keeps up[/]" if ok else "[red]does not keep up[/]")
                    + f" with {sot_workers}")
    if "error" not in meanflow:
        console.print(f"meanflow: step {meanflow['meanflow_step_s'] * 1e3:.1f} ms = "
                      f"{meanflow['ratio_meanflow_over_fm']:.2f}x flow matching (estimate "
                      f"{meanflow['expected_ratio_forward_equivalents']:.2f}x)")
    console.print(f"[green]wrote[/] {out}")
    if failed:
        raise CheckFailed(f"{len(failed)} path(s) failed (details in {out}): " + "; ".join(failed))
    return report


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def report_table(report: dict[str, Any]) -> Table:
    dev = report["device"]
    table = Table(title=f"gpu-check: {dev['name']}, iSM step at batch {report['batch_per_gpu']}"
                        " per GPU (ms per step; MFU vs dense bf16 peak)")
    for col in ("path", "img/s", "step", "online\nfwd+bwd", "target\npasses", "optim", "EMA",
                "peak mem\nGiB", "MFU", "compile\ns", "status"):
        table.add_column(col, justify="right" if col not in ("path", "status") else "left")
    for r in report["steps"]:
        split = r.get("split_s") or {}
        mem, mfu, comp = r.get("peak_memory_gib"), r.get("mfu"), r.get("compile_s")
        table.add_row(
            f"{r['preset']} {r['mode']} {r['precision']}",
            f"{r['img_s']:.1f}" if "img_s" in r else "-", _ms(r.get("step_s")),
            _ms(split.get("online_fwd_bwd")), _ms(split.get("target_passes")),
            _ms(split.get("optimizer")), _ms(split.get("ema_update")),
            "-" if mem is None else f"{mem:.1f}", "-" if mfu is None else f"{mfu:.1%}",
            "-" if comp is None else f"{comp:.0f}",
            f"[red]{r['error']}[/]" if "error" in r else "[green]ok[/]")
    return table
