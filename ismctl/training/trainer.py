"""The training run: one process, or DDP under ``torchrun`` (NCCL on GPU, gloo on CPU).

Read top to bottom, :func:`_train` is the run in its phases, one module each:

1. check and plan (:mod:`~ismctl.training.preflight`, the same checks as ``train --dry-run``),
   then hold the run folder (:mod:`~ismctl.training.runfolder`: locked, and taken back if the
   run fails before its first step);
2. build or resume the training state (:mod:`~ismctl.training.state`);
3. the step (:mod:`~ismctl.training.step`): data -> objective -> AdamW -> twin EMA;
4. logging and sample grids (:mod:`~ismctl.training.monitor`);
5. checkpoints (:mod:`~ismctl.training.saving`); SIGTERM, SIGUSR1 and Ctrl-C become a
   checkpoint at the step reached and a clean stop (:mod:`ismctl.system.preemption`).

A resumed run replays exactly the batches and random draws an uninterrupted run would have
seen (the data streams restart at the checkpoint's step, every rank's generators are restored).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ismctl.config.recipe import Recipe
from ismctl.losses import build_loss
from ismctl.losses.band_stats import band_stats_for_run
from ismctl.runs.checkpoint import checkpoint_dir
from ismctl.system.distributed import DistInfo, init_distributed, rank_failed, shutdown
from ismctl.system.preemption import Preempted, StopSignals
from ismctl.training.monitor import Monitor
from ismctl.training.preflight import check_start
from ismctl.training.runfolder import RunFolder
from ismctl.training.saving import Saver
from ismctl.training.state import build_state
from ismctl.training.step import TrainStep, loader_workers, make_loaders
from ismctl.training.tracking import RunLog
from ismctl.utils.progress import progress_bar, stdout_is_terminal
from ismctl.utils.rng import restore_rng_state


def train(recipe: Recipe, recipe_path: str | None = None, resume: bool | str = False,
          overwrite: bool = False, progress: bool = True) -> Path:
    """Train a shortcut model as the recipe says; returns the run directory.

    ``resume``: False starts a new run (refused if the run directory holds one), True
    continues the newest intact checkpoint (refused if there is no run, or if the recipe
    differs in a field that is not safe to change, see ``ismctl.training.resume``), ``"auto"``
    does whichever applies. Raises ``Preempted`` after checkpointing when stopped by
    SIGTERM/SIGUSR1/Ctrl-C.
    """
    info = init_distributed(recipe.train.device)
    try:
        with contextlib.ExitStack() as hold:
            return _train(recipe, recipe_path, resume, overwrite, progress, info, hold)
    except BaseException as exc:
        rank_failed(exc)
        raise
    finally:
        shutdown()


def _train(recipe: Recipe, recipe_path: str | None, resume: bool | str, overwrite: bool,
           progress: bool, info: DistInfo, hold: contextlib.ExitStack) -> Path:
    cfg, run = recipe.train, recipe.run
    start = check_start(recipe, recipe_path, resume, overwrite, info.world_size)
    folder = hold.enter_context(RunFolder(recipe, start, resume, overwrite, info))
    run_dir, manifest = start.run_dir, start.manifest

    state = build_state(recipe, start, info)
    # The wavelet loss's band normaliser is a constant of the data set, measured once and kept
    # in the run directory: the loss does not depend on how the batch is split (method §3.2).
    loss_fn = build_loss(recipe.loss, state.model.input_size,
                         band_stats_for_run(recipe.loss, recipe.data, run_dir, info.is_main))
    workers = _check_workers(recipe, state.data, info)
    loaders = make_loaders(recipe, start.micro, start.slots, recipe.data.flip and manifest.flip,
                           info, state.step)
    # However the run ends, its loader workers stop with it (they ignore SIGTERM and Ctrl-C).
    hold.callback(lambda: [it.close() for it in loaders])
    # Last before the first step: starting the loaders drew from the CPU generator, as it did
    # before the first step of the interrupted run.
    if state.rng is not None:
        restore_rng_state(state.rng, info.device)
    step_fn = TrainStep(recipe, state, loss_fn, loaders, start.slots, info)

    runlog = RunLog(run_dir, recipe, state.step, enabled=info.is_main,
                    plain=progress and not stdout_is_terminal())
    monitor = Monitor(recipe, state, runlog, info)
    save = Saver(recipe, state, run_dir, runlog, start.slots, workers, info)
    # Whether any loss since the start was non-finite, read (a device sync) only when logging,
    # checkpointing or stopping.
    nonfinite = torch.zeros((), dtype=torch.bool, device=info.device)
    with runlog, StopSignals(lost=folder.lost) as stop, progress_bar(
            f"train {run_dir.name}", total=cfg.steps, completed=state.step,
            enabled=progress and info.is_main, plain=False) as bar:
        for step in range(state.step, cfg.steps):
            sums, pool, bad, grad_norm = step_fn(step)
            nonfinite |= bad
            monitor.add(sums, pool)
            done = step + 1
            folder.step_done(done)
            bar.advance()
            at_log = done % run.log_every == 0 or done == cfg.steps
            at_ckpt = done % run.ckpt_every == 0 or done == cfg.steps
            if (at_log or at_ckpt) and bool(nonfinite):
                raise save.diverged(done)
            if at_log:
                line = monitor.line(done, grad_norm)
                if info.is_main:
                    bar.update(monitor.summary(line))
            if info.is_main and (done % run.sample_every == 0 or done == cfg.steps):
                monitor.sample_grids(done, run_dir, manifest)
            if at_ckpt:
                save(done)
            if stop.stop_now():
                if not at_ckpt and bool(nonfinite):
                    raise save.diverged(done)
                saved = checkpoint_dir(run_dir, done) if at_ckpt else save(done)
                raise Preempted(stop.received or "a stop signal", done, saved)
    return run_dir


def _check_workers(recipe: Recipe, stored: dict[str, int], info: DistInfo) -> int:
    """Loader workers per slot; a resume with another count says that the data order changes
    (each worker streams its own slice of an epoch)."""
    workers = loader_workers(recipe)
    if stored.get("workers", max(1, workers)) != max(1, workers) and info.is_main:
        print(f"note: resuming with {max(1, workers)} loader streams per slot instead of "
              f"{stored['workers']}: the data order differs from an uninterrupted run")
    return workers
