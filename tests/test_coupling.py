"""sOT coupler: exact assignment against brute force, pooling bookkeeping, closed forms."""

from __future__ import annotations

import itertools
import pickle

import numpy as np
import pytest
import torch
from scipy.stats import norm

from ismctl.data.coupling import STATS, SOTCoupler, coupling_stats, ot_assignment, pair_pool


def _pair_cost(x0: np.ndarray, x1: np.ndarray, perm) -> float:
    """sum_i ||x0[perm[i]] - x1[i]||^2 in float64 numpy."""
    diff = x0.reshape(len(x0), -1)[np.asarray(perm)] - x1.reshape(len(x1), -1)
    return float((diff**2).sum())


def _batches(sizes: list[int], seed: int, shape=(2, 3, 3), mean: float = 0.0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, size in enumerate(sizes):
        x1 = mean + torch.randn(size, *shape, generator=gen)
        y = torch.arange(size) + 100 * i
        out.append((x1, y))
    return out


def _drawn_noise(batches, seed: int) -> list[torch.Tensor]:
    """The noise a coupler seeded with ``seed`` draws, batch by batch, before pairing."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(x1.shape, generator=gen) for x1, _ in batches]


def _sorted_rows(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(len(x), -1)
    return flat[torch.argsort(flat[:, 0])]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n", range(1, 8))
def test_assignment_equals_brute_force(seed: int, n: int) -> None:
    rng = np.random.default_rng(100 * seed + n)
    x0, x1 = rng.standard_normal((n, 3, 2)), rng.standard_normal((n, 3, 2)) + 0.5
    perm = ot_assignment(torch.from_numpy(x0), torch.from_numpy(x1))
    best = min(itertools.permutations(range(n)), key=lambda p: _pair_cost(x0, x1, p))
    np.testing.assert_allclose(_pair_cost(x0, x1, perm.numpy()), _pair_cost(x0, x1, best))
    # Continuous random data: the optimum is unique, so the permutation itself must match.
    assert perm.tolist() == list(best)


def test_assignment_float32_matches_brute_force() -> None:
    rng = np.random.default_rng(5)
    x0 = rng.standard_normal((6, 4, 4)).astype(np.float32)
    x1 = (rng.standard_normal((6, 4, 4)) + 2).astype(np.float32)
    perm = ot_assignment(torch.from_numpy(x0), torch.from_numpy(x1))
    best = min(itertools.permutations(range(6)), key=lambda p: _pair_cost(x0, x1, p))
    assert perm.tolist() == list(best)


@pytest.mark.parametrize("seed", range(3))
def test_output_is_a_permutation_and_beats_identity(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x0, x1 = torch.randn(64, 4, 4, 4, generator=gen), torch.randn(64, 4, 4, 4, generator=gen)
    perm = ot_assignment(x0, x1)
    assert perm.dtype == torch.long
    assert sorted(perm.tolist()) == list(range(64))
    cost = _pair_cost(x0.numpy(), x1.numpy(), perm.numpy())
    assert cost <= _pair_cost(x0.numpy(), x1.numpy(), np.arange(64)) + 1e-9
    torch.testing.assert_close(pair_pool(x0, x1), x0[perm])


def test_one_dimensional_ot_is_the_sorted_coupling() -> None:
    # In 1D with a convex cost the optimal coupling is monotone: k-th smallest noise with
    # k-th smallest data. On shuffled normal quantiles q_k (noise) and mu + s q_k (data) its
    # mean cost is mu^2 + (1 - s)^2 mean(q^2) (the cross term vanishes: mean(q) = 0).
    n, mu, s = 300, 3.0, 0.5
    q = torch.from_numpy(norm.ppf((np.arange(n) + 0.5) / n))
    gen = torch.Generator().manual_seed(0)
    x0 = q[torch.randperm(n, generator=gen)][:, None]
    x1 = (mu + s * q[torch.randperm(n, generator=gen)])[:, None]
    matched = pair_pool(x0, x1)
    expected = torch.empty_like(x0)
    expected[torch.argsort(x1[:, 0])] = torch.sort(x0[:, 0]).values[:, None]
    torch.testing.assert_close(matched, expected)
    mean_cost = (x1 - matched).square().mean().item()
    np.testing.assert_allclose(mean_cost, mu**2 + (1 - s) ** 2 * (q**2).mean().item(), rtol=1e-12)
    assert mean_cost < (x1 - x0).square().mean().item()


def test_k0_keeps_noise_as_drawn() -> None:
    batches = _batches([5, 5, 3], seed=1)
    out = list(SOTCoupler(0, torch.Generator().manual_seed(7))(batches))
    assert len(out) == 3
    drawn_noise = _drawn_noise(batches, 7)
    for (x0, x1, y, stats), drawn, (data, labels) in zip(out, drawn_noise, batches, strict=True):
        torch.testing.assert_close(x0, drawn)
        assert torch.equal(x1, data) and torch.equal(y, labels)
        assert torch.equal(stats, torch.zeros(len(STATS)))


def test_k1_is_per_batch_ot() -> None:
    batches = _batches([6, 6, 4], seed=2)
    out = list(SOTCoupler(6, torch.Generator().manual_seed(3), mode="blind")(batches))
    drawn_noise = _drawn_noise(batches, 3)
    for (x0, x1, y, _), drawn, (data, labels) in zip(out, drawn_noise, batches, strict=True):
        assert torch.equal(x1, data) and torch.equal(y, labels)
        perm = ot_assignment(drawn, data)
        torch.testing.assert_close(x0, drawn[perm])
        cost = _pair_cost(x0.numpy(), data.numpy(), np.arange(len(data)))
        best = min(
            itertools.permutations(range(len(data))),
            key=lambda p: _pair_cost(drawn.numpy(), data.numpy(), p),
        )
        np.testing.assert_allclose(cost, _pair_cost(drawn.numpy(), data.numpy(), best), rtol=1e-6)


def test_pooled_split_keeps_order_labels_and_noise() -> None:
    sizes = [4, 4, 4, 4, 4, 4, 4, 2]
    batches = _batches(sizes, seed=4)
    k = 3
    out = list(SOTCoupler(k * 4, torch.Generator().manual_seed(9), mode="blind")(batches))
    drawn = _drawn_noise(batches, 9)
    assert [len(x0) for x0, _, _, _ in out] == sizes
    for (_, x1, y, _), (data, labels) in zip(out, batches, strict=True):
        assert torch.equal(x1, data) and torch.equal(y, labels)
    # Pools: batches 0-2, 3-5 and the trailing partial pool 6-7.
    for start in range(0, len(sizes), k):
        group = range(start, min(start + k, len(sizes)))
        noise = torch.cat([out[j][0] for j in group])
        pool_noise = torch.cat([drawn[j] for j in group])
        data = torch.cat([batches[j][0] for j in group])
        torch.testing.assert_close(_sorted_rows(noise), _sorted_rows(pool_noise))
        torch.testing.assert_close(noise, pair_pool(pool_noise, data))
        # Per-batch OT is one feasible pool pairing, so the pooled optimum is no worse.
        pooled = _pair_cost(noise.numpy(), data.numpy(), np.arange(len(data)))
        per_batch = 0.0
        for j in group:
            data_j = batches[j][0]
            matched = pair_pool(drawn[j], data_j)
            per_batch += _pair_cost(matched.numpy(), data_j.numpy(), np.arange(sizes[j]))
        assert pooled <= per_batch + 1e-6


def test_partial_pool_shorter_than_k() -> None:
    batches = _batches([5, 3], seed=6)
    out = list(SOTCoupler(32, torch.Generator().manual_seed(1), mode="blind")(batches))
    drawn = torch.cat(_drawn_noise(batches, 1))
    data = torch.cat([x1 for x1, _ in batches])
    assert [len(x0) for x0, _, _, _ in out] == [5, 3]
    torch.testing.assert_close(torch.cat([x0 for x0, _, _, _ in out]), pair_pool(drawn, data))
    assert list(SOTCoupler(4)(iter([]))) == []


def test_ot_shortens_paths_for_data_far_from_zero() -> None:
    batches = _batches([64] * 4, seed=8, shape=(4, 2, 2), mean=3.0)

    def mean_cost(k: int) -> float:
        out = SOTCoupler(64 * k, torch.Generator().manual_seed(2), mode="blind")(batches)
        costs = [(x1 - x0).square().sum(dim=(1, 2, 3)) for x0, x1, _, _ in out]
        return torch.cat(costs).mean().item()

    independent, minibatch, pooled = mean_cost(0), mean_cost(1), mean_cost(4)
    # ||mu + z1 - x0||^2 = ||mu||^2 + 2 mu.(z1 - x0) + ||z1 - x0||^2: the first two sum to the
    # same total under every pairing, so OT can only cut the last part, 2d = 32 of
    # E = d * (mu^2 + 2) = 16 * 11 = 176 when independent.
    np.testing.assert_allclose(independent, 176.0, rtol=0.05)
    assert minibatch < independent - 0.25 * 32
    assert pooled < minibatch


def test_picklable_and_deterministic() -> None:
    batches = _batches([4, 4, 4], seed=3)
    coupler = SOTCoupler(8, torch.Generator().manual_seed(11), mode="blind")
    clone = pickle.loads(pickle.dumps(coupler))
    for a, b in zip(coupler(batches), clone(batches), strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        ot_assignment(torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="pool_size"):
        SOTCoupler(-1)
    with pytest.raises(ValueError, match="coupling mode"):
        SOTCoupler(8, mode="per_class")
    with pytest.raises(ValueError, match="batches of 4 samples do not tile a pool of 6"):
        list(SOTCoupler(6)(_batches([4, 4], seed=0)))


def test_each_batch_carries_its_pools_statistics() -> None:
    batches = _batches([4, 4, 4, 4], seed=5, mean=1.0)
    out = list(SOTCoupler(8, torch.Generator().manual_seed(4), mode="blind")(batches))
    drawn = _drawn_noise(batches, 4)
    for pool in (slice(0, 2), slice(2, 4)):
        stats = coupling_stats(torch.cat(drawn[pool]), torch.cat([b[0] for b in out[pool]]),
                               torch.cat([b[1] for b in out[pool]]),
                               torch.cat([b[2] for b in out[pool]]))
        for batch in out[pool]:
            assert batch[3].dtype == torch.float32
            torch.testing.assert_close(batch[3], torch.tensor([stats[k] for k in STATS]))
            assert batch[3][0] > 0  # the assignment removed transport cost


def test_batch_larger_than_the_pool_is_paired_in_pieces() -> None:
    batches = _batches([8], seed=6)
    x0, x1, _, stats = next(SOTCoupler(4, torch.Generator().manual_seed(5), mode="blind")(batches))
    drawn = _drawn_noise(batches, 5)[0]
    pieces = [pair_pool(drawn[i : i + 4], x1[i : i + 4]) for i in (0, 4)]
    torch.testing.assert_close(x0, torch.cat(pieces))
    labels = batches[0][1]
    halves = [coupling_stats(drawn[i : i + 4], x0[i : i + 4], x1[i : i + 4], labels[i : i + 4])
              for i in (0, 4)]
    expected = [(halves[0][k] + halves[1][k]) / 2 for k in STATS]
    torch.testing.assert_close(stats, torch.tensor(expected))


def _constrained_brute_force(x0: np.ndarray, x1: np.ndarray, y: np.ndarray) -> list[int]:
    """The cheapest permutation that pairs each data row only with noise of a slot of the
    same class, by enumerating every permutation."""
    allowed = [p for p in itertools.permutations(range(len(y)))
               if all(y[p[i]] == y[i] for i in range(len(y)))]
    return list(min(allowed, key=lambda p: _pair_cost(x0, x1, p)))


@pytest.mark.parametrize("seed", range(5))
def test_within_class_pairing_equals_constrained_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=7)
    x0, x1 = rng.standard_normal((7, 2, 2)), rng.standard_normal((7, 2, 2)) + 1.0
    paired = pair_pool(torch.from_numpy(x0), torch.from_numpy(x1), torch.from_numpy(y))
    best = _constrained_brute_force(x0, x1, y)
    np.testing.assert_array_equal(paired.numpy(), x0[best])
    # Without the labels the optimum is free to mix classes, and is cheaper or equal.
    free = pair_pool(torch.from_numpy(x0), torch.from_numpy(x1)).numpy()
    assert ((free - x1) ** 2).sum() <= ((paired.numpy() - x1) ** 2).sum() + 1e-9


def test_within_class_with_one_label_is_plain_ot() -> None:
    gen = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(20, 4, generator=gen), torch.randn(20, 4, generator=gen) + 1
    torch.testing.assert_close(pair_pool(x0, x1, torch.zeros(20, dtype=torch.long)),
                               pair_pool(x0, x1), rtol=0, atol=0)


def _label_signal(noise: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy of a nearest-class-mean classifier fitted on half of the (noise, label)
    pairs and scored on the other half: 1 / classes when the noise says nothing."""
    flat, half = noise.reshape(len(noise), -1), len(noise) // 2
    classes = labels.unique()
    means = torch.stack([flat[:half][labels[:half] == c].mean(0) for c in classes])
    pred = classes[torch.cdist(flat[half:], means).argmin(1)]
    return float((pred == labels[half:]).float().mean())


def test_within_class_pairing_keeps_the_noise_blind_to_the_label() -> None:
    """On the digits, label-blind pooled OT makes the paired noise predict the class (so a
    network can ignore the label); per-class assignment leaves it at chance (method §3.3)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x1 = torch.from_numpy(digits.images[:1600] / 8.0 - 1.0).float()[:, None]
    y = torch.from_numpy(digits.target[:1600]).long()
    batches = list(zip(x1.split(64), y.split(64), strict=True))

    def paired_noise(within_class: bool) -> torch.Tensor:
        coupler = SOTCoupler(8 * 64, torch.Generator().manual_seed(0),
                             mode="within_class" if within_class else "blind")
        return torch.cat([x0 for x0, _, _, _ in coupler(batches)])

    blind, per_class = _label_signal(paired_noise(False), y), _label_signal(paired_noise(True), y)
    independent = _label_signal(torch.cat(_drawn_noise(batches, 0)), y)
    # Chance is 0.1 (10 classes, 800 scored pairs: sd about 0.01).
    assert blind > 0.25
    assert per_class < 0.15 and independent < 0.15


def test_the_coupler_reads_no_batch_beyond_the_pool_it_pairs() -> None:
    """A pool is paired as soon as it is full, before the next batch is read: independent
    pairing (pool 0) hands each batch on at once, and pools of one-sample batches are exactly
    ``pool_size`` batches each, pool after pool."""
    read = []

    def stream(sizes: list[int]):
        for i, batch in enumerate(_batches(sizes, seed=12)):
            read.append(i)
            yield batch

    for pool, sizes, reads_after in ((0, [1, 1, 3], [1, 2, 3]), (8, [4] * 4, [2, 2, 4, 4]),
                                     (4, [1] * 8, [4, 4, 4, 4, 8, 8, 8, 8])):
        read.clear()
        coupler = SOTCoupler(pool, torch.Generator().manual_seed(1), mode="blind")
        seen = [len(read) for _ in coupler(stream(sizes))]
        assert seen == reads_after, (pool, sizes)


def test_the_coupler_pairs_with_its_mode_and_min_group() -> None:
    """The coupler's pool is paired as ``pair_pool`` pairs it with the coupler's own mode and
    ``min_group``: here a class of 2 rows is within-class paired at min_group 2 and joins
    the blind leftovers at min_group 3, which changes the pairing."""
    gen = torch.Generator().manual_seed(13)
    x1 = 2 + torch.randn(12, 2, 2, generator=gen)
    y = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2, 3, 4, 5, 6])
    drawn = _drawn_noise([(x1, y)], 5)[0]
    results = {}
    for mode, min_group in (("hybrid", 2), ("hybrid", 3), ("within_class", 3), ("blind", 3)):
        # min_group 2 is the coupler's default, as it is pair_pool's.
        extra = {} if min_group == 2 else {"min_group": min_group}
        coupler = SOTCoupler(12, torch.Generator().manual_seed(5), mode=mode, **extra)
        x0 = next(coupler([(x1, y)]))[0]
        torch.testing.assert_close(x0, pair_pool(drawn, x1, y, mode=mode, min_group=min_group),
                                   rtol=0, atol=0)
        results[mode, min_group] = x0
    torch.testing.assert_close(pair_pool(drawn, x1, y, mode="hybrid"), results["hybrid", 2],
                               rtol=0, atol=0)
    assert not torch.equal(results["hybrid", 2], results["hybrid", 3])
    assert not torch.equal(results["hybrid", 3], results["within_class", 3])
    assert not torch.equal(results["hybrid", 3], results["blind", 3])
    # Every group's assignment goes to the solver asked for (an unknown one is refused there).
    for mode in ("blind", "within_class", "hybrid"):
        with pytest.raises(ValueError, match="assignment solver"):
            pair_pool(drawn, x1, y, mode=mode, solver="hungarian")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_the_coupler_draws_float32_noise_in_the_data_dtype(dtype: torch.dtype) -> None:
    """Noise is drawn in float32 whatever the data's dtype (the same numbers for float64 and
    bf16 latents) and handed on in the data's dtype."""
    batches = [(x1.to(dtype), y) for x1, y in _batches([4], seed=14)]
    x0, x1, _, _ = next(SOTCoupler(0, torch.Generator().manual_seed(6))(batches))
    assert x0.dtype == x1.dtype == dtype
    assert torch.equal(x0, _drawn_noise(batches, 6)[0].to(dtype))


