"""The few-step study's bookkeeping (ismctl/studies/few_step.py) on fabricated run folders:
the knob is chosen on the selection samples only, grids grow until no choice sits on an upper
edge, the tables report the other samples, and the equal-wall-clock checkpoints follow the
training rates timed one method at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ismctl.studies import few_step as fs


def _study(tmp_path: Path) -> fs.Study:
    return fs.Study(tmp_path, train_steps=1000, seeds=[0, 1], jobs=1, ismctl=["false"])


def _write_eval(study: fs.Study, run_dir: Path, step: int, n: int, seed: int,
                points: list[tuple[float, str, float]]) -> None:
    out = study.eval_file(run_dir, step, n, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"points": [
        {"steps": n, "guidance": w, "sampler": sampler,
         "metrics": {"acc": 0.9, "fd-digits": cfd / 2, "cfd-digits": cfd, "spread-digits": 0.9}}
        for w, sampler, cfd in points]}))


def _write_metrics(run_dir: Path, it_s: float) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": s, "it_s": it_s}) for s in range(50, 1001, 50)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def _fabricate(study: fs.Study, values: dict[str, list[float]] | None = None) -> None:
    """Selection files where the selection samples and the reported samples disagree: a
    choice that peeked at the reported samples would pick another point. The best selection
    point is w = 0.5 for intrinsic methods and the grid's second value for baked ones."""
    for m in fs.METHODS.values():
        grid = (values or {}).get(m.name, study.grids.values[m.name])
        for i, value in enumerate(grid):
            for seed in study.seeds:
                run_dir = study.run_dir(m, value, seed)
                _write_metrics(run_dir, it_s=4.0 if m.name == "sm" else 2.0)
                for n in fs.STEPS:
                    ws = study.grids.w_grid(m, value, n)
                    sampler = "intrinsic" if m.intrinsic else "conditional"
                    sel = [(w, sampler, 10.0 + abs(w - 0.5) + abs(i - 1)) for w in ws]
                    rep = [(w, sampler, 30.0 - w - i) for w in ws]
                    if m.name == "sm" and n == 128:
                        sel.append((value - 1, "flow-cfg", 5.0 + abs(i - 1)))
                        rep.append((value - 1, "flow-cfg", 50.0))
                    for step in (500, 1000):
                        _write_eval(study, run_dir, step, n, fs.SELECT_SEED, sel)
                        _write_eval(study, run_dir, step, n, fs.REPORT_SEED, rep)


def _tuned(study: fs.Study) -> None:
    fs.write_json(study.out / "chosen.json", {"chosen": fs.choose(study), "widened": [],
                                              "grids": {}})
    data = json.loads((study.out / "chosen.json").read_text())
    data["grids"] = {name: {"values": study.grids.values[name],
                            "top128": study.grids.top128[name]} for name in fs.METHODS}
    fs.write_json(study.out / "chosen.json", data)


def test_choice_uses_the_selection_samples_only(tmp_path: Path) -> None:
    study = _study(tmp_path)
    _fabricate(study)
    chosen = fs.choose(study)
    assert chosen["ism"][1]["guidance"] == 0.5 and chosen["ism"][1]["candidates"] == 7
    assert chosen["ism"][128]["candidates"] == 5            # 128 steps: w up to 1 first
    assert chosen["meanflow"][4]["value"] == 0.75            # the second grid value wins
    assert chosen["sm"][128]["sampler"] == "flow-cfg"
    assert chosen["sm"][1]["value"] == 1.5 and chosen["sm"][1]["candidates"] == 4


