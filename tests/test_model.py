import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ismctl.networks.model import (
    PRESETS,
    Attention,
    ShortcutDiT,
    build_model,
    check_jump_sizes,
    d_to_level,
    forward_flops,
    num_levels,
    parse_preset,
)
from ismctl.utils.errors import UserError


def tiny(input_size: int = 8, channels: int = 1, num_classes: int = 10, seed: int = 0,
         **kw: float) -> ShortcutDiT:
    torch.manual_seed(seed)
    return build_model("tiny/2", input_size, channels, num_classes, **kw)


def perturb(model: ShortcutDiT, seed: int = 1, std: float = 0.05) -> ShortcutDiT:
    """Give the zero-initialised adaLN and output layers random weights (as training would)."""
    gen = torch.Generator().manual_seed(seed)
    zero_init = [b.adaLN_modulation[-1] for b in model.blocks]
    zero_init += [model.final_layer.adaLN_modulation[-1], model.final_layer.linear]
    with torch.no_grad():
        for mod in zero_init:
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * std)
            mod.bias.copy_(torch.randn(mod.bias.shape, generator=gen) * std)
    return model


def inputs(batch: int, channels: int, size: int, num_classes: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=gen)
    t = torch.rand(batch, generator=gen)
    d = torch.full((batch,), 0.25)
    y = torch.randint(0, num_classes + 1, (batch,), generator=gen)
    w = torch.full((batch,), 1.5)
    return x, t, d, y, w


def meta_model(preset: str) -> ShortcutDiT:
    with torch.device("meta"):
        return build_model(preset, 32, 4, 1000)


def test_parse_preset() -> None:
    assert parse_preset("XL/2") == ("XL", 2)
    assert parse_preset("tiny/2") == ("tiny", 2)
    assert parse_preset("B/8") == ("B", 8)
    for bad in ["XL", "XXL/2", "B/0", "B/x", "", "/2", "B/-2", "B/2/2"]:
        with pytest.raises(UserError, match="model.preset"):
            parse_preset(bad)
    with pytest.raises(UserError):
        build_model("huge/2", 32, 4, 10)


def test_presets_match_dit_table() -> None:
    assert PRESETS["S"] == {"hidden_size": 384, "depth": 12, "num_heads": 6}
    assert PRESETS["B"] == {"hidden_size": 768, "depth": 12, "num_heads": 12}
    assert PRESETS["L"] == {"hidden_size": 1024, "depth": 24, "num_heads": 16}
    assert PRESETS["XL"] == {"hidden_size": 1152, "depth": 28, "num_heads": 16}


@pytest.mark.parametrize("preset,expected", [("XL/2", 675e6), ("B/2", 130e6), ("L/2", 458e6),
                                             ("S/2", 33e6)])
def test_parameter_counts_match_dit_paper(preset: str, expected: float) -> None:
    # DiT paper Table 4. Our net drops learned sigma and adds the w MLP and d table: < 1% off.
    model = meta_model(preset)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - expected) / expected < 0.01, n


def test_d_to_level_closed_form() -> None:
    d = torch.tensor([0.0, 1.0, 1 / 128])
    assert d_to_level(d, 128).tolist() == [0, 1, 8]
    ks = torch.arange(8)
    assert torch.equal(d_to_level(2.0 ** -ks.double(), 128), ks + 1)
    assert d_to_level(torch.tensor([0.125, 0.0], dtype=torch.bfloat16), 8).tolist() == [4, 0]
    assert d_to_level(torch.tensor([[0.5]]), 128).shape == (1, 1)
    assert d_to_level(torch.tensor([0.5]), 128).dtype == torch.long


@pytest.mark.parametrize("bad", [0.3, 1 / 256, 2.0, -0.5, float("nan")])
def test_unknown_jump_sizes_are_rejected(bad: float) -> None:
    d = torch.tensor([0.5, bad, 1.0])
    with pytest.raises(ValueError, match=f"d={bad}"):
        check_jump_sizes(d, 128)
    # Without the check, the level points past the table, so the look-up fails loudly
    # instead of falling back to the d = 0 row.
    assert d_to_level(d, 128).tolist() == [2, num_levels(128), 1]
    model = tiny()
    x, t, _, y, w = inputs(3, 1, 8, 10)
    with pytest.raises(IndexError):
        model(x, t, d, y, w)


def test_valid_jump_sizes_pass_the_check() -> None:
    check_jump_sizes(torch.tensor([0.0, *(2.0 ** -torch.arange(8)).tolist()]), 128)


