"""Bad input to every command: one line on stderr naming what and where, exit code 2, no
traceback, nothing written. Through ``ismctl.cli.main``, the function the ``ismctl`` script
runs (the ``train`` cases in test_train.py also go through a fresh interpreter)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ismctl.cli import main

REPO = Path(__file__).resolve().parent.parent
QUICK = str(REPO / "recipes" / "quickstart.yaml")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ismctl.data.prepare import prepare_latents
    from ismctl.recipe import load_recipe
    from ismctl.trainer import train

    root = tmp_path_factory.mktemp("cli")
    prepare_latents("digits", out=root / "digits", progress=False)
    recipe = load_recipe(QUICK, [f"data.path={root / 'digits'}", f"run.root={root}",
                                 "run.name=run", "train.steps=1", "data.batch_size=8",
                                 "run.sample_num=10", "run.tracker=none"])
    return train(recipe, QUICK, progress=False)


def cases(run: Path, tmp: Path) -> list[tuple[list[str], str]]:
    missing = str(tmp / "missing")
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
        (["ablate", QUICK, "--cumulative", "--launch", "slurm", "--out", str(tmp / "a")],
         "--launch slurm"),
        (["bench", "--presets", "huge/2", "--out", str(tmp / "b.json")], "huge/2"),
        (["bench", "--threads", "0", "--out", str(tmp / "b.json")], "--threads 0"),
    ]


def test_every_command_reports_bad_input_in_one_line(digits_run: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()  # the commands set it for their process
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
