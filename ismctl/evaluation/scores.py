"""Metrics from features: Frechet distances (ours), Inception Score and precision/recall
(torch-fidelity's implementations, fed with features we extracted once).

- IS: torch-fidelity's ``isc_features_to_metric`` on the unbiased Inception logits, 10
  splits, its fixed shuffling seed (Salimans et al. 2016).
- Precision/recall: torch-fidelity's k-NN manifold estimate (Kynkaanniemi et al. 2019,
  k = 3) on Inception pool3 features, as ADM's evaluator. The pairwise-distance matrices grow
  as N^2, so both sets are capped at ``PRC_MAX`` rows (a seeded random subset of the
  samples; the reference keeps the same number, see ``reference.py``), computed in blocks.
"""

from __future__ import annotations

import numpy as np
import torch
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_prc import calculate_precision_recall_part

from ismctl.evaluation.frechet import feature_stats, frechet_distance
from ismctl.evaluation.reference import KEEP_FEATURES, ReferenceStats, subset_indices

PRC_MAX = KEEP_FEATURES
PRC_NEIGHBORHOOD = 3
ISC_SPLITS = 10


def frechet_to_reference(features: np.ndarray, ref: ReferenceStats) -> float:
    mu, sigma = feature_stats(features)
    return frechet_distance(mu, sigma, ref.mu, ref.sigma)


def inception_score(logits: np.ndarray, splits: int = ISC_SPLITS) -> tuple[float, float]:
    """(mean, std) of exp(E KL(p(y|x) || p(y))) over ``splits`` chunks."""
    splits = max(1, min(splits, len(logits)))
    out = isc_features_to_metric(torch.from_numpy(np.asarray(logits, np.float32)), splits=splits)
    return out["inception_score_mean"], out["inception_score_std"]


def precision_recall(
    generated: np.ndarray,
    real: np.ndarray,
    neighborhood: int = PRC_NEIGHBORHOOD,
    max_rows: int = PRC_MAX,
    block: int = 2_500,
) -> tuple[float, float]:
    """Improved precision and recall of ``generated`` against ``real`` feature rows."""
    if min(len(generated), len(real)) <= neighborhood:
        raise ValueError(f"precision/recall needs more than {neighborhood} rows per set")
    gen = generated[subset_indices(len(generated), max_rows)]
    ref = real[subset_indices(len(real), max_rows)]
    precision, recall = calculate_precision_recall_part(
        torch.from_numpy(np.ascontiguousarray(gen, np.float32)),
        torch.from_numpy(np.ascontiguousarray(ref, np.float32)),
        neighborhood=neighborhood,
        batch_size=block,
    )
    return float(precision), float(recall)
