"""``ismctl eval``: metrics of one checkpoint at chosen step counts and guidance strengths.

The points to sample come from the run's protocol (``ismctl/sampling/protocol.py``): every
(steps, w) of the grid for an iSM run; for an sm run its authors' protocol, the conditional
output at every step count plus two-pass CFG at the training scale on the flow velocity at 128
steps.
For every point: generate ``num_samples`` class-balanced samples batch by batch (under
``torchrun`` each rank its share of the chunks), feed every batch to the feature extractors
the metrics need and keep only the features (``ismctl/evaluation/chunks.py``: memory does not
grow with the number of samples, and an interrupted evaluation resumes from its finished
chunks), gather the features on rank 0 and score them against reference statistics computed
once (and cached).
Guidance is in the delta convention: CFG scale ``s = 1 + w`` (method §1).

Per step count the best point by the selection metric (FID, else the class-conditional
digits distance, ...) is reported and, for the run's latest checkpoint, remembered in the
run directory for ``ismctl sample``.

Outputs next to ``results.json``: a metric-vs-guidance plot (one curve per step count), one
sample grid per point, with ``save_npz`` the ADM ``.npz`` of every sample set (every rank
writes its chunks' images as they are made; rank 0 assembles the file from them) and with
``save_png`` a folder of PNGs per sample set (each rank writes its own samples).
"""

from __future__ import annotations

import datetime
import math
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from rich.markup import escape

import ismctl
from ismctl.evaluation.chunks import (
    GRID_MAX,
    PointShare,
    chunk_size,
    merge_shares,
    open_chunks,
    run_point,
)
from ismctl.evaluation.digits_classifier import (
    FEATURES,
    LOGITS,
    class_accuracy,
    class_conditional_fd,
    class_spread,
)
from ismctl.evaluation.dinov2 import DINOV2_NAME, build_dinov2
from ismctl.evaluation.gather import gather_objects
from ismctl.evaluation.plan import (
    DINOV2_LAYER,
    HIGHER_IS_BETTER,
    INCEPTION_LOGITS,
    POOL,
    REFERENCE_METRICS,
    MetricPlan,
    normalise_metrics,
    plan_metrics,
    selection_metric,
)
from ismctl.evaluation.reference import ReferenceStats, load_reference
from ismctl.evaluation.report import print_results, value_names, write_plot, write_results_json
from ismctl.evaluation.scores import frechet_to_reference, inception_score, precision_recall
from ismctl.evaluation.sources import BUILTIN_DIGITS
from ismctl.sampling.protocol import (
    Grid,
    Point,
    all_strengths,
    best_points,
    plan_points,
    remember_best,
    remembered_points,
)
from ismctl.sampling.sampler import continuous_jumps
from ismctl.utils.errors import UserError

# Feature extraction runs at 299x299 (Inception) whatever the sample size: large batches
# only add memory traffic on a CPU, while a GPU wants them large.
FEATURE_BATCH = {"cuda": 250, "cpu": 32}


def feature_batch_size(batch_size: int, device: torch.device) -> int:
    return max(1, min(batch_size, FEATURE_BATCH.get(device.type, 32)))


def is_digits(manifest: Any) -> bool:
    """The built-in dataset: identity encoder, one 8x8 channel, classes '0'..'9'."""
    from ismctl.data.digits import DIGITS_CLASSES, DIGITS_SIZE
    from ismctl.data.encoders import IDENTITY

    return (manifest.encoder == IDENTITY and manifest.resolution == DIGITS_SIZE
            and manifest.channels == 1 and list(manifest.class_names) == DIGITS_CLASSES)


def default_out(run: Any) -> Path:
    return Path(run.run_dir) / "eval" / f"step-{run.step:07d}" / "results.json"


