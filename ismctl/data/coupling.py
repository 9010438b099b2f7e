"""Scaling optimal transport (sOT, method §3.3): pair noise with data by an exact assignment.

The coupler gathers ``K`` batches into a pool of ``K * B`` noise/data pairs, solves one
linear assignment on the squared Euclidean cost, and splits the pool back into its ``K``
batches: every batch keeps its data and labels in order and receives the noise matched to
them. ``K = 1`` is minibatch OT (Tong et al. 2023), ``K = 0`` independent pairing. The
assignment is a permutation (each noise sample used exactly once), unlike sampling from a
transport plan.

Class-conditional data: an assignment over the whole pool lets the matched noise carry the
class (noise near a "1" goes to a "1"), so the network can read the class off ``x0`` and
learns to ignore the label (method §3.3). ``within_class`` (the default of the recipes) solves
one assignment per class instead: the data of class ``c`` is matched with the noise drawn in
the same slots, so the noise a class receives is still i.i.d. N(0, I) and independent of the
label, while each class's paths are straightened as before. With many classes and small pools
most classes have one or two rows in a pool and get almost no OT; ``hybrid`` pairs the classes
with at least ``min_group`` rows within class and all other rows in one label-blind
assignment. ``coupling_stats`` measures, per pool, how much each choice straightens the paths
and how much label it leaks into the noise (docs/sot_at_scale.md).

Solving a pool of ``n`` pairs costs up to ``O(n^3)`` on the CPU (method §3.3: seconds at
n = 4096; the ``lapjv`` solver is 2-7x faster than scipy's at 4,096-8,192 pairs), so the
coupler runs in data-loader worker processes, off the training step: plain torch on the CPU
plus scipy or ``lap``, and a picklable object holding no lambdas.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

Triple = tuple[Tensor, Tensor, Tensor]


def squared_distances(x1: Tensor, x0: Tensor, gram_dtype: torch.dtype = torch.float64) -> Tensor:
    """(n, m) float64 matrix of ``||x1[i] - x0[j]||^2`` over the flattened samples.

    ``||a||^2 + ||b||^2 - 2 a.b`` needs one matrix product instead of an (n, m, d) tensor;
    float64 keeps the cancellation in it far below any cost gap the solver acts on. A float32
    ``gram_dtype`` halves the time of the product (the bulk of the work at 8,192 x 4,096) for
    a rounding error of about ``sqrt(d) * 6e-8`` per entry, against entries of order ``d``.
    """
    a = x1.detach().reshape(x1.shape[0], -1).to(device="cpu")
    b = x0.detach().reshape(x0.shape[0], -1).to(device="cpu")
    gram = (a.to(gram_dtype) @ b.to(gram_dtype).T).to(torch.float64)
    a, b = a.to(torch.float64), b.to(torch.float64)
    cost = a.square().sum(1)[:, None] + b.square().sum(1)[None, :] - 2.0 * gram
    return cost.clamp_min_(0.0)


SOLVERS = ("scipy", "lapjv")


def ot_assignment(x0: Tensor, x1: Tensor, solver: str = "scipy") -> Tensor:
    """Permutation ``perm`` (n,) long minimising ``sum_i ||x0[perm[i]] - x1[i]||^2``.

    Rows are data, columns noise, so the column chosen for row ``i`` is the noise index paired
    with ``x1[i]``. ``solver``: ``scipy`` (``scipy.optimize.linear_sum_assignment`` on the
    float64 cost, the reference) or ``lapjv`` (the Jonker-Volgenant solver of the ``lap``
    package on a cost whose Gram term is computed in float32 for float32 inputs: exact up to
    that rounding, and 2-7x faster at 4,096-8,192 pairs; see docs/sot_at_scale.md).
    """
    if solver not in SOLVERS:
        raise ValueError(f"assignment solver must be one of {SOLVERS}, got {solver!r}")
    if x0.shape != x1.shape:
        raise ValueError(f"noise {tuple(x0.shape)} and data {tuple(x1.shape)} differ in shape")
    n = x0.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    if solver == "scipy":
        rows, cols = linear_sum_assignment(squared_distances(x1, x0).numpy())
        perm = torch.empty(len(rows), dtype=torch.long)
        perm[torch.from_numpy(rows)] = torch.from_numpy(cols).long()
        return perm
    import lap

    gram_dtype = torch.float64 if torch.float64 in (x0.dtype, x1.dtype) else torch.float32
    cost = squared_distances(x1, x0, gram_dtype).numpy()
    if n == 1:
        return torch.zeros(1, dtype=torch.long)
    _, cols, _ = lap.lapjv(cost, extend_cost=False)
    return torch.from_numpy(cols).long()


MODES = ("blind", "within_class", "hybrid")


def _groups(labels: Tensor, mode: str, min_group: int) -> list[Tensor]:
    """Row-index groups that each get one assignment (method §3.3) for the label-aware modes
    (``blind`` is one assignment over the pool); together they cover the pool."""
    _, inverse, counts = labels.unique(return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    groups = list(order.split(counts.tolist()))
    if mode == "within_class":
        return groups
    # hybrid: classes too small to straighten their own paths are paired label-blind together.
    big = [g for g in groups if len(g) >= min_group]
    rest = [g for g in groups if len(g) < min_group]
    return big + ([torch.cat(rest).sort().values] if rest else [])


def pair_pool(x0: Tensor, x1: Tensor, y: Tensor | None = None, *, mode: str = "within_class",
              min_group: int = 2, solver: str = "scipy") -> Tensor:
    """``x0`` reordered so that ``x0_out[i]`` is the noise matched to ``x1[i]``.

    ``mode`` (ignored without labels ``y``, which means one label-blind assignment):

    - ``blind``: one assignment over the whole pool, labels ignored (the paper's sOT).
    - ``within_class``: one assignment per class; rows of class ``c`` only exchange noise among
      themselves, so the noise a class receives is the i.i.d. noise drawn in its slots and
      keeps no trace of the label. A class alone in the pool keeps its drawn noise.
    - ``hybrid``: within class for the classes with at least ``min_group`` rows in the pool;
      the rows of all smaller classes share one label-blind assignment, so with many classes
      and small pools most rows still get straightened paths, at the price of a label trace
      in the noise of those rows.

    ``solver`` picks the assignment solver of every group (see ``ot_assignment``).
    """
    if mode not in MODES:
        raise ValueError(f"coupling mode must be one of {MODES}, got {mode!r}")
    if min_group < 1:
        raise ValueError(f"min_group must be >= 1, got {min_group}")
    if x0.shape != x1.shape:
        raise ValueError(f"noise {tuple(x0.shape)} and data {tuple(x1.shape)} differ in shape")
    if y is None or mode == "blind":
        return x0[ot_assignment(x0, x1, solver).to(x0.device)]
    perm = torch.arange(x0.shape[0])
    for rows in _groups(y.detach().cpu(), mode, min_group):
        if len(rows) > 1:
            sub0, sub1 = x0[rows.to(x0.device)], x1[rows.to(x1.device)]
            perm[rows] = rows[ot_assignment(sub0, sub1, solver)]
    return x0[perm.to(x0.device)]


def coupling_stats(x0_drawn: Tensor, x0_matched: Tensor, x1: Tensor,
                   y: Tensor) -> dict[str, float]:
    """How much a pool's coupling straightens the paths, and how much it tells about the label.

    ``cost_reduction = 1 - sum_i ||x0_matched[i] - x1[i]||^2 / sum_i ||x0_drawn[i] - x1[i]||^2``:
    the share of the independent pairing's transport cost that the assignment removes (0 for
    independent pairing; straighter paths as it grows).

    ``leakage``: the pooled within-class correlation of the matched noise,

        sum_c sum_{i != j in c} <z_i, z_j> / (d * #{(i, j): i != j, y_i = y_j}),

    computed from the class sums ``S_c`` as ``(||S_c||^2 - sum_{i in c} ||z_i||^2)``, O(n d).
    Its expectation is ``E_c ||E[z | c]||^2 / d`` (the pair-weighted mean over classes), the
    share of the unit noise variance that the class explains: the signal a linear probe on the
    noise uses, in the units of the data's between-class share. For noise that is independent
    of the labels and zero-mean, every term has mean 0, so the statistic is exactly unbiased
    whatever the pool size and number of classes (its spread is about
    ``1 / sqrt(d * pairs)``). A within-class assignment only permutes noise inside each class,
    which leaves ``S_c`` and the norms unchanged: its leakage equals the drawn noise's (up to
    float rounding).
    Classes with one row in the pool contribute no pair, so leakage carried only by
    singletons (e.g. ``hybrid`` with ``min_group=2``) is not seen within one pool.
    """
    # Row dot products in the inputs' precision, no (n, d) temporaries (memory-bound: about
    # 0.1-0.3 s at 8,192 x 4,096 float32); per-row values summed in float64, since the cross
    # term is a small difference of two sums of order n * d.
    work = torch.float64 if torch.float64 in (x0_matched.dtype, x1.dtype) else torch.float32
    z = x0_matched.detach().reshape(x0_matched.shape[0], -1).to("cpu", work)
    drawn = x0_drawn.detach().reshape(z.shape).to("cpu", work)
    data = x1.detach().reshape(z.shape).to("cpu", work)

    def rowdot(a: Tensor, b: Tensor) -> Tensor:
        return torch.einsum("nd,nd->n", a, b).double()

    zz, xx = rowdot(z, z), rowdot(data, data)
    independent = (rowdot(drawn, drawn) + xx - 2 * rowdot(drawn, data)).sum()
    matched = (zz + xx - 2 * rowdot(z, data)).sum()
    cost_reduction = float(1.0 - matched / independent) if independent > 0 else 0.0
    _, inverse, counts = y.detach().cpu().unique(return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), z.shape[1], dtype=work).index_add_(0, inverse, z)
    norms = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inverse, zz)
    pairs = float((counts * (counts - 1)).sum())
    cross = float((rowdot(sums, sums) - norms).sum())
    leakage = cross / (z.shape[1] * pairs) if pairs > 0 else 0.0
    return {"cost_reduction": cost_reduction, "leakage": leakage}


# The statistics every paired batch carries: ``coupling_stats`` of its pool, in this order.
STATS = ("cost_reduction", "leakage")
Paired = tuple[Tensor, Tensor, Tensor, Tensor]


class SOTCoupler:
    """Turn ``(x1, y)`` batches into ``(x0, x1, y, stats)`` batches with pooled OT noise.

    ``pool_size``: samples per assignment; 0 pairs independently. Batches are gathered until
    they hold ``pool_size`` samples, that pool is paired by ``pair_pool`` (``mode``,
    ``min_group``) and split back into its batches, which keep their data and labels in order.
    A batch larger than the pool is paired in consecutive pieces of ``pool_size``; other sizes
    must tile the pool. A trailing pool cut short by the end of the data is still paired.
    Noise is standard normal, drawn batch by batch from ``generator`` (the global torch RNG when
    None) in the batches' shape, so the drawn noise does not depend on the pool; only its
    pairing does.

    ``stats`` (float32, one entry per name in ``STATS``) is the mean over the batch's rows of
    ``coupling_stats`` of the assignment each row belongs to; zeros for independent pairing.
    """

    def __init__(self, pool_size: int, generator: torch.Generator | None = None,
                 mode: str = "within_class", min_group: int = 2) -> None:
        if pool_size < 0:
            raise ValueError(f"pool_size must be >= 0, got {pool_size}")
        if mode not in MODES:
            raise ValueError(f"coupling mode must be one of {MODES}, got {mode!r}")
        self.pool_size, self.generator = pool_size, generator
        self.mode, self.min_group = mode, min_group

    def noise_like(self, x1: Tensor) -> Tensor:
        noise = torch.randn(x1.shape, generator=self.generator, dtype=torch.float32)
        return noise.to(device=x1.device, dtype=x1.dtype)

    def __call__(self, batches: Iterable[tuple[Tensor, Tensor]]) -> Iterator[Paired]:
        pool: list[tuple[Tensor, Tensor, Tensor]] = []
        held = 0
        for x1, y in batches:
            pool.append((self.noise_like(x1), x1, y))
            held += x1.shape[0]
            if held >= max(self.pool_size, 1):
                yield from self._pair(pool)
                pool, held = [], 0
        if pool:
            yield from self._pair(pool)

    def _pair(self, pool: list[tuple[Tensor, Tensor, Tensor]]) -> Iterator[Paired]:
        if self.pool_size == 0:
            for x0, x1, y in pool:
                yield x0, x1, y, torch.zeros(len(STATS))
            return
        sizes = [x1.shape[0] for _, x1, _ in pool]
        noise = torch.cat([x0 for x0, _, _ in pool])
        data = torch.cat([x1 for _, x1, _ in pool])
        labels = torch.cat([y for _, _, y in pool])
        n, size = len(data), self.pool_size
        if n > size and n % size:
            raise ValueError(f"batches of {sizes[-1]} samples do not tile a pool of {size}")
        matched = torch.empty_like(noise)
        row_stats = torch.empty(n, len(STATS), dtype=torch.float64)
        for lo in range(0, n, size):
            part = slice(lo, lo + size)
            matched[part] = pair_pool(noise[part], data[part], labels[part], mode=self.mode,
                                      min_group=self.min_group)
            stats = coupling_stats(noise[part], matched[part], data[part], labels[part])
            row_stats[part] = torch.tensor([stats[k] for k in STATS], dtype=torch.float64)
        for x0, stats, (_, x1, y) in zip(matched.split(sizes), row_stats.split(sizes), pool,
                                         strict=True):
            yield x0, x1, y, stats.mean(0).float()
