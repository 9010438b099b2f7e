"""`ismctl bench`: the quick run writes valid JSON with every section, all numbers positive and
finite. Speed goals are reported in bench.json, never asserted here."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from ismctl.tools.bench import (
    Sections,
    coupler_throughput,
    flow_matching_loss,
    run_bench,
    workers_to_keep_up,
)

SECTIONS = {"online_forward", "target_passes", "loss", "backward", "optimizer", "ema_update",
            "objective_other"}


def positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_flow_matching_loss_matches_a_hand_computed_mse() -> None:
    """d = 0, w = 0, target x1 - x0 at x_t = (1 - t) x0 + t x1 (method §1)."""
    calls: list[tuple[torch.Tensor, ...]] = []

    def net(x: torch.Tensor, t: torch.Tensor, d: torch.Tensor, y: torch.Tensor,
            w: torch.Tensor) -> torch.Tensor:
        calls.append((x, t, d, y, w))
        return 2 * x

    gen = torch.Generator().manual_seed(3)
    x0, x1 = torch.randn(5, 1, 2, 2), torch.randn(5, 1, 2, 2)
    y = torch.arange(5)
    out = flow_matching_loss(net, x0, x1, y, lambda p, q: (p - q).square().flatten(1).mean(1),
                             num_classes=10, class_dropout=0.0, generator=gen)
    x, t, d, labels, w = calls[0]
    ref_t = torch.rand(5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(t, ref_t) and torch.equal(labels, y)
    assert torch.equal(d, torch.zeros(5)) and torch.equal(w, torch.zeros(5))
    expected_x = (1 - ref_t.view(-1, 1, 1, 1)) * x0 + ref_t.view(-1, 1, 1, 1) * x1
    torch.testing.assert_close(x, expected_x)
    torch.testing.assert_close(out["loss"], ((2 * expected_x - (x1 - x0)) ** 2).mean())


def test_workers_to_keep_up() -> None:
    """A pool of 8,192 feeds 8192 / 107.5 = 76.2 s of training at 107.5 img/s: 30 s of
    worker time per pool needs 1 worker, 80 s needs 2; at 3x the throughput 30 s needs 2."""
    assert workers_to_keep_up(30.0, 8192, 107.5) == 1
    assert workers_to_keep_up(80.0, 8192, 107.5) == 2
    assert workers_to_keep_up(30.0, 8192, 322.5) == 2
    assert workers_to_keep_up(0.0, 8192, 322.5) == 1


def test_coupler_throughput_pairs_like_the_loader() -> None:
    """The timed pairing is the coupler's: blind pooling removes more transport cost than
    per-class pairing, which with 1,000 classes and a pool of 256 has little left to do."""
    out = coupler_throughput(256, (4, 8, 8), modes=("blind", "within_class"))
    assert out["pool_size"] == 256 and out["classes_in_pool"] <= 256
    assert out["alone_in_class_fraction"] > 0.5
    blind, within = out["modes"]["blind"], out["modes"]["within_class"]
    assert blind["cost_reduction"] > within["cost_reduction"] >= 0
    assert all(positive(m["total_s"]) for m in out["modes"].values())


def test_sections_count_rows_and_time() -> None:
    s = Sections(torch.device("cpu"), enabled=True)
    fn = s.wrap(lambda x: x + 1, "f")
    fn(torch.zeros(3))
    fn(torch.zeros(4))
    assert s.rows == {"f": 7} and s.times["f"] >= 0
    off = Sections(torch.device("cpu"), enabled=False)
    off.wrap(lambda x: x, "f")(torch.zeros(2))
    assert off.times == {}


@pytest.mark.slow
def test_quick_bench_writes_complete_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    report = run_bench(out, quick=True, device="cpu", progress=False)
    stored = json.loads(out.read_text())
    assert stored == report
    for key in ("steps", "components", "sot", "loader", "sampling", "gpu", "goals", "notes"):
        assert key in stored
    step = stored["steps"]["tiny/2"]
    assert positive(step["batch"]) and positive(step["ratio_ism_over_fm"])
    for kind in ("fm", "ism", "sm"):
        assert positive(step[kind]["total_s"]) and positive(step[kind]["img_s"])
        assert all(math.isfinite(v) and v >= 0 for v in step[kind]["sections_s"].values())
    assert SECTIONS <= set(step["ism"]["sections_s"])
    assert "target_passes" not in step["fm"]["sections_s"]
    # method §5: the iSM objective asks 2 target rows per guidance and consistency sample.
    assert step["ism"]["target_rows_per_sample"] == pytest.approx(1.0)
    comp = stored["components"]["tiny/2"]
    for name in ("wavelet", "twin_ema", "sot", "intrinsic_guidance"):
        assert math.isfinite(comp[name]["fraction_of_step"])
    assert positive(comp["wavelet"]["wavelet"]["min_s"])
    assert positive(comp["twin_ema"]["twin"]["median_s"])
    # Pools of 0, 1, 8 and 32 batches of 32, keyed by their size in samples.
    assert set(stored["loader"]["results"]) == {"0", "32", "256", "1024"}
    assert all(positive(r["latents_per_s"]) for r in stored["loader"]["results"].values())
    assert set(stored["sampling"]["img_s"]) == {"1", "4", "128"}
    assert all(positive(v) for v in stored["sampling"]["img_s"].values())
    paths = stored["sampling"]["paths"]
    assert {"before", "inference_mode"} <= set(paths["sample_steps_per_s"])
    assert "compiled" not in paths["sample_steps_per_s"]  # the quick run does not compile
    assert all(positive(v) for v in paths["sample_steps_per_s"].values())
    # Inference mode and no per-step host read change the speed, not the images.
    assert paths["max_abs_diff_from_before"]["inference_mode"] == 0.0
    assert "skipped" in stored["gpu"]
    coupler = stored["coupler"]
    assert coupler["pool_size"] == 512 and coupler["threads"] == 1
    assert set(coupler["modes"]) == {"blind", "within_class", "hybrid"}
    for mode, m in coupler["modes"].items():
        assert positive(m["pair_s"]) and positive(m["total_s"]), mode
        assert 0 < m["cost_reduction"] < 1, mode
        keep = coupler["keep_up"]["modes"][mode]
        assert keep["worker_s_per_pool"] > m["total_s"]  # the pool's loading is included
        assert set(keep["workers_per_gpu"]) == {"A100", "H100"}
        assert all(isinstance(n, int) and n >= 1 for n in keep["workers_per_gpu"].values())
    assert all(isinstance(g["met"], bool) and math.isfinite(g["value"]) for g in stored["goals"])
    # All cores against one thread, as the machine is and with cores - 1 busy processes.
    threads = stored["threads"]
    if threads is not None:
        assert threads["cores"] >= 2 and threads["busy"]["busy_processes"] == threads["cores"] - 1
        for case in ("as_is", "busy"):
            assert positive(threads[case]["ratio_all_over_one"])
            assert threads[case]["ratio_all_over_one"] == pytest.approx(
                threads[case]["all_cores_sample_steps_per_s"]
                / threads[case]["one_thread_sample_steps_per_s"])
