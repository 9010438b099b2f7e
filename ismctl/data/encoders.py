"""Encoders between images and what the model sees: the SD VAE, or the identity (pixels).

Convention (method §3.5, as in DiT/SiT): the model's data ``x1`` is the VAE latent times the
scale factor (0.18215 for sd-vae-ft-mse, read from ``vae.config.scaling_factor``) so it has
roughly unit variance. ``encode`` returns the unscaled posterior (mean, std); ``decode``
takes *scaled* latents, i.e. exactly what the sampler produces.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from ismctl.utils.errors import UserError

IDENTITY = "identity"


class Encoder(Protocol):
    name: str
    scale_factor: float

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]: ...

    def decode(self, latents: Tensor) -> Tensor: ...

    def latent_shape(self, image_channels: int, resolution: int) -> tuple[int, int]: ...


def to_uint8(images: Tensor) -> Tensor:
    """Images in [-1, 1], (B, C, H, W) -> uint8 (B, H, W, C) on the CPU."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu()


class IdentityEncoder:
    """Pixel space: the 'latent' is the image in [-1, 1] with a zero posterior std."""

    name = IDENTITY

    def __init__(self, scale_factor: float = 1.0) -> None:
        self.scale_factor = scale_factor

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = images.detach().float().cpu()
        return x, torch.zeros_like(x)

    def decode(self, latents: Tensor) -> Tensor:
        return to_uint8(latents / self.scale_factor)

    def latent_shape(self, image_channels: int, resolution: int) -> tuple[int, int]:
        return image_channels, resolution


class VAEEncoder:
    """A diffusers ``AutoencoderKL``: fp32 on the CPU; on a GPU under fp16 autocast (norms and
    softmax stay fp32), recomputed in fp32 for any batch whose result is not finite."""

    def __init__(self, vae: Any, name: str, device: torch.device,
                 scale_factor: float | None = None) -> None:
        self.vae, self.name, self.device = vae, name, device
        config_scale = getattr(vae.config, "scaling_factor", None)
        self.scale_factor = float(scale_factor or config_scale or 0.18215)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        self.channels = int(vae.config.latent_channels)

    def _run(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        with torch.inference_mode():
            if self.device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.float16):
                    out = fn(x).float()
                if torch.isfinite(out).all():
                    return out
            return fn(x).float()

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = images.to(self.device, torch.float32)
        mean, std = self._run(self._posterior, x).chunk(2, dim=1)
        return mean.cpu(), std.cpu()

    def _posterior(self, x: Tensor) -> Tensor:
        dist = self.vae.encode(x).latent_dist
        return torch.cat([dist.mean, dist.std], dim=1)

    def decode(self, latents: Tensor) -> Tensor:
        z = latents.to(self.device, torch.float32) / self.scale_factor
        return to_uint8(self._run(lambda v: self.vae.decode(v).sample, z))

    def latent_shape(self, image_channels: int, resolution: int) -> tuple[int, int]:
        if resolution % self.downsample:
            raise UserError(f"resolution {resolution}: not a multiple of the VAE's downsampling "
                            f"factor {self.downsample}")
        return self.channels, resolution // self.downsample


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``owner/name``; anything else with a separator or a leading ``.``/``~`` is
    meant as a local folder."""
    return name.startswith((".", "~", os.sep)) or name.count("/") != 1 or name.endswith("/")


def diffusers_import_error(exc: BaseException) -> str:
    """Why diffusers does not import, in one line. pip installs the newest diffusers whatever
    torch is installed, and recent releases use torch APIs that older torch releases lack."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = f"diffusers {version('diffusers')}"
    except PackageNotFoundError:
        found = "diffusers"
    reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return (f"the VAE encoder needs {found}, which does not import with torch "
            f"{torch.__version__} ({reason}); with this torch install an older diffusers "
            "(pip install 'diffusers<0.37' for torch 2.4) or upgrade torch")


HUB = "https://huggingface.co"
OFFLINE_HELP = ("on a machine with network, run `AutoencoderKL.from_pretrained(\"{name}\")"
                ".save_pretrained(\"DIR\")` (diffusers), copy DIR here and pass --vae DIR "
                "(`ismctl docs training`: 'A VAE without network')")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub (``HF_ENDPOINT``) accepts a connection within ``timeout``
    seconds: without one, diffusers spends most of a minute on retries before failing."""
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", HUB))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _is_cached(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except Exception:
        return False
    return isinstance(found, str)


def _fetch_allowed(name: str) -> bool:
    """A Hub id may be downloaded: it is not in the local cache, the Hub is reachable and
    not switched off (``HF_HUB_OFFLINE``). A cached model loads without any network call;
    one that cannot be fetched is refused at once, naming the way out."""
    if _is_cached(name):
        return False
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline or not hub_reachable():
        why = "HF_HUB_OFFLINE is set" if offline else (
            f"{os.environ.get('HF_ENDPOINT', HUB)} cannot be reached (no network?)")
        raise UserError(f"{name}: not in the local Hugging Face cache and {why}; "
                        + OFFLINE_HELP.format(name=name))
    return True


def load_encoder(name: str, device: torch.device | str = "cpu",
                 scale_factor: float | None = None) -> Encoder:
    """``"identity"`` (pixels), or a diffusers AutoencoderKL: a local folder (its own
    ``config.json``, or a pipeline folder with a ``vae/`` subfolder, e.g. one written by
    ``save_pretrained``) or a Hub id (from the local cache; downloaded only when the Hub can
    be reached, else refused at once with the way out)."""
    device = torch.device(device)
    if name == IDENTITY:
        return IdentityEncoder(scale_factor or 1.0)
    try:
        from diffusers import AutoencoderKL
    except Exception as exc:  # noqa: BLE001 - newer diffusers fail on older torch in many ways
        raise UserError(diffusers_import_error(exc)) from exc

    path = Path(name).expanduser()
    kwargs: dict[str, Any] = {}
    if path.exists():
        if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
            kwargs["subfolder"] = "vae"
        source = str(path.resolve())
    elif _looks_like_path(name):
        raise UserError(f"{name}: not found (expected a diffusers AutoencoderKL folder or a "
                        "Hub id such as stabilityai/sd-vae-ft-mse)")
    else:
        source = name
        kwargs["local_files_only"] = not _fetch_allowed(name)
    try:
        vae = AutoencoderKL.from_pretrained(source, torch_dtype=torch.float32,
                                            low_cpu_mem_usage=False, **kwargs)
    except Exception as exc:
        # from_pretrained raises many types (OSError, ValueError, HTTP errors); the user only
        # needs to know which model failed and the first line of why.
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{name}: cannot load a diffusers AutoencoderKL ({reason})") from exc
    vae = vae.to(device).eval().requires_grad_(False)
    return VAEEncoder(vae, source, device, scale_factor)
