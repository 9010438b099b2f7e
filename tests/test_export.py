"""`ismctl export RUN --out DIR`: a self-contained folder the Python API loads without the
run, with a model card; written atomically; bad input is one line and exit code 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_api import make_run
from typer.testing import CliRunner

from ismctl import export_run, load_model
from ismctl.cli import app
from ismctl.runs.checkpoint import read_metadata
from ismctl.sampling.protocol import remember_best
from ismctl.utils.errors import UserError


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = make_run(tmp_path_factory.mktemp("runs"), "exported", step=4)
    remember_best(run_dir, {4: {"guidance": 0.75, "sampler": "intrinsic", "metric": "fd-digits",
                                "value": 1.25, "candidates": 3, "checkpoint_step": 4}})
    results = run_dir / "eval" / "step-0000004" / "results.json"
    results.parent.mkdir(parents=True)
    results.write_text(json.dumps({
        "metrics": ["acc", "fd-digits"], "select_by": "fd-digits",
        "settings": {"num_samples": 100}, "checkpoint": {"step": 4},
        "points": [{"steps": 4, "guidance": 0.75, "sampler": "intrinsic",
                    "metrics": {"acc": 0.5, "fd-digits": 1.25}},
                   {"steps": 4, "guidance": 0.0, "sampler": "intrinsic",
                    "metrics": {"acc": 0.25, "fd-digits": 2.5}}],
        "best": {"4": {"guidance": 0.75, "sampler": "intrinsic"}}}))
    return run_dir


def test_export_loads_without_the_run(run: Path, tmp_path: Path) -> None:
    reference = load_model(run, device="cpu").sample(num=6, steps=4, seed=2)
    out = export_run(run, tmp_path / "model")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "guidance.json", "model.safetensors", "recipe.yaml",
        "results.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    moved = tmp_path / "elsewhere"
    shutil.move(run, moved)  # the export must not need the run folder
    try:
        model = load_model(out, device="cpu")
        assert model.guidance_for(4)[0] == 0.75  # the remembered guidance travels along
        assert torch.equal(model.sample(num=6, steps=4, seed=2), reference)
    finally:
        shutil.move(moved, run)
    config = json.loads((out / "config.json").read_text())
    assert config["role"] == "inference" and config["step"] == 4
    s = config["sampling"]
    assert (s["objective_mode"], s["sampler"], s["num_classes"], s["input_size"],
            s["in_channels"], s["encoder"]) == ("ism", "intrinsic", 10, 8, 1, "identity")
    assert s["guidance"]["4"]["guidance"] == 0.75 and s["guidance"]["1"]["guidance"] == 0.5
    meta = read_metadata(out / "model.safetensors")
    assert meta["ismctl.role"] == "inference" and meta["ismctl.step"] == "4"
    assert meta["ismctl.recipe_sha256"] == config["recipe_sha256"]


def test_model_card(run: Path, tmp_path: Path) -> None:
    card = (export_run(run, tmp_path / "m") / "README.md").read_text()
    assert "from ismctl import load_model" in card
    assert "checkpoint step 4 of train.steps 3000" in card
    assert "| 4 | 0.75 | intrinsic | guidance.json: best fd-digits 1.2500 at step 4 |" in card
    assert "| 4 | 0.75* | intrinsic | 0.5000 | 1.2500 |" in card  # the evaluation table
    assert "| 1 | 0.5 | intrinsic | recipe eval.default_guidance |" in card
    assert "```yaml" in card and "preset: tiny/2" in card


def test_overwrite_and_errors(run: Path, tmp_path: Path) -> None:
    out = export_run(run, tmp_path / "m", which="online", results=None)
    assert json.loads((out / "config.json").read_text())["role"] == "online"
    with pytest.raises(UserError, match="already exists"):
        export_run(run, out)
    export_run(run, out, overwrite=True)
    assert json.loads((out / "config.json").read_text())["role"] == "inference"
    with pytest.raises(UserError, match="not found"):
        export_run(tmp_path / "no-run", tmp_path / "x")
    with pytest.raises(UserError, match="--results"):
        export_run(run, tmp_path / "y", results=tmp_path / "missing.json")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_export(run: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cli" / "model.safetensors").is_file()
    res = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "cli")])
    assert res.exit_code != 0 and isinstance(res.exception, UserError)


def test_cli_missing_run_is_one_line_exit_2(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "ismctl", "export", str(tmp_path / "none"),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "not found" in res.stderr
    assert not (tmp_path / "out").exists()