def check_points(steps: list[int], guidance: Grid, base_steps: int,
                 continuous: bool = False) -> None:
    """``continuous``: the network takes any jump size (MeanFlow), so any N >= 1 is valid."""
    from ismctl.sampling.sampler import check_steps

    if not steps:
        raise UserError("--steps: give at least one step count")
    if not guidance:
        raise UserError("--guidance: give at least one guidance strength")
    for s in steps:
        check_steps(s, base_steps, continuous)
    if isinstance(guidance, dict) and not all(guidance.values()):
        raise UserError("eval.guidance: every step count needs at least one strength")
    for w in all_strengths(guidance):
        if not (math.isfinite(w) and w >= 0):
            raise UserError(f"--guidance {w}: w must be >= 0 (CFG scale s = 1 + w)")


def point_metrics(plan: MetricPlan, feats: dict[str, dict[str, np.ndarray]], labels: np.ndarray,
                  refs: dict[str, ReferenceStats]) -> dict[str, float]:
    """Every requested metric for one sample set (features already gathered)."""
    out: dict[str, float] = {}
    m = set(plan.metrics)
    if "fid" in m:
        out["fid"] = frechet_to_reference(feats["inception"][POOL], refs["inception"])
    if "isc" in m:
        out["isc"], out["isc_std"] = inception_score(feats["inception"][INCEPTION_LOGITS])
    if "prc" in m:
        real = refs["inception"].features
        if real is None:
            out["precision"] = out["recall"] = float("nan")
        else:
            out["precision"], out["recall"] = precision_recall(feats["inception"][POOL], real)
    if "fd-dinov2" in m:
        out["fd-dinov2"] = frechet_to_reference(feats["dinov2"][DINOV2_LAYER], refs["dinov2"])
    if "acc" in m:
        out["acc"] = class_accuracy(feats["digits"][LOGITS], labels)
    if "fd-digits" in m:
        out["fd-digits"] = frechet_to_reference(feats["digits"][FEATURES], refs["digits"])
    if "cfd-digits" in m:
        out["cfd-digits"] = class_conditional_fd(feats["digits"][FEATURES], labels)
    if "spread-digits" in m:
        out["spread-digits"] = class_spread(feats["digits"][FEATURES], labels)
    return out


def warn_own_data_reference(data_path: str, loud: bool) -> str:
    """No reference given for a dataset other than the digits: the run's own training data
    is the reference, which published FIDs never use. Say so on stderr; returns the note."""
    text = (f"no --ref given: the reference is this run's own training data ({data_path}, "
            "latents decoded by the VAE), so FID and the other reference metrics are NOT "
            "comparable with published numbers; for ImageNet 256 pass ADM's reference batch, "
            "--ref VIRTUAL_imagenet256_labeled.npz (from openai/guided-diffusion's evaluations "
            "folder), or set eval.ref in the recipe")
    if loud:
        Console(stderr=True).print(f"[bold red]WARNING:[/] {escape(text)}", soft_wrap=True,
                                   highlight=False)
    return text


def check_reference_path(ref: str) -> None:
    """The reference exists and has a usable kind (what ``open_source`` accepts), checked
    before any feature extractor or sample set is built."""
    path = Path(ref).expanduser()
    if ref == BUILTIN_DIGITS and not path.exists():
        return
    if path.is_file() and path.suffix.lower() != ".npz":
        raise UserError(f"reference {path}: expected an ADM .npz file, an image folder or "
                        "a prepared dataset folder (--ref)")
    if not path.exists():
        raise UserError(f"reference {path}: not found (pass --ref: an ADM .npz, an image folder "
                        "or a prepared dataset folder)")


def _build_extractors(plan: MetricPlan, device: torch.device) -> dict[str, torch.nn.Module]:
    extractors = {}
    for key, group in plan.groups.items():
        if group.spec.name == DINOV2_NAME:
            extractors[key] = build_dinov2(device)
        else:
            extractors[key] = group.spec.build(group.layers, device)
    return extractors


@dataclass
class Settings:
    """The resolved evaluation request (CLI values, else the recipe's ``eval`` section)."""

    steps: list[int]
    guidance: Grid
    points: list[Point]
    double_guidance: bool
    num_samples: int
    batch_size: int
    seed: int
    ref: str
    out: Path
    save_npz: bool
    progress: bool
    select_by: str | None
    remember: bool
    which: str = "inference"
    save_png: bool = False


