"""Process-group set-up shared by train, prepare-latents and eval.

Under ``torchrun`` the usual environment variables (RANK, WORLD_SIZE, LOCAL_RANK) are set;
without them everything runs as a single process (rank 0 of 1) with no process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ismctl.config.recipe import device_error
from ismctl.utils.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' (a GPU when one is visible), 'cpu', 'cuda' (this rank's local GPU) or 'cuda:N';
    a UserError for any other name, or for CUDA on a machine where none is visible."""
    if (why := device_error(name)) is not None:
        raise UserError(f"device: {why}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"device {name!r}: no CUDA device is visible to this process (no GPU or "
                        "NVIDIA driver, or CUDA_VISIBLE_DEVICES hides them); use 'cpu' or "
                        "'auto' (--device cpu, or --set train.device=cpu)")
    dev = torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device {str(dev)!r}: only {torch.cuda.device_count()} CUDA device(s) "
                        f"are visible (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return dev


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if there is one (NCCL on GPU, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


_CPU_GROUP: dist.ProcessGroup | None = None


def cpu_group() -> dist.ProcessGroup | None:
    """A gloo group over all ranks for small CPU-side collectives (Python objects, flags).

    Under NCCL, object collectives on the default group stage every pickled byte through GPU
    memory; a gloo group keeps them in host memory. Collective: the first call must be made by
    every rank. None (the default group) when the default group already is gloo.
    """
    global _CPU_GROUP
    if dist.get_backend() == "gloo":
        return None
    if _CPU_GROUP is None:
        _CPU_GROUP = dist.new_group(backend="gloo")
    return _CPU_GROUP


def gather_to_main(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable) in rank order on rank 0, ``[]`` on the other ranks;
    ``[obj]`` without a process group. Only rank 0 receives the data."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    main = dist.get_rank() == 0
    out: list[Any] | None = [None] * dist.get_world_size() if main else None
    dist.gather_object(obj, out, dst=0, group=cpu_group())
    return out if main else []


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` (picklable) on every rank; ``obj`` itself without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=cpu_group())
    return box[0]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    global _CPU_GROUP
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CPU_GROUP = None

