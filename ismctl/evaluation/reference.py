"""Reference statistics: mean and covariance of real-image features, plus a fixed random
subset of the features themselves for precision/recall; cached on disk.

Sources (``--ref``): an ADM ``.npz`` (its precomputed ``mu``/``sigma`` are used for the
Inception extractors, as ADM's evaluator does; ``arr_0`` images otherwise and for
precision/recall), an image folder, or the prepared shards (``None``: the run's data),
whose stored posterior means are decoded with the manifest's encoder.

Statistics are accumulated in float64 around a shift (the first batch's mean), so a million
images need O(D^2) memory, and under ``torchrun`` every rank adds its share of the images.
The cache file's name is a hash of the extractor (name and weights hash), the feature layer,
the source path, its content fingerprint (file hash, manifest hash, or folder listing), the
resolution and the size of the kept feature subset; it is written atomically.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from ismctl.evaluation.cache import cache_dir
from ismctl.evaluation.features import ExtractorSpec, extract_features
from ismctl.evaluation.gather import broadcast_object, gather_objects
from ismctl.evaluation.npz import read_npz
from ismctl.evaluation.sources import ImageSource, open_source
from ismctl.utils.fileio import atomic_path
from ismctl.utils.progress import progress_bar

CACHE_VERSION = 1
KEEP_FEATURES = 10_000
SUBSET_SEED = 0


class StatsAccumulator:
    """Running mean/covariance of feature rows; partial sums add across ranks."""

    def __init__(self) -> None:
        self.count = 0
        self.shift: np.ndarray | None = None
        self.s1: np.ndarray | None = None
        self.s2: np.ndarray | None = None

    def add(self, features: np.ndarray) -> None:
        x = np.asarray(features, dtype=np.float64)
        if len(x) == 0:
            return
        if self.shift is None:
            self.shift = x.mean(axis=0)
            self.s1 = np.zeros(x.shape[1])
            self.s2 = np.zeros((x.shape[1], x.shape[1]))
        d = x - self.shift
        self.s1 += d.sum(axis=0)
        self.s2 += d.T @ d
        self.count += len(x)

    def merge(self, other: StatsAccumulator) -> None:
        if other.count == 0:
            return
        if self.shift is None:
            self.count, self.shift, self.s1, self.s2 = other.count, other.shift, other.s1, other.s2
            return
        # Re-centre the other partial sums on this shift: d' = d + (other.shift - shift).
        delta = other.shift - self.shift
        s1 = other.s1 + other.count * delta
        s2 = other.s2 + np.outer(other.s1, delta) + np.outer(delta, other.s1)
        s2 += other.count * np.outer(delta, delta)
        self.s1 += s1
        self.s2 += s2
        self.count += other.count

    def finalize(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count < 2:
            raise ValueError(f"need at least 2 feature rows for a covariance, got {self.count}")
        mean_d = self.s1 / self.count
        sigma = (self.s2 - self.count * np.outer(mean_d, mean_d)) / (self.count - 1)
        return self.shift + mean_d, (sigma + sigma.T) / 2.0


@dataclass
class ReferenceStats:
    mu: np.ndarray
    sigma: np.ndarray
    count: int | None
    features: np.ndarray | None
    source: str
    extractor: str
    layer: str
    cache_file: Path | None = None

    def stats_hash(self) -> str:
        digest = hashlib.sha256(np.ascontiguousarray(self.mu, np.float64).tobytes())
        digest.update(np.ascontiguousarray(self.sigma, np.float64).tobytes())
        return digest.hexdigest()[:16]


def subset_indices(count: int, keep: int, seed: int = SUBSET_SEED) -> np.ndarray:
    """Sorted indices of the feature rows kept for precision/recall (all if count <= keep)."""
    if count <= keep:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).permutation(count)[:keep])


def compute_reference(
    source: ImageSource,
    spec: ExtractorSpec,
    layer: str,
    device: torch.device | str = "cpu",
    batch_size: int = 100,
    keep_features: int = KEEP_FEATURES,
    progress: bool = False,
    rank: int = 0,
    world_size: int = 1,
    extractor: FeatureExtractorBase | None = None,
) -> ReferenceStats | None:
    """Statistics of ``source`` (this rank's share, gathered); None on ranks other than 0.
    ``extractor``: an already built ``spec`` extractor providing ``layer`` (else built here)."""
    keep = subset_indices(source.count, keep_features)
    extractor = extractor if extractor is not None else spec.build([layer], device)
    acc = StatsAccumulator()
    kept_idx: list[np.ndarray] = []
    kept: list[np.ndarray] = []
    share = len(range(rank, source.count, world_size))
    for indices, images in _with_progress(source, batch_size, rank, world_size, share, progress):
        feats = extract_features(extractor, [images], device)[layer]
        acc.add(feats)
        mask = np.isin(indices, keep)
        kept_idx.append(indices[mask])
        kept.append(feats[mask])
    parts = gather_objects((acc, kept_idx, kept))
    if rank != 0:
        return None
    total = StatsAccumulator()
    for part_acc, _, _ in parts:
        total.merge(part_acc)
    mu, sigma = total.finalize()
    idx = np.concatenate([i for _, ids, _ in parts for i in ids])
    rows = np.concatenate([f for _, _, fs in parts for f in fs]) if len(idx) else None
    features = rows[np.argsort(idx, kind="stable")] if rows is not None else None
    return ReferenceStats(mu, sigma, total.count, features, source.description, spec.identity(),
                          layer)


def _with_progress(source: ImageSource, batch_size: int, rank: int, world_size: int,
                   total: int, enabled: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    with progress_bar("reference features", total=total, enabled=enabled and rank == 0,
                      unit="img") as bar:
        for indices, images in source.batches(batch_size, rank, world_size):
            yield indices, images
            bar.advance(len(indices))


def cache_key(spec: ExtractorSpec, layer: str, source: ImageSource, resolution: int,
              keep_features: int) -> str:
    payload = {
        "version": CACHE_VERSION,
        "extractor": spec.identity(),
        "layer": layer,
        "source": source.description,
        "fingerprint": source.fingerprint(),
        "resolution": resolution,
        "keep_features": keep_features,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def save_reference(path: Path, ref: ReferenceStats) -> None:
    arrays: dict[str, np.ndarray] = {
        "mu": ref.mu, "sigma": ref.sigma,
        "count": np.asarray(-1 if ref.count is None else ref.count),
        "meta": np.asarray(json.dumps({"source": ref.source, "extractor": ref.extractor,
                                       "layer": ref.layer})),
    }
    if ref.features is not None:
        arrays["features"] = ref.features.astype(np.float32)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def load_cached(path: Path) -> ReferenceStats:
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        features = data["features"] if "features" in data.files else None
        count = int(data["count"])
        return ReferenceStats(data["mu"], data["sigma"], None if count < 0 else count, features,
                              meta["source"], meta["extractor"], meta["layer"], path)


def is_inception(name: str) -> bool:
    return name.startswith("inception-v3")


def npz_stats_usable(ref: Path, spec: ExtractorSpec) -> bool:
    """An .npz's ``mu``/``sigma`` fit the extractor: written for it (``extractor`` entry), or
    ADM's Inception statistics (no entry) read with an Inception extractor."""
    try:
        with np.load(ref, allow_pickle=False) as data:
            if "mu" not in data.files or "sigma" not in data.files:
                return False
            if "extractor" in data.files:
                return str(data["extractor"]) == spec.name
    except (OSError, ValueError, zipfile.BadZipFile):
        return False  # not an .npz: reading it as images reports the problem
    return is_inception(spec.name)


def _has_images(path: Path) -> bool:
    with np.load(path, allow_pickle=False) as data:
        return "arr_0" in data.files


def _images_reference(
    path: Path, spec: ExtractorSpec, layer: str, resolution: int, device: torch.device | str,
    batch_size: int, keep_features: int, progress: bool, use_cache: bool, rank: int,
    world_size: int, extractor: FeatureExtractorBase | None,
) -> ReferenceStats | None:
    source = open_source(path, resolution, device)
    file = None
    if use_cache:
        key = cache_key(spec, layer, source, resolution, keep_features)
        file = cache_dir("refstats") / f"{key[:32]}.npz"
        cached = None
        if rank == 0 and file.is_file():
            try:
                cached = load_cached(file)
            except (OSError, ValueError, KeyError):
                cached = None  # unreadable cache entry: recompute and overwrite it
        if broadcast_object(cached is not None):
            return cached
    ref = compute_reference(source, spec, layer, device, batch_size, keep_features, progress,
                            rank, world_size, extractor)
    if ref is not None and file is not None:
        save_reference(file, ref)
        ref.cache_file = file
    return ref


def load_reference(
    ref: str | Path,
    spec: ExtractorSpec,
    layer: str,
    resolution: int,
    need_features: bool = False,
    device: torch.device | str = "cpu",
    batch_size: int = 100,
    keep_features: int = KEEP_FEATURES,
    progress: bool = False,
    use_cache: bool = True,
    rank: int = 0,
    world_size: int = 1,
    extractor: FeatureExtractorBase | None = None,
) -> ReferenceStats | None:
    """Reference statistics for one extractor layer (None on ranks other than 0)."""
    path = Path(ref).expanduser()
    args = (spec, layer, resolution, device, batch_size, keep_features, progress, use_cache,
            rank, world_size, extractor)
    if not (path.is_file() and path.suffix.lower() == ".npz" and npz_stats_usable(path, spec)):
        return _images_reference(path, *args)
    features = None
    if need_features and _has_images(path):
        from_images = _images_reference(path, *args)
        features = from_images.features if from_images is not None else None
    if rank != 0:
        return None
    batch = read_npz(path, load_images=False)
    assert batch.mu is not None and batch.sigma is not None
    return ReferenceStats(batch.mu, batch.sigma, None, features, f"npz:{path}", spec.identity(),
                          layer)
