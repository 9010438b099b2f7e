"""Encoders: identity round trip, the diffusers VAE wrapper against direct calls, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ismctl.data.encoders import IdentityEncoder, load_encoder, to_uint8
from ismctl.utils.errors import UserError


def tiny_vae(scaling_factor: float = 0.18215):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4, sample_size=32, scaling_factor=scaling_factor,
    ).eval()


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    tiny_vae(scaling_factor=0.5).save_pretrained(path)
    return path


def test_identity_round_trip() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(3, 3, 5, 7), dtype=np.uint8)
    images = torch.from_numpy(pixels).float() / 127.5 - 1
    for scale in (1.0, 2.5):
        enc = IdentityEncoder(scale)
        mean, std = enc.encode(images)
        assert torch.equal(std, torch.zeros_like(images))
        out = enc.decode(mean * scale)
        assert out.dtype == torch.uint8 and out.shape == (3, 5, 7, 3)
        np.testing.assert_array_equal(out.numpy(), pixels.transpose(0, 2, 3, 1))
    assert load_encoder("identity").latent_shape(1, 8) == (1, 8)


def test_to_uint8_clamps_and_rounds() -> None:
    x = torch.tensor([-3.0, -1.0, 0.0, 0.999, 1.0, 7.0]).view(1, 1, 1, 6)
    expected = np.clip(np.rint((np.array([-3.0, -1.0, 0.0, 0.999, 1.0, 7.0]).clip(-1, 1) + 1)
                               * 127.5), 0, 255)
    np.testing.assert_array_equal(to_uint8(x).numpy().ravel(), expected)


def test_vae_encoder_matches_direct_calls(vae_dir: Path) -> None:
    enc = load_encoder(str(vae_dir))
    assert enc.scale_factor == 0.5  # read from vae.config.scaling_factor
    assert enc.latent_shape(3, 32) == (4, 16)
    with pytest.raises(UserError, match="downsampling factor 2"):
        enc.latent_shape(3, 33)
    assert load_encoder(str(vae_dir), scale_factor=0.25).scale_factor == 0.25

    ref = tiny_vae(scaling_factor=0.5)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    mean, std = enc.encode(images)
    with torch.no_grad():
        post = ref.encode(images).latent_dist
        expected_mean, expected_std = post.mean.numpy(), post.std.numpy()
        decoded = ref.decode(post.mean).sample.numpy()
    np.testing.assert_allclose(mean.numpy(), expected_mean, atol=1e-5)
    np.testing.assert_allclose(std.numpy(), expected_std, rtol=1e-5)
    out = enc.decode(mean * 0.5).numpy()
    expected = np.rint((np.clip(decoded, -1, 1) + 1) * 127.5).transpose(0, 2, 3, 1)
    assert out.dtype == np.uint8 and out.shape == (2, 32, 32, 3)
    assert np.abs(out.astype(int) - expected).max() <= 1


def test_pipeline_folder_with_vae_subfolder(tmp_path: Path) -> None:
    tiny_vae().save_pretrained(tmp_path / "pipe" / "vae")
    assert load_encoder(str(tmp_path / "pipe")).scale_factor == pytest.approx(0.18215)


@pytest.mark.parametrize("name", ["/definitely/not/here", "./nope", "a/b/c"])
def test_missing_path_is_user_error(name: str) -> None:
    with pytest.raises(UserError, match="not found"):
        load_encoder(name)


def test_unloadable_folder_is_user_error(tmp_path: Path) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot load") as err:
        load_encoder(str(tmp_path / "junk"))
    assert "\n" not in str(err.value)


def test_a_hub_vae_without_network_is_refused_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not cached and the Hub unreachable (or switched off): one line naming --vae PATH, at
    once, instead of a minute of retries; a folder written by save_pretrained loads."""
    import time

    import ismctl.data.encoders as encoders

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache" / "hub"))
    monkeypatch.setattr(encoders, "hub_reachable", lambda timeout=3.0: False)
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        load_encoder("stabilityai/sd-vae-ft-mse")
    assert time.perf_counter() - start < 5
    text = str(err.value)
    assert "\n" not in text and "cannot be reached" in text and "--vae DIR" in text
    assert 'from_pretrained("stabilityai/sd-vae-ft-mse").save_pretrained' in text
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set"):
        load_encoder("stabilityai/sd-vae-ft-mse")
    tiny_vae().save_pretrained(tmp_path / "sd-vae-ft-mse")
    assert load_encoder(str(tmp_path / "sd-vae-ft-mse")).channels == 4
