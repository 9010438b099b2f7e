"""Frechet distance between two Gaussians fitted to feature sets (FID, FD-DINOv2, fd-digits).

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

(Heusel et al. 2017, eq. 6). The matrix square root is scipy's Schur method; when the product
of two (near-)singular covariances gives a non-finite or inaccurate root, both covariances
get a small ``eps * I`` added and the root is taken again, as the reference FID code does
(here the traces use the same regularised covariances, so equal inputs still give 0). A product of
two PSD matrices has real non-negative eigenvalues, so an imaginary part above round-off
means the statistics are broken and is reported instead of silently dropped.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), both float64."""
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"feature_stats needs an (N >= 2, D) array, got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _sqrtm(product: np.ndarray, max_residual: float = 1e-3) -> np.ndarray | None:
    """scipy's square root of ``product``, or None when it is not finite or ``X @ X`` misses
    ``product`` by more than ``max_residual`` (relative Frobenius norm)."""
    with warnings.catch_warnings():
        # Singular products are expected (fewer samples than dimensions); the residual
        # below, not scipy's warning, decides whether the root is usable.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(product)
    if not np.isfinite(root).all():
        return None
    scale = max(float(np.linalg.norm(product)), np.finfo(np.float64).tiny)
    if np.isfinite(max_residual) and np.linalg.norm(root @ root - product) / scale > max_residual:
        return None
    return root


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    eps: float = 1e-6,
    imag_atol: float = 1e-3,
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
            f"sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if covmean is None:
        # Regularise both Gaussians and measure between those, traces included, so that
        # identical statistics still give exactly 0 (no -2 * D * eps bias).
        offset = np.eye(sigma1.shape[0]) * eps
        sigma1, sigma2 = sigma1 + offset, sigma2 + offset
        covmean = _sqrtm(sigma1 @ sigma2, max_residual=np.inf)
        if covmean is None:
            raise ValueError("covariance square root is not finite even after regularisation")
    if np.iscomplexobj(covmean):
        worst = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if worst > imag_atol:
            raise ValueError(f"covariance square root has an imaginary component {worst:.3g}")
        covmean = covmean.real
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
    return float(value)
