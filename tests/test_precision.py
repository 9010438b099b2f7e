"""bf16 autocast on the CPU (train.precision: bf16): only the network's products run in bf16;
the loss, its inputs, gradients, optimiser state and EMA copies stay float32."""

from __future__ import annotations

import pytest
import torch

from ismctl.config.recipe import GuidanceCfg, LossCfg, ObjectiveCfg
from ismctl.losses import build_loss
from ismctl.networks.model import build_model
from ismctl.objectives.shortcut import shortcut_loss
from ismctl.system.runtime import autocast, autocast_dtype
from ismctl.training.ema import TwinEMA
from ismctl.utils.errors import UserError

CLASSES, SIZE, BATCH = 10, 8, 16


def one_step(precision: str) -> dict:
    torch.manual_seed(0)
    model = build_model("tiny/2", SIZE, 1, CLASSES)
    with torch.no_grad():  # away from the zero initialisation, so the output is not exactly 0
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ema = TwinEMA(model, target_decay=0.5, inference_decay=0.9)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    wavelet = build_loss(LossCfg(levels=3), SIZE)
    seen: dict[str, set] = {"loss_inputs": set(), "net_outputs": set(), "inner": set()}

    def loss_fn(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        seen["loss_inputs"] |= {pred.dtype, target.dtype}
        return wavelet(pred, target)

    def net(module):
        def call(*args):
            out = module(*args)
            seen["net_outputs"].add(out.dtype)
            return out
        return call

    model.blocks[0].mlp.fc1.register_forward_hook(
        lambda mod, inp, out: seen["inner"].add(out.dtype))
    gen = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(2, BATCH, 1, SIZE, SIZE, generator=gen)
    y = torch.randint(0, CLASSES, (BATCH,), generator=gen)
    with autocast("cpu", autocast_dtype(precision)):
        parts = shortcut_loss(net(model), net(ema.target), x0, x1, y, ObjectiveCfg(),
                              GuidanceCfg(), loss_fn, CLASSES, gen)
    parts["loss"].backward()
    grads = {p.grad.dtype for p in model.parameters() if p.grad is not None}
    opt.step()
    ema.update(model)
    moments = {v.dtype for s in opt.state.values() for k, v in s.items() if k != "step"}
    emas = {p.dtype for m in (ema.target, ema.inference) for p in m.parameters()}
    return {"parts": parts, "seen": seen, "grads": grads, "moments": moments, "emas": emas}


def test_bf16_runs_the_network_in_bf16_and_everything_else_in_fp32() -> None:
    fp32, bf16 = one_step("fp32"), one_step("bf16")
    assert fp32["seen"]["inner"] == {torch.float32}
    assert bf16["seen"]["inner"] == {torch.bfloat16}, "autocast did not reach the network"
    for run in (fp32, bf16):
        assert run["seen"]["net_outputs"] == {torch.float32}
        assert run["seen"]["loss_inputs"] == {torch.float32}
        assert {v.dtype for v in run["parts"].values()} == {torch.float32}
        assert run["grads"] == run["moments"] == run["emas"] == {torch.float32}
    a, b = fp32["parts"]["loss"].item(), bf16["parts"]["loss"].item()
    assert a != b and b == pytest.approx(a, rel=2e-2)


def test_unknown_precision_is_a_user_error() -> None:
    with pytest.raises(UserError, match="train.precision"):
        autocast_dtype("fp16")


def test_ism_training_step_reads_nothing_back_from_the_device(host_reads) -> None:
    """Objective draws, both target passes, online forward, loss, backward, clipping, AdamW and
    the twin EMA: an eager iSM step only queues work, so a GPU never waits for the host.
    AdamW is the fused kernel, as the trainer uses on a GPU (the CPU's for-loop AdamW reads its
    step counter, a host tensor)."""
    torch.manual_seed(0)
    model = build_model("tiny/2", SIZE, 1, CLASSES)
    ema = TwinEMA(model, target_decay=0.5, inference_decay=0.9)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    loss_fn = build_loss(LossCfg(levels=3), SIZE)
    gen = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(2, BATCH, 1, SIZE, SIZE, generator=gen)
    y = torch.randint(0, CLASSES, (BATCH,), generator=gen)
    with host_reads() as reads:
        parts = shortcut_loss(model, ema.target, x0, x1, y, ObjectiveCfg(), GuidanceCfg(),
                              loss_fn, CLASSES, gen)
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model)
    assert reads.ops == []
