"""Inception Score and precision/recall (torch-fidelity's code, our feeding) vs brute force;
FD-DINOv2's offline failure message."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from ismctl.evaluation import dinov2
from ismctl.evaluation.scores import inception_score, precision_recall
from ismctl.utils.errors import UserError


def numpy_is(logits: np.ndarray) -> float:
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    marginal = p.mean(axis=0)
    kl = (p * (np.log(p) - np.log(marginal))).sum(axis=1)
    return float(np.exp(kl.mean()))


def test_inception_score_matches_numpy_and_known_limits():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(200, 7))
    mean, std = inception_score(logits, splits=1)
    assert mean == pytest.approx(numpy_is(logits), rel=1e-6) and std == 0.0
    # Confident and evenly spread over K classes -> IS = K; constant logits -> IS = 1.
    confident = np.eye(5)[np.arange(100) % 5] * 50.0
    assert inception_score(confident, splits=1)[0] == pytest.approx(5.0, rel=1e-6)
    assert inception_score(np.zeros((40, 9)))[0] == pytest.approx(1.0)


def brute_force_prc(gen: np.ndarray, real: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Kynkaanniemi et al. 2019: a sample is covered by a set when it lies within some set
    member's distance to that member's k-th nearest neighbour (itself excluded)."""
    def radii(x):
        d = cdist(x, x)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    precision = (cdist(gen, real) <= radii(real)[None, :]).any(axis=1).mean()
    recall = (cdist(real, gen) <= radii(gen)[None, :]).any(axis=1).mean()
    return float(precision), float(recall)


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(120, 4))
    gen = rng.normal(loc=0.7, scale=0.6, size=(90, 4))
    got = precision_recall(gen, real, block=17)
    want = brute_force_prc(gen, real)
    assert got == pytest.approx(want, abs=1e-6)
    assert 0.0 < want[0] < 1.0 and 0.0 < want[1] < 1.0
    same = precision_recall(real, real)
    assert same == (1.0, 1.0)


def test_precision_recall_caps_rows_with_a_fixed_subset():
    rng = np.random.default_rng(2)
    real, gen = rng.normal(size=(300, 3)), rng.normal(size=(250, 3))
    a = precision_recall(gen, real, max_rows=50)
    assert a == precision_recall(gen, real, max_rows=50)
    with pytest.raises(ValueError):
        precision_recall(gen[:3], real)


def test_dinov2_unavailable_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*args, **kwargs):
        raise RuntimeError("It looks like there is no internet connection")

    monkeypatch.setattr(torch.hub, "load", offline)
    with pytest.raises(UserError) as err:
        dinov2.build_dinov2()
    msg = str(err.value)
    assert "\n" not in msg and "fd-dinov2" in msg
    assert str(tmp_path / "checkpoints" / dinov2.CHECKPOINT) in msg
    assert not dinov2.dinov2_cached()
