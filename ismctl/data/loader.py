"""The training loader: shards -> shuffle buffer -> latent draw -> sOT pairing, in workers.

Each worker streams its slice of the epoch (``plan.py``) through a seeded shuffle buffer,
gathers ``coupling.pool_size`` samples of its stream (``K = pool_size / batch_size`` batches,
across epoch boundaries when a pool straddles one), draws ``x1 = scale * (mean + std * eps)``
(or the flipped pair with probability 1/2) and pairs the pool with noise by the sOT coupler
(method §3.3), all off the training step's critical path. One assignment thus always covers
``pool_size`` samples, however many ranks, accumulation slots and workers share the data.
Every random choice comes from a generator seeded by ``(seed, rank, worker, epoch[, pool])``
(a pool belongs to the epoch of its first batch, ``pool`` counts the pools that start in that
epoch), so the stream depends only on ``(seed, rank, world_size, num_workers, batch_size,
pool_size)``.

Each batch comes with the statistics of the pool it was paired in (``coupling.STATS``: the
transport cost the assignment removed and a cheap estimate of the label leakage), which the
trainer logs.

Exact resume: ``start_batch = n`` locates batch ``n`` arithmetically (worker, its pool, that
pool's first epoch and position), skips earlier epochs without reading them, passes the
earlier samples of that epoch through the shuffle buffer undecoded, and draws latents and runs
the coupler only from the pool that holds batch ``n``. The DataLoader's worker slots are
rotated so that slot 0 serves batch ``n``.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ismctl.data.coupling import SOTCoupler
from ismctl.data.manifest import Manifest, read_manifest
from ismctl.data.plan import (
    LATENT,
    NOISE,
    SHUFFLE,
    Segment,
    batches_per_pool,
    batches_per_rank,
    locate,
    mix_seed,
    pool_key,
    worker_segments,
)
from ismctl.data.verify import check_shards_exist, decode, label, read_shard
from ismctl.system.preemption import ignore_stop_signals
from ismctl.utils.errors import UserError

Batch = tuple[Tensor, Tensor, Tensor, Tensor]
# The last line of a worker traceback that the DataLoader re-raises in the main process.
WORKER_USER_ERROR = re.compile(r"^Caught \w+ in DataLoader worker.*?^[\w.]*UserError: (.+?)\s*\Z",
                               re.DOTALL | re.MULTILINE)


def _generator(seed: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def shuffle_stream(items: Iterable[Any], count: int, buffer_size: int,
                   rng: np.random.Generator) -> Iterator[Any]:
    """A shuffle buffer over exactly ``count`` items: fill ``buffer_size`` slots, then emit a
    random slot and refill it with the next item; finally emit the rest in random order."""
    size = max(1, min(buffer_size, count))
    picks = rng.integers(0, size, size=max(count - size, 0))
    it = iter(items)
    buf = list(itertools.islice(it, size))
    for pick, item in zip(picks.tolist(), it, strict=False):
        yield buf[pick]
        buf[pick] = item
    for i in rng.permutation(len(buf)).tolist():
        yield buf[i]


# Data sets whose shards total less than this are held in memory by each worker after their
# first read (the built-in digits: a few hundred kB). Re-reading tar members and decoding the
# arrays every epoch costs ~40 ms of a ~140 ms quickstart step on one CPU core.
IN_MEMORY_BYTES = 256 * 2**20


def read_segments(root: Path, manifest: Manifest, segments: list[Segment],
                  cache: dict[int, list[dict]] | None = None) -> Iterator[dict]:
    """The raw samples of ``segments`` in order; with ``cache``, each shard is read from disk
    once and kept (the same samples, the same order)."""
    for seg in segments:
        if cache is None:
            samples = read_shard(root, manifest.shards[seg.shard])
        else:
            if seg.shard not in cache:
                cache[seg.shard] = list(read_shard(root, manifest.shards[seg.shard]))
            samples = iter(cache[seg.shard])
        yield from itertools.islice(samples, seg.start, seg.stop)


def fits_in_memory(root: Path, manifest: Manifest) -> bool:
    return sum((root / s.name).stat().st_size for s in manifest.shards) < IN_MEMORY_BYTES


def draw_latents(moments: Tensor, scale: float, flip: bool, gen: torch.Generator) -> Tensor:
    """``x1 = scale * (mean + std * eps)`` per sample; with ``flip`` and stored flipped moments,
    the flipped (mean, std) pair is used with probability 1/2. ``moments`` is (B, 2|4, C, h, w)."""
    moments = moments.float()
    eps = torch.randn(moments[:, 0].shape, generator=gen)
    mean, std = moments[:, 0], moments[:, 1]
    if flip and moments.shape[1] == 4:
        pick = (torch.rand(moments.shape[0], generator=gen) < 0.5).view(-1, 1, 1, 1)
        mean = torch.where(pick, moments[:, 2], mean)
        std = torch.where(pick, moments[:, 3], std)
    return scale * (mean + std * eps)


class PairedLatents(IterableDataset):
    """The per-worker stream of paired ``(x0, x1, y, stats)`` batches (see the module
    docstring)."""

    def __init__(self, root: Path, manifest: Manifest, batch_size: int, pool_size: int,
                 seed: int, rank: int, world_size: int, num_workers: int, shuffle_buffer: int,
                 flip: bool, start_batch: int, mode: str = "within_class",
                 min_group: int = 2) -> None:
        super().__init__()
        self.root, self.manifest = root, manifest
        self.batch_size, self.pool_size = batch_size, pool_size
        self.pool_batches = batches_per_pool(pool_size, batch_size)
        self.mode, self.min_group = mode, min_group
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers = max(1, num_workers)
        self.shuffle_buffer, self.flip, self.start_batch = shuffle_buffer, flip, start_batch
        self.shard_counts = [s.count for s in manifest.shards]
        self.batches = batches_per_rank(manifest.count, world_size, batch_size)
        # Per worker process (each gets its own copy of the dataset object): the raw shards and
        # the decoded arrays, for data sets small enough to hold.
        small = fits_in_memory(root, manifest)
        self._shards: dict[int, list[dict]] | None = {} if small else None
        self._decoded: dict[str, np.ndarray] | None = {} if small else None

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        slot = info.id if info is not None else 0
        return self.worker_stream(self.start_batch + slot)

    def worker_stream(self, first_batch: int) -> Iterator[Batch]:
        """Batches ``first_batch, first_batch + P, ...`` of this rank (one worker's share)."""
        workers, per_pool = self.num_workers, self.pool_batches
        worker, first = first_batch % workers, first_batch // workers
        pool = first // per_pool
        raw = self._raw_batches(worker, pool * per_pool)
        while True:
            batches = list(itertools.islice(raw, per_pool))
            key = (self.seed, self.rank, worker,
                   *pool_key(pool, batches[0][0], self.batches, worker, workers, per_pool))
            latent_gen = _generator(mix_seed(*key, LATENT))
            drawn = [self._batch(samples, latent_gen) for _, samples in batches]
            del batches  # a pool of encoded samples, not needed while pairing
            coupler = SOTCoupler(self.pool_size, generator=_generator(mix_seed(*key, NOISE)),
                                 mode=self.mode, min_group=self.min_group)
            for i, paired in enumerate(coupler(drawn)):
                if pool * per_pool + i >= first:
                    yield paired
            pool += 1

    def _raw_batches(self, worker: int, start: int) -> Iterator[tuple[int, list[dict]]]:
        """(epoch, raw samples) of this worker's batches ``start, start + 1, ...``."""
        epoch, position = locate(worker + start * self.num_workers, self.batches,
                                 self.num_workers)
        bs = self.batch_size
        while True:
            count, segments = worker_segments(
                self.shard_counts, self.seed, epoch, self.rank, self.world_size, worker,
                self.num_workers, bs)
            if position < count:
                rng = np.random.default_rng(mix_seed(self.seed, self.rank, worker, epoch, SHUFFLE))
                samples = shuffle_stream(
                    read_segments(self.root, self.manifest, segments, self._shards),
                    count * bs, self.shuffle_buffer, rng)
                # Earlier batches of the epoch only advance the shuffle buffer.
                for _ in itertools.islice(samples, position * bs):
                    pass
                for _ in range(position, count):
                    yield epoch, list(itertools.islice(samples, bs))
            epoch, position = epoch + 1, 0

    def _moments(self, sample: dict) -> np.ndarray:
        if self._decoded is None:
            return decode(sample)
        key = sample["__key__"]
        if key not in self._decoded:
            self._decoded[key] = decode(sample)
        return self._decoded[key]

    def _batch(self, raw: list[dict], gen: torch.Generator) -> tuple[Tensor, Tensor]:
        moments = torch.from_numpy(np.stack([self._moments(s) for s in raw]))
        if tuple(moments.shape[2:]) != self.manifest.sample_shape:
            raise UserError(f"{self.root}: shard samples have shape {tuple(moments.shape[2:])}, "
                            f"manifest.json says {self.manifest.sample_shape}")
        labels = torch.tensor([label(s) for s in raw], dtype=torch.long)
        return draw_latents(moments, self.manifest.scale_factor, self.flip, gen), labels


class TrainLoader:
    """Infinite stream of already-paired ``(x0, x1, y, stats)`` micro-batches for one rank.

    ``x0`` is noise matched to ``x1`` by the sOT coupler, one assignment per ``pool_size``
    samples (0: independent noise; ``mode``, ``min_group``: see ``coupling.pair_pool``), ``x1``
    a drawn latent times the scale factor, ``y`` long labels, ``stats`` the float32
    ``coupling.STATS`` of the batch's pool. ``pool_size`` must be a multiple or a divisor of
    ``batch_size`` (``plan.batches_per_pool``). ``num_workers=0`` runs everything in the
    calling process. ``start_batch=n`` continues exactly where a loader that already yielded
    ``n`` batches would be; every ``iter()`` starts again from there.

    Memory: a worker emits a whole pool at once, and the DataLoader keeps up to one pool of
    batches per worker in flight (``prefetch_factor`` = batches per pool), so besides the pool
    each worker is building, about ``num_workers x pool_size`` paired samples sit in shared
    memory: with 4x32x32 float32 latents (x0 and x1: 32 KiB per sample) and ``pool_size`` 8192,
    256 MiB per worker.
    """

    def __init__(self, path: str | Path, batch_size: int, pool_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 shuffle_buffer: int = 10_000, flip: bool = True, start_batch: int = 0,
                 mode: str = "within_class", min_group: int = 2) -> None:
        if batch_size < 1 or pool_size < 0 or num_workers < 0 or start_batch < 0:
            raise UserError(f"TrainLoader: invalid batch_size={batch_size}, pool_size="
                            f"{pool_size}, num_workers={num_workers} or "
                            f"start_batch={start_batch}")
        if not 0 <= rank < world_size:
            raise UserError(f"TrainLoader: rank {rank} outside world size {world_size}")
        per_pool = batches_per_pool(pool_size, batch_size)
        self.root = Path(path)
        self.manifest = read_manifest(self.root)
        check_shards_exist(self.root, self.manifest)
        self.batches_per_epoch = batches_per_rank(self.manifest.count, world_size, batch_size)
        self.dataset = PairedLatents(self.root, self.manifest, batch_size, pool_size, seed,
                                     rank, world_size, num_workers, shuffle_buffer,
                                     flip and self.manifest.flip, start_batch, mode, min_group)
        # Room for a pool of prefetched batches per worker: the DataLoader asks its workers
        # strictly in turn, so with less a worker would only start its next pool when the step
        # is about to need it, instead of while the rest of the current pools are consumed.
        self.loader = DataLoader(self.dataset, batch_size=None, num_workers=num_workers,
                                 persistent_workers=num_workers > 0,
                                 prefetch_factor=max(2, per_pool) if num_workers else None,
                                 worker_init_fn=ignore_stop_signals if num_workers else None)

    def __iter__(self) -> Iterator[Batch]:
        # The DataLoader's iterator is made now, not at the first batch: making it draws from
        # torch's CPU generator, which an exactly resumed run restores after its loaders start.
        return self._batches(iter(self.loader))

    def _batches(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        try:
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                except (UserError, RuntimeError) as exc:
                    found = WORKER_USER_ERROR.search(str(exc))
                    if found is None:
                        raise
                    # A UserError raised in a worker comes back wrapped in its traceback.
                    raise UserError(found.group(1).strip()) from None
                yield batch
        finally:
            del batches
            self.close()

    def close(self) -> None:
        """Stop the worker processes now. They ignore SIGTERM (see ``ismctl.system.preemption``),
        so left to the garbage collector they could outlive a failed run's interpreter,
        whose exit then waits for them forever; a later ``iter()`` starts new ones."""
        running = getattr(self.loader, "_iterator", None)
        if running is not None and hasattr(running, "_shutdown_workers"):
            running._shutdown_workers()
        self.loader._iterator = None


def iter_dataset(path: str | Path) -> Iterator[tuple[Tensor, int]]:
    """Every stored sample once, in stored order: (unscaled posterior mean (C, h, w) float32,
    label). The flipped copies are not included."""
    root = Path(path)
    manifest = read_manifest(root)
    for shard in manifest.shards:
        for sample in read_shard(root, shard):
            mean = torch.from_numpy(decode(sample)[0].astype(np.float32))
            yield mean, label(sample)
