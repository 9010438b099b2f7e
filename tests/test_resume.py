"""Which recipe changes a resume accepts: only fields that do not change what is trained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ismctl.config.recipe import Recipe, load_recipe, save_recipe
from ismctl.training.resume import changed_fields, check_resumable, unsafe_changes
from ismctl.utils.errors import UserError

QUICK = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def manifest(count: int = 10) -> dict[str, object]:
    return {"count": count, "num_classes": 10, "class_names": [str(i) for i in range(10)],
            "encoder": "identity", "scale_factor": 1.0, "resolution": 8, "channels": 1,
            "latent_size": 8, "flip": False, "skipped": [],
            "shards": [{"name": "shard-000000.tar", "count": count, "sha256": "ab" * 32}]}


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, Recipe]:
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps(manifest()))
    recipe = load_recipe(QUICK, [f"data.path={data}"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_recipe(recipe, run_dir / "recipe.yaml")
    shutil.copy(data / "manifest.json", run_dir / "manifest.json")
    return run_dir, recipe


def changed(recipe: Recipe, *overrides: str) -> Recipe:
    data = recipe.model_dump(mode="json")
    for text in overrides:
        key, value = text.split("=")
        section, name = key.split(".")
        data[section][name] = json.loads(value)
    return Recipe.model_validate(data)


def test_changed_fields_lists_dotted_paths(run: tuple[Path, Recipe]) -> None:
    _, recipe = run
    other = changed(recipe, "optim.lr=0.5", "train.steps=7", 'run.name="x"')
    assert changed_fields(recipe, other) == ["optim.lr", "run.name", "train.steps"]
    assert changed_fields(recipe, recipe) == []


@pytest.mark.parametrize("override", [
    "train.steps=9000", "train.grad_accum=2", 'train.device="cuda"', 'train.precision="bf16"',
    "train.compile=true", "data.num_workers=8", "run.log_every=7", "run.ckpt_every=3",
    'run.tracker="none"', "run.keep_last=9", "eval.num_samples=50",
])
def test_safe_changes_are_accepted(run: tuple[Path, Recipe], override: str) -> None:
    run_dir, recipe = run
    check_resumable(run_dir, changed(recipe, override))


@pytest.mark.parametrize("override", [
    "optim.lr=0.5", "data.batch_size=32", "train.seed=3", "model.dropout=0.1",
    'loss.name="mse"', "coupling.pool_size=0", "ema.target_decay=0.9",
    'objective.mode="sm"', "guidance.w_max=2.0", "data.flip=true",
])
def test_unsafe_changes_are_refused_by_name(run: tuple[Path, Recipe], override: str) -> None:
    run_dir, recipe = run
    new = changed(recipe, override, "train.steps=10")
    with pytest.raises(UserError) as err:
        check_resumable(run_dir, new)
    message = str(err.value)
    assert f"({override.split('=')[0]} " in message and "\n" not in message
    assert "train.steps 3000" not in message


def test_moved_data_is_accepted_other_data_is_not(run: tuple[Path, Recipe],
                                                  tmp_path: Path) -> None:
    run_dir, recipe = run
    copy = tmp_path / "local-copy"
    shutil.copytree(recipe.data.path, copy)
    moved = changed(recipe, f'data.path="{copy}"')
    assert unsafe_changes(run_dir, recipe, moved) == []
    (copy / "manifest.json").write_text(json.dumps(manifest(count=11)))
    assert unsafe_changes(run_dir, recipe, moved) == ["data.path"]


def test_missing_stored_recipe(run: tuple[Path, Recipe]) -> None:
    run_dir, recipe = run
    (run_dir / "recipe.yaml").unlink()
    with pytest.raises(UserError, match="recipe.yaml: missing"):
        check_resumable(run_dir, recipe)
