"""Which samples each (rank, worker) reads in each epoch: pure arithmetic on shard counts.

An epoch is one pass over a seeded permutation of the shards (reshuffled every epoch from
``(seed, epoch)``, identical on every rank). Their samples, concatenated in that order, form
one virtual sequence; rank ``r`` takes the contiguous range ``[r * n_r, (r + 1) * n_r)`` with
``n_r = B * batch_size`` and ``B = count // (world_size * batch_size)`` batches, so every
rank yields exactly ``B`` batches per epoch however unevenly the shards are sized (DDP never
waits on a rank that ran out), and the leftover ``count mod (world_size * batch_size)``
samples, a different set each epoch, sit out that epoch.

Within a rank, the DataLoader takes batches from its workers in turn, so global batch ``g``
of the rank comes from worker ``g mod P``. Worker ``w`` therefore owns, in epoch ``e``, the
batches ``j`` in ``[0, B)`` with ``(e * B + j) mod P == w``; it reads a contiguous slice of the
rank's range holding exactly that many batches. Every epoch of the rank's stream is then
exactly one pass over its range, and any batch index maps to (epoch, worker, position)
arithmetically, which is what makes an exact resume cheap.

sOT pools: worker ``w``'s ``k``-th batch is the rank's batch ``w + k P`` (whatever the epoch),
and the worker pairs its batches ``[q K, (q + 1) K)`` as pool ``q``, with ``K`` =
``batches_per_pool``. Pools run on across epoch boundaries (a batch never does), so every
assignment covers exactly ``coupling.pool_size`` samples, on any number of ranks and workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ismctl.utils.errors import UserError

ORDER, SHUFFLE, LATENT, NOISE = range(4)


@dataclass(frozen=True)
class Segment:
    """Samples ``[start, stop)`` (positions in stored order) of shard ``shard``."""

    shard: int
    start: int
    stop: int


def mix_seed(*parts: int) -> int:
    """One 64-bit seed from several integers (any sign), via numpy's SeedSequence hashing, so
    nearby tuples such as (seed, rank, worker, epoch) give unrelated streams."""
    state = np.random.SeedSequence([p % 2**64 for p in parts]).generate_state(1, np.uint64)
    return int(state[0])


def batches_per_rank(count: int, world_size: int, batch_size: int) -> int:
    """``floor(count / world_size / batch_size)``; zero is an error (nothing to train on)."""
    batches = count // (world_size * batch_size)
    if batches < 1:
        raise UserError(f"{count} samples cannot fill one batch of {batch_size} on each of "
                        f"{world_size} rank(s): lower data.batch_size or prepare more data")
    return batches


def shard_order(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng(mix_seed(seed, epoch, ORDER)).permutation(num_shards)


def worker_batch_counts(batches: int, num_workers: int, epoch: int) -> list[int]:
    """Batches each of ``num_workers`` workers yields in ``epoch`` (they sum to ``batches``)."""
    offset = (epoch * batches) % num_workers
    base, extra = divmod(batches, num_workers)
    return [base + int((w - offset) % num_workers < extra) for w in range(num_workers)]


def locate(batch: int, batches: int, num_workers: int) -> tuple[int, int]:
    """(epoch, position among its worker's batches of that epoch) of a rank's batch index;
    the worker is ``batch % num_workers``."""
    epoch, j = divmod(batch, batches)
    # The worker's batches in this epoch are j0, j0 + P, ... with j0 < P, so j's rank among
    # them is j // P.
    return epoch, j // num_workers


def slice_segments(shard_counts: list[int], order: np.ndarray, start: int,
                   stop: int) -> list[Segment]:
    """The pieces of shards covering ``[start, stop)`` of the shards concatenated in ``order``."""
    segments = []
    offset = 0
    for shard in order.tolist():
        n = shard_counts[shard]
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            segments.append(Segment(shard, lo - offset, hi - offset))
        offset += n
        if offset >= stop:
            break
    return segments


def worker_segments(shard_counts: list[int], seed: int, epoch: int, rank: int, world_size: int,
                    worker: int, num_workers: int, batch_size: int) -> tuple[int, list[Segment]]:
    """(number of batches, segments to read) for one worker of one rank in one epoch."""
    batches = batches_per_rank(sum(shard_counts), world_size, batch_size)
    counts = worker_batch_counts(batches, num_workers, epoch)
    start = (rank * batches + sum(counts[:worker])) * batch_size
    stop = start + counts[worker] * batch_size
    order = shard_order(len(shard_counts), seed, epoch)
    return counts[worker], slice_segments(shard_counts, order, start, stop)


def batches_per_pool(pool_size: int, batch_size: int, where: str = "") -> int:
    """Batches a loader worker gathers per sOT pool of ``pool_size`` samples.

    ``pool_size / batch_size`` when the pool is a multiple of the batch; 1 when the pool is 0
    (independent pairing) or divides the batch (each batch then holds several assignments).
    Any other pair is an error: an assignment would straddle a batch that is already gone.
    ``where`` says where ``batch_size`` comes from, for the message.
    """
    if pool_size < 0 or batch_size < 1:
        raise UserError(f"pool_size={pool_size} and batch size {batch_size}: need "
                        "pool_size >= 0 and batch size >= 1")
    if pool_size == 0 or batch_size % pool_size == 0:
        return 1
    if pool_size % batch_size == 0:
        return pool_size // batch_size
    lower = (pool_size // batch_size) * batch_size
    upper = lower + batch_size
    options = f"{lower} or {upper}" if lower else f"{upper} or a divisor of {batch_size}"
    raise UserError(f"coupling.pool_size={pool_size} does not split into micro-batches of "
                    f"{batch_size} samples{where}: make it a multiple of {batch_size} (e.g. "
                    f"{options}) or change data.batch_size")


def pool_key(pool: int, epoch: int, batches: int, worker: int, num_workers: int,
             per_pool: int) -> tuple[int, int]:
    """(epoch, index among the pools that start in it) of worker ``worker``'s pool ``pool``,
    whose first batch lies in ``epoch``: the part of the pool's seed that says which pool."""
    # The worker's batches before the epoch: the g < epoch * batches with g = worker mod P.
    before = (epoch * batches - worker + num_workers - 1) // num_workers
    return epoch, pool - -(-before // per_pool)
