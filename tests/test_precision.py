"""bf16 autocast on the CPU (train.precision: bf16): only the network's products run in bf16;
the loss, its inputs, gradients, optimiser state and EMA copies stay float32."""

from __future__ import annotations

import pytest
import torch

from ismctl.config.recipe import LossCfg, Recipe
from ismctl.losses import build_loss
from ismctl.networks.model import build_model
from ismctl.system.distributed import DistInfo
from ismctl.system.runtime import autocast_dtype
from ismctl.training.ema import TwinEMA
from ismctl.training.state import TrainState
from ismctl.training.step import TrainStep
from ismctl.utils.errors import UserError

CLASSES, SIZE, BATCH = 10, 8, 16


def one_step(precision: str) -> dict:
    """One step of the real TrainStep (ism, wavelet loss, AdamW, twin EMA) at ``precision``,
    with the dtypes seen inside it."""
    torch.manual_seed(0)
    model = build_model("tiny/2", SIZE, 1, CLASSES)
    with torch.no_grad():  # away from the zero initialisation, so the output is not exactly 0
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ema = TwinEMA(model, target_decay=0.5, inference_decay=0.9)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    wavelet = build_loss(LossCfg(levels=3), SIZE)
    seen: dict[str, set] = {"loss_inputs": set(), "net_outputs": set(), "inner": set(),
                            "loss": set(), "grads": set()}

    def loss_fn(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        seen["loss_inputs"] |= {pred.dtype, target.dtype}
        out = wavelet(pred, target)
        seen["loss"].add(out.dtype)
        return out

    for net in (model, ema.target):
        net.register_forward_hook(lambda mod, inp, out: seen["net_outputs"].add(out.dtype))
    model.blocks[0].mlp.fc1.register_forward_hook(
        lambda mod, inp, out: seen["inner"].add(out.dtype))
    real_step = opt.step

    def step(*args, **kwargs):
        seen["grads"] |= {p.grad.dtype for p in model.parameters() if p.grad is not None}
        return real_step(*args, **kwargs)

    opt.step = step
    gen = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(2, BATCH, 1, SIZE, SIZE, generator=gen)
    y = torch.randint(0, CLASSES, (BATCH,), generator=gen)
    recipe = Recipe.model_validate({"train": {"precision": precision, "compile": False}})
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    train_step = TrainStep(recipe, TrainState(model, ema, opt), loss_fn,
                           [iter([(x0, x1, y, torch.zeros(2))])], 1, info)
    parts = train_step(0)[0]
    moments = {v.dtype for s in opt.state.values() for k, v in s.items() if k != "step"}
    emas = {p.dtype for m in (ema.target, ema.inference) for p in m.parameters()}
    return {"parts": parts, "seen": seen, "grads": seen["grads"], "moments": moments,
            "emas": emas}


def test_bf16_runs_the_network_in_bf16_and_everything_else_in_fp32() -> None:
    fp32, bf16 = one_step("fp32"), one_step("bf16")
    assert fp32["seen"]["inner"] == {torch.float32}
    assert bf16["seen"]["inner"] == {torch.bfloat16}, "autocast did not reach the network"
    for run in (fp32, bf16):
        assert run["seen"]["net_outputs"] == {torch.float32}
        assert run["seen"]["loss_inputs"] == {torch.float32}
        assert run["seen"]["loss"] == {torch.float32}
        assert run["grads"] == run["moments"] == run["emas"] == {torch.float32}
    a, b = fp32["parts"]["loss"].item(), bf16["parts"]["loss"].item()
    assert a != b and b == pytest.approx(a, rel=2e-2)


def test_unknown_precision_is_a_user_error() -> None:
    with pytest.raises(UserError, match="train.precision"):
        autocast_dtype("fp16")
