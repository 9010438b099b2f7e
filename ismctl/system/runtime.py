"""How the network runs: intra-op threads, bf16 autocast and torch.compile.

Three kinds of network call carry almost all of the compute (method §5): the online forward and
backward, the target-EMA passes (no grad) and the sampler's pass per step. Training treats the
three alike: the same precision, and with ``train.compile`` each callable is compiled once and
reused, so mixed jump sizes and guidance strengths (tensors, not Python numbers) never trigger a
new compilation. Only a new batch shape does, once: the second shape marks the batch dimension
dynamic.

Precision policy (``train.precision: bf16``): autocast wraps the objective, where only the
network's matrix products, convolutions and attention run in bf16. The network casts its output
back to the dtype of its input (float32), the losses switch autocast off, and weights,
gradients, optimiser state and EMA copies stay float32 (autocast never touches parameters); the
sampler integrates its state in float32.
"""

from __future__ import annotations

import contextlib
import os
from typing import cast

import torch
from torch import nn

from ismctl.utils.errors import UserError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (taskset, a SLURM or container
    allocation), which can be fewer than the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """``OMP_NUM_THREADS`` when set, else every usable core, shared among the processes of this
    node (torchrun's ``LOCAL_WORLD_SIZE``), at least one.

    The load average is not consulted: it lags by a minute and counts the machine's own
    history, so in a pipeline (train, then eval) it counts the command that just finished and
    left an idle machine to one thread. Where other jobs really do hold cores, fewer threads
    are faster (``make bench``, ``threads``: on a 2-core machine with one core busy, two threads
    sampled at about half the speed of one): set ``--threads`` or ``OMP_NUM_THREADS`` there,
    and for bitwise-repeatable runs.
    """
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    local = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    ranks = int(local) if local.isdigit() and int(local) > 0 else 1
    return max(1, usable_cores() // ranks)


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (``None``: :func:`default_threads`); returns the number."""
    if threads is not None and threads < 1:
        raise UserError(f"--threads {threads}: must be >= 1")
    n = default_threads() if threads is None else threads
    torch.set_num_threads(n)
    return n


def needs_torch(version: str, what: str, hint: str = "") -> UserError:
    """The one-line error for a feature this torch lacks: ``what`` needs torch >= ``version``.
    Releases older than pyproject's minimum are refused where a feature is used, not on import,
    so that what they can do still runs."""
    return UserError(f"{what} needs torch >= {version} (this is torch {torch.__version__})"
                     + (f"; {hint}" if hint else ""))


def math_attention() -> contextlib.AbstractContextManager:
    """Attention on the math kernel, whose ops have forward-mode derivatives (``torch.func.jvp``
    through the fused kernels is not implemented). torch >= 2.3."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as exc:
        raise needs_torch("2.3", "a Jacobian-vector product through attention "
                                 "(objective.mode meanflow)") from exc
    return sdpa_kernel(SDPBackend.MATH)


def autocast_dtype(precision: str) -> torch.dtype | None:
    if precision not in PRECISIONS:
        raise UserError(f"train.precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def autocast(device: torch.device | str,
             dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` (CPU included), or nothing for ``dtype=None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def compile_network(module: nn.Module, enabled: bool = True) -> nn.Module:
    """``torch.compile(module)`` (inductor; CPU included), or the module itself.

    The default ``dynamic=None`` keeps the first batch shape static and makes only the batch
    dimension dynamic when a second shape shows up (the two target passes differ in rows, and
    a last sampling batch may be short): at most two graphs per call site and grad mode.
    """
    if not enabled:
        return module
    return cast(nn.Module, torch.compile(module))


def compile_counters() -> dict[str, int]:
    """Frames compiled and graph breaks so far in this process (torch._dynamo counters)."""
    from torch._dynamo.utils import counters

    return {"frames": int(counters["frames"]["ok"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}
