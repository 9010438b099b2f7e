"""The sampling section: img/s at 1, 4 and 128 steps, and the evaluation sampling paths (no_grad
with a read back per call, inference mode, compiled).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ismctl.networks.model import build_model
from ismctl.tools.bench.common import CHANNELS, NUM_CLASSES, median, num_threads, sync, time_call

SAMPLING_STEPS = (1, 4, 128)

def sampling_throughput(preset: str, size: int, batch: int, device: torch.device,
                        steps_list: tuple[int, ...]) -> dict[str, Any]:
    from ismctl.sampling.sampler import sample

    torch.manual_seed(0)
    model = build_model(preset, size, CHANNELS, NUM_CLASSES).to(device).eval()
    noise = torch.randn(batch, CHANNELS, size, size, device=device)
    labels = torch.arange(batch, device=device) % NUM_CLASSES
    dtype = torch.bfloat16 if device.type == "cuda" else None
    img_s = {}
    for steps in steps_list:
        seconds = time_call(lambda s=steps: sample(model, noise, labels, s, guidance=1.0,
                                                    autocast_dtype=dtype), device, 1)
        img_s[str(steps)] = batch / seconds["min_s"]
    return {"preset": preset, "batch": batch, "latent": [CHANNELS, size, size],
            "mode": "intrinsic (one pass per step)", "img_s": img_s}

@torch.no_grad()
def sample_before(model: torch.nn.Module, noise: Tensor, labels: Tensor, steps: int,
                  guidance: float, base_steps: int = 128) -> Tensor:
    """The sampling loop as it used to run, kept as the reference of ``sampling.paths``:
    autograd's no_grad instead of inference mode, and the jump sizes checked against the
    table with a read back from the device on every network call (the model's forward did
    that). Same arithmetic as :func:`ismctl.sampling.sampler.sample`, so the same images."""
    from ismctl.networks.model import check_jump_sizes

    batch = noise.shape[0]
    d = torch.full((batch,), 1.0 / steps, device=noise.device)
    w = torch.full((batch,), float(guidance), device=noise.device)
    x = noise.clone()
    for i in range(steps):
        t = torch.full((batch,), i / steps, device=noise.device)
        check_jump_sizes(d, base_steps)
        x = x + (1.0 / steps) * model(x, t, d, labels, w).to(x.dtype)
    return x

def sampling_paths(device: torch.device, quick: bool) -> dict[str, Any]:
    """Sample-steps per second along the sampler's paths, interleaved in one process.

    The setting is the quickstart's evaluation on a CPU (tiny/2 on 8x8x1 digits, 10 classes,
    ``eval.batch_size`` 500) and B/2 at batch 256 on a GPU, with random weights (the
    zero-initialised layers too, so that outputs differ between paths if the arithmetic does).
    Paths: ``before`` (:func:`sample_before`), ``inference_mode``
    (``ismctl.sampling.sampler.sample``), ``compiled`` (the same with the torch.compile'd
    network; compilation timed apart, skipped by the quick run) and, on a CPU with more cores
    than threads, ``inference_mode_all_cores``.
    Rates are given from the median and from the fastest of the rounds (load from other
    processes only adds time), and the largest output difference of each path from ``before``.
    """
    from ismctl.sampling.sampler import sample
    from ismctl.system.runtime import compile_network, usable_cores

    on_gpu = device.type == "cuda"
    preset, shape, classes = ("B/2", (CHANNELS, 32, 32), NUM_CLASSES) if on_gpu else \
        ("tiny/2", (1, 8, 8), 10)
    batch = 32 if quick else (256 if on_gpu else 500)
    steps, rounds = (2, 2) if quick else (8, 7)
    torch.manual_seed(0)
    model = build_model(preset, shape[-1], shape[0], classes).to(device).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    noise = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    labels = (torch.arange(batch) % classes).to(device)
    dtype = torch.bfloat16 if on_gpu else None

    def run(net: torch.nn.Module) -> Callable[[], Tensor]:
        return lambda: sample(net, noise, labels, steps, 1.0, autocast_dtype=dtype)

    paths: dict[str, Callable[[], Tensor]] = {
        "before": lambda: sample_before(model, noise, labels, steps, 1.0),
        "inference_mode": run(model),
    }
    threads, cores = torch.get_num_threads(), usable_cores()
    if not on_gpu and cores > threads:
        def all_cores() -> Tensor:
            with num_threads(cores):
                return run(model)()
        paths["inference_mode_all_cores"] = all_cores
    compile_s = None
    if not quick:
        compiled = compile_network(model)
        start = time.perf_counter()
        run(compiled)()
        sync(device)
        compile_s = time.perf_counter() - start
        paths["compiled"] = run(compiled)
    outputs = {name: fn() for name, fn in paths.items()}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    work = batch * steps
    rate = {name: work / median(t) for name, t in times.items()}
    best = {name: work / min(t) for name, t in times.items()}
    return {
        "preset": preset, "batch": batch, "shape": list(shape), "steps": steps,
        "rounds": rounds, "threads": threads, "all_cores": cores,
        "sample_steps_per_s": rate, "sample_steps_per_s_fastest": best,
        "speedup_over_before": {name: r / rate["before"] for name, r in rate.items()},
        "speedup_over_before_fastest": {name: r / best["before"] for name, r in best.items()},
        "max_abs_diff_from_before": {
            name: float((out.float() - outputs["before"].float()).abs().max())
            for name, out in outputs.items()},
        "compile_s": compile_s,
        "projected_s_1000_samples_128_steps": {name: 1000 * 128 / r for name, r in best.items()},
    }
