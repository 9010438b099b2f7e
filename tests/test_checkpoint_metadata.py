"""Every checkpoint's .safetensors says what it is: architecture, role, step, recipe hash,
version, recipe and data summary, readable without loading a tensor."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

import ismctl
from ismctl.config.recipe import load_recipe
from ismctl.data.manifest import Manifest, ShardInfo, write_manifest
from ismctl.networks.model import ShortcutDiT, build_model
from ismctl.runs.checkpoint import (
    WEIGHT_FILES,
    file_sha256,
    model_config,
    read_metadata,
    recipe_sha256,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parent.parent


def test_every_weights_file_carries_its_description(tmp_path: Path) -> None:
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml")
    manifest = Manifest(count=3, num_classes=2, class_names=["a", "b"], encoder="pixels",
                        scale_factor=1.0, resolution=8, channels=1, latent_size=8, flip=False,
                        shards=[ShardInfo(name="s.tar", count=3, sha256="0" * 64)], skipped=[])
    write_manifest(tmp_path, manifest)
    nets = {name: build_model("tiny/2", 8, 1, 2, base_steps=recipe.objective.base_steps)
            for name in WEIGHT_FILES}
    ckpt = save_checkpoint(tmp_path, 7, nets, {"recipe": recipe.model_dump(mode="json")})
    for name, file in WEIGHT_FILES.items():
        meta = read_metadata(ckpt / file)
        assert meta["ismctl.role"] == name and meta["ismctl.step"] == "7"
        assert meta["ismctl.version"] == ismctl.__version__
        canonical = json.dumps(recipe.model_dump(mode="json"), sort_keys=True,
                               separators=(",", ":"))
        assert meta["ismctl.recipe_sha256"] == hashlib.sha256(canonical.encode()).hexdigest()
        assert meta["ismctl.recipe_sha256"] == recipe_sha256(recipe)
        assert json.loads(meta["ismctl.recipe"]) == recipe.model_dump(mode="json")
        arch = json.loads(meta["ismctl.model"])
        assert arch["preset"] == "tiny/2"
        assert {k: v for k, v in arch.items() if k != "preset"} == model_config(nets[name])
        data = json.loads(meta["ismctl.data"])
        assert data["encoder"] == "pixels" and data["class_names"] == ["a", "b"]
        assert "shards" not in data
        # The architecture alone rebuilds a network the weights load into, bit for bit.
        rebuilt = ShortcutDiT(**{k: v for k, v in arch.items() if k != "preset"})
        with safe_open(str(ckpt / file), framework="pt") as fh:
            rebuilt.load_state_dict({k: fh.get_tensor(k) for k in fh.keys()})
        for (k, a), b in zip(rebuilt.state_dict().items(), nets[name].state_dict().values(),
                             strict=True):
            assert torch.equal(a, b), k


def test_file_sha256_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    data = bytes(range(256)) * 40_000
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
