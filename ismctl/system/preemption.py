"""Stopping a training run cleanly when the scheduler asks (SIGTERM, SIGUSR1) or the user
presses Ctrl-C (SIGINT).

SLURM sends SIGTERM before it kills a job that is preempted or reaches its time limit, and
with ``#SBATCH --signal=USR1@<seconds>`` SIGUSR1 that many seconds before the limit. While
``StopSignals`` is active the first such signal only raises a flag: the training step in
flight finishes, every rank learns at the same step that some rank was signalled (one
all-reduce per step), the trainer writes a checkpoint and raises ``Preempted``, and the CLI
exits with ``PREEMPTED_EXIT_CODE``, so a requeue script can tell a preemption (resume it)
from a failure (do not). A second SIGTERM/SIGUSR1 gets the handler that was there before
(usually: terminate at once).

Ctrl-C does the same (the step in flight, a checkpoint, one line), and the CLI then exits with
130 like any program the user interrupted. A second Ctrl-C aborts at once (``Aborted``) with a
line that says what is lost: the steps since the newest checkpoint.

Data-loader workers ignore all three signals (``ignore_stop_signals``): a signal sent to the
whole process group (Ctrl-C in a terminal) must not kill them under the trainer, which still
needs them for the step in flight; they exit when the trainer shuts its loaders down.

The CLI imports this module at start-up, so torch is only imported where it is needed.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

# EX_TEMPFAIL from sysexits.h: "a temporary failure; the user is invited to retry".
PREEMPTED_EXIT_CODE = 75
# 128 + SIGINT, what a shell reports for a program stopped by Ctrl-C.
INTERRUPTED_EXIT_CODE = 130
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
INTERRUPT = signal.SIGINT


class Preempted(Exception):
    """Training stopped on a signal after writing a checkpoint; resuming continues exactly."""

    # Every rank raises it at the same step, after the same checkpoint: not one rank's failure
    # (ismctl.system.distributed.rank_failed).
    all_ranks = True

    def __init__(self, signal_name: str, step: int, checkpoint: Path) -> None:
        super().__init__(f"stopped at step {step} by {signal_name}, checkpoint {checkpoint} "
                         "written; continue with --resume (or --auto-resume)")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


class Interrupted(BaseException):  # noqa: N818 - what the user did, not an error
    """Ctrl-C stopped a command; the message says what was kept or lost. A BaseException,
    like KeyboardInterrupt, so that no ``except Exception`` swallows it on its way out."""

    # Ctrl-C reaches every process of the terminal's group, every rank.
    all_ranks = True


class Aborted(Interrupted):
    """A second Ctrl-C: the run stops at once; the message says what is lost."""


class StopSignals:
    """Context manager: catch the stop signals (and Ctrl-C) in this process and tell all
    ranks.

    ``lost`` says, when a second Ctrl-C aborts, what the abort loses (the trainer: the steps
    since its newest checkpoint). Signal handlers can only be installed from the main thread;
    elsewhere (a training run started from a worker thread) the manager is inert and the
    signals keep their effect.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS,
                 interrupt: bool = True, lost: Callable[[], str] | None = None) -> None:
        self.signals = signals
        self.interrupt = interrupt
        self.lost = lost
        self.received: str | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._interrupt_previous: Any = None
        self._interrupts = 0

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
            if self.interrupt:
                self._interrupt_previous = signal.signal(INTERRUPT, self._handle_interrupt)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._interrupt_previous is not None:
            signal.signal(INTERRUPT, self._interrupt_previous)
            self._interrupt_previous = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signal.Signals(signum).name
        # From now on a repeated signal does what it did before this run installed us.
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle_interrupt(self, signum: int, frame: FrameType | None) -> None:
        self._interrupts += 1
        if self._interrupts > 1:
            what = self.lost() if self.lost is not None else "at once: unsaved work is lost"
            raise Aborted(f"aborted by a second Ctrl-C {what}")
        self.received = self.received or INTERRUPT.name
        if sys.stderr.isatty():
            # Straight to the descriptor: a print here could re-enter a print in progress.
            os.write(sys.stderr.fileno(), b"Ctrl-C: finishing the step in flight and saving a "
                     b"checkpoint (Ctrl-C again aborts at once)\n")

    def stop_now(self) -> bool:
        """Whether any rank has been signalled; every rank gets the same answer at the same
        step. The flag travels over a CPU group, so asking costs no GPU synchronisation."""
        import torch
        import torch.distributed as dist

        from ismctl.system.distributed import cpu_group

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.received is not None
        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=cpu_group())
        if flag.item() and self.received is None:
            self.received = "a signal to another rank"
        return bool(flag.item())


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` of the training data loader: its workers ignore the stop signals
    and Ctrl-C."""
    for sig in (*STOP_SIGNALS, INTERRUPT):
        signal.signal(sig, signal.SIG_IGN)
