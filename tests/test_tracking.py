"""Reporting: plain progress lines off a terminal, the metrics line, trackers (TensorBoard,
W&B through a stand-in module, none)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ismctl.config.recipe import Recipe
from ismctl.training.tracking import RunLog, metrics_text
from ismctl.utils.errors import UserError
from ismctl.utils.progress import PlainBar, format_duration, progress_bar

LINE = {"step": 200, "loss": 0.5, "velocity": 0.25, "guidance": 0.125, "consistency": 0.125,
        "grad_norm": 1.5, "lr": 1e-4, "it_s": 4.0, "img_s": 1024.0}


def test_format_duration() -> None:
    assert format_duration(0) == "0:00:00"
    assert format_duration(3_725) == "1:02:05"
    assert format_duration(2 * 86_400 + 3_600 + 61) == "2d 01:01:01"
    assert format_duration(None) == "-" and format_duration(float("inf")) == "-"


def test_progress_off_a_terminal_prints_plain_lines(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ISMCTL_LOG_INTERVAL", "0")
    with progress_bar("encoding", total=4, unit="img") as bar:
        assert isinstance(bar, PlainBar)
        for _ in range(4):
            bar.advance()
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(",")[0] for ln in lines] == [
        "encoding: 1/4 img (25%)", "encoding: 2/4 img (50%)", "encoding: 3/4 img (75%)",
        "encoding: 4/4 img (100%)"]
    assert all(" img/s" in ln and "elapsed " in ln and "eta " in ln for ln in lines)


def test_plain_lines_are_rate_limited_and_end_with_a_final_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ISMCTL_LOG_INTERVAL", "3600")
    with progress_bar("sampling", total=10) as bar:
        for _ in range(7):
            bar.advance()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sampling: 7/10 it (70%)")
    with progress_bar("quiet", total=10, plain=False) as bar:
        bar.advance(10)
    with progress_bar("off", total=10, enabled=False) as bar:
        bar.advance(10)
    assert capsys.readouterr().out == ""


def test_metrics_line_text() -> None:
    text = metrics_text(LINE, total=1000)
    assert text.startswith("step 200/1000 loss 0.5000 ")
    assert "(consistency 0.1250 guidance 0.1250 velocity 0.2500)" in text
    assert "4.00 it/s 1024.0 img/s" in text
    assert text.endswith("eta 0:03:20")  # 800 steps left at 4 it/s
    assert "mfu 41.0%" in metrics_text({**LINE, "mfu": 0.41}, total=1000)


def _grid(path: Path) -> Path:
    Image.fromarray(np.full((6, 9, 3), 200, np.uint8)).save(path)
    return path


def test_runlog_writes_metrics_and_tensorboard(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = RunLog(tmp_path, Recipe(), start_step=0, enabled=True, plain=True)
    with log:
        log.metrics(LINE)
        log.grid(_grid(tmp_path / "g.png"), 4, 200)
        log.checkpoint(tmp_path / "checkpoints" / "step-0000200", 200)
    assert [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        LINE]
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("step 200/800000 loss 0.5000")
    assert out[1:] == [f"step 200: sample grid (4 steps) {tmp_path / 'g.png'}",
                       f"step 200: checkpoint {tmp_path / 'checkpoints' / 'step-0000200'}"]
    events = EventAccumulator(str(tmp_path / "tensorboard"),
                              size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert set(events.Tags()["scalars"]) == {
        "train/loss", "train/velocity", "train/guidance", "train/consistency",
        "train/grad_norm", "train/lr", "perf/it_s", "perf/img_s"}
    assert events.Scalars("train/grad_norm")[0].value == 1.5
    image = events.Images("samples/4_step")[0]
    assert (image.step, image.width, image.height) == (200, 9, 6)


def test_disabled_runlog_writes_nothing(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    with RunLog(tmp_path, Recipe(), start_step=0, enabled=False, plain=True) as log:
        log.metrics(LINE)
        log.checkpoint(tmp_path / "c", 1)
    assert list(tmp_path.iterdir()) == [] and capsys.readouterr().out == ""


class FakeWandb(types.ModuleType):
    """Records what the tracker hands to W&B."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.inits: list[dict[str, Any]] = []
        self.logged: list[tuple[dict[str, Any], int]] = []
        self.finished = 0

    def init(self, **kwargs: Any) -> FakeWandb:
        self.inits.append(kwargs)
        return self

    def log(self, values: dict[str, Any], step: int) -> None:
        self.logged.append((values, step))

    def finish(self) -> None:
        self.finished += 1

    @staticmethod
    def Image(array: np.ndarray) -> tuple[str, tuple[int, ...]]:  # noqa: N802 (W&B's name)
        return ("image", array.shape)


def test_wandb_tracker_logs_the_same_tags_and_keeps_its_run_id(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_PROJECT", "digits")
    recipe = Recipe.model_validate({"run": {"tracker": "wandb", "name": "w"}})
    for _ in range(2):
        with RunLog(tmp_path, recipe, start_step=0, enabled=True, plain=False) as log:
            log.metrics(LINE)
            log.grid(_grid(tmp_path / "g.png"), 1, 200)
    first, second = fake.inits
    assert first["id"] == second["id"] == (tmp_path / "wandb_id").read_text().strip()
    assert first["project"] == "digits" and first["resume"] == "allow"
    assert first["config"]["run"]["tracker"] == "wandb"
    values, step = fake.logged[0]
    assert step == 200 and values["train/loss"] == 0.5 and values["perf/img_s"] == 1024.0
    assert fake.logged[1] == ({"samples/1_step": ("image", (6, 9, 3))}, 200)
    assert fake.finished == 2


def test_missing_wandb_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)
    recipe = Recipe.model_validate({"run": {"tracker": "wandb"}})
    with pytest.raises(UserError, match="wandb package is not installed"):
        RunLog(tmp_path, recipe, start_step=0, enabled=True, plain=False)


def test_resume_trims_metrics_after_the_checkpoint(tmp_path: Path) -> None:
    lines = [{**LINE, "step": s} for s in (100, 200, 300)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(ln) + "\n" for ln in lines))
    recipe = Recipe.model_validate({"run": {"tracker": "none"}})
    RunLog(tmp_path, recipe, start_step=200, enabled=True, plain=False).close()
    kept = [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == [100, 200]
