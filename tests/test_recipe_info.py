"""`ismctl recipe show`, `recipe keys` and `train --dry-run`: the resolved values with their
origin, every settable key, and a run's plan, with nothing written."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from ismctl.config.recipe import Recipe, load_recipe
from ismctl.runs.checkpoint import prune_checkpoints
from ismctl.tools.recipe_info import (
    checkpoint_steps,
    kept_checkpoints,
    plan_training,
    recipe_fields,
    resolve_with_sources,
)

REPO = Path(__file__).resolve().parent.parent
QUICK = str(REPO / "recipes" / "quickstart.yaml")


def _tree(root: Path) -> list[tuple[str, float]]:
    return sorted((str(p.relative_to(root)), p.stat().st_mtime) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-step run of the quickstart recipe on the digits (one checkpoint)."""
    from ismctl.data.prepare import prepare_latents
    from ismctl.training.trainer import train

    root = tmp_path_factory.mktemp("info")
    prepare_latents("digits", out=root / "digits", progress=False)
    recipe = load_recipe(QUICK, [f"data.path={root / 'digits'}", f"run.root={root}",
                                 "run.name=run", "train.steps=1", "data.batch_size=8",
                                 "run.sample_num_samples=10", "run.tracker=none"])
    return train(recipe, QUICK, progress=False)


