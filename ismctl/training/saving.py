"""Checkpointing a run: every rank's generators gathered, the weights and the training state
written atomically by the main rank (:mod:`ismctl.runs.checkpoint`), older checkpoints pruned;
and the one error a run stops on by itself, a non-finite loss or weights."""

from __future__ import annotations

from pathlib import Path

import torch

from ismctl.config.recipe import Recipe
from ismctl.runs.checkpoint import (
    checkpoint_dir,
    list_checkpoints,
    prune_checkpoints,
    save_checkpoint,
)
from ismctl.system.distributed import DistInfo, barrier, gather_to_main
from ismctl.training.state import TrainState
from ismctl.training.tracking import RunLog
from ismctl.utils.errors import UserError
from ismctl.utils.rng import capture_rng_state


class TrainingDiverged(UserError):
    """The loss became NaN/inf; the run stops and its last good checkpoint is kept."""


class Saver:
    def __init__(self, recipe: Recipe, state: TrainState, run_dir: Path, runlog: RunLog,
                 slots: int, workers: int, info: DistInfo) -> None:
        self.recipe, self.state, self.run_dir, self.runlog = recipe, state, run_dir, runlog
        self.slots, self.workers, self.info = slots, workers, info

    def diverged(self, step: int) -> TrainingDiverged:
        last = list_checkpoints(self.run_dir)
        keep = f"last good checkpoint: {last[-1][1]}" if last else "no checkpoint yet"
        return TrainingDiverged(f"step {step}: non-finite loss, run stopped ({keep}); "
                                "try a lower optim.lr or set optim.grad_clip")

    def __call__(self, step: int) -> Path:
        s, cfg = self.state, self.recipe.train
        # The last update may have made the weights non-finite before any loss showed it.
        if not all(bool(torch.isfinite(p).all()) for p in s.model.parameters()):
            raise self.diverged(step)
        rng_states = gather_to_main(capture_rng_state(self.info.device))
        if self.info.is_main:
            weights = {"online": s.model}
            if s.ema.target is not s.model:
                weights["target"] = s.ema.target
            if s.ema.inference is not s.model:
                weights["inference"] = s.ema.inference
            state = {"step": step, "optimizer": s.opt.state_dict(),
                     "ema_updates": s.ema.num_updates, "rng": {"ranks": rng_states},
                     "data": {"batches": step, "slots": self.slots, "seed": cfg.seed,
                              "workers": max(1, self.workers)},
                     "recipe": self.recipe.model_dump(mode="json")}
            path = save_checkpoint(self.run_dir, step, weights, state)
            prune_checkpoints(self.run_dir, self.recipe.run.keep_last, self.recipe.run.keep_every)
            self.runlog.checkpoint(path, step)
        barrier()
        return checkpoint_dir(self.run_dir, step)
