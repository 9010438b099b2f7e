"""The few-step study (ismctl/studies/few_step.py) run end to end on a fake ``ismctl``: the knob
is chosen on the selection samples only, grids grow until no choice sits on an edge, every
evaluated point lands in the results folder, a rerun with the run folders gone recomputes
nothing, an interrupted study resumes, and the report reads the results folder alone."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from ismctl.studies import few_step as fs

REPO = Path(__file__).resolve().parents[1]

# A stand-in for `python -m ismctl`, fast and without torch. `train` writes the checkpoints and
# the metrics log a run would; `eval` scores each requested point with the formulas below (sm at
# 128 steps adds its flow-CFG entry, as its protocol does); `sample` writes a 1x1 PNG. Every
# call is appended to $FAKE_LOG. $FAKE_CENTER (JSON) moves the best knob value per run-name tag,
# $FAKE_W the best w; an eval whose output path contains $FAKE_FAIL fails once.
#   selection samples (sampling seed 1): cfd = 10 + |value - center| + |w - FAKE_W|
#                                        (flow CFG: 5 + |value - center|)
#   reported samples (sampling seed 0):  cfd = 30 - value - w - seed / 2 - step / 1e4
#                                        (flow CFG: 50)
FAKE = r'''
import json, os, struct, sys, zlib
from pathlib import Path

args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as fh:
    fh.write(json.dumps(args) + "\n")
opt = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}

if args[0] == "train":
    sets = dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--set")
    run = Path(sets["run.root"]) / sets["run.name"]
    steps, every = int(sets["train.steps"]), int(sets.get("run.ckpt_every", sets["train.steps"]))
    log = int(sets.get("run.log_every", 50))
    run.mkdir(parents=True, exist_ok=True)
    for step in range(every, steps + 1, every):
        ckpt = run / "checkpoints" / f"step-{step:07d}"
        ckpt.mkdir(parents=True, exist_ok=True)
        for name in ("inference_ema", "online", "target_ema"):
            (ckpt / f"{name}.safetensors").write_bytes(b"w")
        (ckpt / "state.pt").write_bytes(b"s")
    rate = 4.0 if args[1] == "sm_quickstart" else 2.0
    lines = [json.dumps({"step": s, "it_s": rate}) for s in range(log, steps + 1, log)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
elif args[0] == "eval":
    out = Path(opt["--out"])
    fail = os.environ.get("FAKE_FAIL")
    if fail and fail in str(out) and not Path(os.environ["FAKE_LOG"] + ".failed").exists():
        Path(os.environ["FAKE_LOG"] + ".failed").write_text("")
        sys.exit(1)
    ckpt = Path(args[1])
    step = int(ckpt.name.split("-")[1])
    method, tag = ckpt.parent.parent.name.split("_", 1)
    knob, seed = tag.rsplit("-seed", 1)
    short = knob.rstrip("0123456789.")
    value, seed = float(knob[len(short):]), int(seed)
    center = {"cfg": 1.5, "omega": 0.75, "wmax": 1.5, **json.loads(os.environ.get(
        "FAKE_CENTER", "{}"))}[short]
    best_w = float(os.environ.get("FAKE_W", "0.5"))
    n, sseed = int(opt["--steps"]), int(opt["--seed"])
    sampler = "intrinsic" if short == "wmax" else "conditional"
    requested = [(float(w), sampler) for w in opt["--guidance"].split(",")]
    if method == "sm" and n == 128:
        requested.append((value - 1, "flow-cfg"))
    points = []
    for w, s in requested:
        if sseed == 1:
            cfd = 10 + abs(value - center) + (abs(w - best_w) if s != "flow-cfg" else -5)
        else:
            cfd = 50.0 if s == "flow-cfg" else 30 - value - w - seed / 2 - step / 1e4
        points.append({"steps": n, "guidance": w, "sampler": s, "num_samples": 1000,
                       "metrics": {"acc": 0.9, "fd-digits": cfd / 2, "cfd-digits": cfd,
                                   "spread-digits": 0.8}})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"checkpoint": {"sha256": "f" * 64, "step": step},
                               "ismctl_version": "fake", "torch": "fake",
                               "created": "2026-01-01T00:00:00+00:00", "points": points}))
elif args[0] == "sample":
    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\x00\x80")) + chunk(b"IEND", b""))
    Path(opt["--out"]).write_bytes(png)
'''


def _fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **env: str) -> Path:
    (tmp_path / "fake_ismctl.py").write_text(FAKE)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return log


def _study(tmp_path: Path, seeds: tuple[int, ...] = (0, 1),
           methods: tuple[str, ...] = fs.DEFAULT_METHODS) -> fs.Study:
    return fs.Study(tmp_path / "runs", train_steps=300, seeds=list(seeds), jobs=2,
                    ismctl=[sys.executable, str(tmp_path / "fake_ismctl.py")],
                    results=tmp_path / "docs" / "results", methods=methods)


def _calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def _result_files(study: fs.Study) -> list[Path]:
    return sorted(p for p in study.results.root.rglob("step*.json"))


def test_choice_uses_the_selection_samples_only(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The reported samples prefer the grids' largest values; the selection samples prefer the
    interior points the choice makes (sm's flow CFG at 128 steps)."""
    _fake(tmp_path, monkeypatch)
    study = _study(tmp_path)
    chosen = fs.tune(study)
    assert chosen["ism"][1]["guidance"] == 0.5 and chosen["ism"][1]["candidates"] == 7
    assert chosen["ism"][128]["candidates"] == 5            # 128 steps: w up to 1 first
    assert chosen["meanflow"][4]["value"] == 0.75
    assert chosen["sm"][128]["sampler"] == "flow-cfg" and chosen["sm"][128]["value"] == 1.5
    assert chosen["sm"][1]["value"] == 1.5 and chosen["sm"][1]["candidates"] == 4
    assert study.grids.widened == []


