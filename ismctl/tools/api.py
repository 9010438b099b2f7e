"""The Python API: load a trained model and sample from it in three lines.

    from ismctl import load_model
    model = load_model("runs/quickstart")        # a run, a checkpoint, an export or weights
    images = model.sample(num=16, steps=4, class_labels=3)   # uint8 (16, H, W, C)

``load_model`` accepts a run directory (its latest checkpoint), a checkpoint folder
(``runs/x/checkpoints/step-N``), a folder written by ``ismctl export`` or a ``.safetensors``
file written by ismctl (its metadata holds the architecture, the recipe and the data summary,
see :mod:`ismctl.runs.checkpoint`). Sampling is the command line's: the same sampler
(:func:`ismctl.sampling.sampler.sample`), seeded noise and labels (sample ``i`` depends only on
``(seed, i)``), decoding by the data's encoder, and, when ``guidance`` is not given, the
guidance the run remembers for that step count (``guidance.json``, written by
``ismctl eval``), else the recipe's ``eval.default_guidance`` (w = 0 for sm runs).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ismctl.config.recipe import recipe_from_dict
from ismctl.data.manifest import Manifest
from ismctl.networks.model import ShortcutDiT
from ismctl.runs.checkpoint import (
    WEIGHT_FILES,
    LoadedRun,
    file_sha256,
    load_for_sampling,
    read_metadata,
)
from ismctl.runs.integrity import ALTERED, DamagedFile
from ismctl.sampling.protocol import choose_point, run_sampler
from ismctl.sampling.sampler import check_steps, continuous_jumps
from ismctl.system.distributed import resolve_device
from ismctl.utils.errors import UserError

EXPORT_CONFIG = "config.json"
EXPORT_FORMAT = "ismctl-export"
EXPORT_WEIGHTS = "model.safetensors"


@dataclass
class Model:
    """A loaded shortcut model: the network with everything sampling needs.

    ``run`` holds the network (eval mode, no gradients), the resolved recipe, the data
    manifest, the device and the sampler; ``guidance_dir`` is the folder whose
    ``guidance.json`` supplies the remembered guidance (a run or an export folder).
    """

    run: LoadedRun
    guidance_dir: Path
    role: str
    source: Path

    @property
    def network(self) -> torch.nn.Module:
        """F(x_t, t, d, c, w), a :class:`ismctl.networks.model.ShortcutDiT`."""
        return self.run.model

    @property
    def num_classes(self) -> int:
        return self.run.manifest.num_classes

    @property
    def class_names(self) -> list[str]:
        return list(self.run.manifest.class_names)

    @property
    def step(self) -> int:
        return self.run.step

    @property
    def device(self) -> torch.device:
        return self.run.device

    def to(self, device: str | torch.device) -> Model:
        """Move the network to ``device`` ('auto', 'cpu', 'cuda', 'cuda:1', ...)."""
        dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
        self.run.model.to(dev)
        self.run.device = dev
        return self

    def guidance_for(self, steps: int) -> tuple[float, str]:
        """The guidance w used at ``steps`` when none is given, and where it comes from."""
        check_steps(steps, self.run.recipe.objective.base_steps,
                    continuous_jumps(self.run.model))
        point, source = choose_point(self.run.recipe, self.guidance_dir, steps)
        return point.guidance, source

    def sample(self, num: int = 16, steps: int = 4, class_labels: int | Sequence[int] |
               torch.Tensor | None = None, guidance: float | None = None, seed: int = 0,
               batch_size: int | None = None, device: str | torch.device | None = None,
               return_labels: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``num`` decoded images as a uint8 tensor (num, H, W, C) on the CPU.

        ``class_labels``: None draws class-balanced labels (shuffled by ``seed``), an int gives
        every image that class, a sequence gives one label per image; ``num_classes`` is the
        null (unconditional) label. ``guidance``: w in the delta convention (CFG scale 1 + w);
        None takes :meth:`guidance_for`. ``device`` moves the model first. With
        ``return_labels`` the labels come back too: ``(images, labels)``.
        """
        from ismctl.sampling.generate import generate_images

        if device is not None:
            self.to(device)
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise UserError(f"num: must be a positive integer, got {num!r}")
        if batch_size is not None and batch_size < 1:
            raise UserError(f"batch_size: must be >= 1, got {batch_size}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise UserError(f"seed: must be an integer >= 0, got {seed!r}")
        check_steps(steps, self.run.recipe.objective.base_steps,
                    continuous_jumps(self.run.model))
        labels = self._labels(class_labels, num)
        point, _ = choose_point(self.run.recipe, self.guidance_dir, steps, guidance)
        images, labels = generate_images(
            self.run, num, steps, point.guidance, seed,
            batch_size or min(num, self.run.recipe.eval.batch_size), labels=labels,
            sampler=point.sampler)
        return (images, labels) if return_labels else images

    def _labels(self, class_labels: int | Sequence[int] | torch.Tensor | None,
                num: int) -> torch.Tensor | None:
        if class_labels is None:
            return None
        labels = torch.as_tensor(class_labels, dtype=torch.long)
        if labels.ndim == 0:  # one class for every image (int, numpy or 0-d tensor)
            labels = labels.expand(num).clone()
        else:
            labels = labels.reshape(-1)
            if labels.numel() != num:
                raise UserError(f"class_labels: {labels.numel()} labels for num={num} images")
        if labels.numel() and (labels.min() < 0 or labels.max() > self.num_classes):
            raise UserError(f"class_labels: must lie in 0..{self.num_classes - 1} "
                            f"({self.num_classes} is the null label)")
        return labels


def _is_export(folder: Path) -> bool:
    config = folder / EXPORT_CONFIG
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == EXPORT_FORMAT
    except (ValueError, AttributeError):
        return False


def _from_parts(weights: Path, arch: dict[str, Any], recipe: dict[str, Any],
                data: dict[str, Any], step: int, guidance_dir: Path, role: str,
                device: str, expected_sha256: str | None = None) -> Model:
    """A Model from a weights file and the descriptions stored with it (export or metadata)."""
    rec = recipe_from_dict(recipe, str(weights))
    manifest = Manifest.model_validate({**data, "count": 0, "shards": [], "skipped": []})
    arch = {k: v for k, v in arch.items() if k != "preset"}
    network = ShortcutDiT(**arch)
    digest = file_sha256(weights)
    if expected_sha256 is not None and digest != expected_sha256:
        raise DamagedFile(weights, f"{ALTERED}; its config.json records another")
    try:
        tensors = load_file(str(weights))
    except Exception as exc:
        # safetensors raises its own error type on a bad header or a short file.
        raise DamagedFile(weights, f"not a readable safetensors file ({exc})") from exc
    try:
        network.load_state_dict(tensors)
    except RuntimeError as exc:
        raise UserError(f"{weights}: the weights do not fit the architecture stored with them "
                        f"({str(exc).splitlines()[0]})") from exc
    dev = resolve_device(device)
    network.to(dev).eval().requires_grad_(False)
    run = LoadedRun(model=network, recipe=rec, manifest=manifest, run_dir=guidance_dir,
                    checkpoint=weights, step=step, sha256=digest,
                    mode=run_sampler(rec), device=dev)
    return Model(run=run, guidance_dir=guidance_dir, role=role, source=weights)


def _load_weights_file(path: Path, device: str) -> Model:
    meta = read_metadata(path)
    needed = ("ismctl.model", "ismctl.recipe", "ismctl.data")
    if missing := [k for k in needed if k not in meta]:
        raise UserError(f"{path}: no ismctl metadata ({', '.join(missing)} missing); load "
                        "the run folder it belongs to, or export the run with `ismctl export`")
    folder = path.parent
    if folder.parent.name == "checkpoints" and (folder.parent.parent / "recipe.yaml").is_file():
        folder = folder.parent.parent  # a run's checkpoint: the run remembers the guidance
    return _from_parts(path, json.loads(meta["ismctl.model"]), json.loads(meta["ismctl.recipe"]),
                       json.loads(meta["ismctl.data"]), int(meta.get("ismctl.step", 0)),
                       folder, meta.get("ismctl.role", "unknown"), device)


def _load_export(folder: Path, device: str) -> Model:
    config = json.loads((folder / EXPORT_CONFIG).read_text())
    weights = folder / config.get("weights", EXPORT_WEIGHTS)
    if not weights.is_file():
        raise UserError(f"{weights}: missing from the exported model folder {folder}")
    return _from_parts(weights, config["model"], config["recipe"], config["data"],
                       int(config["step"]), folder, config.get("role", "inference"), device,
                       config.get("weights_sha256"))


def load_model(path: str | Path, device: str = "auto", which: str = "inference") -> Model:
    """Load a model for sampling from a run directory, a checkpoint folder, a folder written
    by ``ismctl export`` or an ismctl ``.safetensors`` file.

    ``device``: 'auto' (CUDA when visible), 'cpu', 'cuda' or 'cuda:N'. ``which`` picks the
    weights of a run or checkpoint (inference EMA, target EMA or online); an export or a
    weights file holds one set.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: not found (expected a run, a checkpoint, an exported model "
                        "folder or a .safetensors file)")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise UserError(f"{p}: expected a .safetensors file written by ismctl")
        return _load_weights_file(p, device)
    if _is_export(p):
        return _load_export(p, device)
    if which not in WEIGHT_FILES:
        raise UserError(f"which={which!r}: choose from {', '.join(WEIGHT_FILES)}")
    run = load_for_sampling(p, which=which, device=device)
    used = run.checkpoint / WEIGHT_FILES[which]
    role = which if used.is_file() else "online"
    return Model(run=run, guidance_dir=run.run_dir, role=role, source=run.checkpoint)
