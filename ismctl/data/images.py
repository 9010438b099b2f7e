"""Image folders: ImageFolder listing, robust RGB loading and the ADM centre crop.

Class indices are the sorted class-folder names (torchvision ``ImageFolder`` and ADM do the
same), so labels match every published ImageNet checkpoint and evaluator.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ismctl.utils.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def image_root(src: Path) -> Path:
    """The folder whose subfolders are the classes: ``src`` itself, or ``src/train`` when
    ``src`` is an ImageNet-style root holding a ``train`` split with class subfolders."""
    train = src / "train"
    if train.is_dir() and any(p.is_dir() for p in train.iterdir()):
        return train
    return src


def list_image_folder(root: Path) -> tuple[list[str], list[Path], list[int]]:
    """Classes (sorted folder names), image files and labels, in a fixed sorted order.

    Files are found recursively inside each class folder (following links, as torchvision
    does); hidden folders and files with other extensions are ignored.
    """
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{root}: no class subfolders (expected <class>/<image> files)")
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fname in sorted(filenames):
                if fname.lower().endswith(IMAGE_EXTENSIONS) and not fname.startswith("."):
                    files.append(Path(dirpath) / fname)
                    labels.append(label)
    if not files:
        raise UserError(f"{root}: no images found (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return classes, files, labels


def load_rgb(path: Path) -> Image.Image:
    """Open an image fully decoded and as RGB.

    Transparent images (RGBA, LA, PA, palette or RGB with a transparency key) are composited
    on white, as a viewer shows them; 16-bit and float grayscale are rescaled to 8 bits; every
    other mode (L, CMYK, YCbCr, ...) goes through PIL's own RGB conversion.
    """
    with Image.open(path) as im:
        # load() decodes every byte now, so a truncated file raises here, not later.
        im.load()
        if im.mode in _SIXTEEN_BIT_MODES:
            arr = np.asarray(im, dtype=np.float64)
            if arr.max(initial=0.0) > 255:
                arr = arr * (255.0 / 65535.0)
            return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8)).convert("RGB")
        if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return im.convert("RGB")


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop (guided-diffusion ``center_crop_arr``): halve with BOX filtering while
    the short side is at least ``2 * size`` (cheap anti-aliasing), BICUBIC-resize so the short
    side is exactly ``size``, then cut the central ``size x size`` square. Returns (H, W, C)."""
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    new_size = (round(image.width * scale), round(image.height * scale))
    image = image.resize(new_size, resample=Image.Resampling.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


class ImageFileDataset(Dataset):
    """Item ``pos`` = the file ``files[order[pos]]``, decoded and centre-cropped.

    Returns ``(pos, image, reason)``: ``image`` uint8 ``(3, size, size)``, or ``None`` with
    the reason when the file cannot be read (the caller lists it as skipped).
    """

    def __init__(self, files: list[Path], order: np.ndarray, size: int) -> None:
        self.files, self.order, self.size = files, order, size

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, pos: int) -> tuple[int, torch.Tensor | None, str]:
        path = self.files[int(self.order[pos])]
        try:
            arr = center_crop_arr(load_rgb(path), self.size)
        # Any decoder failure (truncated data, unknown format, decompression bomb, ...) means
        # "skip this file and say why"; one bad file must not stop a million-image job.
        except Exception as exc:
            return pos, None, f"{type(exc).__name__}: {exc}".splitlines()[0]
        return pos, torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))), ""
