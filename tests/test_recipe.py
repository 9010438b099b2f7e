from pathlib import Path

import pytest
import yaml

from ismctl.config.recipe import Recipe, apply_override, load_recipe, recipe_from_dict, save_recipe
from ismctl.utils.errors import UserError

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
    assert (r.loss.name, r.loss.levels, r.coupling.pool_size) == ("wavelet", 5, 32 * 256)
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


# One bad value per validated field, the choices the message must list, and the --set form.
BAD_FIELDS = [
    ("model.preset", "Huge/2", "tiny, S, B, L, XL"),
    ("model.preset", "B", "SIZE/PATCH"),
    ("loss.name", "l1", "mse, wavelet"),
    ("loss.wavelet", "notawavelet", "haar, db1..db38, sym2..sym20"),
    ("loss.wavelet", "bior1.3", "orthogonal"),
    ("train.device", "tpu", "auto, cpu, cuda or cuda:N"),
    ("train.device", "cuda:x", "auto, cpu, cuda or cuda:N"),
    ("eval.steps", "[3]", "power of two between 1 and 128"),
    ("eval.steps", "[0]", "must be >= 1"),
    ("eval.steps", "[256]", "power of two between 1 and 128"),
    ("eval.steps", "[]", "at least 1 item"),
]


@pytest.mark.parametrize(("key", "value", "choices"), BAD_FIELDS)
def test_validated_fields_list_the_choices(tmp_path: Path, key: str, value: str,
                                           choices: str) -> None:
    section, name = key.split(".")
    (tmp_path / "r.yaml").write_text(f"{section}:\n  {name}: {value}\n")
    with pytest.raises(UserError) as err:
        load_recipe(tmp_path / "r.yaml")
    assert f"r.yaml: {key}: " in str(err.value) and choices in str(err.value)
    with pytest.raises(UserError) as err:
        load_recipe(None, [f"{key}={value}"])
    assert str(err.value).startswith(f"--set {key}={value}: {key}: ")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("key", "value"), [
    ("model.preset", "S/4"), ("loss.name", "mse"), ("loss.wavelet", "db4"),
    ("loss.wavelet", "sym8"), ("train.device", "cpu"), ("train.device", "cuda"),
    ("train.device", "cuda:3"), ("eval.steps", "[1, 2, 64, 128]"),
])
def test_valid_values_pass(key: str, value: str) -> None:
    r = load_recipe(None, [f"{key}={value}"])
    section, name = key.split(".")
    assert getattr(getattr(r, section), name) == yaml.safe_load(value)


def test_step_counts_follow_the_objective() -> None:
    """Shortcut samplers need powers of two up to base_steps; meanflow takes any N."""
    with pytest.raises(UserError, match="power of two between 1 and 16"):
        load_recipe(None, ["objective.base_steps=16", "eval.steps=[32]"])
    with pytest.raises(UserError, match="'sm'"):
        load_recipe(None, ["objective.mode=sm", "eval.steps=[3]"])
    if "meanflow" in str(Recipe.model_fields["objective"].annotation.model_fields["mode"]):
        r = load_recipe(None, ["objective.mode=meanflow", "eval.steps=[1, 3, 5, 200]"])
        assert r.eval.steps == [1, 3, 5, 200]
        with pytest.raises(UserError, match="must be >= 1"):
            load_recipe(None, ["objective.mode=meanflow", "eval.steps=[0]"])


def test_set_is_blamed_and_the_closest_key_suggested() -> None:
    with pytest.raises(UserError) as err:
        load_recipe(RECIPES[0], ["optim.lr=2e-4", "optim.lrr=1"])
    assert str(err.value) == ("--set optim.lrr=1: optim.lrr: unknown key "
                              "(did you mean optim.lr?)")
    with pytest.raises(UserError, match=r"^--set modle.preset=B/2: modle: unknown key "
                                        r"\(did you mean model\?\)$"):
        load_recipe(None, ["modle.preset=B/2"])


