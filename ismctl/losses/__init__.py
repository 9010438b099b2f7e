"""Loss registry (SPEC 3.2): recipe ``loss.name`` -> per-sample loss ``(pred, target) -> (B,)``.

A factory receives the ``loss`` recipe section and the input side length and returns a
picklable callable; new losses register with ``@register_loss("name")``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import Tensor

from ismctl.errors import UserError
from ismctl.losses.mse import mse_loss
from ismctl.losses.wavelet import dwt2, idwt2, max_levels, wavelet_loss
from ismctl.recipe import LossCfg

LossFn = Callable[[Tensor, Tensor], Tensor]
LossFactory = Callable[[LossCfg, int], LossFn]

_REGISTRY: dict[str, LossFactory] = {}

__all__ = [
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
    """Decorator registering ``factory(cfg, input_size) -> LossFn`` under ``name``."""

    def decorate(factory: LossFactory) -> LossFactory:
        if name in _REGISTRY:
            raise ValueError(f"loss {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorate


def available_losses() -> list[str]:
    return sorted(_REGISTRY)


def build_loss(cfg: LossCfg, input_size: int) -> LossFn:
    """The loss named by ``cfg.name`` for inputs of side ``input_size``."""
    factory = _REGISTRY.get(cfg.name)
    if factory is None:
        choices = ", ".join(available_losses())
        raise UserError(f"loss.name: unknown loss {cfg.name!r} (choose from {choices})")
    return factory(cfg, input_size)


@register_loss("mse")
def _build_mse(cfg: LossCfg, input_size: int) -> LossFn:
    return mse_loss


@register_loss("wavelet")
def _build_wavelet(cfg: LossCfg, input_size: int) -> LossFn:
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
    return functools.partial(
        wavelet_loss,
        wavelet=cfg.wavelet,
        levels=depth,
        approx_weight=cfg.approx_weight,
        detail_weights=weights,
        energy_norm=cfg.energy_norm,
    )
