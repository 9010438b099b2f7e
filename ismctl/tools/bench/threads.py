"""The threads section: the quickstart's evaluation sampling with every usable core against one
thread, alone and beside busy processes.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch

from ismctl.networks.model import build_model
from ismctl.tools.bench.common import num_threads

BUSY_LOOP = "import time\nend = time.monotonic() + {limit}\nwhile time.monotonic() < end: pass"

@contextlib.contextmanager
def busy_processes(count: int, limit_s: float = 120.0) -> Iterator[None]:
    """``count`` processes that each keep one core busy (a Python loop; no torch), as another
    job on a shared machine would. Each also stops by itself after ``limit_s`` seconds, so an
    interrupted bench leaves nothing running."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP.format(limit=limit_s)])
             for _ in range(count)]
    try:
        time.sleep(0.2)  # let them start and take their cores
        yield
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()

def thread_scaling(quick: bool) -> dict[str, Any] | None:
    """Sampling speed with every usable core over one thread, on this machine as it is and with
    ``cores - 1`` busy processes beside it; None with a single usable core.

    The setting is the quickstart's evaluation sampling (tiny/2 on 8x8x1 digits, 10 classes,
    random weights), one and all-core calls interleaved; each rate is from the fastest round
    (other load only adds time). ``ratio_all_over_one`` above 1 means the default thread count
    (every core) is the faster choice; the busy case reproduces the measurement that once made
    the default subtract the load average (two threads at half the speed of one).
    """
    from ismctl.sampling.sampler import sample
    from ismctl.system.runtime import usable_cores

    cores = usable_cores()
    if cores < 2:
        return None
    batch, steps, rounds = (32, 1, 2) if quick else (128, 2, 5)
    budget_s = 1.0 if quick else 8.0  # per case: on a loaded machine one all-core call is slow
    torch.manual_seed(0)
    model = build_model("tiny/2", 8, 1, 10).eval()
    noise = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(batch) % 10

    def rate(n: int) -> float:
        with num_threads(n):
            start = time.perf_counter()
            sample(model, noise, labels, steps, 1.0)
            return batch * steps / (time.perf_counter() - start)

    def measure() -> dict[str, float]:
        rate(1), rate(cores)  # warm-up: allocations, thread pool start
        one: list[float] = []
        every: list[float] = []
        start = time.perf_counter()
        while len(one) < rounds and (len(one) < 2 or time.perf_counter() - start < budget_s):
            one.append(rate(1))
            every.append(rate(cores))
        return {"rounds": len(one), "one_thread_sample_steps_per_s": max(one),
                "all_cores_sample_steps_per_s": max(every),
                "ratio_all_over_one": max(every) / max(one)}

    load_start = list(os.getloadavg())
    as_is = measure()
    with busy_processes(cores - 1):
        busy = measure()
    return {"preset": "tiny/2", "batch": batch, "steps": steps, "max_rounds": rounds,
            "cores": cores, "load_average_start": load_start, "as_is": as_is,
            "busy": {"busy_processes": cores - 1, **busy}}
