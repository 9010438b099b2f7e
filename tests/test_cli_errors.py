"""Bad input to every command: one line on stderr naming what and where, exit code 2, no
traceback, nothing written. Through ``ismctl.cli.main``, the function the ``ismctl`` script
runs (the ``train`` cases in test_train.py also go through a fresh interpreter)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ismctl.cli import main

REPO = Path(__file__).resolve().parent.parent
QUICK = str(REPO / "recipes" / "quickstart.yaml")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ismctl.config.recipe import load_recipe
    from ismctl.data.prepare import prepare_latents
    from ismctl.training.trainer import train

    root = tmp_path_factory.mktemp("cli")
    prepare_latents("digits", out=root / "digits", progress=False)
    recipe = load_recipe(QUICK, [f"data.path={root / 'digits'}", f"run.root={root}",
                                 "run.name=run", "train.steps=1", "data.batch_size=8",
                                 "run.sample_num=10", "run.tracker=none"])
    return train(recipe, QUICK, progress=False)


def cases(run: Path, tmp: Path) -> list[tuple[list[str], str]]:
    missing = str(tmp / "missing")
    data = str(run.parent / "digits")
    train = ["train", QUICK, "--set", f"data.path={data}", "--set", f"run.root={tmp / 'runs'}"]
    return [
        (["prepare-latents", missing], "missing"),
        (["prepare-latents", "digits", "--out", str(tmp / "p"), "--batch-size", "0"],
         "batch"),
        (["sample", missing], "missing: not found"),
        (["sample", str(run), "--steps", "3", "--out", str(tmp / "s.png")], "power of two"),
        (["sample", str(run), "--out", str(tmp / "s.jpg")], "--out"),
        (["sample", str(run), "--which", "best"], "--which 'best'"),
        (["sample", str(run), "--class", "10"], "--class 10"),
        (["eval", missing], "missing: not found"),
        (["eval", str(run), "--steps", "1,x"], "--steps '1,x'"),
        (["eval", str(run), "--which", "slow", "--out", str(tmp / "e.json")], "--which 'slow'"),
        (["eval", str(run), "--metrics", "fud", "--out", str(tmp / "e.json")], "--metrics fud"),
        (["eval", str(run), "--ref", missing, "--metrics", "fd-digits",
          "--out", str(tmp / "e.json")], "missing"),
        (["ablate", QUICK, "--disable", "wavlet", "--out", str(tmp / "a")], "--disable wavlet"),
        (["ablate", QUICK, "--out", str(tmp / "a")], "nothing to compare"),
        (["ablate", missing + ".yaml", "--cumulative", "--out", str(tmp / "a")],
         "recipe file not found"),
        (["ablate", QUICK, "--cumulative", "--launch", "lsf", "--out", str(tmp / "a")],
         "--launch lsf"),
        (["bench", "--presets", "huge/2", "--out", str(tmp / "b.json")], "huge/2"),
        (["bench", "--threads", "0", "--out", str(tmp / "b.json")], "--threads 0"),
        (["sample", str(run), "--steps", "0", "--out", str(tmp / "s.png")], "--steps 0: must be"),
        (["sample", str(run), "--num", "0", "--out", str(tmp / "s.png")], "--num-samples 0"),
        (["sample", str(run), "--num", "-5", "--out", str(tmp / "s.png")], "--num-samples -5"),
        (["sample", str(run), "--num-samples", "0", "--out", str(tmp / "s.png")],
         "--num-samples 0"),
        (["sample", str(run), "--batch-size", "0", "--out", str(tmp / "s.png")],
         "--batch-size 0"),
        (["sample", str(run), "--num", "5", "--num-samples", "6"], "give only --num-samples"),
        (["sample", str(run), "--device", "tpu", "--out", str(tmp / "s.png")],
         "'tpu' is not a device; choose auto, cpu, cuda or cuda:N"),
        (["sample", str(run), "--device", "cuda", "--out", str(tmp / "s.png")],
         "no CUDA device is visible"),
        (["prepare-latents", "digits", "--out", str(tmp / "p"), "--device", "tpu"],
         "'tpu' is not a device"),
        (["prepare-latents", "digits", "--out", str(tmp / "p"), "--num-workers", "-1"],
         "--num-workers -1"),
        (["prepare-latents", "digits", "--out", str(tmp / "p"), "--workers", "1",
          "--num-workers", "2"], "give only --num-workers"),
        (["bench", "--device", "tpu", "--out", str(tmp / "b.json")], "'tpu' is not a device"),
        (["bench", "--device", "cuda", "--quick", "--out", str(tmp / "b.json")],
         "no CUDA device is visible"),
        (["eval", str(run), "--num-samples", "0", "--out", str(tmp / "e.json")],
         "--num-samples 0"),
        (["eval", str(run), "--batch-size", "0", "--out", str(tmp / "e.json")],
         "--batch-size 0"),
        (["eval", str(run), "--device", "tpu", "--out", str(tmp / "e.json")], "'tpu'"),
        (["ablate", QUICK, "--cumulative", "--eval-num-samples", "0", "--out", str(tmp / "a")],
         "--eval-num-samples 0"),
        ([*train, "--set", "train.device=tpu"],
         "--set train.device=tpu: train.device: 'tpu' is not a device"),
        ([*train, "--set", "train.device=cuda"], "no CUDA device is visible"),
        ([*train, "--set", "train.device=cuda", "--dry-run"], "no CUDA device is visible"),
        ([*train, "--set", "optim.lrr=1"],
         "--set optim.lrr=1: optim.lrr: unknown key (did you mean optim.lr?)"),
        ([*train, "--set", f"data.path={missing}", "--dry-run"], "manifest.json: not found"),
        ([*train, "--set", "model.preset=tiny/3", "--dry-run"],
         "input size 8 is not a multiple of the patch size 3"),
        ([*train, "--set", "loss.detail_weights=[1,2]", "--dry-run"], "loss.detail_weights"),
    ]


def test_every_command_reports_bad_input_in_one_line(digits_run: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()  # the commands set it for their process
    # As on a machine without a GPU, whatever this one has.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for args, expect in cases(digits_run, tmp_path):
        monkeypatch.setattr(sys, "argv", ["ismctl", *args])
        with pytest.raises(SystemExit) as stop:
            main()
        torch.set_num_threads(threads)
        err = capsys.readouterr().err
        assert stop.value.code == 2, (args, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (args, err)
        assert err.startswith("error: ") and expect in err, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "bad input wrote files"


# Recipes that load as YAML but hold a value the model rejects: each must stop `train` with
# one line before anything is written (the run folder included).
BAD_RECIPES = [
    "model: {preset: Huge/2}",
    "loss: {name: l1}",
    "loss: {wavelet: notawavelet}",
    "train: {device: tpu}",
    "eval: {steps: [3]}",
    "optim: {lrr: 1}",
    "objective: {base_steps: 100}",
]


@pytest.mark.parametrize("text", BAD_RECIPES)
def test_bad_recipe_creates_no_run_folder(text: str, digits_run: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"extends: {QUICK}\n{text}\nrun: {{root: {tmp_path / 'runs'}}}\n"
                      f"data: {{path: {digits_run.parent / 'digits'}}}\n")
    monkeypatch.setattr(sys, "argv", ["ismctl", "train", str(recipe)])
    with pytest.raises(SystemExit) as stop:
        main()
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: {recipe}: ") and "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["bad.yaml"]


def test_version_and_debug(ismctl_main: Callable[..., int], monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    import ismctl
    from ismctl.utils.errors import UserError

    assert ismctl_main("--version") == 0
    assert capsys.readouterr().out.strip() == f"ismctl {ismctl.__version__}"
    assert ismctl_main("--help") == 0
    out = capsys.readouterr().out
    assert "--version" in out and "--debug" in out and "recipe" in out
    # --debug anywhere: the error propagates with its traceback instead of one line.
    for args in (["--debug", "train", "nowhere.yaml"], ["train", "nowhere.yaml", "--debug"]):
        monkeypatch.setattr(sys, "argv", ["ismctl", *args])
        with pytest.raises(UserError, match="recipe file not found"):
            main()
    assert ismctl_main("train", "nowhere.yaml") == 2


def test_old_option_names_are_hidden_aliases(
        ismctl_main: Callable[..., int], digits_run: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    assert ismctl_main("sample", "--help") == 0
    help_text = capsys.readouterr().out
    assert "--num-samples" in help_text and "--num " not in help_text
    assert ismctl_main("prepare-latents", "--help") == 0
    help_text = capsys.readouterr().out
    assert "--num-workers" in help_text and "--workers" not in help_text
    common = ["sample", str(digits_run), "--steps", "1", "--seed", "3", "--device", "cpu"]
    assert ismctl_main(*common, "--num", "6", "--out", str(tmp_path / "a.npz")) == 0
    assert ismctl_main(*common, "--num-samples", "6",
                       "--out", str(tmp_path / "b.npz")) == 0
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert a["arr_0"].shape[0] == 6 and np.array_equal(a["arr_0"], b["arr_0"])
    out = tmp_path / "p"
    assert ismctl_main("prepare-latents", "digits", "--out", str(out),
                       "--workers", "0") == 0
    assert ismctl_main("prepare-latents", "digits", "--out", str(out),
                       "--num-workers", "0") == 0
    assert (out / "manifest.json").is_file()


def test_device_names_are_checked_before_use(monkeypatch: pytest.MonkeyPatch) -> None:
    from ismctl.system.distributed import resolve_device
    from ismctl.utils.errors import UserError

    assert resolve_device("cpu") == torch.device("cpu")
    for name in ("tpu", "cuda:", "gpu", "cpu:0"):
        with pytest.raises(UserError, match="choose auto, cpu, cuda or cuda:N"):
            resolve_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="no CUDA device is visible"):
        resolve_device("cuda:0")
    # A machine with two GPUs: local rank 1 gets cuda:1, cuda:2 does not exist.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UserError, match=r"only 2 CUDA device\(s\) are visible"):
        resolve_device("cuda:2")
