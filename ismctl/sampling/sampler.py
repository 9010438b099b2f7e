"""Euler shortcut sampling (method §1): N steps of size 1/N from noise (t = 0) to data (t = 1).

    x <- x + (1/N) F(x, t_i, d_i, c, w),  t_i = i / N

with the jump size d_i = 1/N (``jumps="step"``: each step is a shortcut of its own length) or
d_i = 1 - t_i (``jumps="to_end"``: the network predicts the jump to the data end, as a
consistency model does, and the step moves 1/N of the way along it; the last step lands on the
prediction). N is a power of two up to ``base_steps`` for networks trained on dyadic jumps (sm,
ism); a network with continuous jump sizes (MeanFlow, method §4.1) takes any N >= 1.

Samplers (the ``mode`` argument):

- ``intrinsic`` (iSM) feeds the guidance strength w to the network: one pass per step.
- ``conditional`` (the sm baseline, its authors' protocol, method §2): one pass with the label and
  w = 0. An sm network has CFG baked into its shortcuts by its training targets, so this
  output is already guided; ``w`` must be 0.
- ``cfg`` runs the label and the null rows with w = 0 and combines them as
  v_c + w (v_c - v_null), i.e. CFG scale s = 1 + w: two passes per step. On an sm network
  this guides twice (baked-in guidance, then CFG on top): reachable, never the default.
- ``flow-cfg`` is ``cfg`` on the instantaneous velocity instead of the jump of size 1/N: N Euler
  steps of classic flow matching with CFG. The velocity is asked for at the network's
  ``flow_jump``: d = 0 for ism and MeanFlow networks, d = 1/M for sm networks, whose flow is
  trained at the finest jump's embedding as in the official code (method §2). The sm authors'
  separate 128-step CFG entry samples exactly this.
"""

from __future__ import annotations

import contextlib
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor, nn

from ismctl.networks.unwrap import unwrap_model
from ismctl.objectives.guidance import cfg_combine
from ismctl.utils.errors import UserError
from ismctl.utils.progress import progress_bar

Mode = Literal["intrinsic", "conditional", "cfg", "flow-cfg"]
MODES: tuple[str, ...] = get_args(Mode)
TWO_PASS = ("cfg", "flow-cfg")
JUMPS = ("step", "to_end")


def check_steps(steps: int, base_steps: int, continuous: bool = False) -> None:
    """N must be a power of two in [1, base_steps], the jump sizes the network was trained on;
    with ``continuous`` jump sizes any integer N >= 1."""
    if not isinstance(steps, int | np.integer) or steps < 1:
        raise UserError(f"steps: must be a positive integer, got {steps}")
    if not continuous and (steps & (steps - 1) or steps > base_steps):
        raise UserError(f"steps: must be a power of two between 1 and {base_steps}, got {steps}")


def continuous_jumps(model: nn.Module) -> bool:
    """Whether ``model`` (possibly DDP/compile-wrapped) takes any jump size d in [0, 1]."""
    return bool(getattr(unwrap_model(model), "continuous_jumps", False))


def flow_jump(model: nn.Module) -> float:
    """The jump size at which ``model`` (possibly wrapped) was trained as a plain flow."""
    return float(getattr(unwrap_model(model), "flow_jump", 0.0))


def _null_class(model: nn.Module, num_classes: int | None) -> int:
    if num_classes is not None:
        return num_classes
    found = getattr(unwrap_model(model), "num_classes", None)
    if found is None:
        raise UserError("cfg sampling needs num_classes (the null label); the model has none")
    return int(found)


