"""The real training step (:class:`~ismctl.training.step.TrainStep`): the learning-rate warm-up
and gradient clipping as the optimiser sees them, and a step that reads nothing back from the
device. The step runs on the small network of tests/test_training_targets.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_training_targets import (
    CPU,
    ISM,
    NUM_CLASSES,
    SM,
    Harness,
    RecordingAdamW,
    batches,
    field_and_ema,
    make_recipe,
    mse,
)

from ismctl.config.recipe import LossCfg
from ismctl.losses import build_loss
from ismctl.networks.model import build_model
from ismctl.objectives import get_objective
from ismctl.training.ema import TwinEMA
from ismctl.training.state import TrainState
from ismctl.training.step import TrainStep, stream_seed


def _norm(grads: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.double().square().sum()) for g in grads))


@pytest.mark.parametrize("step", [0, 1, 2, 3, 4, 9])
def test_warm_up_is_linear_over_the_first_steps(step: int) -> None:
    """lr x min(1, (n + 1) / warmup_steps) at step n: the optimiser is given that rate, and the
    first AdamW update moves every weight with a gradient by that much (m / sqrt(v) = +-1)."""
    recipe = make_recipe(optim={"lr": 2e-3, "warmup_steps": 4}, **ISM)
    run = Harness(recipe, mse)
    before = [p.detach().clone() for p in run.state.model.parameters()]
    out = run.run(step)
    want = 2e-3 * min(1.0, (step + 1) / 4)
    assert out["seen"]["lr"] == [pytest.approx(want, rel=1e-12)]
    for p0, p1, g in zip(before, run.state.model.parameters(), out["seen"]["grads"],
                         strict=True):
        moved = (p1.detach() - p0).abs()
        big = g.abs() > 1e-5
        assert big.any()
        torch.testing.assert_close(moved[big], torch.full_like(moved[big], want), rtol=1e-2,
                                   atol=0)


def test_no_warm_up_uses_the_rate_from_the_first_step() -> None:
    out = Harness(make_recipe(optim={"lr": 2e-3, "warmup_steps": 0}, **ISM), mse).run(0)
    assert out["seen"]["lr"] == [2e-3]


@pytest.mark.parametrize("clip", [None, 1e-3, 1e6])
def test_clipping_rescales_the_gradient_the_optimiser_gets(clip: float | None) -> None:
    """The step returns the norm before clipping; AdamW gets the gradient scaled to norm
    ``clip`` when it was larger, unchanged otherwise (same step, same draws, clip off as the
    reference)."""
    free = Harness(make_recipe(optim={"grad_clip": None}, **ISM), mse).run(0)
    out = Harness(make_recipe(optim={"grad_clip": clip}, **ISM), mse).run(0)
    norm = _norm(free["seen"]["grads"])
    assert float(out["grad_norm"]) == pytest.approx(norm, rel=1e-5)
    assert float(free["grad_norm"]) == pytest.approx(norm, rel=1e-5)
    scale = 1.0 if clip is None else min(1.0, clip / norm)
    if clip == 1e-3:
        assert norm > 10 * clip, "the clip must bite for this case to test anything"
        assert _norm(out["seen"]["grads"]) == pytest.approx(clip, rel=1e-5)
    for got, ref in zip(out["seen"]["grads"], free["seen"]["grads"], strict=True):
        torch.testing.assert_close(got, ref * scale, rtol=1e-5, atol=1e-9)


def test_losses_are_reported_and_a_non_finite_loss_is_flagged() -> None:
    """The step's "bad" flag is the one thing the loop checks for divergence."""
    run = Harness(make_recipe(**ISM), mse)
    assert not bool(run.run(0)["bad"])
    with torch.no_grad():
        run.state.model.emb[0, 0] = float("nan")
        run.state.model.emb[1:, 0] = float("nan")
    assert bool(run.run(1)["bad"])
    # With accumulation, a non-finite loss in any slot flags the step, not only in the last.
    recipe = make_recipe(train={"grad_accum": 2}, **ISM)
    nan_batch = next(batches(12, 1))
    nan_batch[1][0] = float("nan")
    model, ema = field_and_ema()
    state = TrainState(model, ema, torch.optim.AdamW(model.parameters()))
    step = TrainStep(recipe, state, mse, [iter([nan_batch]), batches(12, 2)], 2, CPU)
    assert bool(step(0)[2])


def test_the_real_step_reads_nothing_back_from_the_device(host_reads) -> None:
    """Objective draws, both target passes, the online forward, the loss, backward, clipping,
    AdamW and the twin EMA, through TrainStep itself: an eager iSM step only queues work, so a
    GPU never waits for the host. AdamW is the fused kernel, as the trainer's on a GPU (the
    CPU's for-loop AdamW reads its step counter, a host tensor)."""
    recipe = make_recipe(optim={"grad_clip": 1.0, "warmup_steps": 10}, **ISM)
    torch.manual_seed(0)
    model = build_model("tiny/2", 8, 2, 3, base_steps=8)
    ema = TwinEMA(model, target_decay=0.5, inference_decay=0.9)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    state = TrainState(model, ema, opt)
    wavelet = build_loss(LossCfg(levels=3), 8)
    step = TrainStep(recipe, state, wavelet, [batches(48, 0)], 1, CPU)
    step(0)
    with host_reads() as reads:
        step(1)
    assert reads.ops == []


