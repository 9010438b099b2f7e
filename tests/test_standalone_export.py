"""An export runs without ismctl: docs/standalone_sampler.py rebuilds the network from
config.json's conventions in plain PyTorch, loads the weights strictly, and computes what
ismctl computes (the network, and Euler shortcut sampling from the same noise)."""

from __future__ import annotations

import ast
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from test_api import make_run

from ismctl import export_run, load_model
from ismctl.sampling.sampler import sample

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "docs" / "standalone_sampler.py"


def standalone() -> ModuleType:
    spec = importlib.util.spec_from_file_location("standalone_sampler", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Exports of an iSM run (a table of jump sizes) and a MeanFlow run (continuous jumps),
    both with random weights."""
    from ismctl.config.recipe import load_recipe, save_recipe
    from ismctl.data.manifest import read_manifest
    from ismctl.runs.checkpoint import WEIGHT_FILES, model_from_recipe, save_checkpoint

    root = tmp_path_factory.mktemp("standalone")
    ism = make_run(root, "ism")
    meanflow = root / "meanflow"
    meanflow.mkdir()
    recipe = load_recipe(ism / "recipe.yaml", ["objective.mode=meanflow"])
    save_recipe(recipe, meanflow / "recipe.yaml")
    shutil.copyfile(ism / "manifest.json", meanflow / "manifest.json")
    torch.manual_seed(3)
    net = model_from_recipe(recipe, read_manifest(meanflow / "manifest.json"))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.05)
    save_checkpoint(meanflow, 4, dict.fromkeys(WEIGHT_FILES, net),
                    {"step": 4, "recipe": recipe.model_dump(mode="json")})
    return {name: export_run(run, root / f"{name}-export") for name, run in
            (("ism", ism), ("meanflow", meanflow))}


def test_the_example_does_not_need_ismctl() -> None:
    imported = set()
    for node in ast.walk(ast.parse(SCRIPT.read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "argparse", "json", "math", "pathlib", "typing",
                        "numpy", "torch", "safetensors", "diffusers"}, imported


@pytest.mark.parametrize("kind", ["ism", "meanflow"])
def test_the_standalone_network_is_the_exported_one(exports: dict[str, Path], kind: str) -> None:
    module = standalone()
    net, config = module.load(exports[kind])
    ours = load_model(exports[kind], device="cpu").network
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1, 8, 8, generator=gen)
    t = torch.rand(5, generator=gen)
    d = (torch.tensor([0.0, 1.0, 0.5, 0.25, 1 / 128]) if kind == "ism"
         else torch.rand(5, generator=gen))
    y = torch.tensor([0, 3, 9, 10, 1])  # 10: the null class
    w = torch.tensor([0.0, 0.5, 1.0, 1.5, 3.0])
    torch.testing.assert_close(net(x, t, d, y, w), ours(x, t, d, y, w), rtol=1e-5, atol=1e-6)
    conv = config["conventions"]
    assert conv["embeddings"]["null_class"] == 10
    if kind == "ism":
        assert conv["embeddings"]["t_scale"] == 1000.0
        assert conv["embeddings"]["d"]["rows"][:3] == [0.0, 1.0, 0.5]
        with pytest.raises(ValueError, match="jump sizes"):
            net(x, t, torch.full((5,), 0.3), y, w)
    else:
        assert conv["embeddings"]["t_scale"] == 1.0 and conv["embeddings"]["d"]["scale"] == 1.0


@pytest.mark.parametrize("kind", ["ism", "meanflow"])
def test_standalone_sampling_matches_ismctl(exports: dict[str, Path], kind: str) -> None:
    module = standalone()
    net, config = module.load(exports[kind])
    model = load_model(exports[kind], device="cpu")
    noise = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(6)
    mode = config["conventions"]["sampler"]["mode"]
    w = 0.5 if mode == "intrinsic" else 0.0
    mine = module.sample(net, config, noise, labels, 4, w)
    theirs = sample(model.network, noise, labels, 4, w, mode=mode, base_steps=128)
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_the_example_runs_as_a_script(exports: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "samples.npz"
    res = subprocess.run([sys.executable, str(SCRIPT), str(exports["ism"]), "--steps", "4",
                          "--num", "8", "--class", "3", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "w = 0.25" in res.stdout  # the export's default for 4 steps
    data = np.load(out)
    assert data["arr_0"].shape == (8, 8, 8, 1) and data["arr_0"].dtype == np.uint8
    assert (data["arr_1"] == 3).all() and data["arr_1"].dtype == np.int64
