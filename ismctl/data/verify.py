"""Shards that are what ``manifest.json`` says they are, and one line naming any that is not.

``manifest.json`` records each shard's sha256. Every reader of a prepared data set (the
training loader, the wavelet loss's band statistics, a reference built from the shards) opens
a shard through :func:`read_shard`, which checks the shard's digest the first time this
process opens it (later epochs re-read it unchecked: the check costs one extra read of the
file, from the page cache, about 20 ms for a 32 MB shard of ImageNet latents) and turns a
shard it cannot parse (a truncated tar, zeroed bytes, an array that is not plain numbers)
into one line naming the shard. :func:`check_dataset` (``ismctl data check DIR``) checks a
whole data set: every digest, every sample decoded, shapes, labels and counts.

A damaged shard is repaired by rerunning the ``ismctl prepare-latents`` command that wrote
it: a rerun checks every shard against its record and rewrites the ones that fail.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ismctl.data.manifest import Manifest, ShardInfo, read_manifest
from ismctl.data.shards import decode_moments, iter_shard, sha256_file
from ismctl.utils.errors import UserError

REPAIR = ("rerun the `ismctl prepare-latents` command that wrote it (a rerun rewrites shards "
          "that fail their checksum)")

# (path, size, mtime) of the shards this process has checked: a shard is hashed once, when it
# is first opened, not on every epoch.
_CHECKED: set[tuple[str, int, int]] = set()


def _stamp(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def shard_problem(root: Path, info: ShardInfo) -> str | None:
    """Why shard ``info`` of the data set in ``root`` is not the one the manifest lists
    (missing, or another sha256), or None when it is."""
    path = Path(root) / info.name
    if not path.is_file():
        return f"{path}: shard listed in manifest.json is missing"
    stamp = _stamp(path)
    if stamp in _CHECKED:
        return None
    if sha256_file(path) != info.sha256:
        return (f"{path}: damaged: its sha256 differs from the one in manifest.json "
                "(truncated or altered)")
    _CHECKED.add(stamp)
    return None


def verify_shard(root: Path, info: ShardInfo) -> None:
    if (problem := shard_problem(root, info)) is not None:
        raise UserError(f"{problem}; {REPAIR}")


def read_shard(root: Path, info: ShardInfo) -> Iterator[dict]:
    """The raw samples of one shard in stored order (``__key__``, ``__url__``, ``npy``,
    ``cls``), the shard checked against the manifest first."""
    verify_shard(root, info)
    path = Path(root) / info.name
    try:
        yield from iter_shard(path)
    except (tarfile.TarError, OSError, ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot be read as a tar file ({_reason(exc)}); {REPAIR}") from exc


def decode(sample: dict) -> np.ndarray:
    """A sample's stored moments; a sample that is not a plain float array names its shard."""
    try:
        return decode_moments(sample["npy"])
    except (KeyError, ValueError, OSError, EOFError) as exc:
        where = sample.get("__url__", "a shard")
        raise UserError(f"{where}: sample {sample.get('__key__', '?')} cannot be decoded "
                        f"({_reason(exc)}); {REPAIR}") from exc


def label(sample: dict) -> int:
    try:
        return int(sample["cls"])
    except (KeyError, ValueError) as exc:
        where = sample.get("__url__", "a shard")
        raise UserError(f"{where}: sample {sample.get('__key__', '?')} has no readable class "
                        f"label ({_reason(exc)}); {REPAIR}") from exc


def _reason(exc: BaseException) -> str:
    text = str(exc.args[0]) if isinstance(exc, tarfile.TarError) and exc.args else str(exc)
    text = text.strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_shards_exist(root: Path, manifest: Manifest) -> None:
    """Every shard the manifest lists is present (cheap: no read)."""
    for info in manifest.shards:
        if not (Path(root) / info.name).is_file():
            raise UserError(f"{Path(root) / info.name}: shard listed in manifest.json is "
                            f"missing; {REPAIR}")


@dataclass
class DataReport:
    root: Path
    shards: int = 0
    samples: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)


def check_dataset(root: str | Path, on_shard: Callable[[int], None] | None = None) -> DataReport:
    """Check every shard of a prepared data set: present, its manifest sha256, readable,
    every sample decodable with the manifest's shape and a label in range, the count listed.
    Collects every problem (one line each) instead of stopping at the first."""
    root = Path(root)
    manifest = read_manifest(root)
    report = DataReport(root=root)
    expected = manifest.sample_shape
    for info in manifest.shards:
        path = root / info.name
        before = len(report.problems)
        report.shards += 1
        if path.is_file():
            report.bytes += path.stat().st_size
        problem = shard_problem(root, info)
        if problem is not None:
            report.problems.append(problem)
        else:
            try:
                count = 0
                for sample in read_shard(root, info):
                    moments = decode(sample)
                    if moments.ndim != 4 or tuple(moments.shape[1:]) != expected:
                        raise UserError(f"{path}: sample {sample['__key__']} has shape "
                                        f"{moments.shape}, manifest.json says (2|4, "
                                        f"{', '.join(map(str, expected))})")
                    y = label(sample)
                    if not 0 <= y < manifest.num_classes:
                        raise UserError(f"{path}: sample {sample['__key__']} has label {y}, "
                                        f"outside 0..{manifest.num_classes - 1}")
                    count += 1
                report.samples += count
                if count != info.count:
                    report.problems.append(f"{path}: {count} samples, manifest.json lists "
                                           f"{info.count}")
            except UserError as exc:
                report.problems.append(str(exc).split("; " + REPAIR)[0])
        if len(report.problems) > before:
            report.bad.append(info.name)
        if on_shard is not None:
            on_shard(1)
    return report
