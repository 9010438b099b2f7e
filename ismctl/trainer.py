"""The training loop: one process, or DDP under ``torchrun`` (NCCL on GPU, gloo on CPU).

Data flow: recipe -> TrainLoader (shards, latent draw, sOT pairing in its workers) ->
the recipe's objective (ismctl.objectives: online net + target EMA) -> AdamW -> twin EMA update.

Reproducibility: the global batch is cut into ``ranks x grad_accum`` slots and slot ``s`` of
step ``n`` gets its data from loader stream ``s`` and its objective randomness (t, d, w,
label dropout) from a generator seeded with ``(seed, n, s)``. So 2 GPUs x 1 accumulation step
and 1 GPU x 2 accumulation steps train the same model (up to float summation order), and a
resumed run replays exactly the batches an uninterrupted run would have seen.

Around the loop: ``ismctl.preflight`` makes every check before the first write (the same
function ``train --dry-run`` calls; ``ismctl.resume`` decides whether a run directory may be
continued with this recipe), ``ismctl.runfolder`` locks the run folder and takes a start back
that fails before its first step, ``ismctl.tracking`` reports (metrics.jsonl, TensorBoard/W&B,
log lines), ``ismctl.preemption`` turns SIGTERM/SIGUSR1/Ctrl-C into a checkpoint and a clean
stop, and ``ismctl.rng`` saves and restores every rank's generators.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ismctl.checkpoint import (
    STATE_FILE,
    WEIGHT_FILES,
    LoadedRun,
    checkpoint_dir,
    list_checkpoints,
    load_state,
    load_weights,
    model_from_recipe,
    prune_checkpoints,
    save_checkpoint,
)
from ismctl.coupling import STATS
from ismctl.data.loader import TrainLoader
from ismctl.distributed import DistInfo, barrier, gather_to_main, init_distributed, shutdown
from ismctl.ema import TwinEMA
from ismctl.errors import UserError
from ismctl.generate import arrange_by_class, generate_images, save_grid
from ismctl.losses import build_loss
from ismctl.losses.band_stats import band_stats_for_run
from ismctl.model import forward_flops
from ismctl.objectives import get_objective
from ismctl.preemption import Preempted, StopSignals
from ismctl.preflight import check_start, run_directory  # noqa: F401 - run_directory re-exported
from ismctl.pretrained import init_from_pretrained
from ismctl.progress import progress_bar, stdout_is_terminal
from ismctl.protocol import choose_point, run_sampler
from ismctl.recipe import Recipe
from ismctl.rng import capture_rng_state, restore_rng_state
from ismctl.runfolder import RunFolder
from ismctl.runtime import autocast, autocast_dtype, compile_network
from ismctl.tracking import RunLog

# Dense bf16 peak FLOP/s by device name, for the MFU estimate (nanoGPT-style); the first key
# found in the name wins, so the PCIe/NVL variants come before the H100 SXM entry.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12,
                   "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


class TrainingDiverged(UserError):
    """The loss became NaN/inf; the run stops and its last good checkpoint is kept."""


def _stream_seed(seed: int, step: int, slot: int) -> int:
    return (seed * 1_000_003 + step) * 1_009 + slot


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def _flops_per_sample(recipe: Recipe, model: torch.nn.Module) -> float:
    """SPEC 5: forward + backward = 3 forwards, plus the target network's no-grad passes as
    the objective counts them (sm/ism: 2 per consistency and per guidance sample; meanflow:
    2 per sample with guidance in the target, a JVP of ~2 per d > 0 sample)."""
    spec = get_objective(recipe.objective.mode)
    return forward_flops(model) * (3 + spec.target_passes(recipe.objective, recipe.guidance))


def train(recipe: Recipe, recipe_path: str | None = None, resume: bool | str = False,
          overwrite: bool = False, progress: bool = True) -> Path:
    """Train a shortcut model as the recipe says; returns the run directory.

    ``resume``: False starts a new run (refused if the run directory holds one), True
    continues the newest intact checkpoint (refused if there is no run, or if the recipe
    differs in a field that is not safe to change, see ``ismctl.resume``), ``"auto"`` does
    whichever applies. Raises ``Preempted`` after checkpointing when stopped by
    SIGTERM/SIGUSR1/Ctrl-C.
    """
    info = init_distributed(recipe.train.device)
    try:
        with contextlib.ExitStack() as hold:
            return _train(recipe, recipe_path, resume, overwrite, progress, info, hold)
    finally:
        shutdown()


def _train(recipe: Recipe, recipe_path: str | None, resume: bool | str, overwrite: bool,
           progress: bool, info: DistInfo, hold: contextlib.ExitStack) -> Path:
    cfg, dev = recipe.train, info.device
    # Every check before the first write, shared with `train --dry-run` (ismctl.preflight);
    # then the run folder is locked and written, and restored if the run fails before its
    # first step (ismctl.runfolder).
    start = check_start(recipe, recipe_path, resume, overwrite, info.world_size)
    manifest, slots, micro, run_dir = start.manifest, start.slots, start.micro, start.run_dir
    pretrained = start.pretrained
    folder = hold.enter_context(RunFolder(recipe, start, resume, overwrite, info))

    torch.manual_seed(cfg.seed)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = model_from_recipe(recipe, manifest).to(dev)
    if pretrained is not None:
        init_from_pretrained(model, pretrained, verbose=info.is_main,
                             name=recipe.model.init_from)
    e = recipe.ema
    ema = TwinEMA(model, target_decay=e.target_decay, inference_decay=e.inference_decay,
                  target_enabled=e.target_enabled, inference_enabled=e.inference_enabled,
                  warmup=e.warmup)
    o = recipe.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps,
                            weight_decay=o.weight_decay, fused=dev.type == "cuda")

    start_step = 0
    stored_data: dict[str, int] = {}
    stored_rng: dict | None = None
    if start.resume_from is not None:
        ckpt = start.resume_from[1]
        state = load_state(ckpt / STATE_FILE)
        load_weights(model, ckpt / WEIGHT_FILES["online"])
        for name, module in (("target", ema.target), ("inference", ema.inference)):
            if module is not model:
                load_weights(module, ckpt / WEIGHT_FILES[name])
        opt.load_state_dict(state["optimizer"])
        ema.num_updates = state["ema_updates"]
        per_rank = state["rng"].get("ranks", [state["rng"]])
        if len(per_rank) == info.world_size:
            stored_rng = per_rank[info.rank]
        elif info.is_main:
            print(f"note: the checkpoint holds the generator states of {len(per_rank)} ranks, "
                  f"this job has {info.world_size}: dropout draws differ from an uninterrupted run")
        start_step, stored_data = state["step"], state["data"]
        if state["data"]["slots"] != slots and info.is_main:
            print(f"note: resuming with {slots} data slots instead of {state['data']['slots']}: "
                  "the data order differs from an uninterrupted run")

    net: torch.nn.Module = model
    if info.enabled:
        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    # Compiled on any device: the online network (DDP included) and the target-EMA passes,
    # each once (ismctl/runtime.py). The periodic sample grids stay eager: a few passes every
    # run.sample_every steps do not repay a compilation.
    online = compile_network(net, cfg.compile)
    target = compile_network(ema.target, cfg.compile)
    # One signature for every objective family (ismctl/objectives): gradients come only from
    # `online` (DDP-wrapped under torchrun); `target` builds the targets under no_grad.
    objective_fn = get_objective(recipe.objective.mode).fn
    # The wavelet loss's band normaliser is a constant of the data set, measured once and kept
    # in the run directory: the loss does not depend on how the batch is split (SPEC 3.2).
    loss_fn = build_loss(recipe.loss, model.input_size,
                         band_stats_for_run(recipe.loss, recipe.data, run_dir, info.is_main))
    # Each accumulation slot has its own loader; the recipe's workers are shared among them.
    workers = max(1, recipe.data.num_workers // cfg.grad_accum) if recipe.data.num_workers else 0
    # Each loader worker streams its own slice of an epoch: another count, another order.
    if stored_data.get("workers", max(1, workers)) != max(1, workers) and info.is_main:
        print(f"note: resuming with {max(1, workers)} loader streams per slot instead of "
              f"{stored_data['workers']}: the data order differs from an uninterrupted run")
    cp = recipe.coupling
    loaders = [iter(TrainLoader(
        recipe.data.path, batch_size=micro, pool_size=cp.pool_size,
        seed=cfg.seed, rank=info.rank * cfg.grad_accum + m, world_size=slots,
        num_workers=workers,
        shuffle_buffer=recipe.data.shuffle_buffer, flip=recipe.data.flip and manifest.flip,
        start_batch=start_step, mode=cp.mode, min_group=cp.min_group))
        for m in range(cfg.grad_accum)]
    # However the run ends, its loader workers stop with it (they ignore SIGTERM and Ctrl-C).
    hold.callback(lambda: [it.close() for it in loaders])
    # Last, right before the first step: starting the loaders above draws from the CPU
    # generator, as it did before step 1 of the interrupted run.
    if stored_rng is not None:
        restore_rng_state(stored_rng, dev)
    gen = torch.Generator(dev)
    amp = autocast(dev, autocast_dtype(cfg.precision))
    flops, peak = _flops_per_sample(recipe, model), _peak_flops(dev)

    def log_line(step: int, sums: dict[str, torch.Tensor], n: int, dt: float,
                 grad_norm: torch.Tensor) -> dict[str, float]:
        names = sorted(sums)
        vec = torch.stack([sums[k] for k in names] + [grad_norm.float()]) / torch.tensor(
            [n] * len(names) + [1], device=dev)
        if info.enabled:
            dist.all_reduce(vec)
            vec /= info.world_size
        vals = dict(zip([*names, "grad_norm"], vec.tolist(), strict=True))
        img_s = n * recipe.data.batch_size / dt
        line = {"step": step, **vals, "lr": opt.param_groups[0]["lr"], "it_s": n / dt,
                "img_s": img_s}
        if peak:
            line["mfu"] = img_s * flops / peak
        return line

    runlog = RunLog(run_dir, recipe, start_step, enabled=info.is_main,
                    plain=progress and not stdout_is_terminal())

    def sample_grids(step: int) -> None:
        run = LoadedRun(model=ema.inference, recipe=recipe, manifest=manifest, run_dir=run_dir,
                        checkpoint=run_dir, step=step, sha256="", device=dev,
                        mode=run_sampler(recipe))
        for steps in (1, 4):
            w = recipe.run.sample_guidance
            point, _ = choose_point(recipe, run_dir, steps, w if run.mode == "intrinsic" else None)
            num = recipe.run.sample_num_samples
            images, labels = generate_images(run, num, steps, point.guidance,
                                             seed=cfg.seed, batch_size=num,
                                             sampler=point.sampler)
            grid, nrow = arrange_by_class(images, labels, manifest.num_classes)
            path = run_dir / "samples" / f"step-{step:07d}-{steps}s.png"
            save_grid(grid, path, nrow=nrow)
            runlog.grid(path, steps, step)

    def diverged(step: int) -> TrainingDiverged:
        last = list_checkpoints(run_dir)
        keep = f"last good checkpoint: {last[-1][1]}" if last else "no checkpoint yet"
        return TrainingDiverged(f"step {step}: non-finite loss, run stopped ({keep}); "
                                "try a lower optim.lr or set optim.grad_clip")

    def checkpoint(step: int) -> Path:
        # The last update may have made the weights non-finite before any loss showed it.
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise diverged(step)
        rng_states = gather_to_main(capture_rng_state(dev))
        if info.is_main:
            weights = {"online": model}
            if ema.target is not model:
                weights["target"] = ema.target
            if ema.inference is not model:
                weights["inference"] = ema.inference
            state = {"step": step, "optimizer": opt.state_dict(), "ema_updates": ema.num_updates,
                     "rng": {"ranks": rng_states},
                     "data": {"batches": step, "slots": slots, "seed": cfg.seed,
                              "workers": max(1, workers)},
                     "recipe": recipe.model_dump(mode="json")}
            path = save_checkpoint(run_dir, step, weights, state)
            prune_checkpoints(run_dir, recipe.run.keep_last, recipe.run.keep_every)
            runlog.checkpoint(path, step)
        barrier()
        return checkpoint_dir(run_dir, step)

    sums: dict[str, torch.Tensor] = {}
    # What the live sOT coupling does (coupling.STATS of each micro-batch's pool), logged as
    # sot_<name> next to the losses; nothing with independent pairing.
    pool_sums: dict[str, torch.Tensor] = {}
    bad = torch.zeros((), dtype=torch.bool, device=dev)
    n_since, t_last = 0, time.perf_counter()
    with runlog, StopSignals(lost=folder.lost) as stop, progress_bar(
            f"train {run_dir.name}", total=cfg.steps, completed=start_step,
            enabled=progress and info.is_main, plain=False) as bar:
        for step in range(start_step, cfg.steps):
            lr = o.lr * min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps else o.lr
            for group in opt.param_groups:
                group["lr"] = lr
            model.train()
            for m, it in enumerate(loaders):
                x0, x1, y, pool_stats = (t.to(dev, non_blocking=True) for t in next(it))
                if cp.pool_size:
                    for k, v in zip(STATS, pool_stats, strict=True):
                        pool_sums[f"sot_{k}"] = pool_sums.get(f"sot_{k}", 0.0) + v / cfg.grad_accum
                slot = info.rank * cfg.grad_accum + m
                gen.manual_seed(_stream_seed(cfg.seed, step, slot))
                last_micro = m == cfg.grad_accum - 1
                sync = contextlib.nullcontext() if last_micro or not info.enabled else net.no_sync()
                with sync:
                    with amp:
                        parts = objective_fn(online, target, x0, x1, y, recipe.objective,
                                             recipe.guidance, loss_fn, model.num_classes, gen,
                                             (slot, slots))
                    (parts["loss"] / cfg.grad_accum).backward()
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float() / cfg.grad_accum
                bad |= ~torch.isfinite(parts["loss"].detach())
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), o.grad_clip if o.grad_clip else float("inf"))
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update(model)
            n_since += 1
            done = step + 1
            folder.step_done(done)
            bar.advance()
            at_log = done % recipe.run.log_every == 0 or done == cfg.steps
            at_ckpt = done % recipe.run.ckpt_every == 0 or done == cfg.steps
            if (at_log or at_ckpt) and bool(bad):
                raise diverged(done)
            if at_log:
                line = log_line(done, sums | pool_sums, n_since, time.perf_counter() - t_last,
                                grad_norm)
                runlog.metrics(line)
                if info.is_main:
                    parts_txt = " ".join(f"{k} {line[k]:.4f}" for k in sorted(sums) if k != "loss")
                    bar.update(f"loss {line['loss']:.4f} ({parts_txt})")
                sums, pool_sums, n_since, t_last = {}, {}, 0, time.perf_counter()
            if info.is_main and (done % recipe.run.sample_every == 0 or done == cfg.steps):
                sample_grids(done)
            if at_ckpt:
                checkpoint(done)
            if stop.stop_now():
                if not at_ckpt and bool(bad):
                    raise diverged(done)
                saved = checkpoint_dir(run_dir, done) if at_ckpt else checkpoint(done)
                raise Preempted(stop.received or "a stop signal", done, saved)
    return run_dir
