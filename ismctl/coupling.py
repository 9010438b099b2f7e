"""Scaling optimal transport (sOT, SPEC 3.3): pair noise with data by an exact assignment.

The coupler gathers ``K`` batches into a pool of ``K * B`` noise/data pairs, solves one
linear assignment on the squared Euclidean cost, and splits the pool back into its ``K``
batches: every batch keeps its data and labels in order and receives the noise matched to
them. ``K = 1`` is minibatch OT (Tong et al. 2023), ``K = 0`` independent pairing. The
assignment is a permutation (each noise sample used exactly once), unlike sampling from a
transport plan.

Class-conditional data: an assignment over the whole pool lets the matched noise carry the
class (noise near a "1" goes to a "1"), so the network can read the class off ``x0`` and
learns to ignore the label (SPEC 3.3). ``within_class`` (the default of the recipes) solves
one assignment per class instead: the data of class ``c`` is matched with the noise drawn in
the same slots, so the noise a class receives is still i.i.d. N(0, I) and independent of the
label, while each class's paths are straightened as before.

Solving a pool of ``n`` pairs costs up to ``O(n^3)`` on the CPU (SPEC 3.3: seconds at
n = 4096), so the coupler runs in data-loader worker processes, off the training step:
plain torch on the CPU plus scipy, and a picklable object holding no lambdas.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

Triple = tuple[Tensor, Tensor, Tensor]


def squared_distances(x1: Tensor, x0: Tensor) -> Tensor:
    """(n, m) float64 matrix of ``||x1[i] - x0[j]||^2`` over the flattened samples.

    ``||a||^2 + ||b||^2 - 2 a.b`` needs one matrix product instead of an (n, m, d) tensor;
    float64 keeps the cancellation in it far below any cost gap the solver acts on.
    """
    a = x1.detach().reshape(x1.shape[0], -1).to(device="cpu", dtype=torch.float64)
    b = x0.detach().reshape(x0.shape[0], -1).to(device="cpu", dtype=torch.float64)
    cost = a.square().sum(1)[:, None] + b.square().sum(1)[None, :] - 2.0 * (a @ b.T)
    return cost.clamp_min_(0.0)


def ot_assignment(x0: Tensor, x1: Tensor) -> Tensor:
    """Permutation ``perm`` (n,) long minimising ``sum_i ||x0[perm[i]] - x1[i]||^2``.

    Exact, via ``scipy.optimize.linear_sum_assignment``; rows are data, columns noise, so
    the column chosen for row ``i`` is the noise index paired with ``x1[i]``.
    """
    if x0.shape != x1.shape:
        raise ValueError(f"noise {tuple(x0.shape)} and data {tuple(x1.shape)} differ in shape")
    if x0.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long)
    rows, cols = linear_sum_assignment(squared_distances(x1, x0).numpy())
    perm = torch.empty(len(rows), dtype=torch.long)
    perm[torch.from_numpy(rows)] = torch.from_numpy(cols).long()
    return perm


def pair_pool(x0: Tensor, x1: Tensor, y: Tensor | None = None) -> Tensor:
    """``x0`` reordered so that ``x0_out[i]`` is the noise matched to ``x1[i]``.

    With labels ``y`` the assignment is solved within each class: rows of class ``c`` only
    exchange noise among themselves, so the noise keeps no trace of the label.
    """
    if y is None:
        return x0[ot_assignment(x0, x1).to(x0.device)]
    perm = torch.arange(x0.shape[0])
    labels = y.detach().cpu()
    for c in labels.unique():
        rows = torch.nonzero(labels == c).squeeze(1)
        perm[rows] = rows[ot_assignment(x0[rows.to(x0.device)], x1[rows.to(x1.device)])]
    return x0[perm.to(x0.device)]


class SOTCoupler:
    """Turn ``(x1, y)`` batches into ``(x0, x1, y)`` batches with pooled OT noise.

    ``pool_batches = K``: 0 independent pairing, 1 per-batch OT, K > 1 one assignment over
    K batches (``within_class``: one per class of the pool). Noise is standard normal, drawn
    batch by batch from ``generator`` (the global torch RNG when None) in the batches' shape,
    so the drawn noise does not depend on K; only its pairing does. A trailing pool cut short
    by the end of the data is still paired.
    """

    def __init__(self, pool_batches: int, generator: torch.Generator | None = None,
                 within_class: bool = False) -> None:
        if pool_batches < 0:
            raise ValueError(f"pool_batches must be >= 0, got {pool_batches}")
        self.pool_batches = pool_batches
        self.generator = generator
        self.within_class = within_class

    def noise_like(self, x1: Tensor) -> Tensor:
        noise = torch.randn(x1.shape, generator=self.generator, dtype=torch.float32)
        return noise.to(device=x1.device, dtype=x1.dtype)

    def __call__(self, batches: Iterable[tuple[Tensor, Tensor]]) -> Iterator[Triple]:
        pool: list[Triple] = []
        for x1, y in batches:
            pool.append((self.noise_like(x1), x1, y))
            if len(pool) >= max(self.pool_batches, 1):
                yield from self._pair(pool)
                pool = []
        if pool:
            yield from self._pair(pool)

    def _pair(self, pool: list[Triple]) -> Iterator[Triple]:
        if self.pool_batches == 0:
            yield from pool
            return
        sizes = [x1.shape[0] for _, x1, _ in pool]
        noise = torch.cat([x0 for x0, _, _ in pool])
        data = torch.cat([x1 for _, x1, _ in pool])
        labels = torch.cat([y for _, _, y in pool]) if self.within_class else None
        matched = pair_pool(noise, data, labels).split(sizes)
        for x0, (_, x1, y) in zip(matched, pool, strict=True):
            yield x0, x1, y