def test_forward_reads_nothing_back_from_the_device(host_reads) -> None:
    """The forward queues work only: no .item(), bool(tensor) or nonzero, in training (with
    backward) and in inference, so an eager step never waits for the accelerator."""
    model = perturb(tiny())
    x, t, d, y, w = inputs(6, 1, 8, 10)
    with host_reads() as reads:
        model(x, t, d, y, w).square().mean().backward()
        with torch.inference_mode():
            model.eval()(x, t, d, y, w)
    assert reads.ops == []
    # The detector does see a read: a forward that validates d on the host would fail above.
    with host_reads() as reads:
        check_jump_sizes(d, 128)
    assert reads.ops


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    """Recomputing each block in the backward pass (dropout included: its RNG state is
    replayed) changes memory, not values."""
    plain = perturb(tiny(dropout=0.1))
    ckpt = perturb(tiny(dropout=0.1, grad_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    x, t, d, y, w = inputs(6, 1, 8, 10)
    grads, block_calls = [], []
    for model in (plain, ckpt):
        calls = []
        model.blocks[0].register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        torch.manual_seed(5)
        out = model.train()(x, t, d, y, w)
        out.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        grads[-1]["out"] = out.detach()
        block_calls.append(len(calls))
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-6, atol=1e-7, msg=name)
    # The checkpointed block ran again in the backward pass.
    assert block_calls == [1, 2]


def test_rejects_bad_shapes() -> None:
    with pytest.raises(UserError, match="multiple of the patch"):
        build_model("tiny/4", 10, 1, 10)
    with pytest.raises(UserError, match="power of two"):
        build_model("tiny/2", 8, 1, 10, base_steps=100)


def test_embedding_tables_and_zero_init() -> None:
    model = tiny()
    assert model.d_embedder.num_embeddings == int(math.log2(128)) + 2
    assert model.y_embedder.num_embeddings == 11
    assert model.num_classes == 10 and model.in_channels == 1 and model.input_size == 8
    assert model.base_steps == 128
    assert "pos_embed" not in dict(model.named_parameters())
    for block in model.blocks:
        assert not block.adaLN_modulation[-1].weight.any()
    assert not model.final_layer.linear.weight.any()
    # Distinct rows for d = 0 and d = 1/128 (method §1: sharing them is a known defect).
    levels = d_to_level(torch.tensor([0.0, 1 / 128]), 128)
    rows = model.d_embedder(levels)
    assert not torch.allclose(rows[0], rows[1])


def test_pos_embed_matches_numpy_closed_form() -> None:
    model = tiny(input_size=16)
    dim, grid = model.hidden_size, 8
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim // 4))
    ref = np.zeros((grid * grid, dim))
    for r in range(grid):
        for c in range(grid):
            ref[r * grid + c] = np.concatenate([np.sin(r * omega), np.cos(r * omega),
                                                np.sin(c * omega), np.cos(c * omega)])
    np.testing.assert_allclose(model.pos_embed[0].numpy(), ref, atol=1e-6)


def test_unpatchify_matches_fold() -> None:
    model = tiny(input_size=12, channels=3)
    p, ch, g = 2, 3, 6
    tokens = torch.randn(2, g * g, p * p * ch)
    # Token n covers patch (n // g, n % g); its features are ordered (row in patch, col, channel).
    cols = tokens.reshape(2, g * g, p, p, ch).permute(0, 4, 2, 3, 1).reshape(2, ch * p * p, -1)
    ref = F.fold(cols, output_size=(12, 12), kernel_size=p, stride=p)
    assert torch.equal(model.unpatchify(tokens), ref)


def test_attention_matches_explicit_softmax() -> None:
    # Scale 1/sqrt(d_head), not the 1/d_head of the official shortcut code (method §2).
    torch.manual_seed(0)
    attn = Attention(dim=16, num_heads=2).eval()
    x = torch.randn(3, 5, 16)
    q, k, v = attn.qkv(x).reshape(3, 5, 3, 2, 8).unbind(2)
    weights = torch.softmax(torch.einsum("bqhc,bkhc->bhqk", q, k) / math.sqrt(8), dim=-1)
    ref = attn.proj(torch.einsum("bhqk,bkhc->bqhc", weights, v).reshape(3, 5, 16))
    with torch.no_grad():
        torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


def test_output_shape_b2_latents_on_meta() -> None:
    model = meta_model("B/2")
    x, t, d, y, w = (v.to("meta") for v in inputs(3, 4, 32, 1000))
    assert model(x, t, d, y, w).shape == (3, 4, 32, 32)


@pytest.mark.parametrize("channels,size", [(4, 32), (1, 8), (3, 16)])
def test_tiny_forward_shape_zero_at_init_and_deterministic(channels: int, size: int) -> None:
    model = tiny(size, channels).eval()
    args = inputs(2, channels, size, 10)
    with torch.no_grad():
        out = model(*args)
    assert out.shape == (2, channels, size, size) and out.dtype == torch.float32
    assert not out.any()  # adaLN-Zero: the zero output layer makes F == 0 at init
    perturb(model)
    again = perturb(tiny(size, channels)).eval()
    with torch.no_grad():
        a, b, c = model(*args), model(*args), again(*args)
    assert a.abs().max() > 1e-3
    assert torch.equal(a, b) and torch.equal(a, c)


def test_conditioning_changes_output() -> None:
    model = perturb(tiny()).eval()
    x, t, _, y, w = inputs(1, 1, 8, 10)
    x, t, y, w = x.repeat(3, 1, 1, 1), t.repeat(3), y.repeat(3), w.repeat(3)
    with torch.no_grad():
        by_d = model(x, t, torch.tensor([0.0, 1 / 128, 1.0]), y, w)
        by_w = model(x, t, torch.full((3,), 0.5), y, torch.tensor([0.0, 1.0, 3.5]))
        by_y = model(x, t, torch.full((3,), 0.5), torch.tensor([3, 7, 10]), w)
        by_t = model(x, torch.tensor([0.0, 0.5, 0.999]), torch.full((3,), 0.5), y, w)
    for out in (by_d, by_w, by_y, by_t):
        scale = out.abs().max()
        for i, j in [(0, 1), (0, 2), (1, 2)]:
            assert (out[i] - out[j]).abs().max() > 1e-3 * scale


def test_samples_are_independent_and_scalars_broadcast() -> None:
    model = perturb(tiny()).eval()
    x, t, d, y, w = inputs(2, 1, 8, 10)
    with torch.no_grad():
        base = model(x, t, d, y, w)
        d2 = d.clone()
        d2[0] = 1.0
        changed = model(x, t, d2, y, w)
        assert not torch.allclose(base[0], changed[0])
        assert torch.equal(base[1], changed[1])
        full = model(x, t, d, torch.tensor([4, 4]), torch.tensor([2.0, 2.0]))
        scalars = model(x, t, d, torch.tensor(4), torch.tensor(2.0))
    torch.testing.assert_close(full, scalars)


def test_gradients_reach_every_parameter() -> None:
    model = perturb(tiny())
    x, t, d, y, w = inputs(4, 1, 8, 10)
    y = torch.tensor([7, 8, 9, 10])  # 10 is the null row
    model(x, t, d, y, w).square().mean().backward()
    for name, p in model.named_parameters():
        if name.startswith(("d_embedder", "y_embedder")):
            continue  # only the looked-up rows get gradient
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.y_embedder.weight.grad[10].abs().sum() > 0


def test_dropout_only_in_training() -> None:
    model = perturb(tiny(dropout=0.5))
    args = inputs(2, 1, 8, 10)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(*args), model(*args))
        model.train()
        assert not torch.equal(model(*args), model(*args))


