"""Whether a file on disk is still what was written: checkpoint digests and file checks.

A checkpoint folder holds ``SHA256SUMS``, the sha256 of each of its files taken right after
they were written, in the format of coreutils' ``sha256sum`` (``cd step-N && sha256sum -c
SHA256SUMS`` checks it without ismctl). Whatever reads a checkpoint (resume, sample, eval,
export) checks the files it uses against it first, so a truncated or altered file is named
in one line instead of failing somewhere inside a deserialiser.

Checkpoints written before digests were recorded have no ``SHA256SUMS``; their files get a
structural check that catches truncation (a safetensors file is exactly as long as its
header says, a torch zip file has its central directory) and still load.

Cost: sha256 runs at about 1.6 GB/s on one core of the machine this was written on; the
files of a checkpoint are hashed in parallel threads (hashlib releases the GIL), right after
writing, from the page cache.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zipfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ismctl.utils.errors import UserError
from ismctl.utils.fileio import atomic_write_text

SUMS_NAME = "SHA256SUMS"
ALTERED = ("damaged: its sha256 differs from the one recorded when it was written "
           "(truncated or altered)")


class DamagedFile(UserError):
    """A file that is missing, truncated or altered; the message starts with its path."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"{path}: {why}")
        self.path, self.why = Path(path), why


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def digests(paths: Iterable[Path]) -> dict[Path, str]:
    """sha256 of several files, hashed in parallel."""
    paths = list(paths)
    with ThreadPoolExecutor(max_workers=max(1, min(4, len(paths)))) as pool:
        return dict(zip(paths, pool.map(sha256_file, paths), strict=True))


def write_sums(folder: Path, names: Iterable[str]) -> dict[str, str]:
    """Hash ``names`` (files in ``folder``) and write ``folder/SHA256SUMS``; returns them."""
    found = digests(folder / n for n in names)
    sums = {p.name: d for p, d in found.items()}
    atomic_write_text(folder / SUMS_NAME, "".join(f"{d}  {n}\n" for n, d in sorted(sums.items())))
    return sums


def read_sums(folder: Path) -> dict[str, str] | None:
    """The recorded digests of a folder (None when it has no ``SHA256SUMS``)."""
    path = folder / SUMS_NAME
    if not path.is_file():
        return None
    sums = {}
    try:
        for line in path.read_text().splitlines():
            if line.strip():
                digest, name = line.split(maxsplit=1)
                sums[name.lstrip("*")] = digest
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DamagedFile(path, f"not readable ({exc})") from exc
    if not sums or any(len(d) != 64 for d in sums.values()):
        raise DamagedFile(path, "damaged: not a list of sha256 digests")
    return sums


def check_structure(path: Path) -> None:
    """Catch a truncated file without a recorded digest: safetensors by its header, torch
    and numpy zip files by their central directory."""
    try:
        if path.suffix == ".safetensors":
            size = path.stat().st_size
            with open(path, "rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    raise ValueError("shorter than its header")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8:
                    raise ValueError("header longer than the file")
                header = json.loads(fh.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items()
                       if k != "__metadata__"), default=0)
            if 8 + n + end != size:
                raise ValueError(f"{size} bytes where its header describes {8 + n + end}")
        elif path.suffix in (".pt", ".npz"):
            with zipfile.ZipFile(path) as zf:
                zf.infolist()
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        raise DamagedFile(path, f"damaged or truncated ({exc})") from exc


def check_files(folder: Path, names: Iterable[str]) -> dict[str, str | None]:
    """Check ``names`` in ``folder`` against its ``SHA256SUMS`` (or structurally without
    one); returns each file's sha256 (None when unchecked by digest). Raises DamagedFile
    naming the first bad file."""
    names = list(names)
    sums = read_sums(folder)
    for name in names:
        if not (folder / name).is_file():
            raise DamagedFile(folder / name, "missing from its checkpoint")
    if sums is None:
        for name in names:
            check_structure(folder / name)
        return dict.fromkeys(names)
    unlisted = [n for n in names if n not in sums]
    if unlisted:
        raise DamagedFile(folder / unlisted[0], f"not listed in {SUMS_NAME}")
    found = digests(folder / n for n in names)
    for path, digest in found.items():
        if digest != sums[path.name]:
            raise DamagedFile(path, ALTERED)
    return {p.name: d for p, d in found.items()}