def _write(folder: Path, text: str | None) -> Path:
    path = folder / "r.yaml"
    if text is not None:
        path.write_text(text)
    return path


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    # The file's own mistake is the file's, whatever the overrides.
    bad = _write(tmp_path, "optim: {lrr: 0.1}\n")
    with pytest.raises(UserError, match=r"r.yaml: optim.lrr: unknown key \(did you mean optim"):
        load_recipe(bad, ["optim.lr=1e-3"])
    with pytest.raises(UserError, match="no_such_thing: unknown key$"):
        load_recipe(None, ["run.no_such_thing=1"])


def test_yaml_syntax_error_gives_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "model:\n  preset: B/2\n dropout: 0.1\n")
    with pytest.raises(UserError, match=r"r.yaml:3:2: not valid YAML \(") as err:
        load_recipe(path)
    assert "\n" not in str(err.value)


def test_missing_parent_names_the_file_that_extends_it(tmp_path: Path) -> None:
    (tmp_path / "mid.yaml").write_text("extends: gone.yaml\n")
    child = _write(tmp_path, "extends: mid.yaml\n")
    with pytest.raises(UserError) as err:
        load_recipe(child)
    assert str(err.value) == (f"{tmp_path / 'gone.yaml'}: recipe file not found (named by "
                              f"'extends' in {tmp_path / 'mid.yaml'})")


def test_old_name_of_the_grid_size_still_reads(tmp_path: Path) -> None:
    r = load_recipe(None, ["run.sample_num=12"])
    assert r.run.sample_num_samples == 12 and r.run.sample_num == 12
    save_recipe(r, tmp_path / "r.yaml")
    assert "sample_num_samples: 12" in (tmp_path / "r.yaml").read_text()
    assert load_recipe(tmp_path / "r.yaml") == r
    assert Recipe().data.path == "data/imagenet-256"


def test_old_spelling_of_the_sot_pool_still_reads_and_resumes(tmp_path: Path) -> None:
    """coupling.pool_batches (global batches) and coupling.within_class, as recipes saved by
    older runs have them, become pool_size = K x data.batch_size and mode; conflicting new
    spellings are a one-line error."""
    from ismctl.training.resume import unsafe_changes

    quick = load_recipe(Path("recipes/quickstart.yaml"))
    old = quick.model_dump(mode="json")
    old["coupling"] = {"pool_batches": 4, "within_class": True}
    save_recipe(recipe_from_dict(old), tmp_path / "old.yaml")
    text = (tmp_path / "old.yaml").read_text()
    assert "pool_size: 256" in text and "pool_batches" not in text and "within_class:" not in text
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    assert load_recipe(tmp_path / "old.yaml") == quick
    assert unsafe_changes(tmp_path, load_recipe(tmp_path / "old.yaml"), quick) == []
    blind = load_recipe(None, ["coupling.within_class=false", "coupling.pool_batches=0"])
    assert (blind.coupling.pool_size, blind.coupling.mode) == (0, "blind")
    xl = load_recipe(Path("recipes/ism_xl.yaml"), ["coupling.pool_batches=32"])
    assert xl.coupling.pool_size == 8192  # agrees with the new spelling: no conflict
    with pytest.raises(UserError, match=r"coupling.pool_batches=2 \(deprecated: 2 x "
                                        r"data.batch_size 64 = 128 samples\) conflicts with "
                                        r"coupling.pool_size=256; set only coupling.pool_size"):
        load_recipe(Path("recipes/quickstart.yaml"), ["coupling.pool_batches=2"])
    with pytest.raises(UserError, match=r"coupling.within_class=false .* conflicts with "
                                        r"coupling.mode='within_class'; set only coupling.mode"):
        load_recipe(Path("recipes/quickstart.yaml"), ["coupling.within_class=false"])


def test_deprecated_energy_norm_still_loads() -> None:
    """Runs saved before loss.band_norm wrote loss.energy_norm; they must still load."""
    assert load_recipe(None, ["loss.energy_norm=true"]).loss.band_norm == "energy"
    assert load_recipe(None, ["loss.energy_norm=false"]).loss.band_norm == "none"
    assert "energy_norm" not in load_recipe(None, ["loss.energy_norm=true"]).model_dump()["loss"]
    with pytest.raises(UserError, match="set only band_norm"):
        load_recipe(None, ["loss.energy_norm=false", "loss.band_norm=variance"])