def test_bf16_autocast_close_to_fp32() -> None:
    model = perturb(tiny(16, 4)).eval()
    args = inputs(2, 4, 16, 10)
    with torch.no_grad():
        ref = model(*args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(*args)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_traces_as_one_graph() -> None:
    # fullgraph=True fails on any graph break (e.g. data-dependent Python branching).
    model = perturb(tiny()).eval()
    args = inputs(2, 1, 8, 10)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args), model(*args))


def test_forward_flops_xl2_matches_spec() -> None:
    flops = forward_flops(meta_model("XL/2"))
    assert abs(flops - 237e9) / 237e9 < 0.03, flops


def count_flops(model: ShortcutDiT, batch: int, device: str) -> float:
    x, t, d, y, w = (v.to(device) for v in inputs(batch, model.in_channels, model.input_size,
                                                    model.num_classes))
    # The math backend runs attention as bmm, which the counter sees; the fused CPU kernel
    # has no flop formula and would be silently skipped.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(x, t, d, y, w)
    return fc.get_total_flops() / batch


def test_forward_flops_matches_flop_counter() -> None:
    # The counter counts conv and matmul FLOPs (bias-free, 2 per multiply-add) and nothing
    # else, the same set forward_flops sums analytically, so they agree to rounding; 1% leaves
    # room only for bookkeeping differences, not for a missing or double-counted layer.
    for model in (tiny(32, 4), tiny(8, 1)):
        counted = count_flops(model, 2, "cpu")
        assert abs(forward_flops(model) - counted) / counted < 0.01
    counted = count_flops(meta_model("XL/2"), 2, "meta")
    assert abs(forward_flops(meta_model("XL/2")) - counted) / counted < 0.01