def evaluate(
    path: str | None,
    steps: list[int] | None,
    guidance: Grid | None,
    num_samples: int | None,
    ref: str | None,
    metrics: list[str] | None,
    out: str | Path | None,
    inception_weights: str | None,
    save_npz: bool,
    batch_size: int | None,
    seed: int | None,
    device: str | None = "auto",
    progress: bool = True,
    double_guidance: bool = False,
    select_by: str | None = None,
    remember: bool | None = None,
    at_best: bool = False,
    compile: bool = False,
    which: str = "inference",
    save_png: bool = False,
) -> dict[str, Any]:
    """Evaluate a run or checkpoint; returns the results dict (empty on ranks other than 0).

    ``None`` for steps, guidance, num_samples, batch_size, seed or metrics takes the run
    recipe's ``eval`` section, ``device`` None its ``train.device``; ``ref`` None takes the
    recipe's ``eval.ref``, else the built-in digits for a digits run, else the prepared shards
    of ``data.path`` (with a loud warning: not comparable with published numbers).
    ``double_guidance`` samples an sm run with CFG on top of its baked-in
    guidance; ``select_by`` names the value that picks the best point per step count;
    ``remember`` stores those picks in the run (None: only when the points have at least
    the recipe's ``eval.num_samples`` samples, so a quick look does not replace them);
    ``at_best`` evaluates each step count at the point remembered by an earlier grid
    evaluation instead of a guidance list (e.g. FID-50K where a cheaper grid chose w).
    ``compile``: sample with the torch.compile'd network (same images, up to float rounding).
    ``which``: the weights sampled, the inference EMA (default, method §3.4), the target EMA or
    the online network; only the inference EMA's picks are remembered. ``save_png``: also a
    folder of PNGs per sample set.
    """
    from ismctl.runs.checkpoint import load_for_sampling, run_recipe
    from ismctl.sampling.fits import check_eval_request
    from ismctl.sampling.streamout import decoded_shape
    from ismctl.system.distributed import init_distributed, rank_failed, shutdown

    if device is None:
        device = run_recipe(path).train.device
    owns_group = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(device)
    try:
        t_start = time.perf_counter()
        run = load_for_sampling(path, which=which, device=str(info.device), compile=compile)
        ev = run.recipe.eval
        digits = is_digits(run.manifest)
        steps = list(ev.steps if steps is None else steps)
        if at_best:
            points = remembered_points(run.run_dir, steps)
            guidance = sorted({p.guidance for p in points})
        else:
            guidance = guidance if guidance is not None else ev.guidance
        check_points(steps, guidance, run.recipe.objective.base_steps,
                     continuous_jumps(run.model))
        if not at_best:
            points = plan_points(run.recipe, steps, guidance, double_guidance)
        cfg = Settings(
            steps=steps,
            guidance=guidance,
            points=points,
            double_guidance=double_guidance,
            num_samples=int(ev.num_samples if num_samples is None else num_samples),
            batch_size=int(ev.batch_size if batch_size is None else batch_size),
            seed=ev.seed if seed is None else int(seed),
            ref=next(r for r in (ref, ev.ref, BUILTIN_DIGITS if digits else run.recipe.data.path)
                     if r is not None),
            out=Path(out) if out is not None else default_out(run),
            save_npz=save_npz,
            progress=progress and info.is_main,
            select_by=select_by,
            remember=bool(remember) and which == "inference",
            which=which,
            save_png=save_png,
        )
        if cfg.num_samples < 2 or cfg.batch_size < 1:
            raise UserError(f"--num-samples {cfg.num_samples} / --batch-size {cfg.batch_size}: "
                            "need at least 2 samples and a batch of at least 1")
        # The cheap, certain failures first: a missing reference stops the evaluation before
        # the feature extractors (optional packages, weights, downloads) are looked for.
        names = normalise_metrics(list(ev.metrics) if metrics is None else metrics)
        wants_ref = (digits and metrics is None) or bool(set(names) & set(REFERENCE_METRICS))
        own_data = None
        if wants_ref and ref is None and ev.ref is None and not digits:
            own_data = warn_own_data_reference(cfg.ref, info.is_main)
        if wants_ref:
            check_reference_path(cfg.ref)
        plan = plan_metrics(metrics, list(ev.metrics), digits, inception_weights)
        if own_data is not None:
            plan.notes.append(own_data)
        selection_metric(value_names(plan.metrics), select_by, digits)
        if remember is None:
            # A quick look (fewer samples than the recipe's evaluation) does not replace the
            # guidance that `sample` uses unless asked to.
            cfg.remember = which == "inference" and cfg.num_samples >= ev.num_samples
            if which == "inference" and not cfg.remember:
                plan.notes.append(
                    f"best w not remembered: {cfg.num_samples} samples per point, fewer than "
                    f"the recipe's eval.num_samples ({ev.num_samples}); --remember stores it")
        w_max = run.recipe.guidance.w_max
        far = [w for w in all_strengths(cfg.guidance) if w > w_max]
        if run.mode == "intrinsic" and far:
            plan.notes.append(f"guidance {', '.join(f'{w:g}' for w in far)} above the trained "
                              f"w_max {w_max:g}: extrapolated")
        check_eval_request(cfg.num_samples, info.world_size, decoded_shape(run.manifest),
                           len(plan.groups), cfg.save_npz, info.is_main, cfg.batch_size,
                           cfg.out)
        return _evaluate(run, plan, cfg, info, t_start)
    except BaseException as exc:
        if owns_group:
            rank_failed(exc)
        raise
    finally:
        if owns_group:
            shutdown()


