"""From a loaded run to decoded images: seeded noise, class-balanced labels, PNG grids.

Sample ``i`` of a request depends only on ``(seed, i)``: its label comes from one seeded
permutation of a class-balanced list and its noise from a stream keyed by the pair
(``ismctl.sampling.sampler.balanced_labels`` and ``sample_noise``).
So the images are the same whatever the batch size or the number of ranks sharing the work.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ismctl.data.encoders import load_encoder
from ismctl.objectives import sampling
from ismctl.runs.checkpoint import LoadedRun
from ismctl.sampling.sampler import balanced_labels, sample, sample_noise
from ismctl.utils.errors import UserError
from ismctl.utils.fileio import atomic_path
from ismctl.utils.progress import progress_bar


def generate_images(run: LoadedRun, num: int, steps: int, guidance: float, seed: int,
                    batch_size: int, labels: torch.Tensor | None = None, progress: bool = False,
                    rank: int = 0, world_size: int = 1,
                    sampler: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample and decode; returns uint8 images (n, H, W, C) and labels (n,) for this rank's
    share (indices ``rank::world_size``) of the ``num`` requested samples. ``sampler`` is a
    mode of :func:`ismctl.sampling.sampler.sample` (default: the run's own, ``run.mode``)."""
    _check_request(num, batch_size, steps, labels)
    indices = torch.arange(num)[rank::world_size]
    parts = list(iter_images(run, num, steps, guidance, seed, batch_size, labels, progress,
                             indices.split(batch_size), sampler))
    return torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])


def iter_images(run: LoadedRun, num: int, steps: int, guidance: float, seed: int,
                batch_size: int, labels: torch.Tensor | None = None, progress: bool = False,
                chunks: Sequence[torch.Tensor] | None = None, sampler: str | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(indices, uint8 images (n, H, W, C), labels)`` batch by batch, as they are made.

    ``chunks`` are the batches of sample indices to make (default: all ``num``, in batches
    of ``batch_size``); sample ``i`` is the same whichever batch it is made in."""
    _check_request(num, batch_size, steps, labels)
    man = run.manifest
    if labels is None:
        labels = balanced_labels(num, man.num_classes, seed)
    if chunks is None:
        chunks = torch.arange(num).split(batch_size)
    encoder = load_encoder(man.encoder, run.device, scale_factor=man.scale_factor)
    shape = (man.channels, man.latent_size, man.latent_size)
    autocast = torch.bfloat16 if run.device.type == "cuda" else None
    jumps = sampling(run.recipe).jumps
    with progress_bar(f"sampling {steps} step(s), w={guidance:g}",
                      total=sum(len(c) for c in chunks), enabled=progress, unit="img") as bar:
        for chunk in chunks:
            noise = sample_noise(chunk, shape, seed).to(run.device)
            x = sample(run.model, noise, labels[chunk].to(run.device), steps, guidance,
                       mode=sampler or run.mode, base_steps=run.recipe.objective.base_steps,
                       autocast_dtype=autocast, num_classes=man.num_classes, jumps=jumps)
            yield chunk, encoder.decode(x.float()).cpu(), labels[chunk]
            bar.advance(len(chunk))


def _check_request(num: int, batch_size: int, steps: int, labels: torch.Tensor | None) -> None:
    if num < 1 or batch_size < 1 or steps < 1:
        raise UserError(f"sampling {num} image(s) in batches of {batch_size} with {steps} "
                        "step(s): each must be at least 1")
    if labels is not None and len(labels) != num:
        raise UserError(f"{len(labels)} labels given for {num} images")


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile uint8 (N, H, W, C) images, ``nrow`` per grid row (default ceil(sqrt(N))), with a
    ``pad``-pixel white border (torchvision's make_grid; a single image gets no border and
    fewer than ``nrow`` images make a narrower grid, as there)."""
    # Imported here: torchvision's package import pulls in torch.compile's stack (about as
    # long as importing torch), which only a grid needs.
    from torchvision.utils import make_grid

    nrow = nrow or math.ceil(math.sqrt(len(images)))
    grid = make_grid(images.permute(0, 3, 1, 2), nrow=nrow, padding=pad, pad_value=255)
    # make_grid repeats a single channel three times; keep grey images grey.
    return np.ascontiguousarray(grid[: images.shape[-1]].permute(1, 2, 0).numpy())


def arrange_by_class(images: torch.Tensor, labels: torch.Tensor,
                     num_classes: int) -> tuple[torch.Tensor, int | None]:
    """Order a class-balanced set so each grid column holds one class (<= 16 classes);
    otherwise sort by label. Returns the images and the grid's row length. Every image is
    shown: where a class has fewer images than the others (19 images of 10 classes), its
    column ends in white cells, the colour of the grid's border."""
    if num_classes > 16 or len(labels.unique()) < num_classes:
        return images[torch.argsort(labels, stable=True)], None
    per_class = [images[labels == c] for c in range(num_classes)]
    rows = max(len(p) for p in per_class)
    grid = torch.full((rows, num_classes, *images.shape[1:]), 255, dtype=images.dtype)
    for c, column in enumerate(per_class):
        grid[: len(column), c] = column
    return grid.reshape(-1, *images.shape[1:]), num_classes


def grid_scale(width: int, height: int, min_side: int = 256) -> int:
    """The integer upscaling that brings a grid's longer side to at least ``min_side``."""
    return max(1, math.ceil(min_side / max(width, height)))


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None,
              min_side: int = 256, scale: int | None = None) -> None:
    """Write a PNG grid, each pixel ``scale`` x ``scale`` (nearest neighbours); by default
    tiny images (8x8 digits) are upscaled until the grid's longer side is ``min_side``."""
    grid = image_grid(images, nrow)
    pil = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    factor = grid_scale(pil.width, pil.height, min_side) if scale is None else scale
    if factor > 1:
        pil = pil.resize((pil.width * factor, pil.height * factor), Image.NEAREST)
    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG")
