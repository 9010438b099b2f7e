"""Shared pieces of the benchmark: sizes, iteration counts, the section timer and small timing
helpers.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

LossFn = Callable[[Tensor, Tensor], Tensor]

Network = Callable[..., Tensor]

NUM_CLASSES = 1000

CHANNELS = 4

# Per-step batch per preset size: a real CPU training batch, and a real per-GPU batch that
# fits an 80 GB card in bf16 without activation checkpointing.
BATCH = {"cpu": {"tiny": 32, "S": 32, "B": 16, "L": 8, "XL": 8},
         "cuda": {"tiny": 256, "S": 256, "B": 256, "L": 128, "XL": 64}}

# (warm-up, timed) iterations per step kind: big CPU models take ~10-30 s per step.
ITERS = {"cpu": {"tiny": (3, 15), "S": (1, 5), "B": (1, 5), "L": (1, 3), "XL": (1, 3)},
         "cuda": {"tiny": (5, 20), "S": (5, 20), "B": (5, 20), "L": (3, 10), "XL": (3, 10)}}

RATIO_GOAL, COMPONENT_GOAL = 1.40, 0.03

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

def median(values: list[float]) -> float:
    return float(statistics.median(values))

class Sections:
    """Wall time per named section of one step; disabled, it times nothing and adds no sync."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.device, self.enabled = device, enabled
        self.times: dict[str, float] = {}
        self.rows: dict[str, int] = {}

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        sync(self.device)
        start = time.perf_counter()
        yield
        sync(self.device)
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start

    def wrap(self, fn: Callable[..., Tensor], name: str) -> Callable[..., Tensor]:
        """``fn`` timed under ``name``, counting the rows (samples) of every call."""

        def timed_call(*args: Tensor) -> Tensor:
            self.rows[name] = self.rows.get(name, 0) + args[0].shape[0]
            with self.timed(name):
                return fn(*args)

        return timed_call

def ratio(a: dict[str, float], b: dict[str, float]) -> float:
    return a["total"] / b["total"]

def time_call(fn: Callable[[], Any], device: torch.device, iters: int) -> dict[str, float]:
    """Median and minimum of ``iters`` timed calls after one untimed call."""
    fn()
    times = []
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return {"median_s": median(times), "min_s": min(times)}

@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads. The quick run uses one: on a busy machine the tiny
    model's small ops spend more time synchronising threads than computing."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)

def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