def _evaluate(run: Any, plan: MetricPlan, cfg: Settings, info: Any,
              t_start: float) -> dict[str, Any]:
    from ismctl.system.distributed import barrier

    rank, world, device = info.rank, info.world_size, info.device
    fbatch = feature_batch_size(cfg.batch_size, device)
    console = Console()
    # Extractors first: a network that cannot be loaded stops the run before any work.
    extractors = _build_extractors(plan, device)
    t_ref = time.perf_counter()
    refs: dict[str, ReferenceStats] = {}
    for key, group in plan.groups.items():
        if group.ref_layer is None:
            continue
        stats = load_reference(cfg.ref, group.spec, group.ref_layer, run.manifest.resolution,
                               need_features=group.need_ref_features, device=device,
                               batch_size=fbatch, progress=cfg.progress, rank=rank,
                               world_size=world, extractor=extractors[key])
        if stats is not None:
            refs[key] = stats
    if info.is_main and "prc" in plan.metrics and refs["inception"].features is None:
        plan.notes.append(f"precision/recall skipped: the reference {cfg.ref} has no images")
    reference_s = time.perf_counter() - t_ref

    points: list[dict[str, Any]] = []
    requests: dict[str, dict[str, Any]] = {}
    chunks_root = _chunks_root(cfg)
    for pt in cfg.points:
        folder = chunks_root / pt.tag()
        request = _chunk_request(run, plan, cfg, pt)
        fresh = open_chunks(folder, request, info.is_main)
        if fresh and cfg.save_png and info.is_main:
            from ismctl.sampling.pngdir import clear_png_folder

            clear_png_folder(_png_folder(cfg, pt))
        npz = _npz_path(cfg, pt)
        sinks = []
        if cfg.save_npz and info.is_main:
            sinks.append(_npz_sink(npz, request, cfg.num_samples).write)
        barrier()
        if cfg.save_npz and not info.is_main:
            sinks.append(_npz_sink(npz, request, cfg.num_samples).write)
        if cfg.save_png:
            sinks.append(lambda idx, imgs, labs, pt=pt: _write_pngs(cfg, pt, idx, imgs, labs))
        share = run_point(run, pt, cfg.num_samples, cfg.seed, cfg.batch_size, extractors, fbatch,
                          device, folder, rank, world, cfg.progress, sinks)
        shared: list[PointShare] = gather_objects(share)
        if not info.is_main:
            continue
        t2 = time.perf_counter()
        if share.resumed and cfg.progress:
            console.print(f"{pt.label()}: {share.resumed:,} samples from finished chunks in "
                          f"{folder}", markup=False, highlight=False)
        feats, all_labels = merge_shares(shared)
        point = _score_point(run, plan, cfg, refs, pt, feats, all_labels, share.grid)
        if cfg.save_npz:
            point["npz"] = str(npz)
            requests[str(npz)] = request
        made = max(cfg.num_samples - sum(s.resumed for s in shared), 0)
        point["timings"] = {"generate_s": share.generate_s, "features_s": share.features_s,
                            "metrics_s": time.perf_counter() - t2,
                            "images_per_s": made / world / max(share.generate_s, 1e-9)}
        points.append(point)
        if cfg.progress:
            console.print(f"{pt.label()}: " + ", ".join(
                f"{k}={v:.4g}" for k, v in point["metrics"].items()))

    if not info.is_main:
        barrier()
        return {}
    results = _results(run, plan, points, refs, cfg, world, str(device))
    results["timings"] = {"reference_s": reference_s, "total_s": time.perf_counter() - t_start}
    if cfg.remember and _is_latest(run):
        chosen = {int(s): b for s, b in results["best"].items() if b["candidates"] > 1}
        if chosen:
            results["remembered"] = str(remember_best(run.run_dir, chosen))
    plot = write_plot(cfg.out.parent / f"{cfg.out.stem}-plot.png", results)
    results["plot"] = str(plot) if plot is not None else None
    # Every point's .npz is assembled from its chunks last, so that an evaluation stopped before
    # its results finds every chunk again.
    for npz, request in requests.items():
        _finish_npz(Path(npz), request, cfg.num_samples)
    write_results_json(cfg.out, results)
    # The results hold what the chunks were kept for.
    shutil.rmtree(chunks_root, ignore_errors=True)
    if cfg.progress:
        print_results(results, console)
        console.print(f"[green]wrote[/] {escape(str(cfg.out))}")
    barrier()
    return results


