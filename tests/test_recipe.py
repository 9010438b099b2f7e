from pathlib import Path

import pytest

from ismctl.errors import UserError
from ismctl.recipe import Recipe, apply_override, load_recipe, save_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_every_field_has_default_and_description() -> None:
    Recipe()
    for section in Recipe.model_fields.values():
        cls = section.annotation
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no description"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_load(path: Path) -> None:
    load_recipe(path)


def test_paper_setting() -> None:
    r = load_recipe(Path("recipes/ism_xl.yaml"))
    assert (r.model.preset, r.guidance.w_max, r.guidance.interval_start) == ("XL/2", 3.5, 0.3)
    assert (r.loss.name, r.loss.levels, r.coupling.pool_batches) == ("wavelet", 5, 32)
    assert (r.ema.target_decay, r.ema.inference_decay, r.train.steps) == (0.95, 0.9999, 800_000)
    sm = load_recipe(Path("recipes/sm_b.yaml"))
    assert (sm.objective.mode, sm.model.preset, sm.optim.weight_decay) == ("sm", "B/2", 0.1)
    assert (sm.guidance.cfg_scale, sm.ema.inference_decay, sm.loss.name) == (1.5, 0.999, "mse")


def test_extends_and_overrides(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("optim: {lr: 0.001}\nmodel: {preset: B/2}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nmodel: {dropout: 0.1}\n")
    r = load_recipe(tmp_path / "child.yaml", ["optim.lr=2e-4", "eval.steps=[1,2]"])
    assert r.model.preset == "B/2" and r.model.dropout == 0.1
    assert r.optim.lr == 2e-4 and r.eval.steps == [1, 2]


def test_resolved_recipe_round_trips(tmp_path: Path) -> None:
    r = load_recipe(Path("recipes/sm_xl.yaml"))
    save_recipe(r, tmp_path / "r.yaml")
    assert load_recipe(tmp_path / "r.yaml") == r


@pytest.mark.parametrize(("text", "sets", "expect"), [
    ("optim: {lrr: 0.1}\n", [], "optim.lrr: unknown key"),
    ("optim: {lr: fast}\n", [], "optim.lr:"),
    ("", ["optim.lr=-1"], "optim.lr: Input should be greater than 0"),
    ("objective: {base_steps: 100}\n", [], "power of two"),
    ("", ["optim.lr"], "expected KEY=VALUE"),
    ("- a\n- b\n", [], "mapping"),
    ("extends: nowhere.yaml\n", [], "recipe file not found"),
])
def test_bad_recipes_name_the_field(tmp_path: Path, text: str, sets: list[str],
                                    expect: str) -> None:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(UserError, match=expect) as err:
        load_recipe(p, sets)
    assert "\n" not in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_override_into_scalar_fails() -> None:
    with pytest.raises(UserError, match="not a section"):
        apply_override({"optim": 3}, "optim.lr=1")
