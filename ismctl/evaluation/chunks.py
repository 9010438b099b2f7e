"""One evaluation point in bounded memory: sample images in batches, feed each batch to the
feature extractors (and the sample writers) and keep only the features.

A point's ``num_samples`` global sample indices are cut into *chunks* of consecutive indices
(a whole number of sampling batches, about ``CHUNK_SAMPLES``); under ``torchrun`` rank ``r``
makes the chunks ``k`` with ``k % world_size == r``. Images live only for one batch: the
peak memory of an evaluation is one batch of images plus the features (2048 + 1008 floats per
sample for Inception), whatever ``--num-samples`` is (a 50,000-sample FID at 256x256 held
about 10 GB of images per process before). Sample ``i`` depends only on ``(seed, i)``
(``ismctl.sampling.generate``), so the images, and the metrics, are those of the whole set.

Every finished chunk's features and labels are written to ``<results stem>-chunks/<point>/``
with the request they belong to (checkpoint digest, point, seed, count, chunk size,
extractors); an evaluation stopped part-way and run again with the same request makes only the
chunks still missing. ``--save-npz`` streams each chunk's images into the ``.npz`` writer of
``ismctl.sampling.streamout`` (chunk files, assembled at the end without holding the set),
``--save-png`` writes each chunk's PNGs as it is made.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ismctl.evaluation.features import extract_features, iter_batches
from ismctl.utils.fileio import atomic_path, atomic_write_text

CHUNK_SAMPLES = 1000
REQUEST_NAME = "request.json"
GRID_MAX = 100


def chunk_size(batch_size: int, target: int | None = None) -> int:
    """A whole number of sampling batches, at least ``target`` (``CHUNK_SAMPLES``) samples."""
    return batch_size * max(1, math.ceil((target or CHUNK_SAMPLES) / batch_size))


def chunk_ranges(num: int, size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each chunk of ``num`` samples."""
    return [(start, min(start + size, num)) for start in range(0, num, size)]


@dataclass
class PointShare:
    """What one rank made of a point: its chunks' features and labels, keyed by chunk index,
    the grid's images (rank 0: the first samples), and where the time went."""

    features: dict[int, dict[str, dict[str, np.ndarray]]] = field(default_factory=dict)
    labels: dict[int, np.ndarray] = field(default_factory=dict)
    grid: tuple[np.ndarray, np.ndarray] | None = None
    generate_s: float = 0.0
    features_s: float = 0.0
    resumed: int = 0


def _chunk_path(folder: Path, k: int) -> Path:
    return folder / f"chunk-{k:06d}.npz"


def _write_chunk(path: Path, feats: dict[str, dict[str, np.ndarray]], labels: np.ndarray,
                 grid: tuple[np.ndarray, np.ndarray] | None) -> None:
    arrays = {f"f/{key}/{layer}": value for key, layers in feats.items()
              for layer, value in layers.items()}
    arrays["labels"] = labels
    if grid is not None:
        arrays["grid_images"], arrays["grid_labels"] = grid
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def _read_chunk(path: Path) -> tuple[dict[str, dict[str, np.ndarray]], np.ndarray,
                                     tuple[np.ndarray, np.ndarray] | None] | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            feats: dict[str, dict[str, np.ndarray]] = {}
            for name in data.files:
                if name.startswith("f/"):
                    _, key, layer = name.split("/", 2)
                    feats.setdefault(key, {})[layer] = data[name]
            grid = ((data["grid_images"], data["grid_labels"])
                    if "grid_images" in data.files else None)
            return feats, data["labels"], grid
    except (OSError, ValueError, KeyError):
        return None  # a damaged chunk is made again


def open_chunks(folder: Path, request: dict[str, Any], is_main: bool) -> bool:
    """Rank 0: keep the folder's finished chunks if they belong to ``request``, else start it
    over (the other ranks wait for this before reading it); True when started over."""
    if not is_main:
        return False
    request = json.loads(json.dumps(request))
    marker = folder / REQUEST_NAME
    try:
        same = json.loads(marker.read_text()) == request
    except (OSError, ValueError):
        same = False
    if not same:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        atomic_write_text(marker, json.dumps(request, indent=1) + "\n")
    return not same


def run_point(run: Any, pt: Any, num: int, seed: int, batch_size: int,
              extractors: dict[str, torch.nn.Module], fbatch: int, device: torch.device,
              folder: Path, rank: int = 0, world: int = 1, progress: bool = False,
              sinks: list[Any] | None = None) -> PointShare:
    """Make this rank's chunks of one point (those not already in ``folder``) batch by batch;
    ``sinks`` get every batch's ``(indices, images, labels)`` (the ``.npz`` and PNG
    writers)."""
    from ismctl.sampling.generate import iter_images

    size = chunk_size(batch_size)
    share = PointShare()
    todo: list[tuple[int, int, int]] = []
    for k, (start, stop) in enumerate(chunk_ranges(num, size)):
        if k % world != rank:
            continue
        found = _read_chunk(_chunk_path(folder, k))
        if found is None:
            todo.append((k, start, stop))
            continue
        share.features[k], share.labels[k], grid = found
        share.resumed += stop - start
        if k == 0:
            share.grid = grid
    if not todo:
        return share
    batches = [b for _, start, stop in todo for b in torch.arange(start, stop).split(batch_size)]
    owner = {int(b[0]): (k, stop) for k, start, stop in todo
             for b in torch.arange(start, stop).split(batch_size)}
    parts: list[dict[str, dict[str, np.ndarray]]] = []
    labels: list[np.ndarray] = []
    t = time.perf_counter()
    for indices, images, got in iter_images(run, num, pt.steps, pt.guidance, seed, batch_size,
                                            progress=progress, chunks=batches,
                                            sampler=pt.sampler):
        t1 = time.perf_counter()
        share.generate_s += t1 - t
        parts.append({key: extract_features(ext, iter_batches(images, fbatch), device)
                      for key, ext in extractors.items()})
        labels.append(got.numpy())
        k, stop = owner[int(indices[0])]
        if k == 0 and share.grid is None:
            share.grid = (images[:GRID_MAX].numpy(), got[:GRID_MAX].numpy())
        for sink in sinks or []:
            sink(indices.numpy(), images.numpy(), got.numpy())
        del images
        if int(indices[-1]) + 1 == stop:
            feats = {key: {layer: np.concatenate([p[key][layer] for p in parts])
                           for layer in parts[0][key]} for key in parts[0]}
            share.features[k], share.labels[k] = feats, np.concatenate(labels)
            _write_chunk(_chunk_path(folder, k), feats, share.labels[k],
                         share.grid if k == 0 else None)
            parts, labels = [], []
        t = time.perf_counter()
        share.features_s += t - t1
    return share


def merge_shares(shares: list[PointShare]) -> tuple[dict[str, dict[str, np.ndarray]],
                                                    np.ndarray]:
    """Every rank's chunks in sample order: the features of the whole set and its labels."""
    chunks = sorted((k, s) for s in shares for k in s.features)
    keys = chunks[0][1].features[chunks[0][0]]
    feats = {key: {layer: np.concatenate([s.features[k][key][layer] for k, s in chunks])
                   for layer in layers} for key, layers in keys.items()}
    return feats, np.concatenate([s.labels[k] for k, s in chunks])
