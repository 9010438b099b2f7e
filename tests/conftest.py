"""Shared test set-up: one intra-op thread everywhere.

The suite runs many small tensor ops on (often shared) 2-core machines, where extra OpenMP
threads mostly spin against each other; subprocesses inherit OMP_NUM_THREADS.
"""

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    os.environ["OMP_NUM_THREADS"] = "1"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class HostReads(TorchDispatchMode):
    """Counts the ops that read tensor values back to the host: ``.item()``, ``bool()``,
    ``int()``, ``float()`` (all ``aten._local_scalar_dense``) and ``nonzero`` (its output size
    depends on the values). On an accelerator each one waits for every queued kernel."""

    SYNCING = ("aten._local_scalar_dense", "aten.nonzero")

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in self.SYNCING:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def host_reads() -> type[HostReads]:
    return HostReads


@pytest.fixture
def ismctl_main(monkeypatch: pytest.MonkeyPatch) -> Callable[..., int]:
    """The real ``ismctl`` entry point in this process: ``ismctl_main("train", ...)`` returns
    the exit code. Commands set torch's thread count for their process; the suite's is put
    back."""
    from ismctl.cli import main

    def run(*args: str) -> int:
        monkeypatch.setattr(sys, "argv", ["ismctl", *args])
        threads = torch.get_num_threads()
        try:
            main()
        except SystemExit as stop:
            return int(stop.code or 0)
        finally:
            torch.set_num_threads(threads)
        return 0

    return run


@pytest.fixture
def plugin_registry():
    """Objectives that a test registers (plugin modules it imports) are gone afterwards: the
    registry and sys.modules as they were, so other tests in the process see ismctl's own."""
    from ismctl.config import plugins

    saved, modules = dict(plugins._REGISTRY), set(sys.modules)
    yield plugins
    plugins._REGISTRY.clear()
    plugins._REGISTRY.update(saved)
    for name in set(sys.modules) - modules:
        if name.startswith(("ismctl_ct", "ismctl_plugin_")):
            del sys.modules[name]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Scheduler tests are also slow tests: `-m "not slow"` leaves them out."""
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def slurm_cluster() -> Path:
    """The SLURM cluster named by SLURM_CONF (``.ci/slurm-up`` starts one), answering, with
    submitit installed. Without one the scheduler tests skip, saying why; with
    ISMCTL_REQUIRE_SLURM=1 (CI) they fail instead."""
    conf = os.environ.get("SLURM_CONF")
    why = None
    if not conf or not Path(conf).is_file():
        why = "no SLURM cluster: SLURM_CONF is not set (.ci/slurm-up DIR starts a one-node one)"
    elif shutil.which("sinfo") is None:
        why = "no SLURM client commands (sinfo) on this machine"
    else:
        try:
            out = subprocess.run(["sinfo", "--noheader", "--format=%T"], capture_output=True,
                                 text=True, timeout=20, check=False)
            if out.returncode != 0 or not out.stdout.strip():
                why = f"the SLURM cluster of {conf} does not answer: {out.stderr.strip()}"
        except subprocess.TimeoutExpired:
            why = f"the SLURM cluster of {conf} does not answer in 20 s"
    if why is None:
        try:
            import submitit  # noqa: F401
        except ImportError:
            why = "submitit is not installed (pip install 'ismctl[slurm]')"
    if why is not None:
        if os.environ.get("ISMCTL_REQUIRE_SLURM") == "1":
            pytest.fail(f"ISMCTL_REQUIRE_SLURM=1 but {why}")
        pytest.skip(why)
    return Path(conf)