def test_show_names_the_origin_of_every_field(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("optim: {lr: 0.001}\nmodel: {preset: B/2}\n")
    (tmp_path / "child.yaml").write_text(
        "extends: base.yaml\nmodel: {preset: S/2, dropout: 0.1}\nrun: {sample_num: 9}\n")
    recipe, sources = resolve_with_sources(tmp_path / "child.yaml",
                                           ["optim.betas=[0.8, 0.9]", "eval.default_guidance.4=2"])
    child, base = tmp_path / "child.yaml", tmp_path / "base.yaml"
    assert sources == {
        "optim.lr": f"extends {base}",
        "model.preset": f"file {child}",
        "model.dropout": f"file {child}",
        "run.sample_num_samples": f"file {child}",
        "optim.betas": "--set optim.betas=[0.8, 0.9]",
        "eval.default_guidance": "--set eval.default_guidance.4=2",
    }
    assert recipe.model.preset == "S/2" and recipe.optim.lr == 0.001
    assert recipe.run.sample_num_samples == 9 and recipe.eval.default_guidance[4] == 2


def test_show_prints_every_field(ismctl_main: Callable[..., int], monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert ismctl_main("recipe", "show", QUICK, "--set", "optim.lr=3e-4") == 0
    lines = capsys.readouterr().out.splitlines()
    fields = recipe_fields()
    assert len(lines) == len(fields)
    by_key = {line.split()[0]: line for line in lines}
    assert set(by_key) == {f"{s}.{n}" for s, n, _ in fields}
    assert by_key["optim.lr"].endswith("# --set optim.lr=3e-4")
    assert '"tiny/2"' in by_key["model.preset"] and by_key["model.preset"].endswith(QUICK)
    assert by_key["optim.eps"].endswith("# default")


def test_keys_lists_every_field_with_its_description(
        ismctl_main: Callable[..., int], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert ismctl_main("recipe", "keys") == 0
    lines = capsys.readouterr().out.splitlines()
    fields = recipe_fields()
    assert len(lines) == len(fields)
    for line, (section, name, info) in zip(lines, fields, strict=True):
        assert line.startswith(f"{section}.{name} (") and line.endswith(info.description)
    assert any(line.startswith('train.precision ("fp32" | "bf16", default "bf16")')
               for line in lines)


def test_bad_show_is_one_line(ismctl_main: Callable[..., int], monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    assert ismctl_main("recipe", "show", QUICK, "--set", "optim.lrr=1") == 2
    err = capsys.readouterr().err
    assert err.strip() == ("error: --set optim.lrr=1: optim.lrr: unknown key "
                           "(did you mean optim.lr?)")


@pytest.mark.parametrize(("steps", "every", "keep_last", "keep_every"), [
    (3000, 1000, 2, 0), (10, 3, 1, 0), (100, 10, 2, 30), (25, 5, 3, 10), (7, 10, 2, 5),
])
def test_kept_checkpoints_match_the_pruning(tmp_path: Path, steps: int, every: int,
                                            keep_last: int, keep_every: int) -> None:
    """The plan's count against prune_checkpoints run on real folders after every save."""
    saved = checkpoint_steps(steps, every)
    for step in saved:
        (tmp_path / "checkpoints" / f"step-{step:07d}").mkdir(parents=True)
        prune_checkpoints(tmp_path, keep_last, keep_every)
    left = sorted(int(p.name[5:]) for p in (tmp_path / "checkpoints").iterdir())
    assert kept_checkpoints(saved, keep_last, keep_every) == left
    assert saved[-1] == steps


def test_plan_predicts_the_checkpoint_size(trained: Path) -> None:
    """Planned bytes per checkpoint against the checkpoint the one-step run wrote."""
    recipe = load_recipe(trained / "recipe.yaml", ["run.name=other"])
    plan = plan_training(recipe, None)
    ckpt = next((trained / "checkpoints").iterdir())
    on_disk = sum(p.stat().st_size for p in ckpt.iterdir())
    assert abs(plan.checkpoint_bytes - on_disk) / on_disk < 0.02, (plan.checkpoint_bytes, on_disk)
    assert plan.run_state == "new" and plan.batch_per_rank == 8 and plan.checkpoints == 1
    assert plan.parameters > 0 and plan.disk_bytes == 2 * plan.checkpoint_bytes


def test_dry_run_plans_and_writes_nothing(
        ismctl_main: Callable[..., int], trained: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    root = trained.parent
    before, repo_before = _tree(root), _tree(REPO / "recipes")
    args = ["train", QUICK, "--dry-run", "--set", f"data.path={root / 'digits'}",
            "--set", f"run.root={root}", "--set", "run.name=dry", "--set", "train.device=cpu"]
    assert ismctl_main(*args) == 0
    out = capsys.readouterr().out
    assert f"{root / 'dry'} (new)" in out
    assert "64 global = 64 per rank x 1 rank(s) x 1 accumulation step(s)" in out
    assert "3,000 (192,000 samples" in out and "tiny/2" in out
    assert "3 written, 2 kept" in out and "dry run: nothing written" in out
    # Two ranks: half the batch each; three do not divide 64.
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert ismctl_main(*args) == 0
    assert "32 per rank x 2 rank(s)" in capsys.readouterr().out
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert ismctl_main(*args) == 2
    assert "not divisible by ranks x train.grad_accum = 3" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    # The run that exists is refused as train would refuse it; --resume plans the resume.
    existing = ["train", str(trained / "recipe.yaml"), "--dry-run"]
    assert ismctl_main(*existing) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert ismctl_main(*existing, "--resume", "--set", "train.steps=5") == 0
    assert "resume from step 1" in capsys.readouterr().out
    assert _tree(root) == before and _tree(REPO / "recipes") == repo_before
    assert os.listdir(tmp_path) == []


def test_every_section_field_is_listed() -> None:
    names = {f"{s}.{n}" for s, n, _ in recipe_fields()}
    defaults = Recipe().model_dump()
    assert names == {f"{s}.{n}" for s, fields in defaults.items() for n in fields}


def test_dry_run_refuses_the_init_from_files_the_run_refuses(
        ismctl_main: Callable[..., int], trained: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`train --dry-run` reads and plans model.init_from as the run does: a missing file, a file
    that is not a checkpoint and a network of other shapes each exit 2 with the run's line."""
    import torch

    from ismctl.networks.model import build_model

    root = trained.parent
    base = ["train", QUICK, "--dry-run", "--set", f"data.path={root / 'digits'}",
            "--set", f"run.root={tmp_path}", "--set", "run.name=pre", "--set", "train.device=cpu"]
    other = build_model("tiny/2", input_size=16, in_channels=1, num_classes=10)
    state = {("x_embedder.proj.weight" if k == "x_embedder.weight" else k): v
             for k, v in other.state_dict().items()}
    wrong = tmp_path / "wrong.pt"
    torch.save(state, wrong)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    for path, line in ((tmp_path / "missing.pt", "file not found"),
                       (tmp_path / "junk.pt", "not a readable checkpoint"),
                       (wrong, "pos_embed has shape")):
        assert ismctl_main(*base, "--set", f"model.init_from={path}") == 2
        err = capsys.readouterr().err
        assert f"model.init_from {path}" in err and line in err, err
    assert not (tmp_path / "pre").exists()
