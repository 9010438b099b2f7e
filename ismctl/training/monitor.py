"""What a run shows while it trains: metrics lines (losses averaged over the steps since the
last line and over ranks, learning rate, it/s, img/s and, on a known GPU, the MFU estimate)
and sample grids from the inference EMA at 1 and 4 steps. Writing them is
:mod:`ismctl.training.tracking`'s job (metrics.jsonl, TensorBoard/W&B, log lines).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from ismctl.config.recipe import Recipe
from ismctl.data.manifest import Manifest
from ismctl.networks.model import forward_flops
from ismctl.objectives import get_objective
from ismctl.runs.checkpoint import LoadedRun
from ismctl.sampling.generate import arrange_by_class, generate_images, save_grid
from ismctl.sampling.protocol import choose_point, run_sampler
from ismctl.system.distributed import DistInfo
from ismctl.training.state import TrainState
from ismctl.training.tracking import RunLog

# Dense bf16 peak FLOP/s by device name, for the MFU estimate (nanoGPT-style); the first key
# found in the name wins, so the PCIe/NVL variants come before the H100 SXM entry.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12,
                   "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def flops_per_sample(recipe: Recipe, model: torch.nn.Module) -> float:
    """method §5: forward + backward = 3 forwards, plus the target network's no-grad passes as
    the objective counts them (sm/ism: 2 per consistency and per guidance sample; meanflow:
    2 per sample with guidance in the target, a JVP of ~2 per d > 0 sample)."""
    spec = get_objective(recipe.objective.mode)
    return forward_flops(model) * (3 + spec.target_passes(recipe.objective, recipe.guidance))


class Monitor:
    """Accumulates each step's losses and emits a metrics line every ``run.log_every`` steps."""

    def __init__(self, recipe: Recipe, state: TrainState, runlog: RunLog, info: DistInfo) -> None:
        self.recipe, self.state, self.runlog, self.info = recipe, state, runlog, info
        self.flops, self.peak = flops_per_sample(recipe, state.model), peak_flops(info.device)
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.pool: dict[str, Tensor] = {}
        self.steps, self.since = 0, time.perf_counter()

    def add(self, sums: dict[str, Tensor], pool: dict[str, Tensor]) -> None:
        for target, part in ((self.sums, sums), (self.pool, pool)):
            for k, v in part.items():
                target[k] = target.get(k, 0.0) + v
        self.steps += 1

    def line(self, step: int, grad_norm: Tensor) -> dict[str, float]:
        """The metrics line of the steps since the last one (one all-reduce under DDP), written
        to the run log; then the sums start over."""
        dev, n = self.info.device, self.steps
        values = self.sums | self.pool
        names = sorted(values)
        vec = torch.stack([values[k] for k in names] + [grad_norm.float()]) / torch.tensor(
            [n] * len(names) + [1], device=dev)
        if self.info.enabled:
            dist.all_reduce(vec)
            vec /= self.info.world_size
        dt = time.perf_counter() - self.since
        img_s = n * self.recipe.data.batch_size / dt
        line = {"step": step, **dict(zip([*names, "grad_norm"], vec.tolist(), strict=True)),
                "lr": self.state.opt.param_groups[0]["lr"], "it_s": n / dt, "img_s": img_s}
        if self.peak:
            line["mfu"] = img_s * self.flops / self.peak
        self.runlog.metrics(line)
        self.parts = sorted(self.sums)
        self._reset()
        return line

    def summary(self, line: dict[str, float]) -> str:
        parts = " ".join(f"{k} {line[k]:.4f}" for k in self.parts if k != "loss")
        return f"loss {line['loss']:.4f} ({parts})"

    def sample_grids(self, step: int, run_dir: Path, manifest: Manifest) -> None:
        """Class-sorted grids of the inference EMA at 1 and 4 steps, at the run's guidance."""
        r = self.recipe
        run = LoadedRun(model=self.state.ema.inference, recipe=r, manifest=manifest,
                        run_dir=run_dir, checkpoint=run_dir, step=step, sha256="",
                        device=self.info.device, mode=run_sampler(r))
        for steps in (1, 4):
            w = r.run.sample_guidance
            point, _ = choose_point(r, run_dir, steps, w if run.mode == "intrinsic" else None)
            num = r.run.sample_num_samples
            images, labels = generate_images(run, num, steps, point.guidance, seed=r.train.seed,
                                             batch_size=num, sampler=point.sampler)
            grid, nrow = arrange_by_class(images, labels, manifest.num_classes)
            path = run_dir / "samples" / f"step-{step:07d}-{steps}s.png"
            save_grid(grid, path, nrow=nrow)
            self.runlog.grid(path, steps, step)