def test_grids_grow_until_no_choice_sits_on_an_edge(tmp_path: Path) -> None:
    """A baked knob chosen at its largest value gets one more value, MeanFlow's omega chosen at
    its smallest one value below (half-way to 0 near it); an intrinsic method whose best w is its
    128-step ceiling gets a higher ceiling, and one whose best w is the w_max it was trained
    with gets a run with a larger w_max. SM's scale 1 (its recipe's least) is not grown."""
    study = _study(tmp_path)
    _fabricate(study)
    chosen = fs.choose(study)
    assert fs.edges(study, chosen) == []                       # all interior
    chosen["meanflow"][1] = {**chosen["meanflow"][1], "value": 1.0}
    chosen["ism"][128] = {**chosen["ism"][128], "guidance": 1.0}
    chosen["meanflow+sot+twin-ema+intrinsic"][2] = {
        **chosen["meanflow+sot+twin-ema+intrinsic"][2], "guidance": 1.5}
    chosen["sm"][4] = {**chosen["sm"][4], "value": 1.0}      # the low end: no guidance
    chosen["meanflow+sot"][2] = {**chosen["meanflow+sot"][2], "value": 0.5}
    grown = fs.edges(study, chosen)
    assert len(grown) == 4
    assert study.grids.values["meanflow+sot"] == [0.25, 0.5, 0.75, 1.0]
    assert study.grids.values["meanflow"] == [0.5, 0.75, 1.0, 1.25]
    assert study.grids.top128["ism"] == 1.5 and study.grids.values["ism"] == [1.5]
    assert study.grids.values["meanflow+sot+twin-ema+intrinsic"] == [1.5, 3.0]
    assert study.grids.values["sm"] == [1.0, 1.5, 2.0, 3.0]
    # Persisted: a resumed study continues with the grown grids.
    again = fs.Grids(tmp_path / "grids.json")
    assert again.values["meanflow"] == [0.5, 0.75, 1.0, 1.25] and again.top128["ism"] == 1.5
    assert again.w_grid(fs.METHODS["ism"], 1.5, 128) == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    assert again.values["meanflow+sot"] == [0.25, 0.5, 0.75, 1.0]
    # omega 0.25 chosen: a step down would reach 0 (the unconditional model), so half-way.
    chosen["meanflow+sot"][2] = {**chosen["meanflow+sot"][2], "value": 0.25}
    again = _study(tmp_path)
    fs.edges(again, chosen)
    assert again.grids.values["meanflow+sot"] == [0.125, 0.25, 0.5, 0.75, 1.0]


def test_tables_report_the_other_samples_and_count_two_pass_nfe(tmp_path: Path) -> None:
    study = _study(tmp_path)
    _fabricate(study)
    _tuned(study)
    _write_timing(study)
    summary = fs.summarise(study)
    ism = summary["equal_steps"]["ism"]["1"]
    assert ism["cfd-digits"]["mean"] == pytest.approx(30.0 - 0.5)
    assert ism["spread-digits"]["mean"] == pytest.approx(0.9)
    assert ism["nfe"] == 1
    sm128 = summary["equal_steps"]["sm"]["128"]
    assert sm128["nfe"] == 256 and sm128["cfd-digits"]["mean"] == pytest.approx(50.0)
    text = fs.markdown(summary)
    assert "flow CFG" in text and "Equal wall-clock" in text and "| spread |" in text
    assert "MeanFlow + sOT + twin EMA + wavelet" in text


def _write_timing(study: fs.Study) -> None:
    """Timed: SM 0.25 s per step, every other method 0.5 s (twice as slow)."""
    fs.write_json(study.out / "timing.json", {
        f"{name}/round{r}": 0.25 if name == "sm" else 0.5
        for name in fs.METHODS for r in range(fs.TIME_ROUNDS)})


def test_wall_clock_budget_is_the_fastest_method_s_full_run(tmp_path: Path) -> None:
    study = _study(tmp_path)
    _fabricate(study)
    _write_timing(study)
    budget = fs.wall_budget(study, fs.choose(study))
    assert budget["seconds_per_step"]["sm"] == pytest.approx(0.25)
    assert budget["budget_s"] == pytest.approx(250.0)
    assert budget["step"]["sm"] == {"0": 1000, "1": 1000}
    assert budget["step"]["meanflow"] == {"0": 500, "1": 500}   # half the rate: half the steps
    # The logged rates (sm 4 it/s, others 2 it/s) are reported beside, not used.
    assert budget["logged_train_s"]["sm"] == pytest.approx(250.0)


def test_report_without_timing_leaves_out_the_wall_clock_table(tmp_path: Path) -> None:
    study = _study(tmp_path)
    _fabricate(study)
    _tuned(study)
    assert fs.wall_budget(study, fs.choose(study), measure=False) is None
    summary = fs.summarise(study)
    assert summary["wall_clock"] is None and summary["equal_wall_clock"] == {}
    text = fs.markdown(summary)
    assert "Equal training steps" in text and "Equal wall-clock" not in text


FAKE_TRAIN = """import json, sys
from pathlib import Path
sets = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
run = Path(sets["run.root"]) / sets["run.name"]
run.mkdir(parents=True)
slow = "sm_quickstart" not in sys.argv[2]
# a slow start-up interval, then 0.2 s (sm) or 0.4 s (the others) per step, one odd interval
rates = [0.5] + [2.5 if slow else 5.0] * 8 + [1.0]
log = int(sets["run.log_every"])
lines = [json.dumps({"step": log * (i + 1), "it_s": r}) for i, r in enumerate(rates)]
(run / "metrics.jsonl").write_text("\\n".join(lines) + "\\n")
"""


