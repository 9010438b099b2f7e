"""Feature extraction through torch-fidelity's extractor registry.

Every network that turns images into features (Inception-v3 for FID/IS/precision-recall,
DINOv2 for FD-DINOv2, the digits classifier) is a torch-fidelity ``FeatureExtractorBase``
looked up by name, so all of them take the same input: uint8 NCHW with 3 channels in
[0, 255]. Images arrive here as uint8 (N, H, W, C), the ADM sample layout; grayscale (C = 1)
is repeated to 3 channels. Outputs are gathered as float32 numpy arrays per feature name.
"""

from __future__ import annotations

import functools
import hashlib
import pickle
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from ismctl.evaluation import digits_classifier, inception  # noqa: F401  (register extractors)
from ismctl.utils.errors import UserError
from ismctl.utils.progress import progress_bar

ImageBatch = np.ndarray | torch.Tensor


@functools.cache
def _file_digest(path: Path, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file, computed once per process for an unchanged file."""
    stat = Path(path).stat()
    return _file_digest(Path(path).resolve(), stat.st_size, stat.st_mtime_ns)


@dataclass(frozen=True)
class ExtractorSpec:
    """A registered extractor name plus the weights file it is built from (None = its own
    default: torch-fidelity's download or cache, or the digits classifier's cache)."""

    name: str
    weights: Path | None = None

    def identity(self) -> str:
        """Name and weights hash: what reference statistics depend on (cache keys)."""
        if self.weights is None:
            return self.name
        return f"{self.name}@{file_digest(self.weights)[:16]}"

    def build(self, features: Sequence[str],
              device: torch.device | str = "cpu") -> FeatureExtractorBase:
        if self.name not in FEATURE_EXTRACTORS_REGISTRY:
            raise ValueError(f"feature extractor {self.name!r} is not registered")
        weights = str(self.weights) if self.weights is not None else None
        try:
            extractor = create_feature_extractor(
                self.name, list(features), cuda=False, verbose=False,
                feature_extractor_weights_path=weights,
            )
        except (RuntimeError, KeyError, OSError, EOFError, pickle.UnpicklingError) as exc:
            if weights is None:
                raise
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(
                f"{weights}: cannot load {self.name} weights from it ({reason})"
            ) from exc
        return extractor.to(device)


def to_nchw_uint8(images: ImageBatch) -> torch.Tensor:
    """uint8 (N, H, W, C) with C in {1, 3} -> uint8 (N, 3, H, W)."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"expected uint8 images (N, H, W, 1 or 3), got {x.dtype} {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()


def iter_batches(images: ImageBatch, batch_size: int) -> Iterator[ImageBatch]:
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size]


@torch.no_grad()
def extract_features(
    extractor: FeatureExtractorBase,
    batches: Iterable[ImageBatch],
    device: torch.device | str = "cpu",
    total: int | None = None,
    progress: bool = False,
    description: str = "features",
) -> dict[str, np.ndarray]:
    """Run ``extractor`` over image batches; returns {feature name: float32 (N, D)}."""
    names = list(extractor.get_requested_features_list())
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    with progress_bar(description, total=total or 0, enabled=progress and bool(total),
                      unit="img") as bar:
        for batch in batches:
            if len(batch) == 0:
                continue
            out = extractor(to_nchw_uint8(batch).to(device))
            for name, value in zip(names, out, strict=True):
                parts[name].append(value.detach().to("cpu", torch.float32).numpy())
            bar.advance(len(batch))
    return {
        name: np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
        for name, chunks in parts.items()
    }


def features_from_images(
    spec: ExtractorSpec,
    features: Sequence[str],
    images: ImageBatch,
    batch_size: int = 100,
    device: torch.device | str = "cpu",
    progress: bool = False,
    description: str = "features",
) -> dict[str, np.ndarray]:
    """Build the extractor and run it over an in-memory image array."""
    extractor = spec.build(features, device)
    return extract_features(extractor, iter_batches(images, batch_size), device,
                            total=len(images), progress=progress, description=description)
