"""One trainer per run folder: a lock file, ``<run>/.lock``.

The trainer takes the lock before it writes anything into the folder and holds it until it
exits, so a second ``train``, ``train --resume`` or ``ablate`` variant aimed at the same folder
stops with one line naming the holder instead of interleaving its metrics and checkpoints
with the first one's.

The lock is an exclusive ``flock`` on the file, which the kernel releases when the holding
process dies, however it dies. The file itself says who holds it (host, pid, start time,
command line). A file left behind by a process that died is therefore stale by
construction: the next trainer takes it over and says whose it was (and, on the same host,
that the process is gone). ``flock`` works across the nodes of a shared filesystem where
the filesystem supports it (NFSv4, Lustre and GPFS with locking enabled).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ismctl.utils.errors import UserError

LOCK_NAME = ".lock"


class RunLocked(UserError):
    """Another live process holds the run folder's lock."""


def lock_path(run_dir: Path) -> Path:
    return Path(run_dir) / LOCK_NAME


def _read_holder(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def describe(holder: dict[str, Any] | None) -> str:
    """``pid 123 on host gpu7, started 2025-01-01T10:00:00, `ismctl train r.yaml```."""
    if not holder:
        return "a process that has not written its name yet"
    text = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
    if holder.get("started"):
        text += f", started {holder['started']}"
    if holder.get("command"):
        text += f", `{holder['command']}`"
    return text


def _alive_here(holder: dict[str, Any]) -> bool | None:
    """Whether the holder's process still runs (None: not on this host, cannot tell)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return None
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _refusal(run_dir: Path, holder: dict[str, Any] | None) -> RunLocked:
    return RunLocked(f"{run_dir}: in use by another trainer ({describe(holder)}); wait for it "
                     "to finish or stop it, or train into another run.name")


def check_unlocked(run_dir: Path) -> None:
    """Refuse (RunLocked) when a live process holds the folder's lock; writes nothing."""
    path = lock_path(run_dir)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({exc.strerror})") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        raise _refusal(run_dir, _read_holder(path)) from exc
    finally:
        os.close(fd)


@dataclass
class RunLock:
    """A held lock; ``stale`` describes the dead holder whose file it took over, if any."""

    path: Path
    fd: int
    stale: str | None = None

    def release(self) -> None:
        if self.fd < 0:
            return
        # Remove the name while still holding the lock: a process waiting on this inode
        # then finds it unlinked and starts over on a fresh file (see acquire).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire(run_dir: Path) -> RunLock:
    """Take ``run_dir``'s lock (the folder must exist) or raise RunLocked naming the holder."""
    path = lock_path(run_dir)
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise UserError(f"{path}: cannot create the run folder's lock "
                            f"({exc.strerror})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise _refusal(run_dir, _read_holder(path)) from exc
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise UserError(f"{path}: this filesystem does not support file locks "
                                f"({exc.strerror}); put run.root on one that does") from exc
            raise
        # The holder before us may have unlinked the file between our open and our flock:
        # then we locked a name nobody sees, and must start over on the current one.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        previous = _read_holder(path) if os.fstat(fd).st_size else None
        stale = None
        if previous is not None:
            alive = _alive_here(previous)
            gone = " (no longer running)" if alive is False else ""
            stale = f"took over the stale lock of {describe(previous)}{gone}"
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "command": " ".join(["ismctl", *sys.argv[1:]])}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        return RunLock(path, fd, stale)
    raise UserError(f"{path}: the lock keeps changing hands; is another trainer starting on "
                    f"{run_dir}?")
