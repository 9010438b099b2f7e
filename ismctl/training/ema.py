"""Twin EMA (method §3.4): a fast target EMA for the training targets, a slow one for sampling.

The target EMA (decay 0.95) builds the self-consistency and guidance targets; the inference
EMA (decay 0.9999) is only used to sample and evaluate. Either can be disabled for ablations,
and then the online weights take its place. The paper's EMA has no warm-up, which is the
default (``ema.warmup: false``); the warm-up schedule is there for short runs (method §3.4).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ismctl.networks.unwrap import unwrap_model
from ismctl.utils.errors import UserError


def ema_decay(decay: float, num_updates: int, warmup: bool) -> float:
    """Decay used at update ``num_updates`` (0-based).

    With warm-up it is min(decay, (1 + n) / (10 + n)): 0.1 at the first update, so a short run's
    EMA moves off the initial weights instead of staying there for ~1 / (1 - decay) steps. The
    schedule reaches 0.95 after 170 updates, 0.999 after ~9,000 and 0.9999 after ~90,000; until
    then the decay is the schedule's whatever the recipe says (0.997 at update 3,000).
    """
    if warmup:
        return min(decay, (1.0 + num_updates) / (10.0 + num_updates))
    return decay


def _frozen_copy(model: nn.Module) -> nn.Module:
    ema = copy.deepcopy(model)
    ema.eval()
    ema.requires_grad_(False)
    return ema


class TwinEMA:
    """The target and inference EMA copies of one online model.

    ``target`` and ``inference`` are deep copies in eval mode without gradients; a disabled
    EMA returns the online module itself (DDP unwrapped, so calls stay local to the rank).
    """

    def __init__(self, model: nn.Module, target_decay: float = 0.95,
                 inference_decay: float = 0.9999, target_enabled: bool = True,
                 inference_enabled: bool = True, warmup: bool = False) -> None:
        for name, value in (("target_decay", target_decay), ("inference_decay", inference_decay)):
            if not 0.0 <= value < 1.0:
                raise UserError(f"ema.{name}: must be in [0, 1), got {value}")
        self._online = model.module if isinstance(model, DistributedDataParallel) else model
        plain = unwrap_model(model)
        self.target_decay = target_decay
        self.inference_decay = inference_decay
        self.warmup = warmup
        self.num_updates = 0
        self._target = _frozen_copy(plain) if target_enabled else None
        self._inference = _frozen_copy(plain) if inference_enabled else None

    @property
    def target(self) -> nn.Module:
        return self._target if self._target is not None else self._online

    @property
    def inference(self) -> nn.Module:
        return self._inference if self._inference is not None else self._online

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema = decay * ema + (1 - decay) * online for each enabled copy; buffers copied.

        Call after each optimiser step. One fused ``_foreach_lerp_`` per EMA over the whole
        parameter list keeps this a few percent of a step even for XL models (method §5).
        """
        online = unwrap_model(model)
        params = [p.detach() for p in online.parameters()]
        buffers = list(online.buffers())
        for ema, decay in ((self._target, self.target_decay),
                           (self._inference, self.inference_decay)):
            if ema is None:
                continue
            ema_params = list(ema.parameters())
            if len(ema_params) != len(params):
                raise ValueError("TwinEMA.update: the model's parameters differ from the EMA's")
            weight = 1.0 - ema_decay(decay, self.num_updates, self.warmup)
            torch._foreach_lerp_(ema_params, params, weight)
            ema_buffers = list(ema.buffers())
            if ema_buffers:
                torch._foreach_copy_(ema_buffers, buffers)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_updates": self.num_updates,
            "target": None if self._target is None else self._target.state_dict(),
            "inference": None if self._inference is None else self._inference.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the enabled copies; a copy stored but disabled now is ignored."""
        for name, ema in (("target", self._target), ("inference", self._inference)):
            if ema is None:
                continue
            weights = state.get(name)
            if weights is None:
                raise UserError(f"checkpoint: no {name} EMA weights stored, but ema.{name}_enabled "
                                "is true in the recipe")
            ema.load_state_dict(weights)
        self.num_updates = int(state["num_updates"])
