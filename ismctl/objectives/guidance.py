"""Guidance in the "delta" convention (method §1): v_w = v_c + w (v_c - v_null), CFG scale
s = 1 + w.

The same combination serves three places: plain CFG at sampling time (the sm baseline), CFG
inside the finest bootstrap targets (sm, method §2) and the guidance target of iSM (method §3.1).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ismctl.utils.errors import UserError


def _per_sample(w: Tensor | float, like: Tensor) -> Tensor | float:
    """Broadcast a per-sample (B,) strength over the trailing (C, H, W) dims of ``like``."""
    if isinstance(w, Tensor) and w.ndim == 1:
        return w.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))
    return w


def cfg_combine(v_cond: Tensor, v_null: Tensor, w: Tensor | float) -> Tensor:
    """Guided velocity v_c + w (v_c - v_null); ``w`` a number or one value per sample."""
    return v_cond + _per_sample(w, v_cond) * (v_cond - v_null)


def guidance_grid(w_max: float, w_step: float) -> Tensor:
    """The training grid {0, w_step, ..., w_max} (float64, w_max included when on the grid)."""
    if w_step <= 0 or w_max < 0:
        raise UserError(f"guidance grid: need w_step > 0 and w_max >= 0, got {w_step}, {w_max}")
    # The tolerance keeps w_max itself when w_max / w_step is an integer up to rounding.
    count = math.floor(w_max / w_step + 1e-9) + 1
    return torch.arange(count, dtype=torch.float64) * w_step


def sample_guidance(n: int, w_max: float, w_step: float,
                    generator: torch.Generator | None, device: torch.device | str) -> Tensor:
    """``n`` strengths drawn uniformly from {0, w_step, ..., w_max} (method §3.1), float32."""
    grid = guidance_grid(w_max, w_step).to(device=device, dtype=torch.float32)
    gen_device = generator.device if generator is not None else device
    idx = torch.randint(len(grid), (n,), generator=generator, device=gen_device)
    return grid[idx.to(grid.device)]


def interval_weight(t: Tensor, w: Tensor, interval_start: float) -> Tensor:
    """Interval guidance (method §3.1): the strength is kept for t >= start and zeroed for
    t < start, the high-noise end where guidance mostly hurts diversity."""
    return torch.where(t >= interval_start, w, torch.zeros_like(w))


def parse_guidance(text: str) -> list[float]:
    """Guidance strengths from the command line: comma-separated numbers and/or inclusive
    ranges ``START:STOP:STEP`` (``0:4:0.5`` is 0, 0.5, ..., 4), in order, duplicates dropped."""
    out: list[float] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            fields = [float(v) for v in item.split(":")]
        except ValueError as exc:
            raise UserError(f"--guidance {text!r}: {item!r} is not a number or START:STOP:STEP "
                            "(e.g. 0,1.0 or 0:4:0.5)") from exc
        if len(fields) == 1:
            values = fields
        elif len(fields) == 3 and fields[2] > 0 and fields[1] >= fields[0]:
            start, stop, step = fields
            count = math.floor((stop - start) / step + 1e-9) + 1
            values = [round(start + i * step, 10) for i in range(count)]
        else:
            raise UserError(f"--guidance {text!r}: a range is START:STOP:STEP with STEP > 0 and "
                            f"STOP >= START, got {item!r}")
        for w in values:
            if not (math.isfinite(w) and w >= 0):
                raise UserError(f"--guidance {text!r}: w must be >= 0 (CFG scale 1 + w)")
            if w not in out:
                out.append(w)
    if not out:
        raise UserError(f"--guidance {text!r}: give at least one strength")
    return out


def scale_to_w(s: float) -> float:
    """Classic CFG scale s to the delta strength w = s - 1."""
    return s - 1.0


def w_to_scale(w: float) -> float:
    """Delta strength w to the classic CFG scale s = 1 + w."""
    return 1.0 + w


def baked_scale(omega: float, kappa: float) -> float:
    """The CFG scale s that MeanFlow's baked-in guidance converges to (docs/meanflow.md): at
    d = 0 the target omega v + kappa F_c + (1 - omega - kappa) F_null has the fixed point
    F_c = v_null + s (v_c - v_null) with s = omega / (1 - kappa); w = s - 1."""
    if not 0.0 <= kappa < 1.0:
        raise UserError(f"guidance.kappa: must be in [0, 1), got {kappa}")
    return omega / (1.0 - kappa)
