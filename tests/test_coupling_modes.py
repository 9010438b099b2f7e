"""sOT coupling modes (blind, within_class, hybrid) and the per-pool coupling statistics,
against brute-force optima, scipy, and the statistics' direct definitions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from ismctl.data.coupling import SOLVERS, coupling_stats, ot_assignment, pair_pool

MODES = ("blind", "within_class", "hybrid")


def _cost(x0: np.ndarray, x1: np.ndarray, perm) -> float:
    diff = x0.reshape(len(x0), -1)[np.asarray(perm)] - x1.reshape(len(x1), -1)
    return float((diff**2).sum())


def _brute_force(x0: np.ndarray, x1: np.ndarray, allowed) -> list[int]:
    """Cheapest permutation ``p`` with ``allowed(i, p[i])`` for every row, by enumeration."""
    n = len(x0)
    feasible = [p for p in itertools.permutations(range(n))
                if all(allowed(i, p[i]) for i in range(n))]
    return list(min(feasible, key=lambda p: _cost(x0, x1, p)))


def _hybrid_allowed(y: np.ndarray, min_group: int):
    """Hybrid's constraint: rows of a class with >= min_group rows take noise from their own
    class's slots; rows of the smaller classes take noise from any small-class slot."""
    counts = {c: int((y == c).sum()) for c in np.unique(y)}
    big = {i: counts[y[i]] >= min_group for i in range(len(y))}

    def allowed(i: int, j: int) -> bool:
        return y[i] == y[j] if big[i] else not big[j]
    return allowed


def _problem(seed: int, n: int = 8, classes: int = 4, d: int = 3):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=n)
    x0 = rng.standard_normal((n, d))
    x1 = rng.standard_normal((n, d)) + 1.5 * rng.standard_normal((classes, d))[y]
    return x0, x1, y


def _as_perm(matched: np.ndarray, x0: np.ndarray) -> list[int]:
    """Recover the permutation from the matched rows (continuous data: rows are distinct)."""
    return [int(np.flatnonzero((x0 == row).all(1))[0]) for row in matched]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", range(3))
def test_every_mode_is_a_permutation(mode: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 30, (200,), generator=gen)
    x0, x1 = torch.randn(200, 2, 4, generator=gen), torch.randn(200, 2, 4, generator=gen)
    out = pair_pool(x0, x1, y, mode=mode, min_group=3)
    perm = _as_perm(out.reshape(200, -1).numpy(), x0.reshape(200, -1).numpy())
    assert sorted(perm) == list(range(200))


@pytest.mark.parametrize("min_group", [2, 3])
@pytest.mark.parametrize("seed", range(6))
def test_hybrid_equals_constrained_brute_force(seed: int, min_group: int) -> None:
    x0, x1, y = _problem(seed)
    out = pair_pool(torch.from_numpy(x0), torch.from_numpy(x1), torch.from_numpy(y),
                    mode="hybrid", min_group=min_group).numpy()
    best = _brute_force(x0, x1, _hybrid_allowed(y, min_group))
    np.testing.assert_array_equal(out, x0[best])


