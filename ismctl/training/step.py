"""One optimiser step: the learning-rate schedule, every data slot's micro-batch through the
objective, gradient clipping, AdamW and the twin EMA update.

Data flow (method §3, one way): TrainLoader (shards, latents, the sOT pairing in its workers) ->
the recipe's objective (online network + target EMA, :mod:`ismctl.objectives`) -> AdamW ->
EMA. Reproducibility: the global batch is cut into ``ranks x grad_accum`` slots; slot ``s`` of
step ``n`` gets its data from loader stream ``s`` and its objective randomness (t, d, w, label
dropout) from a generator seeded with ``(seed, n, s)``, so 2 GPUs x 1 accumulation step and
1 GPU x 2 accumulation steps train the same model (up to float summation order).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from ismctl.config.recipe import Recipe
from ismctl.data.coupling import STATS
from ismctl.data.loader import TrainLoader
from ismctl.losses import LossFn
from ismctl.objectives import get_objective
from ismctl.system.distributed import DistInfo
from ismctl.system.runtime import autocast, autocast_dtype, compile_network
from ismctl.training.state import TrainState


def stream_seed(seed: int, step: int, slot: int) -> int:
    """The objective generator's seed of one data slot at one step."""
    return (seed * 1_000_003 + step) * 1_009 + slot


def loader_workers(recipe: Recipe) -> int:
    """Worker processes per accumulation slot: the recipe's workers are shared among them."""
    workers, accum = recipe.data.num_workers, recipe.train.grad_accum
    return max(1, workers // accum) if workers else 0


def make_loaders(recipe: Recipe, micro: int, slots: int, flip: bool, info: DistInfo,
                 start_step: int) -> list[Iterator[tuple[Tensor, ...]]]:
    """One data stream per accumulation slot of this rank, positioned at ``start_step``. Each
    slot's loader solves one sOT assignment per ``coupling.pool_size`` samples of its own
    stream, so the pool is the same on any number of ranks and accumulation steps (method §3.3)."""
    cfg, cp = recipe.train, recipe.coupling
    return [iter(TrainLoader(
        recipe.data.path, batch_size=micro, pool_size=cp.pool_size, seed=cfg.seed,
        rank=info.rank * cfg.grad_accum + m, world_size=slots,
        num_workers=loader_workers(recipe), shuffle_buffer=recipe.data.shuffle_buffer,
        flip=flip, start_batch=start_step, mode=cp.mode, min_group=cp.min_group))
        for m in range(cfg.grad_accum)]


class TrainStep:
    """Callable once per step; returns its losses (summed over slots, divided by grad_accum),
    the sOT pool statistics, whether any loss was non-finite, and the gradient norm."""

    def __init__(self, recipe: Recipe, state: TrainState, loss_fn: LossFn,
                 loaders: list[Iterator[tuple[Tensor, ...]]], slots: int, info: DistInfo) -> None:
        self.recipe, self.state, self.loss_fn, self.loaders = recipe, state, loss_fn, loaders
        self.slots, self.info = slots, info
        dev = info.device
        net: torch.nn.Module = state.model
        if info.enabled:
            net = DistributedDataParallel(state.model,
                                          device_ids=[dev.index] if dev.type == "cuda" else None)
        self.net = net
        # Compiled on any device: the online network (DDP included) and the target-EMA passes,
        # each once (ismctl/system/runtime.py). Gradients come only from `online` (DDP-wrapped
        # under torchrun); `target` builds the targets under no_grad.
        self.online = compile_network(net, recipe.train.compile)
        self.target = compile_network(state.ema.target, recipe.train.compile)
        self.objective = get_objective(recipe.objective.mode).fn
        self.gen = torch.Generator(dev)
        self.amp = autocast(dev, autocast_dtype(recipe.train.precision))

    def learning_rate(self, step: int) -> float:
        o = self.recipe.optim
        return o.lr * min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps else o.lr

    def __call__(self, step: int) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor, Tensor]:
        r, s, info = self.recipe, self.state, self.info
        accum = r.train.grad_accum
        for group in s.opt.param_groups:
            group["lr"] = self.learning_rate(step)
        s.model.train()
        sums: dict[str, Tensor] = {}
        pool: dict[str, Tensor] = {}
        bad = torch.zeros((), dtype=torch.bool, device=info.device)
        for m, it in enumerate(self.loaders):
            x0, x1, y, pool_stats = (t.to(info.device, non_blocking=True) for t in next(it))
            if r.coupling.pool_size:
                for k, v in zip(STATS, pool_stats, strict=True):
                    pool[f"sot_{k}"] = pool.get(f"sot_{k}", 0.0) + v / accum
            slot = info.rank * accum + m
            self.gen.manual_seed(stream_seed(r.train.seed, step, slot))
            # DDP all-reduces on the last micro-batch only.
            last = m == accum - 1
            sync = contextlib.nullcontext() if last or not info.enabled else self.net.no_sync()
            with sync:
                with self.amp:
                    parts = self.objective(self.online, self.target, x0, x1, y, r.objective,
                                           r.guidance, self.loss_fn, s.model.num_classes,
                                           self.gen, (slot, self.slots))
                (parts["loss"] / accum).backward()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / accum
            bad |= ~torch.isfinite(parts["loss"].detach())
        clip = r.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(s.model.parameters(),
                                                   clip if clip else float("inf"))
        s.opt.step()
        s.opt.zero_grad(set_to_none=True)
        s.ema.update(s.model)
        return sums, pool, bad, grad_norm
