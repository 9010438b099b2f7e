"""``manifest.json``: what ``prepare-latents`` wrote and what ``train`` reads (method §6).

The manifest is the only thing the trainer, sampler and evaluator need to know about a
prepared dataset: sample count, classes, the encoder that decodes it, the scale factor
applied to latents, shapes, and the list of webdataset shards with per-shard counts and
checksums.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from ismctl.utils.errors import UserError
from ismctl.utils.fileio import atomic_write_text

MANIFEST_NAME = "manifest.json"


class ShardInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    count: int
    sha256: str


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    count: int
    num_classes: int
    class_names: list[str]
    encoder: str
    scale_factor: float
    resolution: int
    channels: int
    latent_size: int
    flip: bool
    shards: list[ShardInfo]
    skipped: list[dict[str, str]]

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.count != sum(s.count for s in self.shards):
            raise ValueError(f"count {self.count} != sum of shard counts")
        if self.num_classes != len(self.class_names):
            raise ValueError(f"num_classes {self.num_classes} != {len(self.class_names)} names")
        return self

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """Shape of one latent (or pixel image) as the model sees it."""
        return (self.channels, self.latent_size, self.latent_size)


def manifest_path(path: str | Path) -> Path:
    path = Path(path)
    return path if path.name == MANIFEST_NAME else path / MANIFEST_NAME


def read_manifest(path: str | Path) -> Manifest:
    """Read ``<folder>/manifest.json`` (``path`` may be the folder or the file itself)."""
    file = manifest_path(path)
    if not file.is_file():
        raise UserError(f"{file}: not found — run `ismctl prepare-latents` first")
    try:
        return Manifest.model_validate(json.loads(file.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{file}: not valid JSON ({exc}); rerun `ismctl prepare-latents`") from exc
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        raise UserError(f"{file}: not a valid manifest ({loc}: {err['msg']})") from exc


def write_manifest(folder: str | Path, manifest: Manifest) -> bool:
    """Write the manifest atomically; leave the file untouched when it already says the same.

    Returns whether the file was (re)written, so a rerun of a finished preparation changes
    nothing on disk.
    """
    file = manifest_path(folder)
    text = json.dumps(manifest.model_dump(mode="json"), indent=1) + "\n"
    if file.is_file() and file.read_text() == text:
        return False
    atomic_write_text(file, text)
    return True