def test_loader_workers_are_shared_among_the_accumulation_slots() -> None:
    from ismctl.training.step import loader_workers

    for workers, accum, want in ((0, 1, 0), (4, 2, 2), (1, 4, 1), (6, 1, 6)):
        recipe = make_recipe(data={"num_workers": workers}, train={"grad_accum": accum})
        got = loader_workers(recipe)
        assert got == want and isinstance(got, int), (workers, accum)


def test_each_accumulation_slot_reads_its_own_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank r's slot m is data stream r x grad_accum + m of ranks x grad_accum, positioned at
    the step reached, with the recipe's pool, pairing, buffer, flip and workers per slot."""
    import ismctl.training.step as step_module
    from ismctl.system.distributed import DistInfo
    from ismctl.training.step import make_loaders

    made: list[dict] = []

    class Loader:
        def __init__(self, path: str, **kwargs: object) -> None:
            made.append({"path": path, **kwargs})

        def __iter__(self):
            return iter(())

    monkeypatch.setattr(step_module, "TrainLoader", Loader)
    recipe = make_recipe(data={"path": "somewhere", "num_workers": 4, "shuffle_buffer": 77},
                         train={"grad_accum": 2, "seed": 9},
                         coupling={"pool_size": 32, "mode": "hybrid", "min_group": 3})
    info = DistInfo(rank=1, world_size=3, local_rank=1, device=torch.device("cpu"))
    make_loaders(recipe, 16, 6, True, info, 40)
    assert [m["rank"] for m in made] == [2, 3]
    for m in made:
        assert m == {**m, "path": "somewhere", "batch_size": 16, "pool_size": 32, "seed": 9,
                     "world_size": 6, "num_workers": 2, "shuffle_buffer": 77, "flip": True,
                     "start_batch": 40, "mode": "hybrid", "min_group": 3}


def test_accumulation_averages_the_slots_as_the_objective_defines_them() -> None:
    """grad_accum 2 (slots 0 and 1 of 2), sm, whose bootstrap levels depend on the slot: each
    micro-batch is the objective on its own stream's batch with the generator seeded by
    (seed, step, slot) and the slot handed on. The optimiser gets the mean of the two slots'
    gradients; the step logs the mean of their loss parts and of their pools' sOT statistics.
    The reference calls the objective by hand on copies of the networks."""
    # M = 16, 3 bootstrap rows per micro-batch: the global batch's 6 rows take the levels
    # 1/8, 1/4, 1/2, 1, 1, 1 and slot 1 the odd ones, where 3 rows alone would all take d = 1.
    recipe = make_recipe(train={"grad_accum": 2}, coupling={"pool_size": 8},
                         objective={**SM["objective"], "base_steps": 16},
                         guidance=SM["guidance"])
    stats = [torch.tensor([0.25, 0.01]), torch.tensor([0.75, 0.03])]
    data = [(*next(batches(12, seed))[:3], pool) for seed, pool in zip((1, 2), stats,
                                                                       strict=True)]
    model, ema = field_and_ema()
    online, target = copy.deepcopy(model), copy.deepcopy(ema.target)
    opt = RecordingAdamW(model.parameters(), lr=1e-3)
    step = TrainStep(recipe, TrainState(model, ema, opt), mse, [iter([d]) for d in data], 2, CPU)
    model.record = []
    sums, pool, _, _ = step(5)

    objective, gen, parts = get_objective("sm").fn, torch.Generator(), []
    for slot, (x0, x1, y, _) in enumerate(data):
        gen.manual_seed(stream_seed(recipe.train.seed, 5, slot))
        parts.append(objective(online, target, x0, x1, y, recipe.objective, recipe.guidance, mse,
                               NUM_CLASSES, gen, (slot, 2)))
    ((parts[0]["loss"] + parts[1]["loss"]) / 2).backward()
    assert len(model.record) == 2  # one online call per slot; slot 1's bootstrap rows lead
    assert sorted(model.record[1]["d"][:3].tolist()) == [0.25, 1.0, 1.0]
    for got, p in zip(opt.seen[-1]["grads"], online.parameters(), strict=True):
        torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-8)
    assert set(sums) == set(parts[0])
    for k, v in sums.items():
        torch.testing.assert_close(v, ((parts[0][k] + parts[1][k]) / 2).detach().float())
    assert pool == pytest.approx({"sot_cost_reduction": 0.5, "sot_leakage": 0.02})


def test_bf16_precision_runs_the_networks_under_autocast() -> None:
    """train.precision bf16: the online and target networks run under bf16 autocast on the
    step's device (the CPU here); fp32 runs them without autocast."""
    seen: dict[str, set[tuple[bool, torch.dtype | None]]] = {"fp32": set(), "bf16": set()}
    for precision, calls in seen.items():
        run = Harness(make_recipe(train={"precision": precision}, **ISM), mse)

        def hook(module: torch.nn.Module, args: tuple, calls: set = calls) -> None:
            on = torch.is_autocast_enabled("cpu")
            calls.add((on, torch.get_autocast_dtype("cpu") if on else None))

        run.state.model.register_forward_pre_hook(hook)
        run.state.ema.target.register_forward_pre_hook(hook)
        run.run(0)
    assert seen == {"fp32": {(False, None)}, "bf16": {(True, torch.bfloat16)}}
