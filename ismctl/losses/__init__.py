"""Loss registry (method §3.2): recipe ``loss.name`` -> per-sample loss ``(pred, target) -> (B,)``.

A factory receives the ``loss`` recipe section, the input side length and the data set's band
statistics (``ismctl/losses/band_stats.py``; None where no data set is at hand) and returns a
picklable callable; new losses register with ``@register_loss("name")``. Every loss is a
function of each sample alone, so a batch split across ranks or accumulation steps gives the
same per-sample values.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import Tensor

from ismctl.config.names import LOSS_NAMES
from ismctl.config.recipe import LossCfg
from ismctl.losses.band_stats import BandStats, band_weights, white_stats
from ismctl.losses.mse import mse_loss
from ismctl.losses.wavelet import dwt2, idwt2, max_levels, wavelet_loss
from ismctl.utils.errors import UserError

LossFn = Callable[[Tensor, Tensor], Tensor]
LossFactory = Callable[[LossCfg, int, BandStats | None], LossFn]

_REGISTRY: dict[str, LossFactory] = {}

__all__ = [
    "BandStats",
    "LossFn",
    "available_losses",
    "build_loss",
    "dwt2",
    "idwt2",
    "max_levels",
    "mse_loss",
    "register_loss",
    "wavelet_loss",
]


def register_loss(name: str) -> Callable[[LossFactory], LossFactory]:
    """Decorator registering ``factory(cfg, input_size, band_stats) -> LossFn`` under
    ``name``."""

    def decorate(factory: LossFactory) -> LossFactory:
        if name in _REGISTRY:
            raise ValueError(f"loss {name!r} is already registered")
        if name not in LOSS_NAMES:
            raise ValueError(f"loss {name!r}: add its name to ismctl.config.names.LOSS_NAMES, "
                             "where recipes are checked against it")
        _REGISTRY[name] = factory
        return factory

    return decorate


def available_losses() -> list[str]:
    return sorted(_REGISTRY)


def build_loss(cfg: LossCfg, input_size: int, band_stats: BandStats | None = None) -> LossFn:
    """The loss named by ``cfg.name`` for inputs of side ``input_size``.

    ``band_stats``: the training data's band statistics, which the wavelet loss's normaliser
    is built from; None stands for unit-variance white data (uniform band weights), for
    benchmarks and tests without a data set. The trainer always passes the data's own.
    """
    factory = _REGISTRY.get(cfg.name)
    if factory is None:
        choices = ", ".join(available_losses())
        raise UserError(f"loss.name: unknown loss {cfg.name!r} (choose from {choices})")
    return factory(cfg, input_size, band_stats)


@register_loss("mse")
def _build_mse(cfg: LossCfg, input_size: int, band_stats: BandStats | None) -> LossFn:
    return mse_loss


@register_loss("wavelet")
def _build_wavelet(cfg: LossCfg, input_size: int, band_stats: BandStats | None) -> LossFn:
    try:
        depth = min(cfg.levels, max_levels(input_size, cfg.wavelet))
    except UserError as exc:
        raise UserError(f"loss.wavelet: {exc}") from exc
    weights = cfg.detail_weights
    if isinstance(weights, list):
        if len(weights) != cfg.levels:
            raise UserError(
                f"loss.detail_weights: {len(weights)} weights given for loss.levels = "
                f"{cfg.levels} (one per level, finest first, or a single number)"
            )
        weights = weights[:depth]
    if min(weights if isinstance(weights, list) else [weights], default=0.0) < 0:
        raise UserError(f"loss.detail_weights: weights must be >= 0, got {cfg.detail_weights}")
    stats = band_stats or white_stats((1, input_size, input_size), cfg.wavelet, depth)
    if (stats.wavelet, stats.levels, stats.shape[1:]) != (cfg.wavelet, depth,
                                                         (input_size, input_size)):
        raise UserError(
            f"loss: band statistics measured for {stats.wavelet} L = {stats.levels} on "
            f"{stats.shape[1]}x{stats.shape[2]} inputs, the recipe asks for {cfg.wavelet} "
            f"L = {depth} on {input_size}x{input_size}")
    return functools.partial(
        wavelet_loss,
        wavelet=cfg.wavelet,
        levels=depth,
        approx_weight=cfg.approx_weight,
        detail_weights=weights,
        band_scales=tuple(band_weights(stats, cfg.band_norm, cfg.max_band_ratio)),
    )
