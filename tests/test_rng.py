"""Generator state of a rank: CPU, numpy and Python round trip; CUDA saved and restored for
the rank's own device (a stand-in ``torch.cuda`` where there is no GPU)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ismctl.utils.rng import capture_rng_state, restore_rng_state


def draws() -> tuple[list[float], list[float], float]:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()


def test_cpu_numpy_python_round_trip() -> None:
    state = capture_rng_state(torch.device("cpu"))
    assert set(state) == {"cpu", "numpy", "python"}
    first = draws()
    assert draws() != first
    restore_rng_state(state, torch.device("cpu"))
    assert draws() == first


def test_old_checkpoints_restore_the_cpu_generator() -> None:
    state = {"torch": torch.get_rng_state()}
    first = torch.rand(3)
    restore_rng_state(state, torch.device("cpu"))
    assert torch.equal(torch.rand(3), first)


class FakeCuda:
    def __init__(self) -> None:
        self.states = {0: torch.tensor([1], dtype=torch.uint8),
                       1: torch.tensor([2], dtype=torch.uint8)}
        self.set_calls: list[tuple[int, int]] = []

    def get_rng_state(self, device: torch.device) -> torch.Tensor:
        return self.states[device.index].clone()

    def set_rng_state(self, state: torch.Tensor, device: torch.device) -> None:
        self.set_calls.append((int(state[0]), device.index))


def test_cuda_state_of_the_ranks_device(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeCuda()
    monkeypatch.setattr(torch.cuda, "get_rng_state", fake.get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", fake.set_rng_state)
    state = capture_rng_state(torch.device("cuda", 1))
    assert int(state["cuda"][0]) == 2
    restore_rng_state(state, torch.device("cuda", 1))
    assert fake.set_calls == [(2, 1)]
    # A CPU run saves no CUDA state, and a CUDA state is not applied to a CPU run.
    assert "cuda" not in capture_rng_state(torch.device("cpu"))
    restore_rng_state(state, torch.device("cpu"))
    assert fake.set_calls == [(2, 1)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_round_trip_on_a_gpu() -> None:
    device = torch.device("cuda", 0)
    state = capture_rng_state(device)
    first = torch.rand(3, device=device)
    restore_rng_state(state, device)
    assert torch.equal(torch.rand(3, device=device), first)
