"""Sample outputs that stream and fit: a folder or an .npz is written as the samples are made,
an interrupted job keeps them and the same command continues it (the result identical to an
uninterrupted one); a request that cannot fit is refused before sampling; grids scale."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ismctl.sampling.fits as fits
import ismctl.sampling.generate as generate

REPO = Path(__file__).resolve().parent.parent
QUICK = str(REPO / "recipes" / "quickstart.yaml")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ismctl.config.recipe import load_recipe
    from ismctl.data.prepare import prepare_latents
    from ismctl.training.trainer import train

    root = tmp_path_factory.mktemp("sampleout")
    prepare_latents("digits", out=root / "digits", progress=False)
    recipe = load_recipe(QUICK, [f"data.path={root / 'digits'}", f"run.root={root}",
                                 "run.name=run", "train.steps=2", "data.batch_size=16",
                                 "coupling.pool_size=16", "run.tracker=none",
                                 "run.sample_every=1000", "eval.num_samples=20"])
    return train(recipe, QUICK, progress=False)


def interrupt_after(monkeypatch: pytest.MonkeyPatch, batches: int) -> None:
    """Ctrl-C while the batch after ``batches`` is being sampled."""
    real = generate.sample
    calls = []

    def sample(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) > batches:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(generate, "sample", sample)


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_an_interrupted_folder_is_continued(
        ismctl_main: Callable[..., int], run: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from ismctl.sampling.pngdir import read_png_folder

    args = ["sample", str(run), "--num-samples", "50", "--batch-size", "10"]
    assert ismctl_main(*args, "--out", str(tmp_path / "whole")) == 0
    out = tmp_path / "parts"
    interrupt_after(monkeypatch, 2)
    assert ismctl_main(*args, "--out", str(out)) == 130
    err = one_line(capsys)
    assert f"interrupted: kept 20 of 50 samples in {out}; the same command continues" in err
    assert len(list(out.glob("*.png"))) == 20 and (out / ".ismctl-request.json").is_file()
    monkeypatch.setattr(generate, "sample", _real_sample())
    assert ismctl_main(*args, "--out", str(out)) == 0
    assert "continuing: 20 of 50 samples already in" in capsys.readouterr().out
    a, b = read_png_folder(tmp_path / "whole"), read_png_folder(out)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert len(list(out.iterdir())) == 50, "a finished folder holds its samples only"
    # Another request into the folder starts the set over.
    assert ismctl_main("sample", str(run), "--num-samples", "5", "--seed", "7",
                       "--out", str(out)) == 0
    assert len(list(out.glob("*.png"))) == 5


def _real_sample() -> Callable[..., object]:
    from ismctl.sampling.sampler import sample

    return sample


def test_an_interrupted_npz_is_continued_and_stays_adm(
        ismctl_main: Callable[..., int], run: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["sample", str(run), "--num-samples", "45", "--batch-size", "10"]
    assert ismctl_main(*args, "--out", str(tmp_path / "whole.npz")) == 0
    out = tmp_path / "parts.npz"
    interrupt_after(monkeypatch, 3)
    assert ismctl_main(*args, "--out", str(out)) == 130
    partial = tmp_path / "parts.npz.partial"
    assert f"kept 30 of 45 samples in {partial}" in one_line(capsys)
    assert not out.exists() and len(list(partial.glob("chunk-*.npz"))) == 3
    monkeypatch.setattr(generate, "sample", _real_sample())
    # A different batch size continues the same samples.
    assert ismctl_main(*args[:-1], "7", "--out", str(out)) == 0
    assert not partial.exists()
    whole, parts = np.load(tmp_path / "whole.npz"), np.load(out)
    assert sorted(parts.files) == ["arr_0", "arr_1"]
    assert parts["arr_0"].dtype == np.uint8 and parts["arr_0"].shape == (45, 8, 8, 1)
    assert parts["arr_1"].dtype == np.int64
    assert np.array_equal(whole["arr_0"], parts["arr_0"])
    assert np.array_equal(whole["arr_1"], parts["arr_1"])


def test_requests_that_cannot_fit_are_refused_before_sampling(
        ismctl_main: Callable[..., int], run: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def no_sampling(*args: object, **kwargs: object) -> None:
        raise AssertionError("sampled before refusing")

    monkeypatch.setattr(generate, "sample", no_sampling)
    huge = ["--num-samples", "1000000000"]
    assert ismctl_main("sample", str(run), *huge, "--out", str(tmp_path / "g.png")) == 2
    assert "pixels, over the 8,192x8,192 a grid may have" in one_line(capsys)
    monkeypatch.setattr(fits.shutil, "disk_usage", lambda p: type("U", (), {"free": 10**10})())
    assert ismctl_main("sample", str(run), *huge, "--out", str(tmp_path / "s.npz")) == 2
    assert "an .npz of 1,000,000,000 images needs about 144.0 GB on disk" in one_line(capsys)
    assert ismctl_main("sample", str(run), *huge, "--out", str(tmp_path / "dir")) == 2
    assert "a folder of 1,000,000,000 PNGs needs about" in one_line(capsys)
    monkeypatch.setattr(fits, "available_memory", lambda: 2 * 10**9)
    assert ismctl_main("eval", str(run), *huge, "--out", str(tmp_path / "e.json")) == 2
    err = one_line(capsys)
    assert "evaluating 1,000,000,000 samples of 8x8x1 per point needs about" in err
    assert "2.0 GB is available; lower --num-samples" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_grid_scale(ismctl_main: Callable[..., int], run: Path, tmp_path: Path,
                    capsys: pytest.CaptureFixture[str]) -> None:
    assert ismctl_main("sample", str(run), "--num-samples", "100",
                       "--out", str(tmp_path / "a.png")) == 0
    assert Image.open(tmp_path / "a.png").size == (546, 546)  # 91 pixels, 6x
    assert ismctl_main("sample", str(run), "--num-samples", "100", "--scale", "2",
                       "--out", str(tmp_path / "b.png")) == 0
    assert Image.open(tmp_path / "b.png").size == (182, 182)
    assert ismctl_main("sample", str(run), "--scale", "2", "--out", str(tmp_path / "c.npz")) == 2
    assert "--scale 2: only for a .png grid" in one_line(capsys)
    assert ismctl_main("sample", str(run), "--scale", "0", "--out", str(tmp_path / "c.png")) == 2
    assert "--scale 0: must be >= 1" in one_line(capsys)
