"""Multi-level wavelet loss (method §3.2): the regression error measured per 2D DWT sub-band.

The transform is a batched, differentiable 2D discrete wavelet transform in torch, built
from the filter bank of a PyWavelets wavelet (``dec_lo``/``dec_hi``) with periodic
extension ("periodization" in PyWavelets): each level maps an ``H x W`` map to four
``H/2 x W/2`` bands, and an orthogonal wavelet gives an orthonormal transform. One level is
``Y = A_H X A_W^T`` with ``A_n`` the ``n x n`` single-level analysis matrix (low-pass rows
on top, high-pass rows below, the filter taps wrapped modulo ``n``), applied to all samples
and channels at once. This equals a stride-2 convolution on the periodically padded map, but
runs as two batched matrix products per level, about twice as fast as the convolution on
CPU, handles any filter length without padding code, and its inverse is the transpose.
Coefficients match ``pywt.wavedec2(x, wavelet, mode="periodization", level=L)``; details are
returned finest-first as ``(horizontal, vertical, diagonal)`` = pywt's ``(cH, cV, cD)``.

Loss, per sample: ``(approx_weight * ||dA||^2 + sum_l detail_weight_l * ||dD_l||^2) / (C*H*W)``
with ``dA``, ``dD_l`` the coefficient differences of prediction and target. Because the
transform is orthonormal, equal weights of 1 give plain MSE exactly (Parseval), so the band
weights are the whole content of the loss.

Weights. One factor on every detail band is (almost) MSE: at the maximum depth the
approximation band is the per-channel mean, so ``approx 1, details 2`` is
``2 MSE - mean error^2`` and Adam ignores the factor 2 (method §3.2). What changes what the
network learns is the *relative* price of the scales: per-level detail weights
(``loss.detail_weights``, finest first) and the band normaliser ``loss.band_norm``, which
divides each band's error by the velocity target's variance per coefficient in that band, so
that a scale with little signal is not drowned out by the scales that carry most of it. The
normaliser is a constant of the data set (``ismctl/losses/band_stats.py``, measured once per
run), never of the batch: the same samples give the same loss however the batch is split
across GPUs and accumulation steps. The paper does not publish its weights; the digits study
(``docs/ablation_digits.md``) measured the normalised loss as neutral against MSE there.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import pywt
import torch
from torch import Tensor

from ismctl.losses.mse import residual
from ismctl.utils.errors import UserError


@functools.lru_cache(maxsize=32)
def orthogonal_wavelet(name: str) -> pywt.Wavelet:
    """The PyWavelets wavelet ``name``; only orthogonal ones give an orthonormal transform."""
    try:
        wavelet = pywt.Wavelet(name)
    except (ValueError, TypeError) as exc:
        raise UserError(
            f"wavelet {name!r}: not a discrete PyWavelets wavelet (e.g. haar, db2, sym4, coif1)"
        ) from exc
    if not wavelet.orthogonal:
        raise UserError(
            f"wavelet {name!r} is not orthogonal; the wavelet loss needs an orthonormal "
            "transform (e.g. haar, dbN, symN, coifN)"
        )
    return wavelet


@functools.lru_cache(maxsize=128)
def analysis_matrix(name: str, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The (n, n) one-level periodized DWT of a length-``n`` signal: rows ``0..n/2-1`` give
    the approximation, rows ``n/2..n-1`` the detail.

    pywt convolves with ``dec_lo``; output ``o`` then reads samples ``2o - (F/2 - 1)`` to
    ``2o + F/2`` against the reversed filter, indices taken modulo ``n`` (the alignment of
    ``mode="periodization"``, checked against ``pywt.dwt`` in the tests).
    """
    if n % 2:
        raise ValueError(f"a DWT level needs an even side, got {n}")
    wavelet = orthogonal_wavelet(name)
    taps = wavelet.dec_len
    shift = taps // 2 - 1
    rows = np.arange(n // 2)[:, None]
    cols = (2 * rows + np.arange(taps)[None, :] - shift) % n
    matrix = np.zeros((n, n))
    # add.at, not assignment: a filter longer than the signal wraps onto a column twice.
    np.add.at(matrix[: n // 2], (np.broadcast_to(rows, cols.shape), cols), wavelet.dec_lo[::-1])
    np.add.at(matrix[n // 2 :], (np.broadcast_to(rows, cols.shape), cols), wavelet.dec_hi[::-1])
    return torch.tensor(matrix, dtype=dtype, device=device)


def max_levels(size: int, wavelet: str) -> int:
    """Most levels a side of ``size`` allows: each level halves an even side, and the
    coarsest band keeps at least ``filter length - 1`` samples (1 pixel for haar), the
    PyWavelets ``dwt_max_level`` rule. 32 -> 5 for haar, 3 for db2."""
    min_side = max(orthogonal_wavelet(wavelet).dec_len - 1, 1)
    levels = 0
    while size % 2 == 0 and size // 2 >= min_side:
        size //= 2
        levels += 1
    return levels


def _analysis(x: Tensor, wavelet: str) -> Tensor:
    """(N, H, W) -> (N, H, W) one level in quadrant layout: [[A, V], [H, D]]."""
    height, width = x.shape[-2:]
    rows = analysis_matrix(wavelet, height, x.dtype, x.device)
    cols = analysis_matrix(wavelet, width, x.dtype, x.device)
    return rows @ x @ cols.T


def _synthesis(y: Tensor, wavelet: str) -> Tensor:
    """Inverse of :func:`_analysis`: the transpose of an orthonormal map."""
    height, width = y.shape[-2:]
    rows = analysis_matrix(wavelet, height, y.dtype, y.device)
    cols = analysis_matrix(wavelet, width, y.dtype, y.device)
    return rows.T @ y @ cols


def _check_levels(height: int, width: int, levels: int) -> None:
    if levels < 0 or height % 2**levels or width % 2**levels:
        raise ValueError(
            f"{levels} DWT levels need H and W divisible by 2^{levels}, got {height}x{width}"
        )


def dwt2(x: Tensor, wavelet: str = "haar", levels: int = 1) -> tuple[Tensor, list[Tensor]]:
    """Multi-level 2D DWT of ``x`` (B, C, H, W).

    Returns the approximation (B, C, H/2^L, W/2^L) and the details finest-first, each
    (B, C, 3, h, w) holding (horizontal, vertical, diagonal) = pywt's (cH, cV, cD).
    """
    batch, channels, height, width = x.shape
    _check_levels(height, width, levels)
    approx = x.reshape(batch * channels, height, width)
    details = []
    for _ in range(levels):
        y = _analysis(approx, wavelet)
        h, w = y.shape[-2] // 2, y.shape[-1] // 2
        # cH is high-pass along H (bottom-left), cV high-pass along W (top-right).
        bands = torch.stack([y[:, h:, :w], y[:, :h, w:], y[:, h:, w:]], dim=1)
        details.append(bands.reshape(batch, channels, 3, h, w))
        approx = y[:, :h, :w]
    return approx.reshape(batch, channels, *approx.shape[-2:]), details


def idwt2(approx: Tensor, details: list[Tensor], wavelet: str = "haar") -> Tensor:
    """Inverse of :func:`dwt2`: (approx, details finest-first) -> (B, C, H, W)."""
    batch, channels = approx.shape[:2]
    x = approx.reshape(batch * channels, *approx.shape[-2:])
    for detail in reversed(details):
        if detail.shape[-2:] != x.shape[-2:]:
            raise ValueError(
                f"detail band {tuple(detail.shape)} does not fit approx {tuple(x.shape)}"
            )
        bands = detail.reshape(batch * channels, 3, *x.shape[-2:])
        horizontal, vertical, diagonal = bands.unbind(1)
        top = torch.cat([x, vertical], dim=-1)
        bottom = torch.cat([horizontal, diagonal], dim=-1)
        x = _synthesis(torch.cat([top, bottom], dim=-2), wavelet)
    return x.reshape(batch, channels, *x.shape[-2:])


def band_energies(x: Tensor, wavelet: str, levels: int) -> list[Tensor]:
    """Per-sample squared norms (B,) of the DWT bands of ``x`` (B, C, H, W): the detail bands
    of each level (three orientations together), finest first, then the approximation."""
    batch, channels, height, width = x.shape
    approx = x.reshape(batch * channels, height, width)
    out = []
    for _ in range(levels):
        y = _analysis(approx, wavelet)
        h, w = y.shape[-2] // 2, y.shape[-1] // 2
        squares = y.square()
        # Detail bands = everything but the top-left quadrant: bottom half + top-right.
        detail = squares[:, h:].reshape(batch, -1).sum(1)
        out.append(detail + squares[:, :h, w:].reshape(batch, -1).sum(1))
        approx = y[:, :h, :w]
    out.append(approx.square().reshape(batch, -1).sum(1))
    return out


def wavelet_loss(
    pred: Tensor,
    target: Tensor,
    wavelet: str = "haar",
    levels: int = 5,
    approx_weight: float = 1.0,
    detail_weights: float | Sequence[float] = 1.0,
    band_scales: Sequence[float] | None = None,
) -> Tensor:
    """Per-sample band-weighted squared error (B,), see the module docstring.

    ``levels`` is capped by :func:`max_levels` of the input; ``detail_weights`` is one
    number or one per level finest-first (entries past the capped depth are unused).
    ``band_scales`` (one per band at the capped depth: detail levels finest first, then the
    approximation) multiplies the weights: the data-set normaliser of
    :func:`ismctl.losses.band_stats.band_weights`. Each sample's loss depends on that sample
    alone.
    """
    diff = residual(pred, target)
    batch, channels, height, width = diff.shape
    depth = min(levels, max_levels(height, wavelet), max_levels(width, wavelet))
    if isinstance(detail_weights, int | float):
        weights = [float(detail_weights)] * depth
    else:
        weights = [float(w) for w in detail_weights]
    if len(weights) < depth:
        raise ValueError(f"{len(weights)} detail weights for {depth} wavelet levels")
    weights = [*weights[:depth], float(approx_weight)]
    if band_scales is not None:
        if len(band_scales) != depth + 1:
            raise ValueError(f"{len(band_scales)} band scales for {depth} levels + approximation")
        weights = [w * float(s) for w, s in zip(weights, band_scales, strict=True)]
    # The DWT is linear: transforming the residual once equals the difference of the
    # coefficients of pred and target. Autocast would run the matrix products in half
    # precision, which the loss should not inherit.
    with torch.autocast(device_type=diff.device.type, enabled=False):
        errors = band_energies(diff, wavelet, depth)
        total = sum(w * e for w, e in zip(weights, errors, strict=True))
    return total / (channels * height * width)
