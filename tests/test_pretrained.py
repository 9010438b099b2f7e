"""model.init_from: a DiT/SiT state dict in the published layout, built from the published
architecture (written out below from the DiT paper and its reference code's structure), loads
into our backbone so that F(x, t, 0, c, 0) equals the source network's output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ismctl.networks.model import build_model
from ismctl.networks.pretrained import init_from_pretrained, read_pretrained
from ismctl.utils.errors import UserError


def dit_modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    def __init__(self, patch, in_chans, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim, freq=256):
        super().__init__()
        self.freq = freq
        self.mlp = nn.Sequential(nn.Linear(freq, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        half = self.freq // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes, dim, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)

    def forward(self, labels):
        return self.embedding_table(labels)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
        x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(dit_modulate(self.norm1(x), s1, sc1))
        return x + g2.unsqueeze(1) * self.mlp(dit_modulate(self.norm2(x), s2, sc2))


class FinalLayer(nn.Module):
    def __init__(self, dim, patch, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(dit_modulate(self.norm_final(x), shift, scale))


def sincos_1d(dim, pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def dit_pos_embed(dim, grid):
    """DiT/MAE's table: meshgrid(w, h), so the first half of the channels encodes the column."""
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([sincos_1d(dim // 2, gw), sincos_1d(dim // 2, gh)], axis=1)


class DiT(nn.Module):
    """The published DiT network (class-conditional, adaLN-Zero, learned sigma optional)."""

    def __init__(self, input_size=8, patch_size=2, in_channels=4, hidden_size=128, depth=4,
                 num_heads=4, class_dropout_prob=0.1, num_classes=10, learn_sigma=True):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch = patch_size
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        grid = input_size // patch_size
        self.pos_embed = nn.Parameter(
            torch.from_numpy(dit_pos_embed(hidden_size, grid)).float()[None], requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def unpatchify(self, x):
        c, p = self.out_channels, self.patch
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))


def random_dit(**kwargs) -> DiT:
    """Random values everywhere: DiT's own init zeroes the output, which would prove nothing."""
    torch.manual_seed(0)
    net = DiT(**kwargs)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name != "pos_embed":
                p.normal_(0.0, 0.15)
    return net.eval()


def ours(num_classes=10, in_channels=4):
    torch.manual_seed(1)
    return build_model("tiny/2", input_size=8, in_channels=in_channels,
                       num_classes=num_classes).eval()


def compare(src: DiT, net, labels: torch.Tensor, time_scale: float = 1000.0) -> None:
    torch.manual_seed(2)
    x = torch.randn(len(labels), src.in_channels, 8, 8)
    t = torch.rand(len(labels))
    with torch.no_grad():
        expected = src(x, time_scale * t, labels)[:, :src.in_channels]
        got = net(x, t, torch.zeros(len(labels)), labels, torch.zeros(len(labels)))
    assert expected.abs().mean() > 0.1  # a non-trivial function
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_dit_checkpoint_gives_the_same_output_at_d0_w0(tmp_path: Path) -> None:
    src = random_dit()
    path = tmp_path / "DiT-tiny.pt"
    torch.save(src.state_dict(), path)
    net = ours()
    report = init_from_pretrained(net, path, verbose=False)
    labels = torch.tensor([0, 3, 9, 10, 10, 5])  # 10: the null (CFG) row
    compare(src, net, labels)
    # Every tensor accounted for; the learned-sigma half of the output layer is sliced away.
    assert set(report["mapped"]) | set(report["initialised"]) == set(net.state_dict())
    assert report["mapped"]["x_embedder.weight"] == "x_embedder.proj.weight"
    assert report["mapped"]["y_embedder.weight"] == "y_embedder.embedding_table.weight"
    assert report["mapped"]["pos_embed"] == "pos_embed"
    assert report["ignored"] == []
    assert {k for k in report["initialised"]} == {
        "d_embedder.weight", "w_embedder.mlp.0.weight", "w_embedder.mlp.0.bias",
        "w_embedder.mlp.2.weight", "w_embedder.mlp.2.bias"}
    assert torch.count_nonzero(net.d_embedder.weight) == 0
    assert report["time_scale"] == 1000.0


def test_continuous_jump_networks_import_at_the_source_time(capsys) -> None:
    """A MeanFlow (continuous jump embedding) network feeds t unscaled: the import gives
    F(x, t, 0, c, 0) = source(x, t, c), and the report says so (not 1000 t)."""
    from ismctl.networks.pretrained import plan_import, print_report

    src = random_dit()
    torch.manual_seed(1)
    net = build_model("tiny/2", input_size=8, in_channels=4, num_classes=10,
                      jump_embedding="continuous").eval()
    report = init_from_pretrained(net, src.state_dict(), verbose=False)
    compare(src, net, torch.tensor([0, 3, 9, 10]), time_scale=1.0)
    assert report["time_scale"] == 1.0
    assert report["initialised"]["d_embedder.mlp.2.weight"].startswith("zeros")
    _, rep = plan_import(net, src.state_dict(), "src")
    print_report(rep)
    out = capsys.readouterr().out
    assert "source(x, 1 t, c)" in out and "t unscaled" in out and "1000 t" not in out


def test_new_inputs_start_neutral_and_can_learn() -> None:
    """At import every d returns the source's output and w has no effect; the gradient still
    reaches the new embedders (the zeroed layers sit last)."""
    src = random_dit()
    net = ours()
    init_from_pretrained(net, src.state_dict(), verbose=False)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    base = net(x, t, torch.zeros(2), y, torch.zeros(2))
    other = net(x, t, torch.full((2,), 0.25), y, torch.full((2,), 1.5))
    torch.testing.assert_close(other, base)
    net.train()
    net(x, t, torch.full((2,), 0.25), y, torch.full((2,), 1.5)).square().sum().backward()
    assert net.d_embedder.weight.grad.abs().sum() > 0
    assert net.w_embedder.mlp[2].weight.grad.abs().sum() > 0


def test_sit_without_sigma_or_null_row_from_safetensors_under_ema(tmp_path: Path) -> None:
    """A SiT-style checkpoint without learned sigma and without label dropout, saved as
    safetensors; also a training checkpoint with 'ema' and 'model' entries."""
    src = random_dit(learn_sigma=False, class_dropout_prob=0.0)
    path = tmp_path / "sit.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    net = ours()
    report = init_from_pretrained(net, path, verbose=False)
    compare(src, net, torch.tensor([0, 1, 2, 9]))
    assert report["initialised"]["y_embedder.weight[10]"] == "zeros (null class row)"
    assert torch.count_nonzero(net.y_embedder.weight[10]) == 0

    ckpt = tmp_path / "train.pt"
    state = {f"module.{k}": v for k, v in src.state_dict().items()}
    torch.save({"model": {k: v * 0 for k, v in state.items()}, "ema": state,
                "extra.unused": torch.ones(1)}, ckpt)
    loaded, entry = read_pretrained(ckpt)
    assert entry == "ema" and "x_embedder.proj.weight" in loaded
    net2 = ours()
    init_from_pretrained(net2, ckpt, verbose=False)
    compare(src, net2, torch.tensor([4, 5]))


def test_ignored_keys_are_reported() -> None:
    src = random_dit()
    state = dict(src.state_dict())
    state["extra_head.weight"] = torch.ones(3)
    report = init_from_pretrained(ours(), state, verbose=False)
    assert report["ignored"] == ["extra_head.weight"]


@pytest.mark.parametrize("change", ["classes", "channels", "not_dit"])
def test_mismatches_are_one_line_errors(tmp_path: Path, change: str) -> None:
    src = random_dit(num_classes=1000 if change == "classes" else 10,
                     in_channels=3 if change == "channels" else 4)
    state = src.state_dict()
    if change == "not_dit":
        state = {"foo.weight": torch.ones(2)}
    with pytest.raises(UserError, match="model.init_from"):
        init_from_pretrained(ours(), state, verbose=False)


def test_missing_or_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="file not found"):
        read_pretrained(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        read_pretrained(bad)


def test_report_table_is_printed(capsys) -> None:
    init_from_pretrained(ours(), random_dit().state_dict(), verbose=True)
    out = capsys.readouterr().out
    assert "mapped" in out and "initialised" in out and "d_embedder.weight" in out


@pytest.mark.slow
def test_training_starts_from_the_checkpoint_and_resume_ignores_it(tmp_path: Path,
                                                                   capsys) -> None:
    from safetensors.torch import load_file as load_st

    from ismctl.config.recipe import load_recipe
    from ismctl.data.prepare import prepare_latents
    from ismctl.runs.checkpoint import list_checkpoints, read_metadata, recipe_sha256
    from ismctl.training.trainer import train

    data = tmp_path / "digits"
    prepare_latents("digits", out=data, progress=False)
    src = random_dit(in_channels=1)
    weights = tmp_path / "dit.pt"
    torch.save({"ema": src.state_dict()}, weights)
    quick = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"

    def recipe(init_from: Path, steps: int):
        sets = {"data.path": data, "run.root": tmp_path / "runs", "run.name": "pre",
                "train.steps": steps, "data.batch_size": 16, "run.ckpt_every": 2,
                "run.log_every": 1, "run.sample_every": 1000, "run.tracker": "none",
                "optim.lr": 1e-12, "optim.warmup_steps": 0, "model.init_from": init_from,
                "run.sample_num": 10, "loss.name": "mse"}
        return load_recipe(quick, [f"{k}={v}" for k, v in sets.items()])

    with pytest.raises(UserError, match="file not found"):
        train(recipe(tmp_path / "missing.pt", 2), str(quick), progress=False)
    assert not (tmp_path / "runs" / "pre").exists()  # a bad start writes no run folder

    run = train(recipe(weights, 2), str(quick), progress=False)
    assert "d_embedder.weight" in capsys.readouterr().out  # the report was printed
    online = load_st(str(list_checkpoints(run)[-1][1] / "online.safetensors"))
    source = src.state_dict()
    # lr 1e-12: two steps leave the imported weights where they were, to ~1e-11.
    torch.testing.assert_close(online["blocks.1.attn.qkv.weight"],
                               source["blocks.1.attn.qkv.weight"], rtol=0, atol=1e-9)
    torch.testing.assert_close(online["pos_embed"], source["pos_embed"])
    assert online["d_embedder.weight"].abs().max() < 1e-9
    # The trainer's weights files describe themselves (role, step, the run's recipe).
    meta = read_metadata(list_checkpoints(run)[-1][1] / "online.safetensors")
    assert (meta["ismctl.role"], meta["ismctl.step"]) == ("online", "2")
    assert meta["ismctl.recipe_sha256"] == recipe_sha256(load_recipe(run / "recipe.yaml"))
    assert json.loads(meta["ismctl.recipe"])["model"]["init_from"] == str(weights)
    # Resuming continues the run's own weights: init_from is not read again.
    weights.unlink()
    train(recipe(weights, 4), str(quick), resume=True, progress=False)
    assert [s for s, _ in list_checkpoints(run)][-1] == 4
