"""Sample folders: one PNG per sample, index and class in the name, earlier sets replaced."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ismctl.sampling.pngdir import is_png_folder, read_png_folder, write_png_folder


@pytest.mark.parametrize("channels", [1, 3])
def test_round_trip(tmp_path: Path, channels: int) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 4, 6, channels), dtype=np.uint8)
    labels = np.array([3, 0, 9, 3, 12])
    write_png_folder(tmp_path / "out", images, labels)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "000000_class3.png", "000001_class0.png", "000002_class9.png", "000003_class3.png",
        "000004_class12.png"]
    back, back_labels = read_png_folder(tmp_path / "out")
    np.testing.assert_array_equal(back, images)
    np.testing.assert_array_equal(back_labels, labels)


def test_shares_by_index_and_replacing_an_earlier_set(tmp_path: Path) -> None:
    images = np.arange(6 * 2 * 2 * 1, dtype=np.uint8).reshape(6, 2, 2, 1)
    labels = np.arange(6)
    folder = tmp_path / "out"
    write_png_folder(folder, np.zeros((9, 2, 2, 1), np.uint8), np.zeros(9, int))
    (folder / "notes.txt").write_text("mine")
    write_png_folder(folder, images[0::2], labels[0::2], np.arange(6)[0::2])
    write_png_folder(folder, images[1::2], labels[1::2], np.arange(6)[1::2], clear=False)
    back, back_labels = read_png_folder(folder)
    np.testing.assert_array_equal(back, images)
    np.testing.assert_array_equal(back_labels, labels)
    assert (folder / "notes.txt").read_text() == "mine"


def test_what_counts_as_a_folder(tmp_path: Path) -> None:
    assert is_png_folder(tmp_path / "samples") and is_png_folder(tmp_path)
    assert not is_png_folder(tmp_path / "grid.png") and not is_png_folder(tmp_path / "a.npz")
