"""`ismctl ablate`: which recipe fields each component flips, the variant plans, the report.

Changed fields are found by flattening two ``model_dump``s independently of the module's own
helpers; the expected sets are written out by hand from the component definitions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from ismctl.config.recipe import Recipe, load_recipe
from ismctl.tools.ablate import (
    ORDER,
    disable,
    paper_fid,
    plan_sweep,
    plan_variants,
)
from ismctl.tools.ablate_report import aggregate, main_values, markdown, summarise, write_chart
from ismctl.utils.errors import UserError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

EXPECTED = {
    "intrinsic-guidance": {"objective.mode": "sm"},
    "interval-guidance": {"guidance.interval_start": 0.0},
    "wavelet": {"loss.name": "mse"},
    "sot": {"coupling.pool_size": 0},
}


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changes(a: Recipe, b: Recipe) -> dict[str, Any]:
    """Paths whose value differs, mapped to the value in ``b``."""
    fa, fb = flatten(a.model_dump(mode="json")), flatten(b.model_dump(mode="json"))
    assert fa.keys() == fb.keys()
    return {k: fb[k] for k in fa if fa[k] != fb[k]}


def without_run_name(recipe: Recipe) -> dict[str, Any]:
    data = recipe.model_dump(mode="json")
    data["run"].pop("name")
    return data


@pytest.fixture(scope="module")
def ism_xl() -> Recipe:
    return load_recipe(RECIPES / "ism_xl.yaml")


@pytest.fixture(scope="module")
def quickstart() -> Recipe:
    return load_recipe(RECIPES / "quickstart.yaml")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_component_flips_only_its_fields(ism_xl: Recipe, name: str) -> None:
    before = ism_xl.model_dump()
    assert changes(ism_xl, disable(ism_xl, [name])) == EXPECTED[name]
    assert ism_xl.model_dump() == before  # pure


@pytest.mark.parametrize(("recipe_name", "inference"), [("ism_xl", 0.9999), ("quickstart", 0.999)])
def test_twin_ema_uses_the_inference_decay_for_targets(recipe_name: str, inference: float) -> None:
    recipe = load_recipe(RECIPES / f"{recipe_name}.yaml")
    assert recipe.ema.target_decay == 0.95
    assert changes(recipe, disable(recipe, ["twin-ema"])) == {"ema.target_decay": inference}


def test_several_components_at_once(ism_xl: Recipe) -> None:
    expected = {**EXPECTED["wavelet"], **EXPECTED["sot"]}
    assert changes(ism_xl, disable(ism_xl, ["wavelet", "sot"])) == expected
    assert changes(ism_xl, disable(ism_xl, ["sot,wavelet"])) == expected
    everything = {**{k: v for e in EXPECTED.values() for k, v in e.items()},
                  "ema.target_decay": 0.9999}
    assert changes(ism_xl, disable(ism_xl, list(ORDER))) == everything


def test_unknown_component_lists_the_valid_ones(ism_xl: Recipe) -> None:
    with pytest.raises(UserError) as err:
        disable(ism_xl, ["wavlet"])
    message = str(err.value)
    assert "wavlet" in message and "\n" not in message
    for name in ORDER:
        assert name in message
    with pytest.raises(UserError):
        plan_variants(ism_xl, ["sot,bogus"], cumulative=False)


def test_disable_plan_compares_with_the_full_recipe(quickstart: Recipe) -> None:
    plan = plan_variants(quickstart, ["wavelet,sot"], cumulative=False)
    assert [name for name, _ in plan] == ["full", "no-wavelet+sot"]
    assert without_run_name(plan[0][1]) == without_run_name(quickstart)
    assert changes(quickstart, plan[1][1]) == {
        "loss.name": "mse", "coupling.pool_size": 0, "run.name": "no-wavelet+sot"}


def test_cumulative_plan_follows_the_paper_order(quickstart: Recipe) -> None:
    plan = plan_variants(quickstart, None, cumulative=True)
    assert len(plan) == 6
    names = [name for name, _ in plan]
    assert names[0] == "baseline" and names[-1] == "full" and len(set(names)) == 6
    assert [r.run.name for _, r in plan] == names
    first = plan[0][1]
    assert first.objective.mode == "sm"
    assert first.guidance.interval_start == 0.0
    assert first.loss.name == "mse"
    assert first.coupling.pool_size == 0
    assert first.ema.target_decay == first.ema.inference_decay
    assert without_run_name(plan[-1][1]) == without_run_name(quickstart)
    # Row k turns on exactly the k-th component of the paper's order, nothing else.
    added = [("intrinsic-guidance", {"objective.mode": "ism"}),
             ("interval-guidance", {"guidance.interval_start": 0.3}),
             ("wavelet", {"loss.name": "wavelet"}),
             ("sot", {"coupling.pool_size": 256}),
             ("twin-ema", {"ema.target_decay": 0.95})]
    assert [name for name, _ in added] == list(ORDER)
    for k, (_, fields) in enumerate(added):
        diff = changes(plan[k][1], plan[k + 1][1])
        diff.pop("run.name")
        assert diff == fields


def test_plan_errors(quickstart: Recipe) -> None:
    with pytest.raises(UserError, match="nothing to compare"):
        plan_variants(quickstart, None, cumulative=False)
    with pytest.raises(UserError, match="exclusive"):
        plan_variants(quickstart, ["sot"], cumulative=True)
    sm = load_recipe(RECIPES / "sm_xl.yaml")
    with pytest.raises(UserError, match="already off"):
        plan_variants(sm, ["wavelet"], cumulative=False)


def test_paper_numbers_belong_to_the_cumulative_rows() -> None:
    assert paper_fid("full") == {1: 6.56, 4: 2.16}
    assert paper_fid("no-twin-ema") == {1: 7.97, 4: 2.23}
    assert paper_fid("no-interval-guidance+wavelet+sot+twin-ema") == {1: 9.62, 4: 3.17}
    assert paper_fid("no-wavelet") is None  # not a row of the paper's table
    assert paper_fid("baseline") is None


def _results(points: dict[tuple[int, float, str], dict[str, float]]) -> dict[str, Any]:
    return {"points": [{"steps": st, "guidance": w, "sampler": sa, "metrics": m}
                       for (st, w, sa), m in points.items()]}


def test_aggregate_picks_the_best_mean_point_per_step_count() -> None:
    # Seed 0 alone would pick w = 2 at one step (lowest single value); the mean picks w = 1.
    seeds = [_results({(1, 1.0, "intrinsic"): {"fid": 5.0, "acc": 0.9},
                       (1, 2.0, "intrinsic"): {"fid": 4.0, "acc": 0.95},
                       (4, 1.0, "intrinsic"): {"fid": 3.0, "acc": 0.9}}),
             _results({(1, 1.0, "intrinsic"): {"fid": 5.0, "acc": 0.8},
                       (1, 2.0, "intrinsic"): {"fid": 7.0, "acc": 0.85},
                       (4, 1.0, "intrinsic"): {"fid": 2.0, "acc": 0.7}})]
    agg = aggregate(seeds, "fid")
    assert agg["best"] == {"1": "1@1", "4": "4@1"}
    stat = agg["points"]["1@2"]["fid"]
    assert stat["mean"] == pytest.approx(5.5) and stat["sd"] == pytest.approx(math.sqrt(4.5))
    assert agg["points"]["4@1"]["seeds"]["acc"] == [0.9, 0.7]
    # Higher is better for accuracy: the best point flips.
    assert aggregate(seeds, "acc")["best"]["1"] == "1@2"
    # A two-pass entry is its own point.
    sm = aggregate([_results({(128, 0.0, "conditional"): {"fid": 4.0},
                              (128, 0.5, "flow-cfg"): {"fid": 3.0}})], "fid")
    assert sm["best"] == {"128": "128@0.5/flow-cfg"}


def test_report_deltas_markdown_and_chart(tmp_path: Path) -> None:
    full = aggregate([_results({(1, 1.0, "intrinsic"): {"fid": 6.0, "isc": 100.0},
                                (4, 1.0, "intrinsic"): {"fid": 2.0, "isc": 200.0}}),
                      _results({(1, 1.0, "intrinsic"): {"fid": 8.0, "isc": 110.0},
                                (4, 1.0, "intrinsic"): {"fid": 2.5, "isc": 210.0}})], "fid")
    worse = aggregate([_results({(1, 1.0, "intrinsic"): {"fid": 9.0, "isc": 90.0},
                                 (1, 2.0, "intrinsic"): {"fid": 7.5, "isc": 90.0},
                                 (4, 1.0, "intrinsic"): {"fid": 2.25, "isc": 210.0}}),
                       _results({(1, 1.0, "intrinsic"): {"fid": 9.0, "isc": 90.0},
                                 (1, 2.0, "intrinsic"): {"fid": 9.5, "isc": 90.0},
                                 (4, 1.0, "intrinsic"): {"fid": 2.75, "isc": 210.0}})], "fid")
    rows = [{"name": "full", "label": "full iSM", "recipe": "a.yaml", "paper_fid": {1: 6.56},
             "runs": [{"run_dir": "runs/full-seed0"}, {"run_dir": "runs/full-seed1"}], **full},
            {"name": "no-twin-ema", "label": "without twin EMA", "recipe": "b.yaml",
             "paper_fid": {1: 7.97, 4: 2.23},
             "runs": [{"run_dir": "runs/b-seed0"}, {"run_dir": "runs/b-seed1"}], **worse}]
    report = {"recipe": "recipes/ism_xl.yaml", "mode": "disable", "paper": True,
              "seeds": [0, 1], "select_by": "fid", "reference_variant": "full", "notes": [],
              "variants": rows,
              "eval": {"steps": [1, 4], "guidance": [1.0, 2.0], "num_samples": 10, "seed": 0}}
    report.update(summarise(rows, "full"))
    report["main_metrics"] = main_values(report["value_names"], "fid")
    assert report["main_metrics"] == ["fid"] and report["steps"] == [1, 4]
    # Each variant at its own best point: w = 2 for the ablated variant at one step.
    assert rows[1]["at_best"]["1"]["point"] == "1@2"
    assert rows[1]["delta"]["1"]["fid"] == pytest.approx(8.5 - 7.0)
    assert rows[0]["delta"]["4"]["fid"] == 0.0
    text = markdown(report)
    assert "without twin EMA" in text and "+1.50" in text and "7.97" in text
    assert "7.00 ± 1.41" in text and "8.50 ± 1.41 (+1.50)" in text
    assert "`runs/b-seed1`" in text
    png = write_chart(tmp_path / "ablation.png", report)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(report, allow_nan=False)


def test_sweep_plans_one_variant_per_value(quickstart: Recipe) -> None:
    plan = plan_sweep(quickstart, "guidance.w_max=2,3")
    assert [name for name, _ in plan] == ["guidance.w_max=2", "guidance.w_max=3"]
    assert changes(quickstart, plan[0][1]) == {"guidance.w_max": 2.0,
                                               "run.name": "guidance.w_max=2"}
    lists = plan_sweep(quickstart, "loss.detail_weights=[4,2,1],2")
    assert [r.loss.detail_weights for _, r in lists] == [[4.0, 2.0, 1.0], 2.0]
    assert [name for name, _ in plan_sweep(quickstart, "guidance.w_max=2")] == [
        "guidance.w_max=2"]
    with pytest.raises(UserError, match="KEY=V1"):
        plan_sweep(quickstart, "guidance.w_max=")
    with pytest.raises(UserError, match="w_max"):
        plan_sweep(quickstart, "guidance.w_max=2,-1")
    with pytest.raises(UserError, match="same recipe"):
        plan_sweep(quickstart, "guidance.w_max=2,2.0")
    # The recipe's own value is the recipe itself: named like the full variant of an ablation.
    own = plan_sweep(quickstart, "coupling.mode=within_class,blind")
    assert [name for name, _ in own] == ["full", "coupling.mode=blind"]
    assert without_run_name(own[0][1]) == without_run_name(quickstart)


@pytest.fixture(scope="module")
def digits_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ismctl.data.prepare import prepare_latents

    out = tmp_path_factory.mktemp("data") / "digits"
    prepare_latents("digits", out=out, progress=False)
    return out


@pytest.mark.slow
def test_run_ablation_end_to_end_on_digits(digits_data: Path, tmp_path: Path) -> None:
    from ismctl.tools.ablate import run_ablation

    out = tmp_path / "ablate"
    overrides = [f"data.path={digits_data}", "train.steps=20", "optim.warmup_steps=0",
                 "run.log_every=10", "run.sample_every=1000", "run.sample_num=10",
                 "run.ckpt_every=1000", "run.tracker=none", "eval.steps=[1,4]",
                 "eval.guidance=[1.0]", "eval.metrics=[acc,fd-digits,cfd-digits]",
                 "eval.batch_size=100"]
    report = run_ablation(str(RECIPES / "quickstart.yaml"), None, cumulative=True,
                          overrides=overrides, out=out, eval_num_samples=100, progress=False)
    names = ["baseline-sm_quickstart", "no-interval-guidance+wavelet+sot+twin-ema",
             "no-wavelet+sot+twin-ema", "no-sot+twin-ema", "no-twin-ema", "full"]
    assert [v["name"] for v in report["variants"]] == names
    assert report["select_by"] == "cfd-digits"
    assert report["main_metrics"] == ["cfd-digits", "fd-digits", "acc"]
    # Each saved variant recipe differs from the full one in exactly its components' fields.
    full = load_recipe(out / "full.yaml")
    flips = {**EXPECTED, "twin-ema": {"ema.target_decay": full.ema.inference_decay}}
    for name, off in zip(names[1:], [list(ORDER[k:]) for k in range(1, len(ORDER) + 1)],
                         strict=True):
        diff = changes(full, load_recipe(out / f"{name}.yaml"))
        assert diff.pop("run.name", name) == name
        assert diff == {k: v for c in off for k, v in flips[c].items()}, name
    stored = json.loads((out / "ablation.json").read_text())
    text = (out / "ablation.md").read_text()
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    for name, variant in zip(names, stored["variants"], strict=True):
        assert variant["name"] == name
        assert (out / f"{name}.yaml").is_file()
        assert (out / name / "checkpoints" / "step-0000020").is_dir()
        assert variant["label"] in text
        assert sorted(variant["best"]) == ["1", "4"]
    # The sm baseline is sampled by its authors' protocol: conditional output, w = 0.
    assert set(stored["variants"][0]["points"]) == {"1@0", "4@0"}
    assert set(stored["variants"][-1]["points"]) == {"1@1", "4@1"}
    # The baseline row is the official SM algorithm on the quickstart (sm_quickstart.yaml).
    base = load_recipe(out / "baseline-sm_quickstart.yaml").objective
    assert base.mode == "sm" and base.bootstrap_fraction == 0.125 and base.sigma_min == 1e-5
    # Resumable: a second run finds every checkpoint and result and changes nothing.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("results.json")}
    again = run_ablation(str(RECIPES / "quickstart.yaml"), None, cumulative=True,
                         overrides=overrides, out=out, eval_num_samples=100, progress=False)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("results.json")} == stamps
    assert again["variants"][0]["points"] == report["variants"][0]["points"]


@pytest.mark.slow
def test_sweep_with_seeds_trains_one_run_per_value_and_seed(digits_data: Path,
                                                            tmp_path: Path) -> None:
    from ismctl.tools.ablate import run_ablation

    out = tmp_path / "sweep"
    overrides = [f"data.path={digits_data}", "train.steps=10", "optim.warmup_steps=0",
                 "run.log_every=10", "run.sample_every=1000", "run.sample_num=10",
                 "run.ckpt_every=1000", "eval.steps=[1]", "eval.guidance=[0,1]",
                 "eval.metrics=[acc]", "eval.batch_size=50"]
    report = run_ablation(str(RECIPES / "quickstart.yaml"), None, False, overrides=overrides,
                          out=out, eval_num_samples=50, progress=False, seeds=[3, 4],
                          sweep="guidance.w_max=1,2", report_name="wmax")
    assert (out / "wmax.md").is_file() and not (out / "ablation.md").exists()
    assert [v["name"] for v in report["variants"]] == ["guidance.w_max=1", "guidance.w_max=2"]
    for v in report["variants"]:
        assert [r["seed"] for r in v["runs"]] == [3, 4]
        for r in v["runs"]:
            recipe = load_recipe(r["recipe"])
            assert recipe.train.seed == r["seed"]
            assert recipe.guidance.w_max == float(v["name"].split("=")[1])
            assert Path(r["run_dir"]).name == f"{v['name']}-seed{r['seed']}"
        # Two seeds per point, and the mean and sd are theirs.
        acc = v["points"]["1@1"]["acc"]
        seeds = v["points"]["1@1"]["seeds"]["acc"]
        assert len(seeds) == 2 and acc["mean"] == pytest.approx(sum(seeds) / 2)
    assert report["reference_variant"] == "guidance.w_max=1"
    assert "± " in (out / "wmax.md").read_text()


@pytest.mark.slow
def test_ablation_full_variant_learns(digits_data: Path, tmp_path: Path) -> None:
    """Long enough for the full recipe to learn the classes: its samples are recognised as the
    requested digit far above chance (0.1); the variant differs only in its flipped field."""
    from ismctl.tools.ablate import run_ablation

    out = tmp_path / "ablate"
    overrides = [f"data.path={digits_data}", "train.steps=200", "optim.lr=2e-3",
                 "optim.warmup_steps=0", "model.preset=tiny/4", "data.batch_size=32",
                 "run.log_every=100", "run.sample_every=1000", "run.sample_num=10",
                 "run.ckpt_every=1000", "run.tracker=none", "eval.steps=[4]",
                 "eval.guidance=[3.0]", "eval.metrics=[acc]", "eval.batch_size=200"]
    report = run_ablation(str(RECIPES / "quickstart.yaml"), ["sot"], cumulative=False,
                          overrides=overrides, out=out, eval_num_samples=200, progress=False)
    by_name = {v["name"]: v for v in report["variants"]}
    assert sorted(by_name) == ["full", "no-sot"]
    assert by_name["full"]["points"]["4@3"]["acc"]["mean"] >= 0.25
    diff = changes(load_recipe(out / "full.yaml"), load_recipe(out / "no-sot.yaml"))
    assert diff == {**EXPECTED["sot"], "run.name": "no-sot"}


def test_a_variant_trained_with_another_recipe_is_not_continued(quickstart: Recipe,
                                                                tmp_path: Path) -> None:
    from ismctl.config.recipe import save_recipe
    from ismctl.tools.ablate import _check_stored_recipe

    run_dir = tmp_path / "full-seed0"
    (run_dir / "checkpoints").mkdir(parents=True)
    save_recipe(quickstart, run_dir / "recipe.yaml")
    # Evaluation settings do not change what was trained.
    _check_stored_recipe(load_recipe(RECIPES / "quickstart.yaml", ["eval.num_samples=10"]),
                         run_dir)
    with pytest.raises(UserError, match="optim.lr"):
        _check_stored_recipe(load_recipe(RECIPES / "quickstart.yaml", ["optim.lr=0.5"]), run_dir)


def test_default_baseline_is_the_published_sm_recipe_beside_an_ism_one(tmp_path: Path) -> None:
    from ismctl.tools.ablate import baseline_recipe, default_baseline

    assert default_baseline(str(RECIPES / "ism_xl.yaml")) == str(RECIPES / "sm_xl.yaml")
    assert default_baseline(str(RECIPES / "ism_b.yaml")) == str(RECIPES / "sm_b.yaml")
    assert default_baseline(str(RECIPES / "quickstart.yaml")) == str(RECIPES / "sm_quickstart.yaml")
    lonely = tmp_path / "ism_l.yaml"
    lonely.write_text("extends: " + str(RECIPES / "ism_xl.yaml") + "\n")
    assert default_baseline(str(lonely)) is None
    xl = str(RECIPES / "ism_xl.yaml")
    assert baseline_recipe(xl, None, cumulative=True) == str(RECIPES / "sm_xl.yaml")
    assert baseline_recipe(xl, "components-off", cumulative=True) is None
    assert baseline_recipe(xl, None, cumulative=False) is None
    with pytest.raises(UserError, match="only with --cumulative"):
        baseline_recipe(xl, str(RECIPES / "sm_b.yaml"), cumulative=False)
    with pytest.raises(UserError, match="--baseline nope.yaml: recipe file not found"):
        baseline_recipe(xl, "nope.yaml", cumulative=True)


def _fake_ablation(monkeypatch: pytest.MonkeyPatch) -> list[Recipe]:
    """run_ablation's plumbing without training: record the trained recipes, and give every
    run an sm-style (w = 0) or ism-style (w = 1) result."""
    import ismctl.tools.ablate as ablate

    trained: list[Recipe] = []
    monkeypatch.setattr(ablate, "_train_variant", lambda recipe, *a, **k: trained.append(recipe))

    def evaluated(recipe: Recipe, *args: Any, **kwargs: Any) -> dict[str, Any]:
        w = 0.0 if recipe.objective.mode == "sm" else 1.0
        fid = 10.0 if recipe.objective.mode == "sm" else 8.0
        return {"select_by": "fid", **_results({(1, w, "intrinsic"): {"fid": fid},
                                                (4, w, "intrinsic"): {"fid": fid / 2}})}

    monkeypatch.setattr(ablate, "_evaluated", evaluated)
    return trained


def test_cumulative_ism_xl_starts_from_the_published_sm_baseline(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from ismctl.tools.ablate import run_ablation

    trained = _fake_ablation(monkeypatch)
    report = run_ablation(str(RECIPES / "ism_xl.yaml"), None, cumulative=True, out=tmp_path,
                          overrides=["train.steps=100"], progress=False)
    first = report["variants"][0]
    assert first["name"] == "baseline-sm_xl" and first["label"] == "baseline: sm_xl.yaml"
    assert [v["name"] for v in report["variants"]][1:] == [
        "no-interval-guidance+wavelet+sot+twin-ema", "no-wavelet+sot+twin-ema",
        "no-sot+twin-ema", "no-twin-ema", "full"]
    # The baseline run is sm_xl.yaml itself (the ablation's --set applied, like to every row):
    # EMA 0.999, weight decay 0.1, no gradient clip, target clip 4; not ism with parts off.
    sm = load_recipe(RECIPES / "sm_xl.yaml", ["train.steps=100"])
    assert changes(sm, trained[0]).keys() <= {"run.name", "run.root"}
    assert trained[0].ema.inference_decay == 0.999 and trained[0].optim.weight_decay == 0.1
    assert trained[0].optim.grad_clip is None and trained[0].objective.target_clip == 4.0
    assert report["baseline"]["kind"] == "recipe"
    assert report["baseline"]["recipe"] == str(RECIPES / "sm_xl.yaml")
    text = (tmp_path / "ablation.md").read_text()
    assert f"Baseline (first row): {RECIPES / 'sm_xl.yaml'}, trained and evaluated" in text
    assert json.loads((tmp_path / "ablation.json").read_text())["baseline"] == report["baseline"]
    # The sm baseline is evaluated at its own protocol's point (w = 0).
    assert first["best"] == {"1": "1@0", "4": "4@0"}


def test_cumulative_quickstart_baseline_is_the_official_sm_unless_given(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from ismctl.tools.ablate import run_ablation

    trained = _fake_ablation(monkeypatch)
    quick = str(RECIPES / "quickstart.yaml")
    report = run_ablation(quick, None, cumulative=True, out=tmp_path / "d", progress=False)
    assert report["variants"][0]["name"] == "baseline-sm_quickstart"
    assert trained[0].objective.mode == "sm" and trained[0].objective.t_grid
    trained.clear()
    report = run_ablation(quick, None, cumulative=True, out=tmp_path / "a", progress=False,
                          baseline="components-off")
    assert report["variants"][0]["name"] == "baseline"
    assert report["variants"][0]["label"] == "baseline (components off)"
    assert report["baseline"]["kind"] == "components-off"
    assert "all five iSM components switched off" in (tmp_path / "a" / "ablation.md").read_text()
    trained.clear()
    given = tmp_path / "sm_digits.yaml"
    given.write_text(f"extends: {quick}\nobjective:\n  mode: sm\noptim:\n  weight_decay: 0.1\n")
    report = run_ablation(quick, None, cumulative=True, out=tmp_path / "b", progress=False,
                          baseline=str(given))
    assert report["variants"][0]["name"] == "baseline-sm_digits"
    assert trained[0].optim.weight_decay == 0.1 and trained[0].objective.mode == "sm"
    assert report["baseline"]["recipe"] == str(given)
    # Other modes have no baseline row.
    report = run_ablation(quick, ["sot"], cumulative=False, out=tmp_path / "c", progress=False)
    assert report["baseline"] is None


def test_ablate_cli_baseline_option(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ismctl.cli import app

    quick = str(RECIPES / "quickstart.yaml")
    res = CliRunner().invoke(app, ["ablate", quick, "--sweep", "guidance.w_max=1,2",
                                   "--baseline", str(RECIPES / "sm_xl.yaml"),
                                   "--out", str(tmp_path)])
    assert isinstance(res.exception, UserError) and "only with --cumulative" in str(res.exception)
    res = CliRunner().invoke(app, ["ablate", quick, "--cumulative", "--baseline", "missing.yaml",
                                   "--out", str(tmp_path)])
    assert isinstance(res.exception, UserError) and "missing.yaml" in str(res.exception)


def test_stored_results_are_reused_only_for_the_same_evaluation(
        quickstart: Recipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A variant's results are reused only when they come from the evaluation asked for now:
    the same checkpoint, step counts, w grid, sample count, metrics, reference, seed and
    Inception weights. Results of another evaluation (100 samples where 50,000 are asked, an
    older checkpoint, a plain `ismctl eval` with no record of its settings) are evaluated anew."""
    import dataclasses

    import ismctl.evaluation as evaluation
    from ismctl.tools.ablate import _evaluated, eval_settings

    calls: list[tuple[Any, ...]] = []

    def evaluate(run_dir: str, steps: list[int], guidance: Any, num_samples: int, *args: Any,
                 **kwargs: Any) -> dict[str, Any]:
        calls.append((steps, guidance, num_samples))
        out = Path(args[2])
        out.parent.mkdir(parents=True, exist_ok=True)
        results = {"num_samples": num_samples, "n": len(calls)}
        out.write_text(json.dumps(results))
        return results

    monkeypatch.setattr(evaluation, "evaluate", evaluate)
    run_dir = tmp_path / "variant"
    run_dir.mkdir()
    cfg = eval_settings(quickstart, 100, None)

    def ask(recipe: Recipe = quickstart, **change: Any) -> dict[str, Any]:
        from rich.console import Console

        settings = dataclasses.replace(cfg, **change)
        return _evaluated(recipe, run_dir, settings, None, False, Console(quiet=True), "v")

    first = ask()
    assert len(calls) == 1 and first["num_samples"] == 100
    assert ask() == first and len(calls) == 1, "the same evaluation is reused"
    changes_ = [{"num_samples": 50_000}, {"steps": [1]}, {"guidance": [0.0, 2.0]},
                {"metrics": ["acc"]}, {"ref": "other.npz"}, {"seed": 7},
                {"inception_weights": "w.pt"}]
    for n, change in enumerate(changes_, start=2):
        got = ask(**change)
        assert len(calls) == n and got["n"] == n, change
        assert ask(**change) == got and len(calls) == n, change
    # Another checkpoint (the run trained further).
    longer = quickstart.model_copy(update={"train": quickstart.train.model_copy(
        update={"steps": quickstart.train.steps + 1})})
    ask(longer)
    assert len(calls) == len(changes_) + 2
    # Results without the record of their settings.
    (run_dir / "eval" / "ablation-settings.json").unlink()
    ask()
    assert len(calls) == len(changes_) + 3 and calls[-1][2] == 100
