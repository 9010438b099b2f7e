"""Whether a sampling request fits, checked before the first sample is made.

``sample`` and ``eval`` hold decoded images as uint8 (H x W x C bytes each); a PNG grid is
one image of them all; a folder of PNGs takes at least one filesystem block per file; an
ADM ``.npz`` is assembled from chunks (so the disk holds it twice for a moment). A request
whose estimate does not fit the memory available now, the free disk (and inodes) at the
output, or a sane grid size is refused in one line that says the sizes and what to do
instead, rather than after an hour of sampling, or never (the machine swapping to a halt).
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

from ismctl.utils.errors import UserError

# A grid beyond this many pixels is not something to look at (and image viewers and PIL's
# decompression-bomb check refuse ~90-180 MP): 8192 x 8192.
MAX_GRID_PIXELS = 8192 * 8192
# What a PNG holds besides its pixels (signature, IHDR, IDAT and IEND chunks).
PNG_OVERHEAD = 100
# Per sample and feature extractor, what evaluation keeps besides the image: Inception's
# 2048 pool features and 1008 logits in float32 (12 KB) with room to spare.
FEATURE_BYTES = 16 * 1024


def available_memory() -> int:
    """Bytes of memory available to a new allocation now (Linux MemAvailable, else the free
    pages, else unbounded)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**63


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} PB"


def _existing(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def grid_size(num: int, height: int, width: int, nrow: int | None, scale: int = 1,
              pad: int = 1) -> tuple[int, int]:
    """(width, height) in pixels of the PNG grid ``save_grid`` writes for ``num`` images."""
    cols = min(num, nrow or math.ceil(math.sqrt(num)))
    rows = math.ceil(num / cols)
    if num == 1:
        return width * scale, height * scale
    return ((cols * (width + pad) + pad) * scale, (rows * (height + pad) + pad) * scale)


def check_grid(out: Path, num: int, image: tuple[int, int, int], nrow: int | None,
               scale: int) -> None:
    h, w, _ = image
    gw, gh = grid_size(num, h, w, nrow, scale)
    if gw * gh > MAX_GRID_PIXELS:
        side = math.isqrt(MAX_GRID_PIXELS)
        raise UserError(f"--out {out}: a grid of {num:,} images of {w}x{h} at scale {scale} "
                        f"is {gw:,}x{gh:,} pixels, over the {side:,}x{side:,} a grid may have; "
                        "ask for fewer images or a smaller --scale, or write them to a folder "
                        "(--out DIR/) or an .npz file")


STREAM_HINT = ("ask for fewer samples, or write them to a folder (--out DIR/) or an .npz, "
               "which are written as they are made")


def check_memory(what: str, need: int, hint: str = STREAM_HINT) -> None:
    have = available_memory()
    if need > have:
        raise UserError(f"{what} needs about {human(need)} of memory, {human(have)} is "
                        f"available; {hint}")


def check_disk(out: Path, what: str, need: int, files: int = 0) -> None:
    where = _existing(out.parent if out.suffix else out)
    free = shutil.disk_usage(where).free
    if need > free:
        raise UserError(f"--out {out}: {what} needs about {human(need)} on disk, {where} has "
                        f"{human(free)} free; ask for fewer samples or write elsewhere")
    if files:
        stat = os.statvfs(where)
        if stat.f_files and files > stat.f_favail:
            raise UserError(f"--out {out}: {what} writes {files:,} files, the filesystem of "
                            f"{where} has room for {stat.f_favail:,} more; write an .npz "
                            "instead")


def check_sample_request(out: Path, kind: str, num: int, image: tuple[int, int, int],
                         batch_size: int, latent: tuple[int, int, int], nrow: int | None,
                         scale: int) -> None:
    """``ismctl sample``: ``kind`` is ``png`` (a grid), ``npz`` or ``folder``; ``image`` the
    decoded (H, W, C), ``latent`` what the network samples (C, h, w)."""
    per_image = math.prod(image)
    # One batch in flight: noise, state and network output in float32, and its images.
    batch = batch_size * (4 * 4 * math.prod(latent) + per_image)
    if kind == "png":
        check_grid(out, num, image, nrow, scale)
        # The images, the tiled grid and PIL's copy of it.
        gw, gh = grid_size(num, image[0], image[1], nrow, scale)
        check_memory(f"a grid of {num:,} images", num * per_image + 2 * gw * gh * image[2]
                     + batch)
        return
    check_memory(f"sampling in batches of {batch_size}", batch)
    if kind == "npz":
        # The chunks written as samples are made, then the .npz assembled from them.
        check_disk(out, f"an .npz of {num:,} images", 2 * num * (per_image + 8))
    else:
        block = os.statvfs(_existing(out)).f_frsize or 4096
        per_file = math.ceil((per_image + PNG_OVERHEAD) / block) * block
        check_disk(out, f"a folder of {num:,} PNGs", num * per_file, files=num)


def check_eval_request(num: int, world_size: int, image: tuple[int, int, int],
                       extractors: int, save_npz: bool, is_main: bool, batch_size: int = 1,
                       out: Path | None = None) -> None:
    """``ismctl eval``: each rank holds one batch of images at a time and the features of its
    share of a point; rank 0 gathers every rank's features. With ``--save-npz`` the images go
    to disk as they are made (twice, for a moment, while the file is assembled)."""
    per_image = math.prod(image)
    share = math.ceil(num / world_size)
    need = 2 * min(batch_size, share) * per_image + share * extractors * FEATURE_BYTES
    if is_main:
        need += num * extractors * FEATURE_BYTES
    check_memory(f"evaluating {num:,} samples of {image[1]}x{image[0]}x{image[2]} per point",
                 need, "lower --num-samples or --batch-size, or share them among more ranks "
                 "(torchrun)")
    if save_npz and out is not None and is_main:
        check_disk(out, f"an .npz of {num:,} images per point", 2 * num * (per_image + 8))
