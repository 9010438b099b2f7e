"""The few-step study's bookkeeping (ismctl/studies/few_step.py) on fabricated run folders:
the knob is chosen on the selection samples only, the tables report the other samples, and
the equal-wall-clock checkpoints follow the logged training rates."""

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
         "metrics": {"acc": 0.9, "fd-digits": cfd / 2, "cfd-digits": cfd}}
        for w, sampler, cfd in points]}))


def _write_metrics(run_dir: Path, it_s: float) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": s, "it_s": it_s}) for s in range(50, 1001, 50)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def _fabricate(study: fs.Study) -> None:
    """Selection files where the selection samples and the reported samples disagree: a
    choice that peeked at the reported samples would pick another point."""
    for m in fs.METHODS.values():
        values = m.values or (None,)
        for i, value in enumerate(values):
            for seed in study.seeds:
                run_dir = study.run_dir(m, value, seed)
                _write_metrics(run_dir, it_s=4.0 if m.name == "sm" else 2.0)
                for n in fs.STEPS:
                    grid = m.grid(n)
                    sel = [(w, "intrinsic", 10.0 + abs(w - 0.5) + i) for w in grid]
                    rep = [(w, "intrinsic", 30.0 - w - i) for w in grid]
                    if m.name == "sm" and n == 128:
                        sel.append((value - 1, "flow-cfg", 5.0))
                        rep.append((value - 1, "flow-cfg", 50.0))
                    for step in (250, 500, 1000):
                        _write_eval(study, run_dir, step, n, fs.SELECT_SEED, sel)
                        _write_eval(study, run_dir, step, n, fs.REPORT_SEED, rep)


def test_choice_uses_the_selection_samples_only(tmp_path: Path) -> None:
    study = _study(tmp_path)
    _fabricate(study)
    chosen = fs.choose(study)
    assert chosen["ism"][1]["guidance"] == 0.5 and chosen["ism"][1]["candidates"] == 7
    assert chosen["meanflow"][4]["value"] == 0.5          # the first grid value wins (i = 0)
    assert chosen["sm"][128]["sampler"] == "flow-cfg"
    assert chosen["sm"][1]["value"] == 1.0 and chosen["sm"][1]["candidates"] == 3


def test_tables_report_the_other_samples_and_count_two_pass_nfe(tmp_path: Path) -> None:
    study = _study(tmp_path)
    _fabricate(study)
    fs.write_json(tmp_path / "chosen.json", fs.choose(study))
    summary = fs.summarise(study)
    ism = summary["equal_steps"]["ism"]["1"]
    assert ism["cfd-digits"]["mean"] == pytest.approx(30.0 - 0.5)
    assert ism["nfe"] == 1
    sm128 = summary["equal_steps"]["sm"]["128"]
    assert sm128["nfe"] == 256 and sm128["cfd-digits"]["mean"] == pytest.approx(50.0)
    text = fs.markdown(summary)
    assert "flow CFG" in text and "Equal wall-clock" in text


def test_wall_clock_budget_is_the_fastest_method_s_full_run(tmp_path: Path) -> None:
    study = _study(tmp_path)
    _fabricate(study)
    budget = fs.wall_budget(study, fs.choose(study))
    assert budget["seconds_per_step"]["sm"] == pytest.approx(0.25)
    assert budget["budget_s"] == pytest.approx(250.0)
    assert budget["step"]["sm"] == {"0": 1000, "1": 1000}
    assert budget["step"]["meanflow"] == {"0": 500, "1": 500}   # half the rate: half the steps


def test_run_names_and_overrides_are_those_of_the_recipes() -> None:
    sm = fs.METHODS["sm"]
    assert sm.run_name(1.5, 2) == "sm_cfg1.5-seed2"
    assert "guidance.cfg_scale=1.5" in sm.train_overrides(1.5, 2)
    assert fs.METHODS["ism"].run_name(None, 0) == "ism-seed0"
    for m in fs.METHODS.values():
        from ismctl.recipe import load_recipe

        for value in m.values or (None,):
            recipe = load_recipe(m.recipe, m.train_overrides(value, 0))
            assert recipe.objective.mode == m.name.split("+")[0]


def test_step_seconds_reads_the_least_disturbed_intervals(tmp_path: Path) -> None:
    """A run logged at 4 it/s, slowed to 1 it/s for half its intervals by another job and with a
    slow first interval (start-up): 0.25 s per step, while its logged total is longer."""
    rates = [0.5] + [4.0, 1.0] * 10
    lines = [json.dumps({"step": 50 * (i + 1), "it_s": r}) for i, r in enumerate(rates)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert fs.step_seconds(tmp_path) == pytest.approx(0.25)
    assert fs.train_seconds(tmp_path) == pytest.approx(50 * (2 + 10 * 0.25 + 10 * 1.0))


def test_plot_is_written(tmp_path: Path) -> None:
    study = _study(tmp_path / "study")
    _fabricate(study)
    fs.write_json(study.out / "chosen.json", fs.choose(study))
    fs.plot(fs.summarise(study), tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
