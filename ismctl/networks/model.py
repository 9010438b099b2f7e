"""The backbone: a DiT/SiT transformer (Peebles & Xie 2023) with adaLN-Zero, conditioned on
time t, jump size d, class label c and guidance strength w (docs/method.md sections 1 and 3.1).

The network F(x_t, t, d, c, w) returns the average velocity of a jump of size d starting at t
(no learned sigma). The conditioning vector is the sum of four embeddings and drives every
adaLN modulation; d is looked up in a table with one row per dyadic level plus its own row for
d = 0, so the instantaneous velocity never shares an embedding with the finest jump (method §1).
Objectives that train continuous jump sizes (MeanFlow, method §4.1) embed d like t instead
(``jump_embedding="continuous"``): their target differentiates F in d, which a table cannot.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ismctl.config.names import PRESETS
from ismctl.utils.errors import UserError

JUMP_EMBEDDINGS = ("table", "continuous")
FREQ_DIM = 256  # width of the sinusoidal features fed to the t and w MLPs (as in DiT)


def parse_preset(preset: str) -> tuple[str, int]:
    """'XL/2' -> ('XL', 2): a size from PRESETS and a positive patch size."""
    size, sep, patch = preset.partition("/")
    if not sep or size not in PRESETS or not patch.isdigit() or int(patch) < 1:
        raise UserError(f"model.preset {preset!r}: expected SIZE/PATCH with SIZE one of "
                        f"{', '.join(PRESETS)} and PATCH a positive integer, e.g. 'XL/2'")
    return size, int(patch)


def num_levels(base_steps: int) -> int:
    """Rows of the jump-size table: d = 0 plus d = 2^-k for k = 0..log2(base_steps)."""
    return int(math.log2(base_steps)) + 2


def d_to_level(d: Tensor, base_steps: int) -> Tensor:
    """Jump size -> level index (long): 0 for d = 0, k + 1 for d = 2^-k, k = 0..log2(M).

    Matching against the exact table of allowed sizes (powers of two are exact in float32 and
    bf16) needs no data-dependent branching and no read back to the host, so it traces under
    torch.compile and never stalls an accelerator. A size outside the table maps to the row
    index ``num_levels(base_steps)``, one past the end of the embedding table, so the look-up
    fails instead of silently using the d = 0 row. Sizes are validated where they enter: the
    sampler checks its step count, the objective draws only table entries (and
    :func:`check_jump_sizes` is there for other callers).
    """
    table = _jump_table(base_steps, d.device)
    match = d.float().reshape(-1, 1) == table
    levels = torch.arange(table.numel(), device=d.device)
    unknown = (~match.any(dim=1)).long() * table.numel()
    return ((match.long() * levels).sum(dim=1) + unknown).reshape(d.shape)


def _jump_table(base_steps: int, device: torch.device) -> Tensor:
    k = torch.arange(num_levels(base_steps) - 1, device=device, dtype=torch.float32)
    return torch.cat([torch.zeros(1, device=device), torch.exp2(-k)])


def check_jump_sizes(d: Tensor, base_steps: int) -> None:
    """Raise ValueError unless every entry of ``d`` is 0 or 2^-k, k = 0..log2(base_steps).

    Reads the tensor back to the host: call it where sizes enter, never per network call.
    """
    ok = (d.float().reshape(-1, 1) == _jump_table(base_steps, d.device)).any(dim=1)
    if not bool(ok.all()):
        bad = d.reshape(-1)[~ok][0].item()
        raise ValueError(f"jump size d={bad} is not 0 or 2^-k for k = 0.."
                         f"{int(math.log2(base_steps))} (base_steps {base_steps})")


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2D sin-cos position table (grid*grid, dim), row-major over the patch grid.

    The first half of the channels encodes the patch's row (vertical position), the second half
    its column, each as [sin, cos] at dim/4 frequencies. DiT and MAE build theirs from
    ``meshgrid(w, h)``, which puts the column in the first half: the transpose of this table,
    the same up to transposing the image. A network imported from DiT/SiT (``model.init_from``)
    brings its own table, so the import is exact either way."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def encode(coord: Tensor) -> Tensor:
        angles = coord.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: per-sample affine map of the normalised tokens (x: B, T, D; shift/scale: B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class ScalarEmbedder(nn.Module):
    """Scalar -> vector: sinusoidal features then a 2-layer MLP (DiT's TimestepEmbedder).

    ``scale`` stretches the input so its range spans ~[0, 1000], where frequencies from 1 to
    1/10000 rad per unit resolve it finely: t in [0, 1] uses 1000, w in [0, ~5] uses 200.
    """

    def __init__(self, hidden_size: int, scale: float, max_period: float = 10000.0) -> None:
        super().__init__()
        self.scale = scale
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(FREQ_DIM, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def features(self, s: Tensor) -> Tensor:
        # float32 at least (bf16 times would round away the fine frequencies); float64 kept,
        # so a float64 network is float64 throughout (the finite-difference checks need it).
        dtype = torch.promote_types(s.dtype, torch.float32)
        half = FREQ_DIM // 2
        freqs = torch.exp(-math.log(self.max_period) *
                          torch.arange(half, device=s.device, dtype=dtype) / half)
        angles = (s.to(dtype) * self.scale)[:, None] * freqs[None]
        return torch.cat([angles.cos(), angles.sin()], dim=-1)

    def forward(self, s: Tensor) -> Tensor:
        return self.mlp(self.features(s))


class Attention(nn.Module):
    """Multi-head self-attention, fused qkv, scaled by 1/sqrt(d_head) (method §2: the official
    shortcut code divides by d_head, a defect not copied)."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, scale=self.head_dim**-0.5
        )
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x), approximate="tanh")))


