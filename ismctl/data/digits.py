"""The built-in dataset: scikit-learn's 1,797 8x8 handwritten digits (method §6).

Shipped inside the scikit-learn wheel, so no download. Pixel intensities 0..16 are mapped to
[-1, 1] by ``v / 8 - 1`` and stored as they are (identity encoder, one channel, no latent
noise: the posterior std is 0). Flips are never stored: a mirrored digit is not a digit.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

DIGITS_CLASSES = [str(i) for i in range(10)]
DIGITS_SIZE = 8


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Images float32 ``(1797, 1, 8, 8)`` in [-1, 1] and labels int64 ``(1797,)``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    return images, data.target.astype(np.int64)


class DigitsDataset(Dataset):
    """Item ``pos`` = digit ``order[pos]``: ``(pos, image (1, 8, 8) in [-1, 1], "")``."""

    def __init__(self, images: np.ndarray, order: np.ndarray) -> None:
        self.images, self.order = images, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, pos: int) -> tuple[int, torch.Tensor, str]:
        return pos, torch.from_numpy(self.images[int(self.order[pos])]), ""
