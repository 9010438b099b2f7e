"""Sample from a model written by `ismctl export` with PyTorch and safetensors alone.

    python docs/standalone_sampler.py EXPORT_DIR --steps 4 --num 16 --class 3 --out samples.npz

Everything needed is in the export folder: ``model.safetensors`` (the weights) and
``config.json``, whose ``model`` section gives the shapes and whose ``conventions`` section
says how the network is called and sampled (embedding scales, which table row a jump size d
takes, the null class, the Euler shortcut update, the output range). This file reimplements
the network from those, loads the weights strictly (every tensor, every shape) and writes an
ADM-style ``.npz`` (``arr_0`` uint8 images N x H x W x C, ``arr_1`` int64 labels). It does not
import ismctl; the test suite checks that it computes what ismctl computes.

Latent models need their VAE to turn samples into images (``conventions.encoder``, decoded
with diffusers); pixel models (the built-in digits) need nothing more.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

FREQ_DIM = 256


class Sinusoid(nn.Module):
    """A scalar (t, w, or a continuous d) -> cos/sin features of ``scale * value`` -> MLP."""

    def __init__(self, hidden: int, scale: float, max_period: float = 10000.0) -> None:
        super().__init__()
        self.scale, self.max_period = scale, max_period
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden))

    def forward(self, s: Tensor) -> Tensor:
        half = FREQ_DIM // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=s.device,
                                                                    dtype=torch.float32) / half)
        angles = (s.float() * self.scale)[:, None] * freqs[None]
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=-1))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(
            2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, scale=(c // self.heads) ** -0.5)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), sh1, sc1))
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), sh2, sc2))


class Final(nn.Module):
    def __init__(self, dim: int, patch: int, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class Network(nn.Module):
    """F(x, t, d, y, w) as ``config.json`` describes it."""

    def __init__(self, model: dict[str, Any], conventions: dict[str, Any]) -> None:
        super().__init__()
        dim, patch, channels = model["hidden_size"], model["patch_size"], model["in_channels"]
        self.patch, self.channels, self.grid = patch, channels, model["input_size"] // patch
        emb = conventions["embeddings"]
        period = emb["max_period"]
        self.x_embedder = nn.Conv2d(channels, dim, patch, stride=patch)
        self.register_buffer("pos_embed", torch.zeros(1, self.grid**2, dim))
        self.t_embedder = Sinusoid(dim, emb["t_scale"], period)
        self.w_embedder = Sinusoid(dim, emb["w_scale"], period)
        self.jumps = emb["d"]
        if self.jumps["kind"] == "table":
            self.register_buffer("rows", torch.tensor(self.jumps["rows"]), persistent=False)
            self.d_embedder: nn.Module = nn.Embedding(len(self.jumps["rows"]), dim)
        else:
            self.d_embedder = Sinusoid(dim, self.jumps["scale"], period)
        self.y_embedder = nn.Embedding(emb["label_rows"], dim)
        self.blocks = nn.ModuleList(
            Block(dim, model["num_heads"], int(dim * model["mlp_ratio"]))
            for _ in range(model["depth"]))
        self.final_layer = Final(dim, patch, channels)

    def d_rows(self, d: Tensor) -> Tensor:
        """Jump size -> table row: row 0 is d = 0, row k + 1 is d = 2^-k."""
        match = d.float()[:, None] == self.rows[None]
        if not bool(match.any(dim=1).all()):
            raise ValueError(f"jump sizes must be one of {self.jumps['rows']}")
        return match.float().argmax(dim=1)

    def forward(self, x: Tensor, t: Tensor, d: Tensor, y: Tensor, w: Tensor) -> Tensor:
        d_in = self.d_rows(d) if self.jumps["kind"] == "table" else d
        c = self.t_embedder(t) + self.d_embedder(d_in) + self.y_embedder(y) + self.w_embedder(w)
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            h = block(h, c)
        h = self.final_layer(h, c)
        b, g, p, ch = x.shape[0], self.grid, self.patch, self.channels
        return h.reshape(b, g, g, p, p, ch).permute(0, 5, 1, 3, 2, 4).reshape(b, ch, g * p, g * p)


def load(folder: str | Path) -> tuple[Network, dict[str, Any]]:
    """The network of an export folder (eval mode) and its config.json."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    net = Network(config["model"], config["conventions"])
    net.load_state_dict(load_file(str(folder / config["weights"])), strict=True)
    return net.eval().requires_grad_(False), config


@torch.no_grad()
def sample(net: Network, config: dict[str, Any], noise: Tensor, labels: Tensor, steps: int,
           w: float) -> Tensor:
    """N Euler shortcut steps from ``noise`` (B, C, H, W): x <- x + d F(x, i d, d_i, y, w), the
    jump d_i = d = 1/N, or 1 - i d for a network that predicts the jump to the data end."""
    sampler, null = config["conventions"]["sampler"], config["model"]["num_classes"]
    mode, to_end = sampler["mode"], sampler.get("jumps", "step") == "to_end"
    x, d = noise.clone(), 1.0 / steps
    n = len(x)
    jump = torch.full((n,), d)
    for i in range(steps):
        t = torch.full((n,), i * d)
        if to_end:
            jump = 1.0 - t
        if mode == "cfg":
            both = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([jump, jump]),
                       torch.cat([labels, torch.full_like(labels, null)]), torch.zeros(2 * n))
            v_y, v_null = both.chunk(2)
            v = v_y + w * (v_y - v_null)
        else:
            v = net(x, t, jump, labels, torch.full((n,), w if mode == "intrinsic" else 0.0))
        x = x + d * v
    return x


def to_images(x: Tensor, config: dict[str, Any]) -> np.ndarray:
    """Samples -> uint8 (N, H, W, C), decoding latents with the named VAE first."""
    conv = config["conventions"]
    if conv["encoder"] != "identity":
        from diffusers import AutoencoderKL  # only latent models need it

        vae = AutoencoderKL.from_pretrained(conv["encoder"]).eval()
        with torch.no_grad():
            x = vae.decode(x / conv["scale_factor"]).sample
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--num", type=int, default=16)
    parser.add_argument("--class", dest="label", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None,
                        help="w (CFG scale 1 + w); default: the export's own for --steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("samples.npz"))
    args = parser.parse_args()
    net, config = load(args.export)
    model = config["model"]
    table = config["sampling"]["guidance"]
    w = args.guidance if args.guidance is not None else float(
        table.get(str(args.steps), {"guidance": 0.0})["guidance"])
    gen = torch.Generator().manual_seed(args.seed)
    size = model["input_size"]
    noise = torch.randn(args.num, model["in_channels"], size, size, generator=gen)
    labels = (torch.full((args.num,), args.label) if args.label is not None
              else torch.arange(args.num) % model["num_classes"])
    images = to_images(sample(net, config, noise, labels, args.steps, w), config)
    np.savez(args.out, arr_0=images, arr_1=labels.numpy().astype(np.int64))
    print(f"wrote {args.out}: {images.shape[0]} images {images.shape[1:]}, {args.steps} steps, "
          f"w = {w:g}")


if __name__ == "__main__":
    main()
