"""Start a run from a published DiT or SiT checkpoint (``model.init_from``).

DiT (Peebles & Xie 2023) and SiT (Ma et al. 2024) share one network and one parameter naming:
``x_embedder.proj.*`` (a Conv2d patch embedding), ``pos_embed`` (fixed 2D sin-cos),
``t_embedder.mlp.{0,2}.*``, ``y_embedder.embedding_table.weight`` (one extra row, the null
class, when trained with label dropout), ``blocks.N.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2,
adaLN_modulation.1}.*`` and ``final_layer.{linear, adaLN_modulation.1}.*``. Our backbone
(:mod:`ismctl.networks.model`) is the same network with two more conditioning inputs, the jump
size d and the guidance strength w, added to the conditioning vector c = t_emb + d_emb + y_emb +
w_emb. The import copies every shared tensor and starts the new embedders at zero, so
d_emb = 0 and w_emb(w) = 0 for every w, and

    F(x, t, d=0, c, w=0) == source(x, k t, c)[:, :C]

exactly: the same weights compute the same function. The time factor k is our t embedder's
scale, which depends on how the network embeds jump sizes: k = 1000 for a jump-size table
(sm, ism: DiT's own ``1000 t`` features), k = 1 for a continuous jump embedding (MeanFlow,
whose JVP target needs t and d unscaled; :mod:`ismctl.networks.model`). (The d embedding starts
at zero for every jump size, so at the start every jump size returns the source's output; the w
embedder's last layer is zero, its first layer keeps our initialisation.) What that function
*means* differs per source, and the import converts nothing:

- Our time runs from noise (t = 0) to data (t = 1), ``x_t = (1 - t) x0 + t x1``, and F is a
  velocity ``x1 - x0`` (method §1); our t embedder sees ``k t``.
- DiT takes a DDPM step index tau in 0..999 with tau = 0 (almost) clean data and tau = 999
  (almost) pure noise, and its first C output channels predict the noise epsilon (the other
  C, learned variances, are dropped here). Our t corresponds to tau = k t, so the time
  direction is the opposite of ours and the output is a noise prediction, not a velocity:
  an imported DiT is an initialisation for fine-tuning, not a sampler.
- SiT (linear interpolant, velocity prediction) shares our path and sign: t = 0 noise,
  t = 1 data, v = x1 - x0, and feeds its t in [0, 1] to the embedder unscaled. Into a
  continuous-jump network (k = 1) it imports as its own velocity in our time; into a table
  network (k = 1000) its velocity at time s is our network at t = s / 1000, so the time
  argument must be rescaled before the imported network is a flow velocity in our time
  (training rescales it). SiT checkpoints of other interpolants (GVP, VP) or noise/score
  prediction differ further.

Every tensor is accounted for in the returned report: mapped (source key -> our key),
initialised (our keys the source lacks, and how) and ignored (source keys we do not use, e.g.
the learned-variance half of the output layer is counted as mapped, sliced).
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file
from torch import Tensor, nn

from ismctl.networks.unwrap import unwrap_model
from ismctl.system.runtime import needs_torch
from ismctl.utils.console import make_console
from ismctl.utils.errors import UserError

# Our name -> the published name, where they differ; every other tensor keeps its name.
RENAMED = {"x_embedder.weight": "x_embedder.proj.weight",
           "x_embedder.bias": "x_embedder.proj.bias",
           "y_embedder.weight": "y_embedder.embedding_table.weight"}
# Wrappers that prefix every key of a saved state dict (DDP, torch.compile).
PREFIXES = ("module.", "_orig_mod.")
# Entries of a training checkpoint that hold a state dict, in order of preference: the EMA
# is what the authors sample from.
ENTRIES = ("ema", "model", "state_dict")


@dataclass
class ImportReport:
    """What :func:`init_from_pretrained` did with every tensor."""

    source: str
    entry: str | None
    time_scale: float = 1000.0                                  # k: F(., t, ...) = source(., k t)
    mapped: dict[str, str] = field(default_factory=dict)        # our key -> source key
    initialised: dict[str, str] = field(default_factory=dict)   # our key -> how
    ignored: list[str] = field(default_factory=list)            # source keys not used

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "entry": self.entry, "time_scale": self.time_scale,
                "mapped": dict(self.mapped),
                "initialised": dict(self.initialised), "ignored": list(self.ignored)}


def _allow_namespaces(path: Path) -> contextlib.AbstractContextManager:
    """Let ``torch.load(weights_only=True)`` read argparse namespaces (DiT's saved arguments).

    torch >= 2.5 allows them for one call; torch 2.4 only process-wide (plain data, no code,
    so the wider allowance is harmless).
    """
    serialization = torch.serialization
    if hasattr(serialization, "safe_globals"):
        return serialization.safe_globals([argparse.Namespace])
    if not hasattr(serialization, "add_safe_globals"):
        raise needs_torch("2.4", f"model.init_from {path}: reading a checkpoint without "
                                 "running its code", "a .safetensors file needs no more")
    serialization.add_safe_globals([argparse.Namespace])
    return contextlib.nullcontext()


def read_pretrained(path: str | Path) -> tuple[dict[str, Tensor], str | None]:
    """The state dict of a DiT/SiT checkpoint file and the entry it was found under.

    ``.safetensors`` files are read as they are; other files with ``torch.load`` restricted
    to tensors and containers (argparse namespaces allowed: DiT's training checkpoints store
    their arguments), no arbitrary code.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model.init_from {path}: file not found")
    try:
        if path.suffix == ".safetensors":
            data: Any = load_file(str(path))
        else:
            with _allow_namespaces(path):
                data = torch.load(path, map_location="cpu", weights_only=True)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise UserError(f"model.init_from {path}: not a readable checkpoint "
                        f"({str(exc).splitlines()[0]})") from exc
    entry = None
    if isinstance(data, dict):
        entry = next((k for k in ENTRIES if isinstance(data.get(k), dict)), None)
        if entry is not None:
            data = data[entry]
    if not isinstance(data, dict) or not all(isinstance(v, Tensor) for v in data.values()):
        raise UserError(f"model.init_from {path}: expected a state dict of tensors (or one "
                        f"under {', '.join(repr(k) for k in ENTRIES)})")
    state = {}
    for key, value in data.items():
        for prefix in PREFIXES:
            key = key.removeprefix(prefix)
        state[key] = value
    return state, entry


def _output_rows(source: Tensor, ours: Tensor, patch: int) -> Tensor:
    """The output layer's rows for our C channels: each token's p*p*C' outputs are laid out
    (p, p, C') as in DiT's unpatchify, and a learned-sigma network has C' = 2C (the mean's
    C channels first), so the first C of every patch position are kept."""
    c_src, c_ours = source.shape[0] // patch**2, ours.shape[0] // patch**2
    return source.reshape(patch**2, c_src, *source.shape[1:])[:, :c_ours].reshape(ours.shape)


def plan_import(model: nn.Module, state: dict[str, Tensor], source: str = "",
                entry: str | None = None) -> tuple[dict[str, Tensor], ImportReport]:
    """Our state dict's tensors taken from ``state`` (a DiT/SiT state dict) and the report.

    Raises UserError when a tensor's shape does not fit (another preset, input size, patch
    size, channel or class count) or when the source is not a DiT/SiT network.
    """
    net = unwrap_model(model)
    ours = net.state_dict()
    report = ImportReport(source=source, entry=entry, time_scale=time_scale(net))
    values: dict[str, Tensor] = {}
    if "x_embedder.proj.weight" not in state or "blocks.0.attn.qkv.weight" not in state:
        raise UserError(f"model.init_from {source}: not a DiT/SiT state dict (no "
                        "x_embedder.proj.weight / blocks.0.attn.qkv.weight)")
    for key, target in ours.items():
        src_key = RENAMED.get(key, key)
        if src_key not in state:
            continue
        value = state[src_key]
        if key.startswith("final_layer.linear.") and value.shape[0] == 2 * target.shape[0]:
            value = _output_rows(value, target, net.patch_size)
        elif key == "y_embedder.weight" and value.shape[0] == target.shape[0] - 1:
            # Trained without label dropout: no null row; ours starts at zero (see below).
            value = torch.cat([value, torch.zeros_like(value[:1])])
            report.initialised[f"{key}[{target.shape[0] - 1}]"] = "zeros (null class row)"
        if value.shape != target.shape:
            raise UserError(
                f"model.init_from {source}: {src_key} has shape {tuple(value.shape)}, our "
                f"{key} has {tuple(target.shape)}; choose model.preset, input size, channels "
                "and classes as in the source network")
        values[key] = value.to(target.dtype)
        report.mapped[key] = src_key
    used = set(report.mapped.values())
    report.ignored = sorted(k for k in state if k not in used)
    for key in ours:
        if key in report.mapped:
            continue
        # A table's rows, or a scalar embedder's last layer (its first keeps our random
        # initialisation: zeroing both would leave the MLP without a gradient).
        if key == "d_embedder.weight" or key.startswith("d_embedder.mlp.2."):
            values[key] = torch.zeros_like(ours[key])
            report.initialised[key] = "zeros: d_emb = 0 for every jump size"
        elif key.startswith("w_embedder.mlp.2."):
            values[key] = torch.zeros_like(ours[key])
            report.initialised[key] = "zeros: w_emb = 0 for every w"
        elif key.startswith(("w_embedder.", "d_embedder.")):
            report.initialised[key] = "our initialisation (no effect while mlp.2 is zero)"
        else:
            raise UserError(f"model.init_from {source}: the source has no tensor for our "
                            f"{key} (expected {RENAMED.get(key, key)})")
    return values, report


def time_scale(model: nn.Module) -> float:
    """k, the factor our t embedder applies to t: F(x, t, 0, c, 0) = source(x, k t, c)."""
    return float(unwrap_model(model).t_embedder.scale)


def _embedding_note(scale: float) -> str:
    return ("jump-size table: DiT's 1000 t time features" if scale == 1000.0
            else "continuous jump embedding: t unscaled")


def check_init_from(model: nn.Module, path: str | None, resuming: bool
                    ) -> dict[str, Tensor] | None:
    """``model.init_from`` read and planned against ``model`` (e.g. built on the meta device) as
    a run does before it writes anything, so ``train`` and ``train --dry-run`` refuse the same
    files with the same one-line error. Returns the source state dict, or None when the run
    does not read it (no ``init_from``, or a resumed run, which continues its own weights)."""
    if not path or resuming:
        return None
    state, entry = read_pretrained(path)
    plan_import(model, state, path, entry)
    return state


def print_report(report: ImportReport, console: Console | None = None) -> None:
    table = Table(title=f"model.init_from {report.source}"
                        + (f" (entry '{report.entry}')" if report.entry else ""))
    for name in ("our key", "action", "source key / how"):
        table.add_column(name)
    for key, src in report.mapped.items():
        table.add_row(key, "mapped", src)
    for key, how in report.initialised.items():
        table.add_row(key, "initialised", how)
    for key in report.ignored:
        table.add_row("", "ignored", key)
    (console or make_console()).print(table)
    (console or make_console()).print(
        f"{len(report.mapped)} mapped, {len(report.initialised)} initialised, "
        f"{len(report.ignored)} ignored; F(x, t, 0, c, 0) = source(x, "
        f"{report.time_scale:g} t, c) ({_embedding_note(report.time_scale)}): see "
        "ismctl/networks/pretrained.py for the source's time and output conventions")


@torch.no_grad()
def init_from_pretrained(model: nn.Module, source: str | Path | dict[str, Tensor],
                         verbose: bool = True, name: str | None = None) -> dict[str, Any]:
    """Load a DiT/SiT checkpoint (a path, or its state dict) into ``model`` in place and
    return the report (``mapped``, ``initialised``, ``ignored``; see the module docstring).
    ``name`` names a state dict's file in the report."""
    if isinstance(source, dict):
        state, entry, name = source, None, name or "<state dict>"
    else:
        (state, entry), name = read_pretrained(source), str(source)
    values, report = plan_import(model, state, name, entry)
    net = unwrap_model(model)
    ours = net.state_dict()
    for key, value in values.items():
        ours[key].copy_(value)
    if verbose:
        print_report(report)
    return report.as_dict()
