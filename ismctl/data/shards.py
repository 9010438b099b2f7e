"""The sample format inside the webdataset shards.

Each sample is two tar members sharing a key (``r000000123``: the sample's index in the
sorted source list; no dots, since webdataset splits keys from extensions at the first dot):

- ``<key>.npy``: float16 array ``(2, C, h, w)`` = [posterior mean, posterior std], or
  ``(4, C, h, w)`` = [mean, std, mean of the flipped image, std of the flipped image];
  unscaled (the manifest's scale factor is applied when a latent is drawn).
- ``<key>.cls``: the class index as decimal text.

Shards are written to a temporary name and renamed (atomic), with a fixed member mtime so
that the same content always gives the same bytes and checksum.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from webdataset import TarWriter
from webdataset.tariterators import tarfile_samples

from ismctl.utils.fileio import atomic_path


def sample_key(index: int) -> str:
    return f"r{index:09d}"


def encode_sample(key: str, moments: np.ndarray, label: int) -> dict[str, str | bytes]:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(moments, dtype=np.float16), allow_pickle=False)
    return {"__key__": key, "npy": buf.getvalue(), "cls": str(int(label)).encode()}


def decode_moments(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def write_shard(path: Path, samples: Iterable[dict[str, str | bytes]]) -> int:
    """Write samples to ``path`` atomically; returns how many were written."""
    count = 0
    with atomic_path(path) as tmp:
        with TarWriter(str(tmp), encoder=False, mtime=0.0) as writer:
            for sample in samples:
                writer.write(sample)
                count += 1
    return count


def iter_shard(path: Path) -> Iterator[dict[str, bytes]]:
    """Raw samples (``__key__``, ``npy``, ``cls``) of one shard, in stored order."""
    yield from tarfile_samples([{"url": str(path)}])


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
