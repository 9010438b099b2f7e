"""Where a training run reports: ``metrics.jsonl``, an experiment tracker, plain log lines.

``metrics.jsonl`` is the source of truth: one JSON line per ``run.log_every`` steps (every
objective part, grad norm, lr, it/s, img/s, MFU on GPU). The same numbers, and the periodic
sample grids, also go to the tracker chosen by ``run.tracker``:

- ``tensorboard``: an event file under ``<run>/tensorboard/`` (``torch.utils.tensorboard``);
  scalars are tagged ``train/<name>`` (losses, ``grad_norm``, ``lr``) and ``perf/<name>``
  (``it_s``, ``img_s``, ``mfu``), grids ``samples/<N>_step``.
- ``wandb``: Weights & Biases, if installed; the run id is kept in ``<run>/wandb_id`` so a
  resumed run logs into the same W&B run. ``WANDB_PROJECT`` names the project (default
  ``ismctl``); W&B's own variables (``WANDB_MODE=offline``, ...) apply.
- ``none``.

When stdout is not a terminal (a batch job's log), each metrics line, checkpoint and sample
grid is also printed as one plain line. Only the main rank reports.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from ismctl.config.recipe import Recipe
from ismctl.utils.errors import UserError
from ismctl.utils.fileio import atomic_write_text
from ismctl.utils.progress import format_duration

TRACKERS = ("tensorboard", "wandb", "none")
TENSORBOARD_MISSING = ("run.tracker tensorboard: the tensorboard package is not installed "
                       "(pip install tensorboard), or set run.tracker=none")
WANDB_MISSING = ("run.tracker wandb: the wandb package is not installed (pip install wandb), "
                 "or use run.tracker=tensorboard")
PERF_KEYS = ("it_s", "img_s", "mfu")
NOT_SCALARS = ("step",)


def scalar_tag(key: str) -> str:
    return f"perf/{key}" if key in PERF_KEYS else f"train/{key}"


class Tracker(Protocol):
    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    def image(self, tag: str, step: int, image: np.ndarray) -> None: ...

    def close(self) -> None: ...


class NullTracker:
    def scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    def __init__(self, log_dir: Path, start_step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise UserError(TENSORBOARD_MISSING) from exc
        # A resumed run repeats the steps after its checkpoint (a run restarted before its
        # first checkpoint: every step): hide their old events.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(scalar_tag(key), value, step)
        self.writer.flush()

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        self.writer.add_image(tag, image, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, run_dir: Path, recipe: Recipe) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise UserError(WANDB_MISSING) from exc
        self.wandb = wandb
        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        atomic_write_text(id_file, run_id + "\n")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "ismctl"),
                              name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir),
                              config=recipe.model_dump(mode="json"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log({scalar_tag(k): v for k, v in values.items()}, step=step)

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        self.run.log({tag: self.wandb.Image(image)}, step=step)

    def close(self) -> None:
        self.run.finish()


def check_tracker(kind: str) -> None:
    """The tracker's package imports: checked before the run (and by ``train --dry-run``),
    with the line the tracker itself would raise."""
    if kind == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as exc:
            raise UserError(TENSORBOARD_MISSING) from exc
    elif kind == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError as exc:
            raise UserError(WANDB_MISSING) from exc


def open_tracker(kind: str, run_dir: Path, recipe: Recipe, start_step: int) -> Tracker:
    if kind == "tensorboard":
        return TensorBoardTracker(run_dir / "tensorboard", start_step)
    if kind == "wandb":
        return WandbTracker(run_dir, recipe)
    return NullTracker()


def trim_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines logged after the checkpoint the run restarts from."""
    if path.is_file():
        keep = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] <= step]
        atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def metrics_text(line: dict[str, Any], total: int) -> str:
    """One metrics line for a log file: step, losses, grad norm, lr, speed, ETA."""
    step = line["step"]
    parts = " ".join(f"{k} {line[k]:.4f}" for k in sorted(line)
                     if k not in ("step", "loss", "grad_norm", "lr", *PERF_KEYS))
    it_s = line.get("it_s", 0.0)
    eta = (total - step) / it_s if it_s > 0 else None
    text = (f"step {step}/{total} loss {line['loss']:.4f} ({parts}) "
            f"grad_norm {line['grad_norm']:.3g} lr {line['lr']:.3g} "
            f"{it_s:.2f} it/s {line.get('img_s', 0.0):.1f} img/s")
    if "mfu" in line:
        text += f" mfu {100 * line['mfu']:.1f}%"
    return f"{text} eta {format_duration(eta)}"


class RunLog:
    """The reporting side of one training run (every method is a no-op when disabled)."""

    def __init__(self, run_dir: Path, recipe: Recipe, start_step: int, enabled: bool,
                 plain: bool) -> None:
        self.enabled, self.plain = enabled, plain and enabled
        self.total = recipe.train.steps
        self.metrics_path = run_dir / "metrics.jsonl"
        self.tracker: Tracker = NullTracker()
        if enabled:
            trim_metrics(self.metrics_path, start_step)
            self.tracker = open_tracker(recipe.run.tracker, run_dir, recipe, start_step)

    def metrics(self, line: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(line) + "\n")
        self.tracker.scalars(line["step"], {k: v for k, v in line.items()
                                            if k not in NOT_SCALARS})
        if self.plain:
            print(metrics_text(line, self.total), flush=True)

    def grid(self, path: Path, steps: int, step: int) -> None:
        if not self.enabled:
            return
        with Image.open(path) as img:
            self.tracker.image(f"samples/{steps}_step", step, np.asarray(img.convert("RGB")))
        if self.plain:
            print(f"step {step}: sample grid ({steps} step{'s' * (steps > 1)}) {path}",
                  flush=True)

    def checkpoint(self, path: Path, step: int) -> None:
        if self.plain:
            print(f"step {step}: checkpoint {path}", flush=True)

    def close(self) -> None:
        self.tracker.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
