"""A shard that fails its manifest digest or cannot be read is named in one line (exit 2),
wherever it is read: the run's start, the loader (in-process and in worker processes),
the band statistics; `ismctl data check` checks a whole data set."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import ismctl.data.verify as verify
import ismctl.training.preflight as preflight
from ismctl.data.loader import TrainLoader, iter_dataset
from ismctl.data.shards import sha256_file
from ismctl.utils.errors import UserError

REPO = Path(__file__).resolve().parent.parent
QUICK = str(REPO / "recipes" / "quickstart.yaml")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ismctl.data.prepare import prepare_latents

    out = tmp_path_factory.mktemp("shards") / "digits"
    prepare_latents("digits", out=out, shard_size=400, progress=False)
    return out


@pytest.fixture
def data(prepared: Path, tmp_path: Path) -> Path:
    verify._CHECKED.clear()  # each test's copy is checked afresh
    copy = tmp_path / "digits"
    shutil.copytree(prepared, copy)
    return copy


def truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def zero_bytes(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[5000:10000] = bytes(5000)
    path.write_bytes(bytes(raw))


def pickled_sample(data: Path, shard: str) -> None:
    """Replace the first sample's array by a pickled object array, and record the new digest
    (as if the manifest had been written from the altered shard): only decoding sees it."""
    path = data / shard
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    buf = io.BytesIO()
    np.save(buf, np.array([{"not": "numbers"}], dtype=object), allow_pickle=True)
    out = io.BytesIO()
    first = next(m.name for m, _ in members if m.name.endswith(".npy"))
    with tarfile.open(fileobj=out, mode="w") as tar:
        for member, payload in members:
            if member.name == first:
                payload = buf.getvalue()
                member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    path.write_bytes(out.getvalue())
    manifest = json.loads((data / "manifest.json").read_text())
    for s in manifest["shards"]:
        if s["name"] == shard:
            s["sha256"] = sha256_file(path)
    (data / "manifest.json").write_text(json.dumps(manifest))


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("damage", [truncate, zero_bytes])
def test_train_and_dry_run_name_the_damaged_shard(
        ismctl_main: Callable[..., int], data: Path, tmp_path: Path, damage: Callable,
        capsys: pytest.CaptureFixture[str]) -> None:
    shard = data / "shard-000002.tar"
    damage(shard)
    args = ["train", QUICK, "--no-progress", f"--set=data.path={data}",
            f"--set=run.root={tmp_path / 'runs'}", "--set=train.steps=2"]
    for extra in (["--dry-run"], []):
        verify._CHECKED.clear()
        assert ismctl_main(*args, *extra) == 2
        err = one_line(capsys)
        assert f"{shard}: damaged: its sha256 differs from the one in manifest.json" in err
        assert "ismctl prepare-latents" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("workers", [0, 1])
def test_the_loader_checks_each_shard_when_it_first_opens_it(
        data: Path, workers: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Data sets too large to check at the start: the loader checks each shard as it opens
    it, in the main process or in a worker, and the error reaches the trainer as one line."""
    monkeypatch.setattr(preflight, "VERIFY_AT_START_BYTES", 0)
    truncate(data / "shard-000000.tar")
    loader = TrainLoader(data, batch_size=64, pool_size=0, seed=0, num_workers=workers)
    with pytest.raises(UserError) as err:
        for _ in zip(range(40), loader, strict=False):
            pass
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text
    assert text.startswith(f"{data / 'shard-000000.tar'}: damaged")


@pytest.mark.parametrize("workers", [0, 1])
def test_an_undecodable_sample_names_its_shard(data: Path, workers: int) -> None:
    pickled_sample(data, "shard-000001.tar")
    loader = TrainLoader(data, batch_size=64, pool_size=0, seed=0, num_workers=workers)
    with pytest.raises(UserError) as err:
        for _ in zip(range(40), loader, strict=False):
            pass
    text = str(err.value)
    assert "\n" not in text and "shard-000001.tar: sample r" in text
    assert "cannot be decoded" in text and "Object arrays cannot be loaded" in text
    with pytest.raises(UserError, match="shard-000001.tar: sample r"):
        list(iter_dataset(data))


def test_data_check_names_every_bad_shard(
        ismctl_main: Callable[..., int], data: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert ismctl_main("data", "check", str(data)) == 0
    out = capsys.readouterr().out
    assert "1,797 samples in 5 shards" in out and "all intact" in out
    verify._CHECKED.clear()
    truncate(data / "shard-000003.tar")
    pickled_sample(data, "shard-000001.tar")
    assert ismctl_main("data", "check", str(data)) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err
    assert any("shard-000001.tar: sample r" in ln for ln in lines)
    assert any("shard-000003.tar: damaged" in ln for ln in lines)
    assert lines[-1].startswith(f"error: {data}: 2 of 5 shards are damaged")
    assert ismctl_main("data", "check", str(data / "missing")) == 2
    assert "manifest.json: not found" in one_line(capsys)
