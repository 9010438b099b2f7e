"""Sample sets written as they are made, so an interrupted job keeps what it made and the same
command run again continues it.

Sample ``i`` of a request depends only on the request and ``i`` (``ismctl.sampling.generate``), so a
set can be finished in any number of sittings. A sink records its request (checkpoint and
weights digest, steps, guidance, sampler, seed, count, labels) next to what it writes and, when
run again with the same request, makes only the samples still missing; another request
starts the set over.

- A folder of PNGs (``ismctl.sampling.pngdir``): each sample's file is written as soon as its
  batch is decoded; while the set is incomplete its request is kept in
  ``.ismctl-request.json`` inside the folder (removed when the set is complete, so the folder
  holds only samples).
- An ADM ``.npz``: batches go to ``<name>.npz.partial/`` as chunk files; when every sample is
  there, the ``.npz`` (``arr_0`` uint8 NHWC images, ``arr_1`` int64 labels, the format of
  the ADM evaluator) is assembled from the chunks one at a time, without holding the whole
  set in memory, written atomically, and the partial folder removed.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ismctl.sampling.pngdir import SAMPLE_NAME, clear_png_folder, write_png_folder
from ismctl.utils.errors import UserError
from ismctl.utils.fileio import atomic_path, atomic_write_text

REQUEST_NAME = ".ismctl-request.json"
PARTIAL_SUFFIX = ".partial"


def _same_request(path: Path, request: dict[str, Any]) -> bool:
    try:
        return json.loads(path.read_text()) == request
    except (OSError, ValueError):
        return False


def _normalised(request: dict[str, Any]) -> dict[str, Any]:
    # What a JSON round trip gives back, so a stored request compares equal to a fresh one.
    return json.loads(json.dumps(request))


def missing_runs(done: np.ndarray) -> list[np.ndarray]:
    """The indices not done, as runs of consecutive indices."""
    todo = np.flatnonzero(~done)
    if not len(todo):
        return []
    breaks = np.flatnonzero(np.diff(todo) != 1) + 1
    return np.split(todo, breaks)


class PngFolderSink:
    """One PNG per sample, written as made (see the module docstring)."""

    def __init__(self, folder: Path, request: dict[str, Any], num: int) -> None:
        self.folder, self.num = Path(folder), num
        self.request = _normalised(request)
        self.done = np.zeros(num, dtype=bool)
        marker = self.folder / REQUEST_NAME
        if self.folder.is_dir() and _same_request(marker, self.request):
            for path in self.folder.iterdir():
                m = SAMPLE_NAME.match(path.name)
                if m and int(m.group(1)) < num:
                    self.done[int(m.group(1))] = True
        else:
            # Another request's samples would mix with this one's: the set starts over.
            clear_png_folder(self.folder)
            atomic_write_text(marker, json.dumps(self.request, indent=1) + "\n")

    @property
    def kept(self) -> int:
        return int(self.done.sum())

    def write(self, indices: np.ndarray, images: np.ndarray, labels: np.ndarray) -> None:
        write_png_folder(self.folder, images, labels, indices, clear=False)
        self.done[indices] = True

    def finish(self) -> Path:
        # A finished folder holds its samples and nothing else, for the evaluators that read
        # image folders (a rerun of a finished set starts it over).
        (self.folder / REQUEST_NAME).unlink(missing_ok=True)
        return self.folder

    def where(self) -> Path:
        return self.folder


class NpzSink:
    """Chunks in ``<out>.partial/``, assembled into the ``.npz`` at the end."""

    def __init__(self, out: Path, request: dict[str, Any], num: int) -> None:
        self.out, self.num = Path(out), num
        self.request = _normalised(request)
        self.partial = self.out.with_name(self.out.name + PARTIAL_SUFFIX)
        self.done = np.zeros(num, dtype=bool)
        self.chunks: list[tuple[int, int, Path]] = []
        marker = self.partial / REQUEST_NAME
        if self.partial.is_dir() and _same_request(marker, self.request):
            for path in sorted(self.partial.glob("chunk-*.npz")):
                start, stop = (int(v) for v in path.stem.split("-")[1:3])
                if 0 <= start < stop <= num:
                    self.chunks.append((start, stop, path))
                    self.done[start:stop] = True
        else:
            shutil.rmtree(self.partial, ignore_errors=True)
            self.partial.mkdir(parents=True)
            atomic_write_text(marker, json.dumps(self.request, indent=1) + "\n")

    @property
    def kept(self) -> int:
        return int(self.done.sum())

    def where(self) -> Path:
        return self.partial

    def write(self, indices: np.ndarray, images: np.ndarray, labels: np.ndarray) -> None:
        start, stop = int(indices[0]), int(indices[-1]) + 1
        if stop - start != len(indices):
            raise ValueError("a chunk must hold consecutive sample indices")
        path = self.partial / f"chunk-{start:09d}-{stop:09d}.npz"
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, images=np.ascontiguousarray(images, dtype=np.uint8),
                     labels=np.asarray(labels, dtype=np.int64))
        self.chunks.append((start, stop, path))
        self.done[start:stop] = True

    def finish(self) -> Path:
        """Assemble the ``.npz`` from the chunks (which must cover every sample once)."""
        chunks = sorted(self.chunks)
        covered = 0
        for start, stop, _ in chunks:
            if start != covered:
                raise UserError(f"{self.partial}: chunks do not cover samples {covered}.."
                                f"{start - 1}; delete the folder and sample again")
            covered = stop
        if covered != self.num:
            raise UserError(f"{self.partial}: only {covered} of {self.num} samples written")
        first = np.load(chunks[0][2])["images"]
        shape = (self.num, *first.shape[1:])
        labels = np.empty(self.num, dtype=np.int64)
        with atomic_path(self.out) as tmp:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                with zf.open("arr_0.npy", "w", force_zip64=True) as fh:
                    np.lib.format.write_array_header_1_0(
                        fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                             "fortran_order": False, "shape": shape})
                    for start, stop, path in chunks:
                        with np.load(path) as chunk:
                            images = chunk["images"]
                            if images.shape[1:] != shape[1:]:
                                raise UserError(f"{path}: images of shape {images.shape[1:]}, "
                                                f"the others {shape[1:]}")
                            fh.write(np.ascontiguousarray(images).tobytes())
                            labels[start:stop] = chunk["labels"]
                with zf.open("arr_1.npy", "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, labels, allow_pickle=False)
        shutil.rmtree(self.partial, ignore_errors=True)
        return self.out


def open_sink(out: Path, request: dict[str, Any], num: int) -> PngFolderSink | NpzSink:
    if out.suffix == ".npz":
        return NpzSink(out, request, num)
    return PngFolderSink(out, request, num)


def decoded_shape(manifest: Any) -> tuple[int, int, int]:
    """(H, W, C) of a decoded sample: pixels for the identity encoder, RGB through a VAE."""
    from ismctl.data.encoders import IDENTITY

    channels = manifest.channels if manifest.encoder == IDENTITY else 3
    return manifest.resolution, manifest.resolution, channels


GRID_MIN_SIDE = 512


def write_samples(run: Any, out: Path, num: int, steps: int, point: Any, seed: int,
                  batch_size: int, class_: int | None = None, scale: int | None = None,
                  progress: bool = True) -> int:
    """Sample ``num`` images of ``run`` at ``point`` into ``out``: a ``.png`` grid (``scale``:
    pixels per image pixel, default enough for a 512-pixel grid), an ``.npz`` or a folder,
    the last two written as they are made and continued when interrupted. Checks first that
    the request fits. Returns how many samples were already there (a continued set)."""
    import torch

    from ismctl.sampling.fits import check_sample_request, grid_size
    from ismctl.sampling.generate import arrange_by_class, grid_scale, iter_images, save_grid
    from ismctl.system.preemption import Interrupted

    man = run.manifest
    image = decoded_shape(man)
    kind = "png" if out.suffix == ".png" else "npz" if out.suffix == ".npz" else "folder"
    balanced = class_ is None and man.num_classes <= 16 and num >= man.num_classes
    nrow = man.num_classes if balanced else None
    if kind == "png" and scale is None:
        scale = grid_scale(*grid_size(num, image[0], image[1], nrow), GRID_MIN_SIDE)
    latent = (man.channels, man.latent_size, man.latent_size)
    check_sample_request(out, kind, num, image, batch_size, latent, nrow, scale or 1)
    labels = None if class_ is None else torch.full((num,), class_, dtype=torch.long)
    if kind == "png":
        parts = list(iter_images(run, num, steps, point.guidance, seed, batch_size, labels,
                                 progress, sampler=point.sampler))
        images, got = torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])
        grid, nrow = arrange_by_class(images, got, man.num_classes)
        save_grid(grid, out, nrow=nrow, scale=scale)
        return 0
    request = {"checkpoint": str(Path(run.checkpoint).resolve()), "weights_sha256": run.sha256,
               "steps": steps, "guidance": point.guidance, "sampler": point.sampler,
               "seed": seed, "num_samples": num, "class": class_}
    sink = open_sink(out, request, num)
    before = sink.kept
    if before and progress:
        print(f"continuing: {before:,} of {num:,} samples already in {sink.where()}",
              flush=True)
    chunks = [c for run_ in missing_runs(sink.done)
              for c in torch.from_numpy(run_).split(batch_size)]
    try:
        if chunks:
            for indices, images, got in iter_images(run, num, steps, point.guidance, seed,
                                                    batch_size, labels, progress, chunks,
                                                    point.sampler):
                sink.write(indices.numpy(), images.numpy(), got.numpy())
    except KeyboardInterrupt:
        raise Interrupted(f"kept {sink.kept:,} of {num:,} samples in {sink.where()}; the same "
                          "command continues from there") from None
    sink.finish()
    return before
