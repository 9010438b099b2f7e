"""Shared test set-up: one intra-op thread everywhere.

The suite runs many small tensor ops on (often shared) 2-core machines, where extra OpenMP
threads mostly spin against each other; subprocesses inherit OMP_NUM_THREADS.
"""

import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    os.environ["OMP_NUM_THREADS"] = "1"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
