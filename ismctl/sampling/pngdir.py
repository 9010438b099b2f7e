"""Samples as a folder of PNG files, one per sample, for evaluators that read image folders.

A file is named ``<index>_class<label>.png``: the sample's index in the request (zero-padded
to six digits, so names sort in sample order) and its class index. Each file is written
atomically, and under ``torchrun`` every rank writes its own samples under their global
indices, so a folder of 50K samples needs no gathering at all. Writing a sample set into a
folder first removes the sample files (and only those) of an earlier set there.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from ismctl.utils.fileio import atomic_path

SAMPLE_NAME = re.compile(r"^(\d+)_class(\d+)\.png$")


def is_png_folder(path: str | Path) -> bool:
    """An output path meant as a folder: an existing directory or a name without extension."""
    path = Path(path)
    return path.is_dir() or path.suffix == ""


def sample_file_name(index: int, label: int) -> str:
    return f"{index:06d}_class{label}.png"


def clear_png_folder(folder: str | Path) -> None:
    """Remove the sample files of an earlier set (other files are left alone)."""
    folder = Path(folder)
    if folder.is_dir():
        for path in folder.iterdir():
            if SAMPLE_NAME.match(path.name):
                path.unlink()


def write_png_folder(folder: str | Path, images: np.ndarray, labels: np.ndarray,
                     indices: np.ndarray | None = None, clear: bool = True) -> Path:
    """Write uint8 (N, H, W, 1|3) images as PNGs named by index (default 0..N-1) and label."""
    folder = Path(folder)
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"samples must be uint8 (N, H, W, 1 or 3), got {images.dtype} "
                         f"{images.shape}")
    indices = np.arange(len(images)) if indices is None else np.asarray(indices)
    if clear:
        clear_png_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for index, label, image in zip(indices.tolist(), np.asarray(labels).tolist(), images,
                                   strict=True):
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        with atomic_path(folder / sample_file_name(index, label)) as tmp:
            pil.save(tmp, format="PNG")
    return folder


def read_png_folder(folder: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The sample files of a folder in index order: uint8 (N, H, W, C) images and labels."""
    found = sorted((int(m.group(1)), int(m.group(2)), p) for p in Path(folder).iterdir()
                   if (m := SAMPLE_NAME.match(p.name)))
    images = [np.asarray(Image.open(p)) for _, _, p in found]
    images = [im[..., None] if im.ndim == 2 else im for im in images]
    return np.stack(images), np.asarray([label for _, label, _ in found], dtype=np.int64)
