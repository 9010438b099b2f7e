"""How runs are sampled: guidance grids, the sm authors' protocol, remembered best w."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ismctl.config.recipe import load_recipe
from ismctl.objectives.guidance import parse_guidance
from ismctl.sampling.protocol import (
    Point,
    best_points,
    choose_point,
    default_guidance,
    describe_grid,
    grid_for,
    plan_points,
    read_best,
    remember_best,
)
from ismctl.utils.errors import UserError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_parse_guidance_numbers_and_ranges() -> None:
    assert parse_guidance("0,1.5") == [0.0, 1.5]
    assert parse_guidance("0:2:0.5") == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert parse_guidance("0:1:0.3") == [0.0, 0.3, 0.6, 0.9]
    assert parse_guidance("3, 0:1:1, 3") == [3.0, 0.0, 1.0]
    for bad in ("", "a", "1:0:0.5", "0:1:0", "0:1", "-1", "nan"):
        with pytest.raises(UserError, match="--guidance"):
            parse_guidance(bad)


def test_ism_points_are_the_full_grid() -> None:
    ism = load_recipe(RECIPES / "ism_b.yaml")
    points = plan_points(ism, [1, 128], [0.0, 2.0])
    assert points == [Point(1, 0.0, "intrinsic"), Point(1, 2.0, "intrinsic"),
                      Point(128, 0.0, "intrinsic"), Point(128, 2.0, "intrinsic")]
    with pytest.raises(UserError, match="baked-in guidance"):
        plan_points(ism, [1], [0.0], double_guidance=True)


def test_sm_points_follow_the_authors_protocol() -> None:
    sm = load_recipe(RECIPES / "sm_b.yaml")
    assert plan_points(sm, [1, 4], [0.0]) == [Point(1, 0.0, "conditional"),
                                              Point(4, 0.0, "conditional")]
    # At 128 steps a second entry: two-pass CFG at the training scale 1.5 on d = 0.
    assert plan_points(sm, [128], [0.0])[-1] == Point(128, 0.5, "flow-cfg")
    with pytest.raises(UserError, match="double-guidance"):
        plan_points(sm, [1], [0.0, 1.0])
    assert plan_points(sm, [1], [0.0, 1.0], double_guidance=True) == [
        Point(1, 0.0, "cfg"), Point(1, 1.0, "cfg")]


def test_default_guidance_takes_the_nearest_listed_step_count() -> None:
    recipe = load_recipe(RECIPES / "ism_b.yaml", ["eval.default_guidance={1: 2.0, 8: 1.0}"])
    assert default_guidance(recipe, 1) == 2.0
    assert default_guidance(recipe, 2) == 2.0  # log2 distance 1 to 1 step, 2 to 8 steps
    assert default_guidance(recipe, 4) == 1.0
    assert default_guidance(recipe, 128) == 1.0
    # An empty table samples unguided.
    assert default_guidance(load_recipe(RECIPES / "ism_b.yaml", ["eval.default_guidance={}"]),
                            4) == 0.0


def test_best_points_and_remembering(tmp_path: Path) -> None:
    points = [{"steps": 1, "guidance": w, "sampler": "intrinsic", "metrics": {"fid": f}}
              for w, f in ((0.0, 9.0), (1.0, 5.0), (2.0, 5.0), (3.0, 7.0))]
    points.append({"steps": 4, "guidance": 1.0, "sampler": "intrinsic",
                   "metrics": {"fid": float("nan")}})
    best = best_points(points, "fid", lower_is_better=True, checkpoint_step=7)
    # A tie goes to the smaller w; a step count without a finite value has no best.
    assert list(best) == [1] and best[1]["guidance"] == 1.0 and best[1]["candidates"] == 4
    assert best_points(points, "fid", False, 7)[1]["guidance"] == 0.0
    recipe = load_recipe(RECIPES / "ism_b.yaml")
    assert read_best(tmp_path) == {}
    remember_best(tmp_path, best)
    remember_best(tmp_path, {4: {**best[1], "guidance": 3.0}})
    assert {s: r["guidance"] for s, r in read_best(tmp_path).items()} == {1: 1.0, 4: 3.0}
    point, source = choose_point(recipe, tmp_path, 1)
    assert point == Point(1, 1.0, "intrinsic") and "guidance.json" in source
    assert choose_point(recipe, tmp_path, 1, guidance=2.5)[0].guidance == 2.5
    assert choose_point(recipe, tmp_path, 2)[0].guidance == recipe.eval.default_guidance[1]
    (tmp_path / "guidance.json").write_text(json.dumps({"nope": 1}))
    with pytest.raises(UserError, match="guidance.json"):
        read_best(tmp_path)


def test_sm_sampling_defaults_to_the_conditional_output(tmp_path: Path) -> None:
    sm = load_recipe(RECIPES / "sm_b.yaml")
    assert choose_point(sm, tmp_path, 4)[0] == Point(4, 0.0, "conditional")
    with pytest.raises(UserError, match="double-guidance"):
        choose_point(sm, tmp_path, 4, guidance=1.0)
    assert choose_point(sm, tmp_path, 4, 1.0, double_guidance=True)[0] == Point(4, 1.0, "cfg")
    # The recipe's default w is for --double-guidance only, and so is it with a remembered best
    # (a point of the run's own protocol, which --double-guidance leaves).
    sm = load_recipe(RECIPES / "sm_b.yaml", ["eval.default_guidance={1: 1.5}"])
    assert choose_point(sm, tmp_path, 4)[0] == Point(4, 0.0, "conditional")
    remember_best(tmp_path, {4: {"guidance": 0.75, "sampler": "flow-cfg", "metric": "fid",
                                 "value": 3.0, "candidates": 5, "checkpoint_step": 700}})
    assert choose_point(sm, tmp_path, 4)[0] == Point(4, 0.75, "flow-cfg")
    assert choose_point(sm, tmp_path, 4, double_guidance=True) == (
        Point(4, 1.5, "cfg"), "recipe eval.default_guidance")


def test_per_step_count_grids() -> None:
    grid = {1: [0.0, 0.5, 1.0], 128: [0.0, 1.0]}
    assert grid_for(grid, 1) == [0.0, 0.5, 1.0] and grid_for(grid, 4) == [0.0, 0.5, 1.0]
    assert grid_for(grid, 64) == [0.0, 1.0] and grid_for([2.0], 64) == [2.0]
    ism = load_recipe(RECIPES / "ism_b.yaml", ["eval.guidance={1: [0, 0.5], 128: [1]}"])
    assert ism.eval.guidance == {1: [0.0, 0.5], 128: [1.0]}
    assert plan_points(ism, [1, 128], ism.eval.guidance) == [
        Point(1, 0.0, "intrinsic"), Point(1, 0.5, "intrinsic"), Point(128, 1.0, "intrinsic")]
    assert describe_grid({"128": [1.0], "4": [0.0]}) == "4 steps: 0; 128 steps: 1"


def test_parse_guidance_edges() -> None:
    """Empty items are skipped (not the end of the list); a range may start anywhere and end
    at its start; STOP < START names the rule."""
    assert parse_guidance("0,,1") == [0.0, 1.0]
    assert parse_guidance("1:2:0.5") == [1.0, 1.5, 2.0]
    assert parse_guidance("1:1:0.5") == [1.0]
    with pytest.raises(UserError, match="STOP >= START"):
        parse_guidance("3:1:1")


def test_best_point_ties_gaps_and_record() -> None:
    """A point without a value is passed over, not the end of the search; on an exact tie (same
    value, same w: sm's conditional entry and a flow-CFG entry at scale 1) the first point
    stays; the record says what was chosen, by what and among how many."""
    points = [
        {"steps": 128, "guidance": 0.0, "sampler": "conditional", "metrics": {"fid": None}},
        {"steps": 128, "guidance": 0.0, "sampler": "conditional", "metrics": {"fid": 4.0}},
        {"steps": 128, "guidance": 0.0, "sampler": "flow-cfg", "metrics": {"fid": 4.0}},
        {"steps": 1, "guidance": 2.0, "sampler": "conditional", "metrics": {}},
        {"steps": 1, "guidance": 0.5, "sampler": "conditional", "metrics": {"fid": 9.0}},
    ]
    best = best_points(points, "fid", lower_is_better=True, checkpoint_step=11)
    assert best[128] == {"guidance": 0.0, "sampler": "conditional", "metric": "fid",
                         "value": 4.0, "candidates": 3, "checkpoint_step": 11}
    assert best[1]["guidance"] == 0.5 and best[1]["candidates"] == 2


def test_all_strengths_of_a_per_step_count_grid() -> None:
    from ismctl.sampling.protocol import all_strengths

    assert all_strengths({1: [0.0, 1.0], 128: [2.0, 1.0]}) == [0.0, 1.0, 2.0]
    assert all_strengths([2.0, 0.5, 2.0]) == [0.5, 2.0]
    sm = load_recipe(RECIPES / "sm_b.yaml")
    with pytest.raises(UserError, match="double-guidance"):
        plan_points(sm, [1], {1: [0.0, 1.0]})


def test_remembered_points_are_the_stored_choices(tmp_path: Path) -> None:
    from ismctl.sampling.protocol import remembered_points

    record = {"metric": "fid", "value": 3.0, "candidates": 2, "checkpoint_step": 5}
    remember_best(tmp_path, {1: {**record, "guidance": 1.5, "sampler": "intrinsic"},
                             128: {**record, "guidance": 0.5, "sampler": "flow-cfg"}})
    assert remembered_points(tmp_path, [128, 1]) == [Point(128, 0.5, "flow-cfg"),
                                                     Point(1, 1.5, "intrinsic")]
    with pytest.raises(UserError, match=r"no best w for 4, 8 step"):
        remembered_points(tmp_path, [1, 4, 8])


def test_nfe_counts_both_passes_of_a_two_pass_entry() -> None:
    """One network call per step, two for two-pass CFG (method §2): the study's NFE column."""
    assert [Point(4, 0.0, s).nfe() for s in ("conditional", "intrinsic")] == [4, 4]
    assert [Point(4, 1.0, s).nfe() for s in ("cfg", "flow-cfg")] == [8, 8]
    assert Point(1, 0.5, "cfg").nfe() == 2


def test_extrapolation_is_said_only_above_the_trained_w_max() -> None:
    from ismctl.sampling.protocol import extrapolation_note

    ism = load_recipe(RECIPES / "quickstart.yaml")   # w_max 1.5
    inside = [Point(1, 0.0, "intrinsic"), Point(1, 1.5, "intrinsic")]
    assert extrapolation_note(ism, inside) is None
    # A two-pass w is a CFG scale, not a network input: never extrapolated.
    assert extrapolation_note(ism, [Point(1, 3.0, "cfg"), Point(1, 3.0, "flow-cfg")]) is None
    far = [Point(1, 2.5, "intrinsic"), Point(4, 2.0, "intrinsic"), Point(1, 2.0, "intrinsic"),
           *inside, Point(1, 9.0, "cfg")]
    assert extrapolation_note(ism, far) == ("guidance 2, 2.5 above the trained w_max 1.5: "
                                            "extrapolated")
    wide = load_recipe(RECIPES / "quickstart.yaml", ["guidance.w_max=3"])
    assert extrapolation_note(wide, far) is None


@pytest.mark.usefixtures("plugin_registry")
def test_a_baked_objective_without_a_description_is_named_in_the_error() -> None:
    toy = str(Path(__file__).resolve().parent / "plugins" / "toy_flow.py")
    recipe = load_recipe("quickstart", ["objective.mode=toy-flow", "ema.target_enabled=false"],
                         plugins=[toy])
    with pytest.raises(UserError) as err:
        plan_points(recipe, [1], [0.0, 1.0])
    assert ("a run of objective.mode 'toy-flow' is sampled from its conditional output (w = 0; "
            "its guidance, if any, is baked into its jumps)") in str(err.value)


def test_choose_point_says_where_each_w_came_from(tmp_path: Path) -> None:
    """``ismctl sample`` prints the source of its w: the command line (any finite w >= 0),
    the run's remembered best (also when asked for by name), or the recipe default; ``best``
    without a remembered point, with --double-guidance, and a negative or non-finite w are
    refused."""
    recipe = load_recipe(RECIPES / "ism_b.yaml", ["eval.default_guidance={1: 2.0, 8: 1.0}"])
    record = {"sampler": "intrinsic", "metric": "fid", "value": 3.0, "candidates": 5,
              "checkpoint_step": 700}
    assert choose_point(recipe, tmp_path, 4) == (Point(4, 1.0, "intrinsic"),
                                                 "recipe eval.default_guidance")
    with pytest.raises(UserError, match="no best w for 4 step"):
        choose_point(recipe, tmp_path, 4, "best")
    remember_best(tmp_path, {4: {**record, "guidance": 0.75}, 8: {**record, "guidance": 2.5}})
    from_file = (Point(4, 0.75, "intrinsic"), "guidance.json (best fid at step 700)")
    assert choose_point(recipe, tmp_path, 4) == from_file
    assert choose_point(recipe, tmp_path, 4, "best") == from_file
    assert choose_point(recipe, tmp_path, 8, "best")[0] == Point(8, 2.5, "intrinsic")
    assert choose_point(recipe, tmp_path, 1) == (Point(1, 2.0, "intrinsic"),
                                                 "recipe eval.default_guidance")
    for w in (0.0, 0.5, 3.0):
        assert choose_point(recipe, tmp_path, 4, w) == (Point(4, w, "intrinsic"), "command line")
    for w in (-0.5, float("nan"), float("inf")):
        with pytest.raises(UserError, match="w must be >= 0"):
            choose_point(recipe, tmp_path, 4, w)
    with pytest.raises(UserError, match="a strength w >= 0 or 'best'"):
        choose_point(recipe, tmp_path, 4, "strong")
    with pytest.raises(UserError, match="--double-guidance"):
        choose_point(recipe, tmp_path, 4, "best", double_guidance=True)