@torch.inference_mode()
def sample(model: nn.Module, noise: Tensor, labels: Tensor, steps: int, guidance: float = 0.0,
           mode: Mode = "intrinsic", base_steps: int = 128,
           autocast_dtype: torch.dtype | None = None, num_classes: int | None = None,
           jumps: str = "step") -> Tensor:
    """Integrate ``noise`` (B, C, H, W) to samples in ``steps`` shortcut jumps.

    ``guidance`` is w in the delta convention (CFG scale 1 + w); ``mode`` is one of the samplers
    in the module docstring, ``jumps`` the jump-size rule ("step" or "to_end"). The two-pass
    modes take the null label ``num_classes``, read from ``model.num_classes`` when not given.
    ``autocast_dtype`` (e.g. bfloat16) is the network's autocast precision on any device; the
    state is integrated in the dtype of ``noise``. The model runs in eval mode and gets its
    previous mode back afterwards.

    ``steps`` is validated here, once, so the loop reads nothing back from the device: under
    inference mode each step only queues work (``model`` may be a compiled network).
    """
    check_steps(steps, base_steps, continuous_jumps(model))
    if mode not in MODES:
        raise UserError(f"sampling mode: expected one of {', '.join(MODES)}, got {mode!r}")
    if jumps not in JUMPS:
        raise UserError(f"sampling jumps: expected one of {', '.join(JUMPS)}, got {jumps!r}")
    to_end = jumps == "to_end" and mode != "flow-cfg"
    if to_end and not continuous_jumps(model):
        raise UserError("sampling jumps 'to_end' needs a network with continuous jump sizes "
                        "(d = 1 - t is not a dyadic jump)")
    if guidance < 0:
        raise UserError(f"guidance: w must be >= 0 (CFG scale 1 + w), got {guidance}")
    if mode == "conditional" and guidance != 0:
        raise UserError(f"guidance {guidance:g}: the conditional sampler takes w = 0 (the "
                        "network's guidance is baked into its jumps); use cfg to add more")
    batch = noise.shape[0]
    two_pass = mode in TWO_PASS
    null = _null_class(model, num_classes) if two_pass else 0
    autocast = (torch.autocast(noise.device.type, dtype=autocast_dtype)
                if autocast_dtype is not None else contextlib.nullcontext())
    jump = flow_jump(model) if mode == "flow-cfg" else 1.0 / steps
    d = torch.full((batch,), jump, device=noise.device)
    if not two_pass:
        w = torch.full((batch,), float(guidance), device=noise.device)
    else:
        w = torch.zeros(2 * batch, device=noise.device)
        pair_labels = torch.cat([labels, torch.full_like(labels, null)])
        pair_d = torch.cat([d, d])

    was_training = model.training
    model.eval()
    try:
        x = noise.clone()
        for i in range(steps):
            t = torch.full((batch,), i / steps, device=noise.device)
            if to_end:
                d = 1.0 - t
                pair_d = torch.cat([d, d])
            with autocast:
                if not two_pass:
                    v = model(x, t, d, labels, w)
                else:
                    # Label and null rows in one call: the two CFG passes share a batch.
                    out = model(torch.cat([x, x]), torch.cat([t, t]), pair_d, pair_labels, w)
                    v_cond, v_null = out.to(x.dtype).chunk(2)
                    v = cfg_combine(v_cond, v_null, float(guidance))
            x = x + (1.0 / steps) * v.to(x.dtype)
    finally:
        model.train(was_training)
    return x


def balanced_labels(num: int, num_classes: int, seed: int) -> Tensor:
    """Class-balanced labels (i mod num_classes) in an order fixed by ``seed``."""
    labels = torch.arange(num) % num_classes
    perm = torch.randperm(num, generator=torch.Generator().manual_seed(seed))
    return labels[perm]


def sample_noise(indices: Tensor, shape: tuple[int, ...], seed: int) -> Tensor:
    """Standard normal noise where row j depends only on (seed, indices[j]), float32 on CPU.

    Each sample gets its own PCG64 stream keyed by the pair through numpy's SeedSequence, so
    streams neither overlap nor collide across seeds (torch's CPU generator keeps only the low
    32 bits of a seed).
    """
    out = np.empty((len(indices), *shape), dtype=np.float32)
    for row, i in enumerate(indices.tolist()):
        out[row] = np.random.default_rng([seed, i]).standard_normal(shape, dtype=np.float32)
    return torch.from_numpy(out)


def generate(model: nn.Module, num: int, shape: tuple[int, int, int], num_classes: int,
             steps: int, guidance: float, mode: str, seed: int, batch_size: int,
             device: torch.device | str, labels: Tensor | None = None, base_steps: int = 128,
             autocast_dtype: torch.dtype | None = None,
             progress: bool = False, jumps: str = "step") -> tuple[Tensor, Tensor]:
    """``num`` samples in batches; returns (x (num, *shape) float32 on CPU, labels (num,) long).

    Labels are class-balanced and shuffled by ``seed`` unless given (values 0..num_classes, the
    last being the null label for unconditional samples). Sample i depends only on (seed, i),
    so the output is the same whatever ``batch_size``.
    """
    if num < 1 or batch_size < 1:
        raise UserError(f"generate: num and batch_size must be >= 1, got {num}, {batch_size}")
    if seed < 0:
        raise UserError(f"seed: must be >= 0, got {seed}")
    check_steps(steps, base_steps, continuous_jumps(model))
    if labels is None:
        labels = balanced_labels(num, num_classes, seed)
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    if labels.shape != (num,):
        raise UserError(f"labels: expected shape ({num},), got {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() > num_classes):
        raise UserError(f"labels: must lie in 0..{num_classes} ({num_classes} is the null label)")
    out: list[Tensor] = []
    # The project's bar: rich's own, disabled, still ends with a newline in older rich (13.4).
    with progress_bar(f"sampling {steps} step(s), w={guidance:g}", num, enabled=progress,
                      unit="img") as bar:
        for chunk in torch.arange(num).split(batch_size):
            noise = sample_noise(chunk, shape, seed).to(device)
            x = sample(model, noise, labels[chunk].to(device), steps, guidance, mode=mode,
                       base_steps=base_steps, autocast_dtype=autocast_dtype,
                       num_classes=num_classes, jumps=jumps)
            out.append(x.float().cpu())
            bar.advance(len(chunk))
    return torch.cat(out), labels
