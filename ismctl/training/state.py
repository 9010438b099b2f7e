"""What a training run holds between steps, built fresh or resumed from a checkpoint.

The network, its twin EMA (method §3.4), the AdamW state, the step reached and where the data
streams stand. Building draws from the global generators in a fixed order (the network's
initialisation after ``torch.manual_seed(train.seed)``), so a run is reproducible from its
recipe; resuming restores every piece an uninterrupted run would have had at that step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ismctl.config.recipe import Recipe
from ismctl.networks.model import ShortcutDiT
from ismctl.networks.pretrained import init_from_pretrained
from ismctl.runs.checkpoint import (
    STATE_FILE,
    WEIGHT_FILES,
    load_state,
    load_weights,
    model_from_recipe,
)
from ismctl.system.distributed import DistInfo
from ismctl.training.ema import TwinEMA
from ismctl.training.preflight import StartCheck


@dataclass
class TrainState:
    """The trained objects and where the run stands."""

    model: ShortcutDiT
    ema: TwinEMA
    opt: torch.optim.Optimizer
    step: int = 0
    data: dict[str, int] = field(default_factory=dict)   # the checkpoint's data position
    rng: dict[str, Any] | None = None                    # this rank's saved generators


def build_state(recipe: Recipe, start: StartCheck, info: DistInfo) -> TrainState:
    """The network (from ``model.init_from`` when set), EMA and optimiser on this rank's device;
    then, when ``start`` resumes, every piece of the checkpoint loaded into them."""
    cfg, dev = recipe.train, info.device
    torch.manual_seed(cfg.seed)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = model_from_recipe(recipe, start.manifest).to(dev)
    if start.pretrained is not None:
        init_from_pretrained(model, start.pretrained, verbose=info.is_main,
                             name=recipe.model.init_from)
    e, o = recipe.ema, recipe.optim
    ema = TwinEMA(model, target_decay=e.target_decay, inference_decay=e.inference_decay,
                  target_enabled=e.target_enabled, inference_enabled=e.inference_enabled,
                  warmup=e.warmup)
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps,
                            weight_decay=o.weight_decay, fused=dev.type == "cuda")
    state = TrainState(model, ema, opt)
    if start.resume_from is not None:
        _resume(state, start.resume_from[1], start.slots, info)
    return state


def _resume(state: TrainState, ckpt: Any, slots: int, info: DistInfo) -> None:
    stored = load_state(ckpt / STATE_FILE)
    load_weights(state.model, ckpt / WEIGHT_FILES["online"])
    for name, module in (("target", state.ema.target), ("inference", state.ema.inference)):
        if module is not state.model:
            load_weights(module, ckpt / WEIGHT_FILES[name])
    state.opt.load_state_dict(stored["optimizer"])
    state.ema.num_updates = stored["ema_updates"]
    per_rank = stored["rng"].get("ranks", [stored["rng"]])
    if len(per_rank) == info.world_size:
        state.rng = per_rank[info.rank]
    elif info.is_main:
        print(f"note: the checkpoint holds the generator states of {len(per_rank)} ranks, "
              f"this job has {info.world_size}: dropout draws differ from an uninterrupted run")
    state.step, state.data = stored["step"], stored["data"]
    if stored["data"]["slots"] != slots and info.is_main:
        print(f"note: resuming with {slots} data slots instead of {stored['data']['slots']}: "
              "the data order differs from an uninterrupted run")
