"""Where reference images come from: an ADM ``.npz``, an image folder, or prepared shards.

Each source knows its size, a fingerprint of its content (part of the reference-statistics
cache key) and yields uint8 (B, H, W, C) batches with their global indices; under
``torchrun`` rank ``r`` takes the items with ``index % world_size == r``.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ismctl.evaluation.features import file_digest
from ismctl.evaluation.npz import read_npz
from ismctl.utils.errors import UserError

BUILTIN_DIGITS = "digits"
Batch = tuple[np.ndarray, np.ndarray]


class ImageSource(Protocol):
    description: str
    count: int

    def fingerprint(self) -> str: ...

    def batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[Batch]: ...


def _chunks(indices: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(indices), batch_size):
        yield indices[start : start + batch_size]


def _npz_length(path: Path, key: str) -> int:
    """Leading dimension of one array in an .npz, read from its header only."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if key not in data.files:
                raise UserError(f"{path}: no '{key}' images in this .npz")
            with data.zip.open(f"{key}.npy") as fh:
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    shape = np.lib.format.read_array_header_1_0(fh)[0]
                elif version == (2, 0):
                    shape = np.lib.format.read_array_header_2_0(fh)[0]
                else:
                    shape = data[key].shape
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path}: not a readable .npz file ({exc})") from exc
    return int(shape[0])


class NpzImages:
    """``arr_0`` of an ADM batch (read once, on first use)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = f"npz:{path}"
        self._images: np.ndarray | None = None
        self.count = _npz_length(path, "arr_0")

    def images(self) -> np.ndarray:
        if self._images is None:
            batch = read_npz(self.path)
            assert batch.images is not None
            self._images = batch.images
        return self._images

    def fingerprint(self) -> str:
        return file_digest(self.path)

    def batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        images = self.images()
        for idx in _chunks(np.arange(rank, self.count, world_size), batch_size):
            yield idx, images[idx]


class FolderImages:
    """Every image file under a folder (recursive, sorted), ADM-centre-cropped to the
    evaluation resolution (``ismctl.data.images.center_crop_arr``)."""

    def __init__(self, root: Path, resolution: int) -> None:
        from ismctl.data.images import IMAGE_EXTENSIONS

        self.root, self.resolution = root, resolution
        self.description = f"folder:{root}"
        files = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files += [Path(dirpath) / f for f in sorted(filenames)
                      if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
        if not files:
            raise UserError(f"reference {root}: no images found in this folder")
        self.files = files
        self.count = len(files)

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for path in self.files:
            stat = path.stat()
            digest.update(f"{path.relative_to(self.root)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    def _load(self, path: Path) -> np.ndarray:
        from ismctl.data.images import center_crop_arr, load_rgb

        try:
            return center_crop_arr(load_rgb(path), self.resolution)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            raise UserError(f"reference image {path}: cannot read it ({reason})") from exc

    def batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        for idx in _chunks(np.arange(rank, self.count, world_size), batch_size):
            yield idx, np.stack([self._load(self.files[i]) for i in idx])


class ShardImages:
    """The prepared dataset: stored posterior means decoded by the manifest's encoder."""

    def __init__(self, folder: Path, device: torch.device | str = "cpu") -> None:
        from ismctl.data.manifest import manifest_path, read_manifest

        self.folder, self.device = folder, torch.device(device)
        self.manifest_file = manifest_path(folder)
        self.manifest = read_manifest(folder)
        self.description = f"shards:{folder}"
        self.count = self.manifest.count

    def fingerprint(self) -> str:
        with open(self.manifest_file, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()

    def batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        from ismctl.data.encoders import load_encoder
        from ismctl.data.loader import iter_dataset

        man = self.manifest
        encoder = load_encoder(man.encoder, self.device, scale_factor=man.scale_factor)
        indices: list[int] = []
        latents: list[torch.Tensor] = []
        for i, (latent, _label) in enumerate(iter_dataset(self.folder)):
            if i % world_size != rank:
                continue
            indices.append(i)
            latents.append(torch.as_tensor(latent, dtype=torch.float32))
            if len(latents) == batch_size:
                yield np.asarray(indices), self._decode(encoder, latents)
                indices, latents = [], []
        if latents:
            yield np.asarray(indices), self._decode(encoder, latents)

    def _decode(self, encoder: object, latents: list[torch.Tensor]) -> np.ndarray:
        # Stored means are unscaled; decode() takes scaled latents, as the sampler makes them.
        scaled = torch.stack(latents) * self.manifest.scale_factor
        return encoder.decode(scaled).numpy()  # type: ignore[attr-defined]


class DigitsImages:
    """The built-in digits (scikit-learn's 1,797 images), the data ``prepare-latents digits``
    stores: used directly, so no prepared folder is needed to evaluate a digits run."""

    description = "builtin:digits"

    def __init__(self) -> None:
        from ismctl.evaluation.digits_classifier import digits_dataset

        self.images = digits_dataset()[0]
        self.count = len(self.images)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.images.tobytes()).hexdigest()

    def batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        for idx in _chunks(np.arange(rank, self.count, world_size), batch_size):
            yield idx, self.images[idx]


def open_source(ref: str | Path, resolution: int,
                device: torch.device | str = "cpu") -> ImageSource:
    """An ``.npz`` file, a prepared dataset folder (has ``manifest.json``), an image folder, or
    the word ``digits`` (the built-in dataset)."""
    path = Path(ref).expanduser()
    if str(ref) == BUILTIN_DIGITS and not path.exists():
        return DigitsImages()
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise UserError(f"reference {path}: expected an ADM .npz file, an image folder or "
                            "a prepared dataset folder (--ref)")
        return NpzImages(path)
    if path.is_dir():
        if (path / "manifest.json").is_file():
            return ShardImages(path, device)
        return FolderImages(path, resolution)
    raise UserError(f"reference {path}: not found (pass --ref: an ADM .npz, an image folder "
                    "or a prepared dataset folder)")
