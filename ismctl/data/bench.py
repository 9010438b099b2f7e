"""Loader throughput, and synthetic shards at ImageNet latent shape that need no VAE."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ismctl.data.encoders import IDENTITY
from ismctl.data.loader import TrainLoader
from ismctl.data.manifest import Manifest, ShardInfo, write_manifest
from ismctl.data.shards import encode_sample, sample_key, sha256_file, write_shard
from ismctl.utils.errors import UserError


def make_synthetic_latents(out: str | Path, count: int, channels: int = 4, size: int = 32,
                           num_classes: int = 1000, shard_size: int = 1000, flip: bool = True,
                           seed: int = 0, structure: float = 0.0) -> Manifest:
    """Random shards in the format ``prepare-latents`` writes, already at unit scale.

    Means are standard normal and stds uniform in [0, 0.1], so with ``scale_factor = 1`` the
    drawn latents look like scaled SD-VAE latents in shape and magnitude. ``encoder`` is
    ``identity``: decoding shows the raw channels. Labels are ``index mod num_classes``.

    ``structure`` in [0, 1] mixes a fixed standard-normal pattern per class into the means,
    ``sqrt(s) pattern[label] + sqrt(1 - s) noise`` (still unit variance): 0 is pure noise,
    while e.g. 0.9 gives a distribution a network learns within a few hundred steps, so a
    training loss visibly falls.
    """
    if count < 1 or shard_size < 1 or num_classes < 1:
        raise UserError(f"synthetic latents: count={count}, shard_size={shard_size} and "
                        f"num_classes={num_classes} must be positive")
    if not 0.0 <= structure <= 1.0:
        raise UserError(f"synthetic latents: structure={structure} must be in [0, 1]")
    out = Path(out)
    rng = np.random.default_rng(seed)
    parts = 4 if flip else 2
    patterns = None
    if structure > 0:
        # A stream of its own, so that structure = 0 keeps the original samples.
        patterns = np.random.default_rng(seed + 1).standard_normal(
            (num_classes, channels, size, size), dtype=np.float32)
    shards = []
    for i in range(math.ceil(count / shard_size)):
        lo, hi = i * shard_size, min(count, (i + 1) * shard_size)

        def samples(lo: int = lo, hi: int = hi) -> Iterator[dict]:
            for index in range(lo, hi):
                moments = rng.standard_normal((parts, channels, size, size), dtype=np.float32)
                moments[1::2] = rng.uniform(0.0, 0.1, size=moments[1::2].shape)
                if patterns is not None:
                    moments[0::2] = (np.sqrt(structure) * patterns[index % num_classes]
                                     + np.sqrt(1.0 - structure) * moments[0::2])
                yield encode_sample(sample_key(index), moments, index % num_classes)

        path = out / f"shard-{i:06d}.tar"
        n = write_shard(path, samples())
        shards.append(ShardInfo(name=path.name, count=n, sha256=sha256_file(path)))
    manifest = Manifest(count=count, num_classes=num_classes,
                        class_names=[str(c) for c in range(num_classes)], encoder=IDENTITY,
                        scale_factor=1.0, resolution=size, channels=channels, latent_size=size,
                        flip=flip, shards=shards, skipped=[])
    write_manifest(out, manifest)
    return manifest


def benchmark_loader(path: str | Path, batch_size: int, pool_size: int, num_batches: int,
                     num_workers: int, mode: str = "within_class") -> dict[str, float]:
    """Latents per second delivered by ``TrainLoader`` (paired, i.e. sOT included), measured
    after the first batch so that worker start-up is not counted."""
    if num_batches < 1:
        raise UserError(f"benchmark: num_batches={num_batches} must be positive")
    loader = TrainLoader(path, batch_size=batch_size, pool_size=pool_size, seed=0,
                         num_workers=num_workers, mode=mode)
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(it)
    seconds = time.perf_counter() - start
    rate = num_batches * batch_size / seconds
    return {"latents_per_s": rate, "latents_per_s_per_worker": rate / max(1, num_workers),
            "seconds": seconds, "batches": float(num_batches), "batch_size": float(batch_size),
            "pool_size": float(pool_size), "num_workers": float(num_workers)}
