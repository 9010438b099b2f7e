"""``ismctl prepare-latents``: encode a dataset once into webdataset shards (method §6).

Layout of the output folder::

    manifest.json          what `train` reads (manifest.py)
    prepare.json           the arguments and source listing the shards were made from
    shard-000000.tar ...   webdataset shards (shards.py)
    records/shard-000000.tar.json   per-shard count, checksum and skipped files

Samples are a fixed random permutation of the sorted source list, cut into shards of
``shard_size``: ImageFolder listings are sorted by class, and a shuffle buffer at training
time could not undo class-sorted shards. Shard ``i`` is written by rank ``i mod world_size``
(under ``torchrun`` each GPU encodes its own shards); rank 0 merges the per-shard records into
the manifest after a barrier. A shard counts as done when its record exists and the tar's
checksum matches it, so an interrupted run is resumed by running the same command again
(even on a different number of GPUs), and a rerun of a finished one writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from ismctl.data.digits import DIGITS_CLASSES, DIGITS_SIZE, DigitsDataset, load_digits_arrays
from ismctl.data.encoders import IDENTITY, Encoder, IdentityEncoder, load_encoder
from ismctl.data.images import ImageFileDataset, image_root, list_image_folder
from ismctl.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, read_manifest, write_manifest
from ismctl.data.shards import encode_sample, sample_key, sha256_file, write_shard
from ismctl.system.distributed import (
    DistInfo,
    barrier,
    init_distributed,
    rank_failed,
    shutdown,
)
from ismctl.utils.errors import UserError
from ismctl.utils.fileio import atomic_write_text
from ismctl.utils.progress import progress_bar

DATA_ROOT = Path("data")
FINGERPRINT_NAME = "prepare.json"
RECORDS_DIR = "records"
PERMUTATION_SEED = 20251024
FORMAT_VERSION = 1


@dataclass
class Source:
    """A dataset to encode: items in a fixed sorted order with labels and display names."""

    kind: str
    default_name: str
    class_names: list[str]
    labels: list[int]
    names: list[str]
    image_channels: int
    resolution: int
    listing: list[str]
    make_dataset: Callable[[np.ndarray], Dataset]

    def listing_sha256(self) -> str:
        digest = hashlib.sha256()
        for name, label in zip(self.listing, self.labels, strict=True):
            digest.update(f"{label}\t{name}\n".encode())
        return digest.hexdigest()


def open_source(src: str, resolution: int) -> Source:
    """``digits`` (the built-in dataset) or an ImageFolder root."""
    if src == "digits":
        images, labels = load_digits_arrays()
        return Source(kind="digits", default_name="digits", class_names=list(DIGITS_CLASSES),
                      labels=labels.tolist(), names=[f"digits[{i}]" for i in range(len(labels))],
                      image_channels=1, resolution=DIGITS_SIZE,
                      listing=[str(i) for i in range(len(labels))],
                      make_dataset=lambda order: DigitsDataset(images, order))
    path = Path(src).expanduser()
    if not path.exists():
        raise UserError(f"{src}: not found (expected an ImageFolder root or 'digits')")
    if not path.is_dir():
        raise UserError(f"{src}: not a folder (expected an ImageFolder root or 'digits')")
    root = image_root(path)
    class_names, files, labels = list_image_folder(root)
    resolved = root.resolve()
    # `imagenet/train` is named after its dataset, not after its split.
    name = resolved.parent.name if resolved.name == "train" else resolved.name
    return Source(kind="imagefolder", default_name=f"{name}-{resolution}",
                  class_names=class_names, labels=labels, names=[str(f.resolve()) for f in files],
                  image_channels=3, resolution=resolution,
                  listing=[f.relative_to(root).as_posix() for f in files],
                  make_dataset=lambda order: ImageFileDataset(files, order, resolution))


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def _record_path(out: Path, index: int) -> Path:
    return out / RECORDS_DIR / f"{shard_name(index)}.json"


def read_record(out: Path, index: int, verify: bool) -> dict[str, Any] | None:
    """The record of a finished shard, or None when the shard must be (re)written.

    ``verify`` recomputes the tar's sha256 (used when deciding to skip a shard on a rerun).
    """
    path = _record_path(out, index)
    tar = out / shard_name(index)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not tar.is_file() or tar.stat().st_size != record.get("size"):
        return None
    if verify and sha256_file(tar) != record.get("sha256"):
        return None
    return record


def _check_fingerprint(out: Path, fingerprint: dict[str, Any]) -> bool:
    """Whether ``out`` already holds this preparation; UserError when it holds another one."""
    file = out / FINGERPRINT_NAME
    if not file.is_file():
        if (out / MANIFEST_NAME).is_file():
            raise UserError(f"{out}: holds a {MANIFEST_NAME} not written by prepare-latents; "
                            "choose another --out")
        return False
    try:
        old = json.loads(file.read_text())
    except ValueError as exc:
        raise UserError(f"{file}: corrupt; delete the folder {out} and rerun") from exc
    for key, value in fingerprint.items():
        if old.get(key) != value:
            shown = "the file list" if key == "listing_sha256" else key
            raise UserError(f"{out}: already prepared with {shown}={old.get(key)!r}, this run "
                            f"asks {value!r} — choose another --out or delete the folder")
    return True


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary files left by a killed run (atomic writes name them ``.<file>.<random>.tmp``);
    called before any rank starts writing."""
    for pattern in (".shard-*.tmp", f"{RECORDS_DIR}/.shard-*.tmp"):
        for path in out.glob(pattern):
            path.unlink(missing_ok=True)


