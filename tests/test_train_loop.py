"""Inside the training loop, in this process: which EMA does what, and the loader-worker path
(sOT in worker processes) with an exact resume."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import ismctl.data.coupling as coupling
import ismctl.training.monitor as train_monitor
import ismctl.training.step as train_step
import ismctl.training.trainer as trainer
from ismctl.config.recipe import Recipe, load_recipe
from ismctl.data.manifest import read_manifest
from ismctl.networks.unwrap import unwrap_model
from ismctl.objectives import get_objective
from ismctl.runs.checkpoint import list_checkpoints, model_from_recipe

QUICK = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ismctl.data.prepare import prepare_latents

    out = tmp_path_factory.mktemp("data") / "digits"
    prepare_latents("digits", out=out, progress=False)
    return out


def recipe(digits: Path, root: Path, name: str, steps: int, **extra: Any) -> Recipe:
    sets = {"data.path": digits, "run.root": root, "run.name": name, "train.steps": steps,
            "data.batch_size": 16, "coupling.pool_size": 32, "run.log_every": 1,
            "run.sample_every": 10_000, "run.sample_num": 10, "run.ckpt_every": 1000,
            "run.keep_last": 100, "optim.warmup_steps": 0, "run.tracker": "none", **extra}
    return load_recipe(QUICK, [f"{k}={v}" for k, v in sets.items()])


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unwrap_model(module).state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_target_ema_builds_targets_and_inference_ema_samples(
        digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Record the network the objective gets as its target and the one the periodic grids
    sample from, and recompute both EMAs by hand from the online weights of every step."""
    targets: list[dict[str, torch.Tensor]] = []
    sampled: list[dict[str, torch.Tensor]] = []
    real_loss, real_generate = get_objective("ism").fn, train_monitor.generate_images

    def loss(net: Any, target: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        targets.append(snapshot(target))
        return real_loss(net, target, *args, **kwargs)

    def generate(run: Any, *args: Any, **kwargs: Any) -> Any:
        sampled.append(snapshot(run.model))
        return real_generate(run, *args, **kwargs)

    monkeypatch.setattr(train_step, "get_objective",
                        lambda mode: dataclasses.replace(get_objective(mode), fn=loss))
    monkeypatch.setattr(train_monitor, "generate_images", generate)
    decays = {"target_ema": 0.5, "inference_ema": 0.8}
    r = recipe(digits, tmp_path, "roles", 4, **{"run.ckpt_every": 1, "run.sample_every": 2,
                                                "ema.target_decay": 0.5,
                                                "ema.inference_decay": 0.8,
                                                "ema.warmup": False})
    run = trainer.train(r, str(QUICK), progress=False)
    ckpts = dict(list_checkpoints(run))
    assert sorted(ckpts) == [1, 2, 3, 4] and len(targets) == 4 and len(sampled) == 4

    def saved(step: int, name: str) -> dict[str, torch.Tensor]:
        return load_file(str(ckpts[step] / f"{name}.safetensors"))

    params = {n for n, _ in model_from_recipe(r, read_manifest(digits)).named_parameters()}
    hand = {name: {k: v.double() for k, v in targets[0].items()} for name in decays}
    for step in range(1, 5):
        online = saved(step, "online")
        for name, decay in decays.items():
            for key in params:
                hand[name][key] += (1 - decay) * (online[key].double() - hand[name][key])
            stored = saved(step, name)
            for key in params:
                torch.testing.assert_close(stored[key].double(), hand[name][key], atol=1e-6,
                                           rtol=1e-5, msg=f"{name} step {step} {key}")
        if step < 4:
            # Step step+1 builds its targets with the target EMA after `step` updates ...
            assert same(targets[step], saved(step, "target_ema")), step
            assert not same(targets[step], saved(step, "inference_ema")), step
    # ... and the grids of steps 2 and 4 (1 and 4 sampling steps each) use the inference EMA.
    for i, step in ((0, 2), (1, 2), (2, 4), (3, 4)):
        assert same(sampled[i], saved(step, "inference_ema")), i
        assert not same(sampled[i], saved(step, "target_ema")), i


@pytest.mark.slow
def test_loader_workers_pair_in_worker_processes_and_resume_exactly(
        digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """num_workers=2: the sOT assignment runs in the loader's worker processes (they inherit
    this patch when forked and report their pid), and 6 + 6 resumed steps are 12 steps."""
    pids = tmp_path / "pids.txt"
    real = coupling.linear_sum_assignment

    def recording(cost: Any) -> Any:
        with open(pids, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        return real(cost)

    monkeypatch.setattr(coupling, "linear_sum_assignment", recording)
    common = {"data.num_workers": 2}
    whole = trainer.train(recipe(digits, tmp_path, "whole", 12, **common), str(QUICK),
                          progress=False)
    trainer.train(recipe(digits, tmp_path, "split", 6, **common), str(QUICK), progress=False)
    split = trainer.train(recipe(digits, tmp_path, "split", 12, **common), str(QUICK),
                          resume=True, progress=False)
    workers = {int(p) for p in pids.read_text().split()}
    assert os.getpid() not in workers and len(workers) == 6  # 2 workers x 3 loaders

    def losses(run: Path) -> list[float]:
        return [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().split("\n")
                if ln]

    assert len(losses(whole)) == 12
    assert losses(split) == pytest.approx(losses(whole), rel=1e-5, abs=1e-7)