def _is_latest(run: Any) -> bool:
    """The evaluated weights are the inference EMA of the run's newest checkpoint."""
    from ismctl.runs.checkpoint import list_checkpoints

    ckpts = list_checkpoints(Path(run.run_dir))
    return bool(ckpts) and ckpts[-1][1].resolve() == Path(run.checkpoint).resolve()


def _png_folder(cfg: Settings, pt: Point) -> Path:
    return cfg.out.parent / f"{cfg.out.stem}-samples-{pt.tag()}"


def _chunks_root(cfg: Settings) -> Path:
    return cfg.out.parent / f"{cfg.out.stem}-chunks"


def _npz_path(cfg: Settings, pt: Point) -> Path:
    return cfg.out.parent / f"{cfg.out.stem}-samples-{pt.tag()}.npz"


def _npz_sink(path: Path, request: dict[str, Any], num: int) -> Any:
    from ismctl.sampling.streamout import NpzSink

    return NpzSink(path, request, num)


def _finish_npz(path: Path, request: dict[str, Any], num: int) -> None:
    from ismctl.sampling.streamout import PARTIAL_SUFFIX

    if path.is_file() and not path.with_name(path.name + PARTIAL_SUFFIX).exists():
        return  # assembled already, by this evaluation before it was stopped
    _npz_sink(path, request, num).finish()


def _chunk_request(run: Any, plan: MetricPlan, cfg: Settings, pt: Point) -> dict[str, Any]:
    """What a point's finished chunks were made for: only chunks of the same request are
    taken up again."""
    return {"checkpoint": str(Path(run.checkpoint).resolve()), "weights_sha256": run.sha256,
            "which": cfg.which, "steps": pt.steps, "guidance": pt.guidance,
            "sampler": pt.sampler, "seed": cfg.seed, "num_samples": cfg.num_samples,
            "chunk": chunk_size(cfg.batch_size), "save_npz": cfg.save_npz,
            "save_png": cfg.save_png,
            "extractors": {key: [g.spec.identity(), list(g.layers)]
                           for key, g in plan.groups.items()}}


