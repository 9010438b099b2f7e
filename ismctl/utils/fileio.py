"""Atomic file writes: write to a temporary file in the same folder, then rename.

A crash mid-write leaves the previous file (or nothing), never a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ismctl.utils.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp creates 0600 files; give the result the permissions of a normal new file.
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _umask() -> int:
    # /proc says it without changing it: os.umask() can only be read by setting it, and a
    # thread creating a file meanwhile would get the temporary mask.
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The permission bits ``open()`` gives a new file under this process's umask."""
    return 0o666 & ~_umask()


def give_default_mode(path: str | Path) -> None:
    """Set the permissions of a file written by a library that creates it private (0600,
    as safetensors does) to those of any other new file, so colleagues sharing the
    filesystem read weights like the rest of the run folder."""
    os.chmod(path, new_file_mode())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def json_safe(obj: Any) -> Any:
    """JSON has no NaN/Infinity: non-finite floats become null, keys become strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented, strictly valid JSON."""
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")


def check_writable(path: str | Path, what: str, folder: bool = False) -> None:
    """Refuse, before any work, an output that cannot be written: ``path`` (a file, or with
    ``folder`` a folder) may not exist yet, but the nearest folder above it that exists must
    accept a new file (tried with a temporary one: permissions, read-only mounts and /proc
    answer alike), nothing on the way may be a file, and ``path`` itself must be of its kind."""
    path = Path(path).expanduser()
    if path.is_dir() and not folder:
        raise UserError(f"{what} {path}: is a folder; give a file name")
    if path.exists() and folder and not path.is_dir():
        raise UserError(f"{what} {path}: is a file; give a folder")
    probe = path if folder and path.is_dir() else path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UserError(f"{what} {path}: {probe} is a file, not a folder")
    try:
        before = probe.stat()
        fd, tmp = tempfile.mkstemp(prefix=".ismctl-write-check.", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise UserError(f"{what} {path}: cannot create files in {probe} "
                        f"({exc.strerror or exc})") from None
    # The folder looks untouched afterwards (a refused command leaves everything as it was);
    # only its owner may set its times, which others need not.
    with contextlib.suppress(OSError):
        os.utime(probe, ns=(before.st_atime_ns, before.st_mtime_ns))
