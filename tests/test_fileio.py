import os
from pathlib import Path

import pytest

from ismctl.utils.fileio import atomic_path, atomic_write_text


def test_atomic_write_replaces_and_is_readable(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert os.stat(target).st_mode & 0o044, "result should be readable like a normal new file"
    assert [p.name for p in target.parent.iterdir()] == ["file.txt"]


def test_failure_keeps_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    atomic_write_text(target, "good")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]
