"""prepare-latents on a tiny ImageFolder (tiny VAE) and on digits: shards, manifest, resume."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ismctl.data.images import center_crop_arr, load_rgb
from ismctl.data.manifest import Manifest, read_manifest
from ismctl.data.prepare import prepare_latents
from ismctl.data.shards import decode_moments, iter_shard
from ismctl.utils.errors import UserError

CLASSES = ["bird", "cat", "dog"]
EXTS = {".jpg", ".jpeg", ".png"}
RES = 32


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4, sample_size=32,
    ).eval()


def make_image_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(16):
            h, w = rng.integers(20, 90, size=2)
            pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"img_{i:02d}.jpg", quality=95)
    gray = rng.integers(0, 256, size=(40, 48), dtype=np.uint8)
    Image.fromarray(gray, "L").save(root / "bird" / "gray.jpg")
    cmyk = rng.integers(0, 256, size=(36, 50, 4), dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(root / "bird" / "cmyk.jpg")
    rgba = rng.integers(0, 256, size=(45, 33, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(root / "bird" / "rgba.png")
    (root / "dog" / "sub").mkdir()
    Image.fromarray(rng.integers(0, 256, size=(64, 70, 3), dtype=np.uint8)).save(
        root / "dog" / "sub" / "deep.png")
    data = (root / "cat" / "img_00.jpg").read_bytes()
    (root / "cat" / "corrupt.jpg").write_bytes(data[: len(data) // 2])
    (root / "dog" / "readme.txt").write_text("not an image")


def expected_files(root: Path) -> list[tuple[Path, int]]:
    """Independent listing: sorted class folders, sorted image paths inside each."""
    out = []
    for label, c in enumerate(sorted(p.name for p in root.iterdir() if p.is_dir())):
        files = sorted(p for p in (root / c).rglob("*") if p.suffix.lower() in EXTS)
        out += [(f, label) for f in files]
    return out


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns
            for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("prep")
    make_image_folder(base / "toyset" / "train")
    tiny_vae().save_pretrained(base / "vae")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        manifest = prepare_latents("toyset", resolution=RES, vae=str(base / "vae"),
                                   batch_size=8, shard_size=20, num_workers=1, progress=False)
    return base, base / "data" / f"toyset-{RES}", manifest


def stored_samples(out: Path, manifest: Manifest) -> dict[str, tuple[np.ndarray, int]]:
    samples = {}
    for shard in manifest.shards:
        for s in iter_shard(out / shard.name):
            assert s["__key__"] not in samples
            samples[s["__key__"]] = (decode_moments(s["npy"]), int(s["cls"]))
    return samples


def test_manifest_and_shards(prepared) -> None:
    base, out, manifest = prepared
    files = expected_files(base / "toyset" / "train")
    assert len(files) == 53
    assert manifest == read_manifest(out) == read_manifest(out / "manifest.json")
    assert manifest.count == 52 and sum(s.count for s in manifest.shards) == 52
    assert manifest.class_names == CLASSES and manifest.num_classes == 3
    assert [s.name for s in manifest.shards] == [f"shard-{i:06d}.tar" for i in range(3)]
    assert manifest.encoder == str((base / "vae").resolve())
    assert manifest.scale_factor == pytest.approx(0.18215)
    assert (manifest.resolution, manifest.channels, manifest.latent_size) == (RES, 4, RES // 2)
    assert manifest.flip
    for shard in manifest.shards:
        assert hashlib.sha256((out / shard.name).read_bytes()).hexdigest() == shard.sha256
    [skip] = manifest.skipped
    assert Path(skip["path"]).name == "corrupt.jpg" and "truncated" in skip["reason"]

    samples = stored_samples(out, manifest)
    assert len(samples) == 52
    for key, (moments, label) in samples.items():
        assert "." not in key
        path, expected_label = files[int(key[1:])]
        assert label == expected_label and path.name != "corrupt.jpg"
        assert moments.dtype == np.float16 and moments.shape == (4, 4, RES // 2, RES // 2)


def reference_rgb(path: Path) -> np.ndarray:
    im = Image.open(path)
    if im.mode == "RGBA":
        a = np.asarray(im, dtype=np.float64)
        alpha = a[..., 3:] / 255.0
        return np.rint(a[..., :3] * alpha + 255.0 * (1 - alpha)).astype(np.uint8)
    return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("name", ["gray.jpg", "cmyk.jpg", "rgba.png"])
def test_load_rgb_modes(prepared, name: str) -> None:
    base, _, _ = prepared
    got = np.asarray(load_rgb(base / "toyset" / "train" / "bird" / name))
    ref = reference_rgb(base / "toyset" / "train" / "bird" / name)
    assert got.shape == ref.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1
    if name == "gray.jpg":
        assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()


def test_stored_moments_match_direct_encoding(prepared) -> None:
    from diffusers import AutoencoderKL

    from ismctl.data.encoders import load_encoder

    base, out, manifest = prepared
    files = expected_files(base / "toyset" / "train")
    samples = stored_samples(out, manifest)
    vae = AutoencoderKL.from_pretrained(base / "vae").eval()
    wanted = {"gray.jpg", "cmyk.jpg", "rgba.png", "deep.png", "img_03.jpg"}
    keys = [k for k in samples if files[int(k[1:])][0].name in wanted]
    assert len(keys) >= 6
    pixels = np.stack([center_crop_arr(Image.fromarray(reference_rgb(files[int(k[1:])][0])), RES)
                       for k in keys])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        post_flip = vae.encode(x.flip(-1)).latent_dist
        decoded = vae.decode(post.mean).sample
    stored = np.stack([samples[k][0] for k in keys]).astype(np.float32)
    for i, ref in enumerate([post.mean, post.std, post_flip.mean, post_flip.std]):
        np.testing.assert_allclose(stored[:, i], ref.numpy(), rtol=2e-3, atol=2e-2)

    encoder = load_encoder(manifest.encoder)
    images = encoder.decode(torch.from_numpy(stored[:, 0]) * manifest.scale_factor).numpy()
    expected = np.rint((decoded.clamp(-1, 1).numpy() + 1) * 127.5).transpose(0, 2, 3, 1)
    assert np.abs(images.astype(int) - expected).max() <= 2


def test_rerun_writes_nothing(prepared) -> None:
    base, out, manifest = prepared
    before = mtimes(out)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        again = prepare_latents("toyset", resolution=RES, vae=str(base / "vae"), batch_size=8,
                                shard_size=20, num_workers=0, progress=False)
    assert again == manifest
    assert mtimes(out) == before


def test_resume_rewrites_only_missing_or_damaged_shards(prepared, tmp_path: Path) -> None:
    base, out, manifest = prepared
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "shard-000001.tar").unlink()
    damaged = bytearray((copy / "shard-000002.tar").read_bytes())
    damaged[2000] ^= 0xFF
    (copy / "shard-000002.tar").write_bytes(bytes(damaged))
    (copy / ".shard-000001.tar.k1ll3d.tmp").write_bytes(b"half a shard from a killed run")
    before = mtimes(copy)
    again = prepare_latents(str(base / "toyset"), out=copy, resolution=RES,
                            vae=str(base / "vae"), batch_size=8, shard_size=20, num_workers=0,
                            progress=False)
    after = mtimes(copy)
    assert after["shard-000000.tar"] == before["shard-000000.tar"]
    assert after["shard-000002.tar"] != before["shard-000002.tar"]
    assert ".shard-000001.tar.k1ll3d.tmp" not in after
    # The rewritten shards are byte-identical to the first run's (deterministic writer).
    assert again == manifest


@pytest.mark.parametrize("change", [{"resolution": 64}, {"flip": False}, {"shard_size": 10}])
def test_rerun_with_other_arguments_is_user_error(prepared, change: dict) -> None:
    base, out, _ = prepared
    args = {"resolution": RES, "vae": str(base / "vae"), "shard_size": 20, **change}
    before = mtimes(out)
    with pytest.raises(UserError, match=next(iter(change))) as err:
        prepare_latents(str(base / "toyset"), out=out, progress=False, num_workers=0, **args)
    assert "\n" not in str(err.value)
    assert mtimes(out) == before


def test_digits(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    manifest = prepare_latents("digits", out=tmp_path / "digits", progress=False)
    assert manifest.count == 1797 and manifest.num_classes == 10
    assert manifest.class_names == [str(i) for i in range(10)]
    assert (manifest.encoder, manifest.scale_factor, manifest.flip) == ("identity", 1.0, False)
    assert (manifest.channels, manifest.latent_size, manifest.resolution) == (1, 8, 8)
    assert manifest.skipped == []
    data = load_digits()
    samples = stored_samples(tmp_path / "digits", manifest)
    assert sorted(int(k[1:]) for k in samples) == list(range(1797))
    for key, (moments, label) in samples.items():
        i = int(key[1:])
        assert moments.shape == (2, 1, 8, 8) and label == data.target[i]
        np.testing.assert_array_equal(moments[0, 0], data.images[i] / 8 - 1)
        assert not moments[1].any()


def test_digits_default_out_and_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from ismctl.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["prepare-latents", "digits", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / "data" / "digits").count == 1797
    result = CliRunner().invoke(app, ["prepare-latents", str(tmp_path / "imagenet")])
    assert isinstance(result.exception, UserError)
    assert "imagenet: not found" in str(result.exception)


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="nope: not found"):
        prepare_latents(str(tmp_path / "nope"), progress=False)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        prepare_latents(str(tmp_path / "file.txt"), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no class subfolders"):
        prepare_latents(str(tmp_path / "empty"), progress=False)
    (tmp_path / "hollow" / "a").mkdir(parents=True)
    (tmp_path / "hollow" / "a" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="no images"):
        prepare_latents(str(tmp_path / "hollow"), progress=False)
    with pytest.raises(UserError, match="--batch-size 0"):
        prepare_latents("digits", batch_size=0, progress=False)


def test_center_crop_matches_box_halving_reference() -> None:
    rng = np.random.default_rng(1)
    size = 8
    pixels = rng.integers(0, 256, size=(2 * size, 3 * size, 3), dtype=np.uint8)
    got = center_crop_arr(Image.fromarray(pixels), size)
    halved = pixels.reshape(size, 2, 3 * size // 2, 2, 3).astype(np.float64).mean(axis=(1, 3))
    left = (3 * size // 2 - size) // 2
    ref = halved[:, left : left + size]
    assert got.shape == (size, size, 3)
    assert np.abs(got.astype(np.float64) - ref).max() <= 1.0
    assert np.array_equal(center_crop_arr(Image.fromarray(pixels[:size, :size]), size),
                          pixels[:size, :size])
    for h, w in [(5, 7), (31, 64), (100, 33), (257, 255)]:
        img = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
        assert center_crop_arr(img, size).shape == (size, size, 3)


def test_records_are_json_sidecars(prepared) -> None:
    _, out, manifest = prepared
    for shard in manifest.shards:
        record = json.loads((out / "records" / f"{shard.name}.json").read_text())
        assert record["sha256"] == shard.sha256 and record["count"] == shard.count
        assert record["size"] == os.path.getsize(out / shard.name)


def test_default_workers_fit_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from ismctl.data.prepare import default_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert default_workers() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert default_workers() == 4
