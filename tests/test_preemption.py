"""Stop signals: a flag, not death; every rank stops at the same step; workers ignore them;
objects gathered on rank 0 only (two gloo ranks for the collective parts)."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from ismctl.system.preemption import STOP_SIGNALS, StopSignals, ignore_stop_signals


@pytest.mark.parametrize("sig", STOP_SIGNALS)
def test_first_signal_sets_a_flag_the_second_gets_the_old_handler(sig: signal.Signals) -> None:
    seen: list[int] = []

    def old(signum: int, frame: object) -> None:
        seen.append(signum)

    previous = signal.signal(sig, old)
    try:
        with StopSignals() as stop:
            assert not stop.stop_now()
            os.kill(os.getpid(), sig)
            assert stop.stop_now() and stop.received == sig.name and seen == []
            os.kill(os.getpid(), sig)
            assert seen == [sig]
        assert signal.getsignal(sig) is old
    finally:
        signal.signal(sig, previous)


def test_loader_workers_ignore_stop_signals() -> None:
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        ignore_stop_signals(0)
        assert all(signal.getsignal(sig) is signal.SIG_IGN for sig in STOP_SIGNALS)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _rank(rank: int, port: int, folder: Path) -> None:
    from ismctl.system.distributed import gather_to_main, init_distributed, shutdown

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2")
    init_distributed("cpu")
    try:
        gathered = gather_to_main({"rank": rank, "items": list(range(rank + 2))})
        stopped_at = None
        with StopSignals() as stop:
            for step in range(50):
                if rank == 1 and step == 3:
                    os.kill(os.getpid(), signal.SIGUSR1)
                if stop.stop_now():
                    stopped_at = step
                    break
        result = {"gathered": gathered, "stopped_at": stopped_at, "received": stop.received}
        (folder / f"{rank}.json").write_text(json.dumps(result))
    finally:
        shutdown()


@pytest.mark.slow
def test_two_ranks_stop_at_the_same_step_and_gather_on_rank_0(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, tmp_path), nprocs=2)
    zero, one = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert zero["stopped_at"] == one["stopped_at"] == 3
    assert one["received"] == "SIGUSR1" and zero["received"] == "a signal to another rank"
    assert zero["gathered"] == [{"rank": 0, "items": [0, 1]}, {"rank": 1, "items": [0, 1, 2]}]
    assert one["gathered"] == []
