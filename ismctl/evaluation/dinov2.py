"""FD-DINOv2 (Stein et al. 2023): the Frechet distance in DINOv2 ViT-L/14 feature space.

torch-fidelity 0.4 exposes DINOv2 as ``dinov2-vit-l-14`` (1024-d CLS features; uint8 input
resized TF1-bilinear to 224 and ImageNet-normalised inside). It loads the network with
``torch.hub.load("facebookresearch/dinov2", ...)``, which needs the network the first time
and afterwards works offline from torch hub's cache: the repository folder and the
checkpoint file named below.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ismctl.evaluation.features import ExtractorSpec
from ismctl.utils.errors import UserError

DINOV2_NAME = "dinov2-vit-l-14"
HUB_REPO = "facebookresearch/dinov2"
CHECKPOINT = "dinov2_vitl14_pretrain.pth"
CHECKPOINT_URL = f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/{CHECKPOINT}"


def hub_paths() -> tuple[Path, Path]:
    """(repository folder, checkpoint file) torch hub uses for DINOv2 ViT-L/14."""
    hub = Path(torch.hub.get_dir())
    return hub / "facebookresearch_dinov2_main", hub / "checkpoints" / CHECKPOINT


def dinov2_cached() -> bool:
    repo, ckpt = hub_paths()
    return (repo / "hubconf.py").is_file() and ckpt.is_file()


def build_dinov2(device: torch.device | str = "cpu") -> torch.nn.Module:
    """The torch-fidelity DINOv2 extractor; one clear line when it cannot be loaded."""
    repo, ckpt = hub_paths()
    try:
        return ExtractorSpec(DINOV2_NAME).build(["dinov2"], device)
    except Exception as exc:
        raise UserError(
            f"fd-dinov2: cannot load DINOv2 ViT-L/14 through torch hub ({type(exc).__name__}); "
            f"run once with internet, or place the {HUB_REPO} repository at {repo} and "
            f"{CHECKPOINT_URL} at {ckpt}"
        ) from exc
