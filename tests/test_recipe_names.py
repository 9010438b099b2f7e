"""Shipped recipes by name: from any folder, in `extends:`, in `recipe list`; paths win."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ismctl
from ismctl.cli import app
from ismctl.config.recipe import (
    find_recipe,
    load_recipe,
    recipe_summary,
    shipped_recipe_dir,
    shipped_recipes,
)
from ismctl.tools.recipe_info import resolve_with_sources
from ismctl.utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = {"ism_b", "ism_xl", "meanflow_b", "meanflow_digits", "meanflow_xl",
           "meanflow_sot_digits", "meanflow_sot_xl", "quickstart", "sm_b", "sm_xl"}


def test_the_shipped_recipes_live_in_the_package() -> None:
    assert shipped_recipe_dir() == Path(ismctl.__file__).resolve().parent / "recipes"
    assert SHIPPED <= set(shipped_recipes())
    # The clone's recipes/ folder (a link; a copy in the sdist) holds the same files: make demo,
    # the README and the docs use it.
    clone = {p.name: p.read_text() for p in (REPO / "recipes").glob("*.yaml")}
    assert clone == {p.name: p.read_text() for p in shipped_recipes().values()}


@pytest.mark.parametrize("ref", ["quickstart", "quickstart.yaml"])
def test_a_name_resolves_from_any_folder(ref: str, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert find_recipe(ref) == shipped_recipe_dir() / "quickstart.yaml"
    clone = load_recipe(REPO / "recipes" / "quickstart.yaml")
    assert load_recipe(ref).model_dump() == clone.model_dump()


def test_a_path_wins_over_a_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart.yaml").write_text("extends: ism_xl.yaml\ntrain:\n  steps: 7\n")
    assert find_recipe("quickstart.yaml") == tmp_path / "quickstart.yaml"
    assert load_recipe("quickstart.yaml").train.steps == 7
    # A bare name without the suffix is not that file: it names the shipped recipe.
    assert find_recipe("quickstart") == shipped_recipe_dir() / "quickstart.yaml"


def test_extends_by_name_from_a_users_folder(tmp_path: Path) -> None:
    own = tmp_path / "project" / "mine.yaml"
    own.parent.mkdir()
    own.write_text("extends: quickstart.yaml\ntrain:\n  steps: 11\n")
    recipe, sources = resolve_with_sources(own)
    assert recipe.train.steps == 11 and recipe.model.preset == "tiny/2"
    assert sources["model.preset"] == f"extends {shipped_recipe_dir() / 'quickstart.yaml'}"
    assert sources["train.steps"] == f"file {own}"


def test_extends_prefers_the_file_beside_it(tmp_path: Path) -> None:
    (tmp_path / "ism_xl.yaml").write_text("train:\n  steps: 3\n")
    (tmp_path / "mine.yaml").write_text("extends: ism_xl.yaml\n")
    recipe = load_recipe(tmp_path / "mine.yaml")
    # The local ism_xl.yaml (defaults + steps 3), not the shipped one (800K steps).
    assert recipe.train.steps == 3


def test_a_recipe_named_like_a_shipped_one_extends_the_shipped_one(tmp_path: Path) -> None:
    own = tmp_path / "ism_xl.yaml"
    own.write_text("extends: ism_xl.yaml\ntrain:\n  steps: 5\n")
    recipe = load_recipe(own)
    shipped = load_recipe("ism_xl")
    assert recipe.train.steps == 5 and recipe.model == shipped.model


def test_unknown_names_suggest_close_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"quikstart: recipe file not found.*did you mean "
                                        r"quickstart.*ismctl recipe list"):
        find_recipe("quikstart")
    # A clone's path used outside a clone points at the name that works anywhere.
    with pytest.raises(UserError, match="shipped recipe of that name is 'quickstart'"):
        find_recipe("recipes/quickstart.yaml")
    (tmp_path / "bad.yaml").write_text("extends: sm_xxl.yaml\n")
    with pytest.raises(UserError, match=r"sm_xxl.yaml: recipe file not found.*named by "
                                        r"'extends' in .*bad.yaml.*did you mean sm_xl"):
        load_recipe(tmp_path / "bad.yaml")


def test_summaries_are_one_line_each() -> None:
    for name, path in shipped_recipes().items():
        text = recipe_summary(path)
        assert text and "\n" not in text and len(text) <= 110, (name, text)
    assert recipe_summary(shipped_recipe_dir() / "ism_b.yaml") == \
        "iSM with the B/2 backbone (~130M params)"
    # A colon inside parentheses does not end the summary.
    assert recipe_summary(shipped_recipe_dir() / "sm_b.yaml").endswith("1 steps)")


def test_a_long_summary_is_cut_at_a_clause(tmp_path: Path) -> None:
    recipe = tmp_path / "long.yaml"
    recipe.write_text("# A baseline (source; notes: many) on data, a network, trained as its\n"
                      "# authors train it (a long reference to files and flags): details.\n"
                      "model:\n  preset: B/2\n")
    assert recipe_summary(recipe, width=60) == "A baseline (source; notes: many) on data, a network"
    assert recipe_summary(recipe, width=20) == "A baseline"
    # 121 characters up to the ': ': cut before the last parenthesis.
    assert recipe_summary(recipe) == ("A baseline (source; notes: many) on data, a network, "
                                      "trained as its authors train it")
    recipe.write_text("# Abaselinewithoutanyclauseboundary at all\n")
    assert recipe_summary(recipe, width=12) == "Abaseline..."


def test_recipe_list_and_train_by_name_on_the_command_line(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["recipe", "list"])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert [line.split()[0] for line in lines] == sorted(shipped_recipes())
    assert any(line.startswith("quickstart ") and "digits" in line for line in lines)
    res = CliRunner().invoke(app, ["recipe", "show", "sm_b"])
    assert res.exit_code == 0, res.output
    assert any(line.split()[:2] == ["model.preset", '"B/2"'] for line in res.output.splitlines())


def test_unknown_name_is_one_line_exit_2(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "ismctl", "train", "quickstrat"], cwd=tmp_path,
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "did you mean quickstart" in res.stderr
