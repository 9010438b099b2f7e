"""Plain per-sample mean squared error, the shortcut-model baseline loss (method §2)."""

from __future__ import annotations

import torch
from torch import Tensor


def residual(pred: Tensor, target: Tensor) -> Tensor:
    """``pred - target`` in at least float32: bf16/fp16 inputs are promoted before the
    subtraction, so the residual itself is not rounded to half precision."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    return pred.to(dtype) - target.to(dtype)


def mse_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean of squared errors over every non-batch dimension: (B, ...) -> (B,)."""
    return residual(pred, target).square().flatten(1).mean(dim=1)