def _write_pngs(cfg: Settings, pt: Point, indices: np.ndarray, images: np.ndarray,
                labels: np.ndarray) -> None:
    """Every rank writes its own samples into the folder, batch by batch."""
    from ismctl.sampling.pngdir import write_png_folder

    write_png_folder(_png_folder(cfg, pt), images, labels, indices, clear=False)


def _score_point(run: Any, plan: MetricPlan, cfg: Settings, refs: dict[str, ReferenceStats],
                 pt: Point, feats: dict[str, dict[str, np.ndarray]], all_labels: np.ndarray,
                 grid_images: tuple[np.ndarray, np.ndarray] | None) -> dict[str, Any]:
    """Rank 0: metrics of the gathered sample set and its grid."""
    from ismctl.sampling.generate import arrange_by_class, save_grid

    tag = pt.tag()
    grid = cfg.out.parent / f"{cfg.out.stem}-grid-{tag}.png"
    # The grid shows the first samples of the set, one class per column when few.
    assert grid_images is not None
    shown, nrow = arrange_by_class(torch.from_numpy(grid_images[0][:GRID_MAX]),
                                   torch.from_numpy(grid_images[1][:GRID_MAX]),
                                   run.manifest.num_classes)
    save_grid(shown, grid, nrow)
    point: dict[str, Any] = {
        "steps": pt.steps, "guidance": pt.guidance, "cfg_scale": 1.0 + pt.guidance,
        "sampler": pt.sampler, "num_samples": cfg.num_samples,
        "metrics": point_metrics(plan, feats, all_labels, refs), "grid": str(grid),
    }
    if cfg.save_png:
        point["png_folder"] = str(_png_folder(cfg, pt))
    return point


def _results(run: Any, plan: MetricPlan, points: list[dict[str, Any]],
             refs: dict[str, ReferenceStats], cfg: Settings, world_size: int,
             device: str) -> dict[str, Any]:
    settings = {
        "steps": cfg.steps, "guidance": cfg.guidance, "double_guidance": cfg.double_guidance,
        "num_samples": cfg.num_samples,
        "batch_size": cfg.batch_size, "seed": cfg.seed, "world_size": world_size,
        "device": device, "sampling_mode": run.mode,
        "guidance_convention": "delta: guided v = v_c + w (v_c - v_null), CFG scale 1 + w",
    }
    extractors = {key: {"name": g.spec.name, "identity": g.spec.identity(),
                        "weights": None if g.spec.weights is None else str(g.spec.weights),
                        "layers": g.layers} for key, g in plan.groups.items()}
    if plan.inception is not None and "inception" in extractors:
        extractors["inception"]["found_by"] = plan.inception.source
    select = selection_metric(value_names(plan.metrics), cfg.select_by, is_digits(run.manifest))
    best = {str(s): b for s, b in
            best_points(points, select, select not in HIGHER_IS_BETTER, run.step).items()}
    return {
        "ismctl_version": ismctl.__version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "checkpoint": {"run_dir": str(run.run_dir), "path": str(run.checkpoint),
                       "sha256": run.sha256, "step": run.step, "weights": cfg.which},
        "recipe": run.recipe.model_dump(mode="json"),
        "data": {"encoder": run.manifest.encoder, "resolution": run.manifest.resolution,
                 "num_classes": run.manifest.num_classes, "count": run.manifest.count},
        "settings": settings,
        "metrics": plan.metrics,
        "feature_extractors": extractors,
        "reference": {"source": str(cfg.ref), "stats": {
            key: {"extractor": r.extractor, "layer": r.layer, "source": r.source,
                  "count": r.count, "stats_hash": r.stats_hash(),
                  "prc_features": None if r.features is None else len(r.features),
                  "cache_file": None if r.cache_file is None else str(r.cache_file)}
            for key, r in refs.items()}},
        "notes": plan.notes,
        "points": points,
        "select_by": select,
        "best": best,
        "results_json": str(cfg.out),
    }