class DiTBlock(nn.Module):
    """Pre-norm transformer block; the conditioning sets shift/scale/gate of both branches
    (adaLN-Zero: the gates start at 0, so every block starts as the identity)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN then a linear map from each token to its p x p x C patch of velocity."""

    def __init__(self, dim: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class ShortcutDiT(nn.Module):
    """F(x_t, t, d, c, w): the average velocity of a jump of size d from time t (method §1)."""

    def __init__(self, input_size: int, in_channels: int, num_classes: int, patch_size: int = 2,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16,
                 mlp_ratio: float = 4.0, base_steps: int = 128, dropout: float = 0.0,
                 grad_checkpointing: bool = False, jump_embedding: str = "table",
                 flow_jump: float = 0.0) -> None:
        super().__init__()
        if input_size % patch_size:
            raise UserError(f"model: input size {input_size} is not a multiple of the patch "
                            f"size {patch_size}")
        if hidden_size % num_heads or hidden_size % 4:
            raise UserError(f"model: hidden size {hidden_size} must be a multiple of 4 and of "
                            f"the number of heads {num_heads}")
        if base_steps < 1 or base_steps & (base_steps - 1):
            raise UserError(f"model: base_steps must be a power of two, got {base_steps}")
        if jump_embedding not in JUMP_EMBEDDINGS:
            raise UserError(f"model: jump_embedding must be one of {', '.join(JUMP_EMBEDDINGS)}, "
                            f"got {jump_embedding!r}")
        self.input_size = input_size
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_hidden = int(hidden_size * mlp_ratio)
        self.base_steps = base_steps
        self.grid = input_size // patch_size
        self.grad_checkpointing = grad_checkpointing
        self.jump_embedding = jump_embedding
        # The jump size of the instantaneous velocity (what two-pass flow CFG samples): d = 0,
        # or 1/M for sm networks, whose flow shares the finest jump's row (method §2).
        self.flow_jump = flow_jump

        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid)[None])
        # A continuous-jump objective differentiates F in t and d (MeanFlow's JVP): at DiT's
        # 1000 t the features oscillate up to 1000 rad per unit time and the JVP target
        # grows without bound (digits, 120 steps: consistency loss 5.3 against 0.42 at scale
        # 1); such networks take t and d as they are, like FastGen's MeanFlow (scale_t off).
        time_scale = 1000.0 if jump_embedding == "table" else 1.0
        self.t_embedder = ScalarEmbedder(hidden_size, scale=time_scale)
        self.w_embedder = ScalarEmbedder(hidden_size, scale=200.0)
        self.d_embedder: nn.Module = (
            nn.Embedding(num_levels(base_steps), hidden_size) if jump_embedding == "table"
            else ScalarEmbedder(hidden_size, scale=time_scale))
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size)  # last row: null class
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, dropout) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT initialisation: xavier linears, N(0, 0.02) tables and t/w MLPs, and zeros for
        every adaLN modulation and the output layer, so F starts at exactly 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        tables = [self.y_embedder]
        scalars = [self.t_embedder, self.w_embedder]
        (tables if self.jump_embedding == "table" else scalars).append(self.d_embedder)
        for table in tables:
            nn.init.normal_(table.weight, std=0.02)
        for embedder in scalars:
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        for mod in [*(b.adaLN_modulation[-1] for b in self.blocks),
                    self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(mod.weight)
            nn.init.zeros_(mod.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, T, p*p*C) tokens -> (B, C, H, W) image."""
        b, p, g, ch = x.shape[0], self.patch_size, self.grid, self.in_channels
        x = x.reshape(b, g, g, p, p, ch).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, ch, g * p, g * p)

    @property
    def continuous_jumps(self) -> bool:
        """True when any jump size d in [0, 1] is an input (else only 0 and 2^-k)."""
        return self.jump_embedding == "continuous"

    def condition(self, t: Tensor, d: Tensor, y: Tensor, w: Tensor) -> Tensor:
        """The adaLN conditioning vector (B, D) = t_emb + d_emb + y_emb + w_emb (method §3.1)."""
        d_in = d if self.continuous_jumps else d_to_level(d, self.base_steps)
        return (self.t_embedder(t) + self.d_embedder(d_in)
                + self.y_embedder(y) + self.w_embedder(w))

    def forward(self, x: Tensor, t: Tensor, d: Tensor, y: Tensor, w: Tensor) -> Tensor:
        """x (B, C, H, W), t/d/w (B,) float, y (B,) long in [0, num_classes] -> (B, C, H, W).

        A 0-d or single-element t, d, y or w is broadcast to the batch.
        """
        b = x.shape[0]
        t, d, y, w = (v.reshape(-1).expand(b) for v in (t, d, y, w))
        c = self.condition(t, d, y, w)
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
        # Activation checkpointing keeps only each block's input and recomputes the block in
        # the backward pass: ~1/3 more compute for a fraction of the activation memory.
        checkpointed = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            h = checkpoint(block, h, c, use_reentrant=False) if checkpointed else block(h, c)
        return self.unpatchify(self.final_layer(h, c)).to(x.dtype)


def build_model(preset: str, input_size: int, in_channels: int, num_classes: int,
                base_steps: int = 128, dropout: float = 0.0,
                grad_checkpointing: bool = False, jump_embedding: str = "table",
                flow_jump: float = 0.0) -> ShortcutDiT:
    """A ShortcutDiT from a preset name such as 'XL/2' (size from PRESETS, patch size)."""
    size, patch = parse_preset(preset)
    return ShortcutDiT(input_size, in_channels, num_classes, patch_size=patch,
                       base_steps=base_steps, dropout=dropout,
                       grad_checkpointing=grad_checkpointing, jump_embedding=jump_embedding,
                       flow_jump=flow_jump, **PRESETS[size])


def forward_flops(model: ShortcutDiT) -> float:
    """FLOPs (2 x multiply-adds) of one forward pass for one sample, counted from the shapes.

    Counts every matrix product: patch embedding, t/w MLPs, adaLN, qkv, QK^T, AV, output
    projection, MLP and the final layer. Biases, norms, activations and table look-ups are
    omitted (< 0.1% for DiT sizes). DiT-XL/2 on 32x32x4 gives ~118.6 G multiply-adds (method §5).
    """
    n, dim, hid = model.grid**2, model.hidden_size, model.mlp_hidden
    patch_dim = model.patch_size**2 * model.in_channels
    scalars = 3 if model.continuous_jumps else 2  # t and w MLPs, and d when continuous
    embed = n * patch_dim * dim + scalars * (FREQ_DIM * dim + dim * dim)
    block = (dim * 6 * dim                 # adaLN modulation (once per sample)
             + n * dim * 3 * dim           # fused qkv
             + 2 * n * n * dim             # QK^T and AV over all heads
             + n * dim * dim               # output projection
             + 2 * n * dim * hid)          # MLP
    final = dim * 2 * dim + n * dim * patch_dim
    return 2.0 * (embed + model.depth * block + final)
