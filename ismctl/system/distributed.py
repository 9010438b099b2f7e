"""Process-group set-up shared by train, prepare-latents and eval.

Under ``torchrun`` (or one SLURM task per rank, ``ismctl.system.slurm``) the usual environment
variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) are set; without them
everything runs as a single process (rank 0 of 1) with no process group.

One rank's failure ends every rank within seconds. A rank that raises anything but a stop all
ranks make together (a preemption, Ctrl-C) calls :func:`rank_failed`, which prints its one-line
reason with its rank and leaves it in the job's key-value store (the TCPStore the ranks met
at); every rank polls that store from a thread (:class:`FailureWatch`), and on finding another
rank's failure (or the store gone, the process that held it having ended) prints that rank's
reason and exits at once, even from the middle of a collective that would otherwise wait for
the process group's timeout (10-30 minutes). No error path waits in a collective:
:func:`shutdown` after a failure neither meets the other ranks nor tears the group down.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
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
    """Join the torchrun process group if there is one (NCCL on GPU, gloo on CPU), and start
    watching for another rank's failure."""
    global _WATCH
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        if _WATCH is None and "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
            _WATCH = FailureWatch(rank, world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


# How often each rank looks for another rank's failure, and how long a store that stopped
# answering is given before that counts as one (a rank that finished may close it first).
POLL_S = 0.5
STORE_GRACE_S = 3.0


class FailureWatch:
    """A thread that ends this process when another rank has failed (see the module
    docstring); :meth:`publish` is this rank's own failure."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.host, self.port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        # Restarts of a torchrun job share its store: one key per attempt.
        self.key = f"ismctl-failed-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self.failed = False
        self._stop = threading.Event()
        # A client of its own: the process group's store is not shared with this thread.
        self.store = dist.TCPStore(self.host, self.port, is_master=False,
                                   timeout=datetime.timedelta(seconds=10),
                                   wait_for_workers=False)
        self._thread = threading.Thread(target=self._watch, name="ismctl-failure-watch",
                                        daemon=True)
        self._thread.start()

    def publish(self, reason: str) -> None:
        self.failed = True
        try:
            self.store.set(self.key, f"rank {self.rank}: {reason}")
        except Exception:  # noqa: BLE001 - the others still see the store go or time out
            pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * POLL_S + STORE_GRACE_S)

    def _watch(self) -> None:
        lost: float | None = None
        while not self._stop.wait(POLL_S):
            try:
                seen = self.store.check([self.key])
                lost = None
            except Exception:  # noqa: BLE001 - any error: the store is unreachable
                if lost is None:
                    lost = _now()
                if _now() - lost >= STORE_GRACE_S and not self._stop.is_set():
                    self._end(f"the job's store at {self.host}:{self.port} stopped answering "
                              "(the process holding it ended)")
                continue
            if seen and not self.failed and not self._stop.is_set():
                try:
                    reason = self.store.get(self.key).decode(errors="replace")
                except Exception:  # noqa: BLE001
                    reason = "another rank failed"
                self._end(reason)

    def _end(self, reason: str) -> None:
        try:
            sys.stdout.flush()
            sys.stderr.write(f"stopping: rank {self.rank} of {self.world_size} ends because "
                             f"{reason}\n")
            sys.stderr.flush()
        finally:
            os._exit(1)


def _now() -> float:
    import time

    return time.monotonic()


_WATCH: FailureWatch | None = None
_FAILED = {"on": False}


def failure_reason(exc: BaseException) -> str:
    """One line: a UserError's message, else the exception's type and first line."""
    from ismctl.utils.errors import UserError

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, UserError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def rank_failed(exc: BaseException) -> None:
    """Called with the exception that ends this rank's work. A stop that every rank makes
    together (a preemption after its checkpoint, Ctrl-C) is not a failure; anything else is
    printed with this rank's number and left for the other ranks, which then end within
    seconds. Either way :func:`shutdown` then meets no other rank."""
    _FAILED["on"] = True
    # ``all_ranks``: a stop every rank makes at once (ismctl.system.preemption's exceptions).
    if _WATCH is None or isinstance(exc, KeyboardInterrupt) or getattr(exc, "all_ranks", False):
        return
    reason = failure_reason(exc)
    sys.stderr.write(f"error: rank {_WATCH.rank} of {_WATCH.world_size} failed: {reason}\n")
    sys.stderr.flush()
    _WATCH.publish(reason)


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
    """Leave the process group. After a clean end every rank meets the others first (so that
    no rank closes the store while another still watches it); after :func:`rank_failed`
    nothing here waits for another rank."""
    global _CPU_GROUP, _WATCH
    failed, _FAILED["on"] = _FAILED["on"], False
    if _WATCH is not None and not failed and dist.is_available() and dist.is_initialized():
        dist.barrier()
    if _WATCH is not None:
        _WATCH.stop()
        _WATCH = None
    if dist.is_available() and dist.is_initialized() and not failed:
        dist.destroy_process_group()
    _CPU_GROUP = None