def test_time_methods_runs_each_method_alone_and_resumes(tmp_path: Path) -> None:
    import sys

    fake = tmp_path / "fake_ismctl.py"
    fake.write_text(FAKE_TRAIN)
    study = fs.Study(tmp_path / "study", train_steps=1000, seeds=[0, 1], jobs=2,
                     ismctl=[sys.executable, str(fake)])
    _fabricate(study)
    chosen = fs.choose(study)
    per_step = fs.time_methods(study, chosen)
    assert per_step["sm"] == pytest.approx(0.2)
    assert per_step["meanflow+sot+twin-ema"] == pytest.approx(0.4)
    timing = json.loads((study.out / "timing.json").read_text())
    assert len(timing) == len(fs.METHODS) * fs.TIME_ROUNDS
    assert not any((study.out / "timing").iterdir())   # the timing runs are not kept
    # Resumed from timing.json: nothing is run again (this ismctl would fail).
    study.ismctl = ["false"]
    assert fs.time_methods(study, chosen) == per_step


def test_run_names_and_overrides_are_those_of_the_recipes() -> None:
    from ismctl.config.recipe import load_recipe

    sm = fs.METHODS["sm"]
    assert sm.run_name(1.5, 2) == "sm_cfg1.5-seed2"
    assert "guidance.cfg_scale=1.5" in sm.train_overrides(1.5, 2)
    assert fs.METHODS["ism"].run_name(1.5, 0) == "ism_wmax1.5-seed0"
    for m in fs.METHODS.values():
        for value in m.values:
            recipe = load_recipe(m.recipe, m.train_overrides(value, 0))
            assert recipe.objective.mode == m.name.split("+")[0]
            if m.name.startswith("meanflow"):
                assert ("+sot" in m.name) == (recipe.coupling.pool_size > 0)
                assert ("twin-ema" in m.name) == recipe.ema.target_enabled
                assert ("wavelet" in m.name) == (recipe.loss.name == "wavelet")
    sm_recipe = load_recipe(sm.recipe, sm.train_overrides(1.5, 0))
    assert sm_recipe.objective.bootstrap_fraction == 0.125 and sm_recipe.objective.t_grid
    intrinsic = load_recipe(fs.MF, fs.METHODS["meanflow+sot+twin-ema+intrinsic"]
                            .train_overrides(1.5, 0))
    assert intrinsic.objective.meanflow_guidance == "intrinsic"
    assert intrinsic.guidance.w_max == 1.5


def test_timed_seconds_is_the_median_interval_after_the_warm_up(tmp_path: Path) -> None:
    """A timing run logged every 25 steps: a slow start-up (left out), then 0.25 s per step
    with one disturbed interval (the median ignores it)."""
    rates = [0.5, 1.0, 1.0, 1.0] + [4.0] * 7 + [1.0]
    lines = [json.dumps({"step": 25 * (i + 1), "it_s": r}) for i, r in enumerate(rates)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert fs.timed_seconds(tmp_path) == pytest.approx(0.25)
    assert fs.train_seconds(tmp_path) == pytest.approx(25 * (2 + 4 * 1.0 + 7 * 0.25))


def test_slim_checkpoints_keep_the_inference_weights_and_the_final_checkpoint(
        tmp_path: Path) -> None:
    files = ("state.pt", "online.safetensors", "target_ema.safetensors",
             "inference_ema.safetensors")
    for step in (100, 200, 300):
        ckpt = tmp_path / "checkpoints" / f"step-{step:07d}"
        ckpt.mkdir(parents=True)
        for name in files:
            (ckpt / name).write_bytes(b"x")
    fs.slim_checkpoints(tmp_path, 300)
    for step in (100, 200):
        assert sorted(p.name for p in (tmp_path / "checkpoints" / f"step-{step:07d}").iterdir()) \
            == ["inference_ema.safetensors"]
    assert len(list((tmp_path / "checkpoints" / "step-0000300").iterdir())) == 4


def test_plot_is_written(tmp_path: Path) -> None:
    study = _study(tmp_path / "study")
    _fabricate(study)
    _tuned(study)
    fs.plot(fs.summarise(study), tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
