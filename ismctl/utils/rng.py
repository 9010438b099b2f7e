"""Random-number-generator state of one rank: captured in checkpoints, restored on resume.

The objective's draws (t, d, w, label dropout) come from generators reseeded every step, so
they need no saving; what does is everything drawn from the global generators: dropout
masks (the CPU generator, or on GPU the CUDA generator of the rank's device), plus numpy's
and Python's global generators for any code that uses them. Each rank captures its own
state and the checkpoint keeps one entry per rank (``ismctl.training.trainer``), so a resumed run
continues every device's stream exactly where the interrupted one left it.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """This process's generator states; ``cuda`` only when ``device`` is a CUDA device."""
    state: dict[str, Any] = {
        "cpu": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Put back what ``capture_rng_state`` saved; generators it did not save are untouched.

    Older checkpoints stored only the CPU state under the key ``torch``.
    """
    cpu = state.get("cpu", state.get("torch"))
    if cpu is not None:
        torch.set_rng_state(cpu)
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    if "python" in state:
        random.setstate(state["python"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
