"""torch.compile on the CPU (inductor): the compiled training step and sampler give the eager
results, compile once, and never break their graph.

Compilation costs tens of seconds per graph on a 2-core CPU, so the tests are few and share one
tiny model shape; dynamo's caches are reset first so that an earlier test cannot hide a
recompilation (or push a frame past the cache limit, which would fall back to eager silently).
"""

from __future__ import annotations

import pytest
import torch

from ismctl.config.recipe import GuidanceCfg, LossCfg, ObjectiveCfg
from ismctl.losses import build_loss
from ismctl.networks.model import build_model
from ismctl.objectives.shortcut import shortcut_loss
from ismctl.sampling.sampler import sample
from ismctl.system.runtime import compile_counters, compile_network
from ismctl.training.ema import TwinEMA

pytestmark = pytest.mark.slow

CLASSES, SIZE, BATCH = 10, 8, 16


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def train_steps(compiled: bool, mode: str, steps: int) -> tuple[list[float], list[int]]:
    """``steps`` training steps of the tiny net (objective, wavelet loss, AdamW, twin EMA) with
    fresh t, d, w and label draws every step; returns the losses and, after each step, the
    number of frames compiled so far."""
    torch.manual_seed(0)
    model = build_model("tiny/2", SIZE, 1, CLASSES)
    ema = TwinEMA(model, target_decay=0.5, inference_decay=0.9)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    online, target = compile_network(model, compiled), compile_network(ema.target, compiled)
    loss_fn = build_loss(LossCfg(levels=3), SIZE)
    objective = ObjectiveCfg(mode=mode)
    data = torch.Generator().manual_seed(1)
    losses, frames = [], []
    for step in range(steps):
        x0 = torch.randn(BATCH, 1, SIZE, SIZE, generator=data)
        x1 = torch.randn(BATCH, 1, SIZE, SIZE, generator=data)
        y = torch.randint(0, CLASSES, (BATCH,), generator=data)
        gen = torch.Generator().manual_seed(step)
        parts = shortcut_loss(online, target, x0, x1, y, objective, GuidanceCfg(), loss_fn,
                              CLASSES, gen)
        parts["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model)
        losses.append(parts["loss"].item())
        frames.append(compile_counters()["frames"])
    return losses, frames


@pytest.mark.parametrize("mode", ["ism", "sm"])
def test_compiled_training_matches_eager_and_compiles_once(mode: str) -> None:
    """Same losses as eager (to float reordering) over steps whose d, w, t and labels all
    change; every graph is compiled in the first two steps (the target's second batch shape
    marks the batch dimension dynamic; sm's CFG rows vary in number) and never again."""
    eager, _ = train_steps(False, mode, 6)
    before = compile_counters()
    compiled, frames = train_steps(True, mode, 6)
    after = compile_counters()
    assert after["graph_breaks"] == before["graph_breaks"], "graph break in the network"
    assert frames[1] > before["frames"], "nothing was compiled"
    assert frames[-1] == frames[1], f"recompiled after the second step: {frames}"
    assert len(set(eager)) == len(eager), "the losses should change from step to step"
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-6)


def test_compiled_sampler_gives_the_same_images_for_every_step_count() -> None:
    """One compilation serves every step count and guidance strength (d, t and w are tensor
    inputs) and a short last batch costs one more (dynamic batch), not one per call."""
    torch.manual_seed(0)
    model = build_model("tiny/2", SIZE, 1, CLASSES).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    compiled = compile_network(model)
    gen = torch.Generator().manual_seed(2)
    noise = torch.randn(12, 1, SIZE, SIZE, generator=gen)
    labels = torch.randint(0, CLASSES + 1, (12,), generator=gen)
    start = compile_counters()
    for steps, w, rows in ((4, 1.0, 12), (1, 0.0, 12), (8, 2.5, 12), (2, 1.0, 5), (4, 0.5, 7)):
        eager = sample(model, noise[:rows], labels[:rows], steps, guidance=w)
        fast = sample(compiled, noise[:rows], labels[:rows], steps, guidance=w)
        torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-5)
    end = compile_counters()
    assert end["graph_breaks"] == start["graph_breaks"]
    assert 1 <= end["frames"] - start["frames"] <= 2, end["frames"] - start["frames"]