def default_workers(most: int = 4) -> int:
    """Image-decoding workers by default: 4, or fewer on a machine with fewer cores (on 2
    cores, 4 decoders only take turns with the encoder they feed)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(most, cores))


def _check_args(resolution: int, batch_size: int, shard_size: int, num_workers: int) -> None:
    for flag, value, low in (("--resolution", resolution, 1), ("--batch-size", batch_size, 1),
                             ("--shard-size", shard_size, 1), ("--num-workers", num_workers, 0)):
        if value < low:
            raise UserError(f"{flag} {value}: must be at least {low}")


def _collate_list(batch: list[Any]) -> list[Any]:
    return batch


class _ShardEncoder:
    """Turns decoded-image batches into shard samples: [mean, std(, mean_flip, std_flip)]."""

    def __init__(self, source: Source, encoder: Encoder, order: np.ndarray, flip: bool) -> None:
        self.source, self.encoder, self.order, self.flip = source, encoder, order, flip

    def samples(self, batch: list[tuple[int, torch.Tensor | None, str]],
                skipped: list[dict[str, str]]) -> Iterator[dict[str, str | bytes]]:
        good = []
        for pos, image, reason in batch:
            if image is None:
                skipped.append({"path": self.source.names[int(self.order[pos])], "reason": reason})
            else:
                good.append((pos, image))
        if not good:
            return
        x = torch.stack([image for _, image in good])
        x = x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float()
        n = len(good)
        if self.flip:
            x = torch.cat([x, x.flip(-1)])
        mean, std = self.encoder.encode(x)
        parts = [mean[:n], std[:n], mean[n:], std[n:]] if self.flip else [mean, std]
        moments = torch.stack(parts, dim=1).numpy()
        for row, (pos, _) in enumerate(good):
            index = int(self.order[pos])
            yield encode_sample(sample_key(index), moments[row], self.source.labels[index])


def _encode_shards(out: Path, source: Source, encoder: Encoder, order: np.ndarray,
                   pending: list[int], shard_size: int, batch_size: int, flip: bool,
                   num_workers: int, show: bool) -> None:
    n = len(order)
    ranges = {i: (i * shard_size, min(n, (i + 1) * shard_size)) for i in pending}
    # Batches never straddle shards, so each shard's tar is written from its own batches.
    batch_lists = [list(range(lo, min(lo + batch_size, hi)))
                   for lo0, hi in ranges.values() for lo in range(lo0, hi, batch_size)]
    workers = 0 if source.kind == "digits" else num_workers
    loader = DataLoader(source.make_dataset(order), batch_sampler=batch_lists,
                        num_workers=workers, collate_fn=_collate_list,
                        prefetch_factor=4 if workers else None)
    batches = iter(loader)
    coder = _ShardEncoder(source, encoder, order, flip)
    total = sum(hi - lo for lo, hi in ranges.values())
    with progress_bar("encoding", total=total, enabled=show, unit="img") as bar:
        for index in pending:
            lo, hi = ranges[index]
            skipped: list[dict[str, str]] = []

            def shard_samples(lo: int = lo, hi: int = hi,
                              skipped: list[dict[str, str]] = skipped) -> Iterator[dict]:
                done = lo
                while done < hi:
                    batch = next(batches)
                    done += len(batch)
                    yield from coder.samples(batch, skipped)
                    bar.advance(len(batch))

            tar = out / shard_name(index)
            count = write_shard(tar, shard_samples())
            record = {"name": tar.name, "count": count, "sha256": sha256_file(tar),
                      "size": tar.stat().st_size, "skipped": skipped}
            atomic_write_text(_record_path(out, index), json.dumps(record, indent=1) + "\n")


def prepare_latents(src: str, out: str | Path | None = None, resolution: int = 256,
                    vae: str = "stabilityai/sd-vae-ft-mse", batch_size: int = 32,
                    shard_size: int = 1000, flip: bool = True, device: str = "auto",
                    num_workers: int = 4, progress: bool = True) -> Manifest:
    """Encode ``src`` (an ImageFolder root or ``digits``) into shards + ``manifest.json``.

    Images are converted to RGB (transparency composited on white), ADM-centre-cropped to
    ``resolution`` and encoded with the VAE; the posterior mean and std of the image and, with
    ``flip``, of its mirror image are stored in float16. ``digits`` ignores ``resolution``,
    ``vae`` and ``flip``: 8x8 pixels, identity encoder, no flips. Unreadable images are
    skipped and listed in the manifest. Default ``out``: ``data/digits`` or
    ``data/<folder>-<resolution>``.
    """
    _check_args(resolution, batch_size, shard_size, num_workers)
    source = open_source(src, resolution)
    out_dir = Path(out) if out is not None else DATA_ROOT / source.default_name
    owns_group = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(device)
    try:
        return _prepare(source, out_dir, vae, batch_size, shard_size, flip, num_workers,
                        progress, info)
    except BaseException as exc:
        if owns_group:
            rank_failed(exc)
        raise
    finally:
        if owns_group:
            shutdown()


def _prepare(source: Source, out: Path, vae: str, batch_size: int, shard_size: int, flip: bool,
             num_workers: int, progress: bool, info: DistInfo) -> Manifest:
    encoder: Encoder = IdentityEncoder() if source.kind == "digits" else load_encoder(
        vae, info.device)
    flip = flip and source.kind != "digits"
    channels, latent_size = encoder.latent_shape(source.image_channels, source.resolution)
    fingerprint = {"format": FORMAT_VERSION, "source": source.kind,
                   "resolution": source.resolution,
                   "vae": IDENTITY if source.kind == "digits" else encoder.name, "flip": flip,
                   "shard_size": shard_size, "count": len(source.labels),
                   "listing_sha256": source.listing_sha256()}
    known = _check_fingerprint(out, fingerprint)
    barrier()
    if info.is_main:
        if not known:
            atomic_write_text(out / FINGERPRINT_NAME, json.dumps(fingerprint, indent=1) + "\n")
        _remove_stale_temporaries(out)
    barrier()

    n = len(source.labels)
    order = np.random.default_rng(PERMUTATION_SEED).permutation(n)
    num_shards = math.ceil(n / shard_size)
    mine = range(info.rank, num_shards, info.world_size)
    pending = [i for i in mine if read_record(out, i, verify=True) is None]
    if pending:
        _encode_shards(out, source, encoder, order, pending, shard_size, batch_size, flip,
                       num_workers, progress and info.is_main)
    barrier()
    if info.is_main:
        records = [read_record(out, i, verify=False) for i in range(num_shards)]
        missing = [shard_name(i) for i, r in enumerate(records) if r is None]
        if missing:
            raise RuntimeError(f"{out}: shards missing after encoding: {', '.join(missing[:5])}")
        manifest = Manifest(
            count=sum(r["count"] for r in records), num_classes=len(source.class_names),
            class_names=source.class_names, encoder=fingerprint["vae"],
            scale_factor=encoder.scale_factor, resolution=source.resolution, channels=channels,
            latent_size=latent_size, flip=flip,
            shards=[ShardInfo(name=r["name"], count=r["count"], sha256=r["sha256"])
                    for r in records],
            skipped=[s for r in records for s in r["skipped"]])
        write_manifest(out, manifest)
    barrier()
    return read_manifest(out)
