"""Collecting per-rank results on rank 0 under ``torchrun``; plain pass-through otherwise.

Only rank 0 receives the gathered objects (over a CPU group, ``ismctl.system.distributed``): with
50K samples per point, copying every rank's images and features to every rank would
multiply host memory by the number of ranks for nothing.

Generation splits a request by strided indices (rank ``r`` holds samples ``r::world_size``,
see ``ismctl.sampling.generate``); ``interleave`` puts the gathered shares back in sample order so
the metrics see the same ordered set whatever the number of ranks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch.distributed as dist

from ismctl.system.distributed import gather_to_main


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on rank 0; ``[]`` on the other ranks;
    ``[obj]`` without a process group."""
    return gather_to_main(obj)


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
