"""Collecting per-rank results on rank 0 under ``torchrun``; plain pass-through otherwise.

Generation splits a request by strided indices (rank ``r`` holds samples ``r::world_size``,
see ``ismctl.generate``); ``interleave`` puts the gathered shares back in sample order so
the metrics see the same ordered set whatever the number of ranks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch.distributed as dist


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    if not distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def interleave(parts: list[np.ndarray]) -> np.ndarray:
    """Inverse of strided sharding: ``out[r::len(parts)] = parts[r]``."""
    if len(parts) == 1:
        return parts[0]
    total = sum(len(p) for p in parts)
    out = np.empty((total, *parts[0].shape[1:]), dtype=parts[0].dtype)
    for rank, part in enumerate(parts):
        out[rank :: len(parts)] = part
    return out