def test_the_reference_solver_is_exact_below_float32_resolution() -> None:
    """Data 300 away from the origin with pair-cost gaps of ~1e-5: the float32 Gram term
    (lapjv's fast path) cannot resolve them, the default solver on the float64 cost does, and
    finds the brute-force optimum."""
    gen = torch.Generator().manual_seed(0)
    x1 = 300 + 0.001 * torch.randn(4, 8, generator=gen)
    x0 = 300 + 0.001 * torch.randn(4, 8, generator=gen)
    a, b = x0.double().numpy(), x1.double().numpy()
    best = min(itertools.permutations(range(4)), key=lambda p: _pair_cost(a, b, p))
    for perm in (ot_assignment(x0, x1), ot_assignment(x0, x1, "scipy")):
        assert perm.tolist() == list(best)


@pytest.mark.parametrize("solver", ["scipy", "lapjv"])
def test_empty_and_single_row_pools(solver: str) -> None:
    for n in (0, 1):
        perm = ot_assignment(torch.randn(n, 3), torch.randn(n, 3), solver)
        assert perm.dtype == torch.long and perm.tolist() == list(range(n))


@pytest.mark.parametrize(("dtype", "offset", "spread"),
                         [(torch.float64, 300.0, 1e-4), (torch.bfloat16, 2.0, 0.05)])
def test_lapjv_resolves_near_ties_in_the_gram_precision_of_its_inputs(
        dtype: torch.dtype, offset: float, spread: float) -> None:
    """lapjv's Gram term is float64 for float64 inputs and float32 otherwise (bf16 latents
    included): each resolves the near ties its inputs carry (gaps below float32 resolution for
    the first case, below bf16's for the second) and finds the brute-force optimum."""
    gen = torch.Generator().manual_seed(0)
    x1 = (offset + spread * torch.randn(4, 8, generator=gen, dtype=torch.float64)).to(dtype)
    x0 = (offset + spread * torch.randn(4, 8, generator=gen, dtype=torch.float64)).to(dtype)
    a, b = x0.double().numpy(), x1.double().numpy()
    best = min(itertools.permutations(range(4)), key=lambda p: _pair_cost(a, b, p))
    assert ot_assignment(x0, x1, "lapjv").tolist() == list(best)