@pytest.mark.parametrize("seed", range(4))
def test_blind_equals_brute_force_and_scipy_and_ignores_labels(seed: int) -> None:
    x0, x1, y = _problem(seed, n=7)
    out = pair_pool(torch.from_numpy(x0), torch.from_numpy(x1), torch.from_numpy(y),
                    mode="blind").numpy()
    best = _brute_force(x0, x1, lambda i, j: True)
    np.testing.assert_array_equal(out, x0[best])
    np.testing.assert_array_equal(out, pair_pool(torch.from_numpy(x0),
                                                 torch.from_numpy(x1)).numpy())
    # Larger pool: same optimum cost as scipy on the cost matrix built independently here.
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((120, 5)), rng.standard_normal((120, 5)) + 0.7
    cost = ((b[:, None, :] - a[None, :, :]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    out = pair_pool(torch.from_numpy(a), torch.from_numpy(b), torch.zeros(120, dtype=torch.long),
                    mode="blind").numpy()
    np.testing.assert_allclose(((out - b) ** 2).sum(), cost[rows, cols].sum(), rtol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_within_class_is_the_default_and_the_per_class_optimum(seed: int) -> None:
    x0, x1, y = _problem(seed)
    t0, t1, ty = torch.from_numpy(x0), torch.from_numpy(x1), torch.from_numpy(y)
    out = pair_pool(t0, t1, ty, mode="within_class").numpy()
    np.testing.assert_array_equal(out, pair_pool(t0, t1, ty).numpy())
    best = _brute_force(x0, x1, lambda i, j: y[i] == y[j])
    np.testing.assert_array_equal(out, x0[best])


def test_hybrid_limits() -> None:
    x0, x1, y = (torch.from_numpy(a) for a in _problem(11, n=60, classes=9))
    # Every class is "big" at min_group=1: within_class. No class is at min_group > n: blind.
    torch.testing.assert_close(pair_pool(x0, x1, y, mode="hybrid", min_group=1),
                               pair_pool(x0, x1, y, mode="within_class"), rtol=0, atol=0)
    torch.testing.assert_close(pair_pool(x0, x1, y, mode="hybrid", min_group=61),
                               pair_pool(x0, x1, y, mode="blind"), rtol=0, atol=0)


def test_bad_mode_and_min_group() -> None:
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="mode"):
        pair_pool(x, x, torch.zeros(4, dtype=torch.long), mode="global")
    with pytest.raises(ValueError, match="min_group"):
        pair_pool(x, x, torch.zeros(4, dtype=torch.long), mode="hybrid", min_group=0)


def test_stats_match_their_definitions() -> None:
    gen = torch.Generator().manual_seed(3)
    n, d = 40, 6
    y = torch.randint(0, 5, (n,), generator=gen)
    x1 = torch.randn(n, 2, 3, generator=gen) + y[:, None, None]
    drawn = torch.randn(n, 2, 3, generator=gen)
    matched = pair_pool(drawn, x1, y, mode="blind")
    stats = coupling_stats(drawn, matched, x1, y)
    z, a, b = (t.reshape(n, -1).double().numpy() for t in (matched, x1, drawn))
    want = 1 - ((z - a) ** 2).sum() / ((b - a) ** 2).sum()
    assert stats["cost_reduction"] == pytest.approx(want, rel=1e-5)
    same = [(i, j) for i in range(n) for j in range(n) if i != j and y[i] == y[j]]
    want = np.mean([z[i] @ z[j] for i, j in same]) / d
    assert stats["leakage"] == pytest.approx(want, rel=1e-4)
    assert coupling_stats(drawn, drawn, x1, y)["cost_reduction"] == 0.0


def _class_data(seed: int, n: int, d: int, classes: int, between: float):
    """Data with class means of variance ``between`` per dim plus unit within-class noise."""
    gen = torch.Generator().manual_seed(seed)
    means = between**0.5 * torch.randn(classes, d, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    x1 = means[y] + torch.randn(n, d, generator=gen)
    return torch.randn(n, d, generator=gen), x1, y


def test_leakage_is_zero_for_independent_and_within_class_and_positive_for_blind() -> None:
    n, d, classes = 512, 64, 40
    values = {mode: [] for mode in ("independent", *MODES)}
    for seed in range(8):
        drawn, x1, y = _class_data(seed, n, d, classes, between=1.0)
        values["independent"].append(coupling_stats(drawn, drawn, x1, y)["leakage"])
        for mode in MODES:
            matched = pair_pool(drawn, x1, y, mode=mode, min_group=20)
            values[mode].append(coupling_stats(drawn, matched, x1, y)["leakage"])
    # Within a class the noise is only permuted: its leakage is the drawn noise's (up to float32
    # summation order, far below the statistic's spread of about 1e-3 here).
    np.testing.assert_allclose(values["within_class"], values["independent"], rtol=0, atol=1e-7)
    # Independent noise: mean 0 with sd about 1 / sqrt(d * pairs) = 1 / sqrt(64 * 6400) per pool.
    sd = 1 / np.sqrt(d * (n * (n / classes - 1))) / np.sqrt(8)
    assert abs(np.mean(values["independent"])) < 4 * sd
    assert np.mean(values["blind"]) > 50 * sd
    assert 4 * sd < np.mean(values["hybrid"]) < np.mean(values["blind"])


@pytest.mark.parametrize("seed", range(3))
def test_lapjv_solver_equals_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for n in (1, 2, 5, 150):
        x0, x1 = rng.standard_normal((n, 3, 4)), rng.standard_normal((n, 3, 4)) + 0.3
        t0, t1 = torch.from_numpy(x0), torch.from_numpy(x1)
        assert (ot_assignment(t0, t1, "lapjv").tolist() == ot_assignment(t0, t1).tolist())
    # float32 latents: the Gram term in float32 may only move the optimum within its rounding.
    x0 = torch.randn(300, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    x1 = torch.randn(300, 4, 16, 16, generator=torch.Generator().manual_seed(seed + 9)) + 0.2
    fast, ref = (pair_pool(x0, x1, mode="blind", solver=s) for s in SOLVERS)
    ref_cost = float((ref.double() - x1.double()).square().sum())
    assert abs(float((fast.double() - x1.double()).square().sum()) - ref_cost) < 1e-6 * ref_cost
    with pytest.raises(ValueError, match="solver"):
        ot_assignment(x0, x1, "auction")


def test_scale_study_point_and_report(tmp_path) -> None:
    from ismctl.studies.sot_scale import main, run_point

    rows = run_point(256, 1.0, 0, ["blind", "within_class", "hybrid:4"], classes=4,
                     train_samples=512, test_samples=256, solver="lapjv")
    by = {row["coupling"]: row for row in rows}
    assert set(by) == {"independent", "data", "blind", "within_class", "hybrid:4"}
    assert by["data"]["probe_acc"] == 1.0 and by["data"]["oracle_acc"] == 1.0
    assert by["within_class"]["leakage"] == pytest.approx(by["independent"]["leakage"], abs=1e-7)
    # Sd of the statistic over the 3 pools here: about 1 / sqrt(3 * 4096 * 256 * 63) = 7e-5.
    assert by["blind"]["leakage"] > 2.5e-4 and abs(by["independent"]["leakage"]) < 2.5e-4
    assert by["blind"]["cost_reduction"] > by["within_class"]["cost_reduction"] > 0
    assert by["independent"]["cost_reduction"] == 0.0
    out = tmp_path / "results.jsonl"
    main(["run", "--pool", "32", "--ratios", "1", "--seeds", "0,1", "--classes", "3",
          "--couplings", "blind,within_class", "--train-samples", "32", "--test-samples", "32",
          "--out", str(out)])
    main(["report", str(out), "--markdown", str(tmp_path / "tables.md")])
    text = (tmp_path / "tables.md").read_text()
    assert "| 1 | 0.00 ± 0.00 |" in text and "within_class" in text


def _reference_stats(drawn: torch.Tensor, matched: torch.Tensor, x1: torch.Tensor,
                     y: torch.Tensor) -> tuple[float, float]:
    """``coupling_stats`` from its definitions, in float64 numpy, pair by pair."""
    z, a, b = (t.reshape(len(t), -1).double().numpy() for t in (matched, x1, drawn))
    independent = ((b - a) ** 2).sum()
    cost = 1 - ((z - a) ** 2).sum() / independent if independent > 0 else 0.0
    same = [(i, j) for i in range(len(y)) for j in range(len(y)) if i != j and y[i] == y[j]]
    leakage = np.mean([z[i] @ z[j] for i, j in same]) / z.shape[1] if same else 0.0
    return float(cost), float(leakage)


def test_stats_edge_cases_against_their_definitions() -> None:
    """Noise equal to the data (no transport cost to remove: 0, not 0/0), a cost below 1, a
    pool whose classes are all singletons (no pair: leakage 0) and one with a single pair. In
    float64: a cost this small is a difference of much larger norms."""
    gen = torch.Generator().manual_seed(8)
    x1 = torch.randn(6, 2, 3, generator=gen, dtype=torch.float64)
    near = x1 + 0.01 * torch.randn(6, 2, 3, generator=gen, dtype=torch.float64)
    matched = near[torch.tensor([1, 0, 2, 3, 5, 4])]
    singletons, one_pair = torch.arange(6), torch.tensor([0, 1, 2, 2, 3, 4])
    cases = [(x1, x1, x1, one_pair), (near, matched, x1, one_pair),
             (near, matched, x1, singletons), (near, near, x1, singletons)]
    for drawn, z, data, y in cases:
        stats = coupling_stats(drawn, z, data, y)
        cost, leakage = _reference_stats(drawn, z, data, y)
        assert stats["cost_reduction"] == pytest.approx(cost, rel=1e-9, abs=1e-12)
        assert stats["leakage"] == pytest.approx(leakage, rel=1e-9, abs=1e-12)
    assert coupling_stats(x1, x1, x1, one_pair)["cost_reduction"] == 0.0
    assert coupling_stats(near, matched, x1, singletons)["leakage"] == 0.0
    assert coupling_stats(near, near, x1, singletons)["cost_reduction"] == 0.0
    assert 0 < ((near - x1) ** 2).sum() < 1  # the second case's cost is below 1


def test_stats_working_precision_follows_the_inputs() -> None:
    """float64 inputs are reduced in float64 (exact to ~1e-15, where float32 would be off by
    ~1e-7 on data far from zero); bf16 latents in float32, not in bf16 (off by ~1e-3)."""
    gen = torch.Generator().manual_seed(9)
    y = torch.randint(0, 3, (16,), generator=gen)
    x1 = 1000 + torch.randn(16, 8, generator=gen, dtype=torch.float64)
    drawn = torch.randn(16, 8, generator=gen, dtype=torch.float64)
    matched = pair_pool(drawn, x1, y, mode="blind")
    stats = coupling_stats(drawn, matched, x1, y)
    cost, leakage = _reference_stats(drawn, matched, x1, y)
    assert abs(stats["cost_reduction"] - cost) < 1e-12
    assert abs(stats["leakage"] - leakage) < 1e-12
    x1, drawn = (1 + torch.randn(16, 64, generator=gen)).bfloat16(), torch.randn(16, 64).bfloat16()
    matched = pair_pool(drawn, x1, y, mode="blind")
    stats = coupling_stats(drawn, matched, x1, y)
    cost, leakage = _reference_stats(drawn, matched, x1, y)
    assert abs(stats["cost_reduction"] - cost) < 1e-5
    assert abs(stats["leakage"] - leakage) < 1e-5