def test_grids_grow_until_no_choice_sits_on_an_edge(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """SM best at its top scale, MeanFlow at its bottom omega, iSM best beyond its w_max: each
    grid grows (omega half-way to 0 near it) and the choice is made again, until interior."""
    centers = {"cfg": 3.0, "omega": 0.25, "wmax": 3.0}
    log = _fake(tmp_path, monkeypatch, FAKE_CENTER=json.dumps(centers), FAKE_W="1.5")
    study = _study(tmp_path, methods=("sm", "ism", "meanflow"))
    chosen = fs.tune(study)
    assert study.grids.values["sm"] == [1.0, 1.5, 2.0, 3.0, 4.0]
    assert chosen["sm"][1]["value"] == 3.0
    assert study.grids.values["meanflow"] == [0.125, 0.25, 0.5, 0.75, 1.0]
    assert chosen["meanflow"][2]["value"] == 0.25
    assert study.grids.values["ism"] == [1.5, 3.0] and chosen["ism"][1]["value"] == 3.0
    assert chosen["ism"][1]["guidance"] == 1.5
    assert study.grids.top128["ism"] == 2.0                   # 1 -> 1.5 -> 2: w = 1.5 interior
    assert chosen["ism"][128]["guidance"] == 1.5
    rounds = len(study.grids.widened)
    assert 0 < rounds <= fs.MAX_ROUNDS
    # Persisted: a resumed study starts from the grown grids and runs nothing again.
    before = len(_calls(log))
    again = _study(tmp_path, methods=("sm", "ism", "meanflow"))
    assert again.grids.values == study.grids.values
    assert fs.tune(again) == chosen and len(again.grids.widened) == rounds
    assert len(_calls(log)) == before


def test_edges_widen_each_kind_of_grid(tmp_path: Path) -> None:
    """Chosen points set by hand: a baked knob at its largest value gets one more value,
    MeanFlow's omega at its smallest one value below (half-way to 0 near it); an intrinsic
    method whose best w is its 128-step ceiling gets a higher ceiling, one whose best w is its
    w_max a run with a larger w_max. SM's scale 1 (its recipe's least) is not grown."""
    study = _study(tmp_path, methods=tuple(fs.METHODS))
    interior = {"sm": (1.5, 0.0), "ism": (1.5, 0.5), "meanflow": (0.75, 0.0)}
    chosen = {m.name: {n: {"value": interior.get(m.name.split("+")[0], (0.75, 0.0))[0],
                           "guidance": interior.get(m.name.split("+")[0], (1.5, 0.5))[1]}
                       for n in fs.STEPS}
              for m in study.methods}
    chosen["meanflow+sot+twin-ema+intrinsic"] = {n: {"value": 1.5, "guidance": 0.5}
                                                  for n in fs.STEPS}
    assert fs.edges(study, chosen) == []
    chosen["meanflow"][1]["value"] = 1.0
    chosen["ism"][128]["guidance"] = 1.0
    chosen["meanflow+sot+twin-ema+intrinsic"][2]["guidance"] = 1.5
    chosen["sm"][4]["value"] = 1.0                           # the low end: no guidance
    chosen["meanflow+sot"][2]["value"] = 0.5
    assert len(fs.edges(study, chosen)) == 4
    g = study.grids
    assert g.values["meanflow+sot"] == [0.25, 0.5, 0.75, 1.0]
    assert g.values["meanflow"] == [0.5, 0.75, 1.0, 1.25]
    assert g.top128["ism"] == 1.5 and g.values["ism"] == [1.5]
    assert g.w_grid(fs.METHODS["ism"], 1.5, 128) == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    assert g.values["meanflow+sot+twin-ema+intrinsic"] == [1.5, 3.0]
    assert g.values["sm"] == [1.0, 1.5, 2.0, 3.0]
    chosen["meanflow+sot"][2]["value"] = 0.25   # a step down would reach omega 0: half-way
    fs.edges(study, chosen)
    assert g.values["meanflow+sot"] == [0.125, 0.25, 0.5, 0.75, 1.0]


def _run(study: fs.Study) -> dict[str, Any]:
    fs.run_study(study)
    return fs.summarise(study)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One whole study of the six methods on two seeds, shared by the tests that read it."""
    tmp_path = tmp_path_factory.mktemp("study")
    with pytest.MonkeyPatch.context() as monkeypatch:
        _fake(tmp_path, monkeypatch)
        return _run(_study(tmp_path))


def test_results_outlive_the_run_folders(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole study: every reported cell is a result file; with the run folders deleted a
    rerun trains and evaluates nothing, and the report is rendered from the results alone."""
    log = _fake(tmp_path, monkeypatch)
    study = _study(tmp_path)
    summary = _run(study)
    calls = _calls(log)
    kinds = [c[0] for c in calls]
    assert kinds.count("sample") == len(fs.DEFAULT_METHODS)
    files = _result_files(study)
    reported = [f for f in files if f"sseed{fs.REPORT_SEED}" in f.name
                and f.name.startswith("step300-")]
    assert len(reported) >= len(fs.DEFAULT_METHODS) * 2 * len(fs.STEPS)
    record = json.loads(reported[0].read_text())
    assert {"method", "value", "train_seed", "checkpoint_step", "steps", "sampling_seed",
            "guidance", "sampler", "metrics", "command"} <= set(record)
    # Every run trained leaves a training record; the timing is kept too.
    assert (study.results.root / "timing.json").is_file()
    assert len(list(study.results.root.rglob("train.json"))) == kinds.count("train") - \
        len(fs.DEFAULT_METHODS) * fs.TIME_ROUNDS

    shutil.rmtree(study.out)
    log.unlink()
    again = _study(tmp_path)
    assert _run(again) == summary
    assert _calls(log) == []
    assert not again.out.exists()

    # The report needs nothing but the results folder (and renders every table and the picture).
    elsewhere = fs.Study(tmp_path / "nowhere", 300, [0, 1], 1, ["false"],
                         results=study.results.root)
    text = fs.markdown(fs.summarise(elsewhere))
    for m in fs.DEFAULT_METHODS:
        assert text.count(f"| {fs.METHODS[m].label} |") == len(fs.STEPS) + len(fs.WALL_STEPS) + 2
    assert fs.picture(elsewhere, summary, tmp_path / "picture.png")


def test_reported_numbers_are_the_chosen_points_on_other_samples(
        finished: dict[str, Any]) -> None:
    summary = finished
    ism = summary["equal_steps"]["ism"]["1"]
    # 30 - value - w - seed / 2 - step / 1e4 at w_max 1.5, w 0.5, seeds 0 and 1, step 300.
    assert ism["cfd-digits"]["mean"] == pytest.approx(30 - 1.5 - 0.5 - 0.25 - 0.03)
    assert ism["cfd-digits"]["sd"] == pytest.approx(0.5 / 2 ** 0.5)
    assert ism["nfe"] == 1 and ism["spread-digits"]["mean"] == pytest.approx(0.8)
    sm128 = summary["equal_steps"]["sm"]["128"]
    assert sm128["nfe"] == 256 and sm128["cfd-digits"]["mean"] == pytest.approx(50.0)
    assert sm128["sampler"] == "flow-cfg"
    text = fs.markdown(summary)
    assert "flow CFG" in text and "Equal wall-clock" in text and "| spread |" in text


def test_wall_clock_budget_is_the_fastest_method_s_full_run(finished: dict[str, Any]) -> None:
    """The fake trains sm at 4 it/s and the others at 2: within sm's 300 steps the others reach
    150, so they are evaluated at their last kept checkpoint, step 100."""
    summary = finished
    wall = summary["wall_clock"]
    assert wall["seconds_per_step"]["sm"] == pytest.approx(0.25)
    assert wall["seconds_per_step"]["meanflow"] == pytest.approx(0.5)
    assert wall["budget_s"] == pytest.approx(75.0)
    assert wall["step"]["sm"] == {"0": 300, "1": 300} and wall["step"]["ism"] == {"0": 100,
                                                                                 "1": 100}
    assert summary["equal_wall_clock"]["meanflow"]["1"]["train_steps"] == [100, 100]
    # Training time as logged by each run (4 it/s for sm's 300 steps), reported beside.
    assert wall["logged_train_s"]["sm"] == pytest.approx(75.0)


def test_an_interrupted_study_resumes_without_redoing_finished_cells(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clean = tmp_path / "clean"
    clean.mkdir()
    methods = ("sm", "ism")
    clean_log = _fake(clean, monkeypatch)
    _run(_study(clean, methods=methods))
    clean_evals = sum(c[0] == "eval" for c in _calls(clean_log))

    log = _fake(tmp_path, monkeypatch, FAKE_FAIL="step300-4steps-sseed0")
    with pytest.raises(RuntimeError, match="failed"):
        fs.run_study(_study(tmp_path, methods=methods))
    assert _result_files(_study(tmp_path))                   # what finished is kept
    _run(_study(tmp_path, methods=methods))
    evals = sum(c[0] == "eval" for c in _calls(log))
    assert evals == clean_evals + 1                          # the failed one, once more


def test_report_without_timing_leaves_out_the_wall_clock_table(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake(tmp_path, monkeypatch)
    study = _study(tmp_path)
    chosen = fs.tune(study)
    study.run_cells(fs.report_cells(study, chosen, fs.STEPS, lambda m, s: study.train_steps))
    summary = fs.summarise(study)
    assert summary["wall_clock"] is None and summary["equal_wall_clock"] == {}
    text = fs.markdown(summary)
    assert "Equal training steps" in text and "Equal wall-clock" not in text


def test_timed_seconds_is_the_median_interval_after_the_warm_up(tmp_path: Path) -> None:
    """A timing run logged every 25 steps: a slow start-up (left out), then 0.25 s per step
    with one disturbed interval (the median ignores it)."""
    rates = [0.5, 1.0, 1.0, 1.0] + [4.0] * 7 + [1.0]
    lines = [json.dumps({"step": 25 * (i + 1), "it_s": r}) for i, r in enumerate(rates)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert fs.timed_seconds(tmp_path) == pytest.approx(0.25)
    assert fs.train_seconds(tmp_path) == pytest.approx(25 * (2 + 4 * 1.0 + 7 * 0.25))


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


def test_result_keys_name_the_cell(tmp_path: Path) -> None:
    """The path of a result is its key: method, knob value, training seed, checkpoint step, step
    count, sampling seed, sampler and w (the committed results rely on this layout)."""
    results = fs.Results(tmp_path)
    cell = fs.Cell("meanflow+sot", 0.75, 2, 3000, 4, 1)
    (point,) = cell.points([0.0])
    assert results.point_file(cell, point) == (tmp_path / "meanflow+sot" / "omega0.75-seed2"
                                               / "step3000-4steps-sseed1-conditional-w0.json")
    sm = fs.Cell("sm", 1.5, 0, 3000, 128, 0)
    assert [results.point_file(sm, p).name for p in sm.points([0.0])] == [
        "step3000-128steps-sseed0-conditional-w0.json",
        "step3000-128steps-sseed0-flow-cfg-w0.5.json"]


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


def test_plot_is_written(tmp_path: Path, finished: dict[str, Any]) -> None:
    fs.plot(finished, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_named_recipe_is_the_study_s_best_row_as_it_was_trained() -> None:
    """``meanflow_sot_digits`` is MeanFlow + sOT at the omega the committed study chose at every
    step count (read from docs/few_step_digits/results), field for field; its training seed is
    the recipe's own."""
    from ismctl.config.recipe import load_recipe

    study = fs.Study(Path("unused"), 3000, [0, 1, 2], 1, [], results=REPO / fs.RESULTS,
                     methods=["meanflow+sot"])
    chosen = {c["value"] for c in fs.choose(study)["meanflow+sot"].values()}
    assert len(chosen) == 1
    trained = fs.method_recipe("meanflow+sot", chosen.pop()).model_dump()
    named = load_recipe("meanflow_sot_digits").model_dump()
    trained["train"]["seed"] = named["train"]["seed"]
    assert named == trained
