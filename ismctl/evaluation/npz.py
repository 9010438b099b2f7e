"""ADM-compatible ``.npz`` files (method §6), the guided-diffusion evaluator's format.

- Sample batches: ``arr_0`` uint8 (N, H, W, C) images, ``arr_1`` int64 (N,) class labels.
- Reference batches (e.g. ADM's ``VIRTUAL_imagenet256_labeled.npz``): ``arr_0`` images and/or
  precomputed Inception pool3 statistics ``mu`` (2048,) and ``sigma`` (2048, 2048); ADM's
  files also hold spatial statistics ``mu_s``/``sigma_s``, which are not used here.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ismctl.utils.errors import UserError
from ismctl.utils.fileio import atomic_path


def write_samples_npz(path: str | Path, images: np.ndarray,
                      labels: np.ndarray | None = None) -> Path:
    """Write images (and labels) atomically as ``arr_0``/``arr_1``."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"samples must be uint8 (N, H, W, 1 or 3), got {images.dtype} {images.shape}"
        )
    arrays = {"arr_0": images}
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (len(images),):
            raise ValueError(f"labels must have shape ({len(images)},), got {labels.shape}")
        arrays["arr_1"] = labels
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        # A file handle, not a name: np.savez would append ".npz" to the temporary name.
        np.savez(fh, **arrays)
    return path


def write_stats_npz(path: str | Path, mu: np.ndarray, sigma: np.ndarray,
                    extractor: str | None = None) -> Path:
    """Write feature statistics as a reference batch (``mu``, ``sigma``); ``extractor`` names
    the feature extractor they belong to (files without it are taken as Inception pool3)."""
    arrays = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64)}
    if extractor is not None:
        arrays["extractor"] = np.asarray(extractor)
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    return path


@dataclass
class NpzBatch:
    """What an ADM ``.npz`` holds: images, labels and/or Inception statistics."""

    path: Path
    images: np.ndarray | None
    labels: np.ndarray | None
    mu: np.ndarray | None
    sigma: np.ndarray | None


def read_npz(path: str | Path, load_images: bool = True) -> NpzBatch:
    """Read an ADM sample or reference batch; bad files are a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: .npz file not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            images = data["arr_0"] if load_images and "arr_0" in keys else None
            labels = data["arr_1"].astype(np.int64) if "arr_1" in keys else None
            mu = data["mu"].astype(np.float64) if "mu" in keys else None
            sigma = data["sigma"].astype(np.float64) if "sigma" in keys else None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path}: not a readable .npz file ({exc})") from exc
    if "arr_0" not in keys and (mu is None or sigma is None):
        raise UserError(f"{path}: expected 'arr_0' images or 'mu'/'sigma' statistics, "
                        f"found {sorted(keys)}")
    if images is not None:
        _check_images(path, images)
    if (mu is None) != (sigma is None):
        raise UserError(f"{path}: has only one of 'mu' and 'sigma'")
    if mu is not None and (mu.ndim != 1 or sigma.shape != (len(mu), len(mu))):
        raise UserError(f"{path}: 'mu' {mu.shape} and 'sigma' {sigma.shape} do not match")
    return NpzBatch(path, images, labels, mu, sigma)


def _check_images(path: Path, images: np.ndarray) -> None:
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise UserError(
            f"{path}: 'arr_0' must be images (N, H, W, 1 or 3), got shape {images.shape}"
        )
    if images.dtype != np.uint8:
        raise UserError(f"{path}: 'arr_0' must be uint8, got {images.dtype}")
