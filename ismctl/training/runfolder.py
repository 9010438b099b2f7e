"""The trainer's hold on its run folder, from before its first write to its exit.

On entry the main rank creates the folder, takes its lock (``ismctl.training.runlock``), checks
again that the folder may be started (another trainer may have written a run there since the
checks), sets damaged checkpoints aside, remembers what the folder held, and writes the
resolved recipe and the data manifest. The other ranks wait for the outcome, so a refusal
stops every rank with the same line.

Until the first training step is done, the start can be taken back: a run that fails before
it (a shard that cannot be read, a tracker that cannot start, out of memory, Ctrl-C) leaves
the folder as it found it: a new folder is removed (with the parents it created), files the
start rewrote (recipe, metrics) are put back, files it added (a TensorBoard event file) are
removed, and with ``--overwrite`` the earlier run, moved aside rather than deleted, is moved
back. Once a step is done the earlier run of ``--overwrite`` is deleted. The lock is released
on exit, however the run ends.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from ismctl.config.recipe import Recipe, save_recipe
from ismctl.runs.checkpoint import list_checkpoints, set_aside
from ismctl.system.distributed import DistInfo, barrier, broadcast_from_main
from ismctl.training.preflight import StartCheck
from ismctl.training.runlock import LOCK_NAME, RunLock, acquire
from ismctl.utils.errors import UserError
from ismctl.utils.fileio import atomic_write_bytes, atomic_write_text

# Top-level files up to this size are kept in memory at the start, so a failed start can put
# them back as they were (recipe, manifest, metrics, band statistics, tracker ids).
RESTORABLE_BYTES = 64 * 2**20
ASIDE_PREFIX = ".replaced-"


@dataclass
class Snapshot:
    """What a folder held: every path in it, and the bytes of its small top-level files."""

    root: Path
    paths: set[str] = field(default_factory=set)
    files: dict[str, tuple[bytes, int, int]] = field(default_factory=dict)

    @classmethod
    def take(cls, root: Path) -> Snapshot:
        snap = cls(root)
        for dirpath, dirnames, filenames in os.walk(root):
            rel = Path(dirpath).relative_to(root)
            for name in [*dirnames, *filenames]:
                snap.paths.add(str(rel / name))
        for path in root.iterdir():
            if path.is_file() and path.name != LOCK_NAME:
                st = path.stat()
                if st.st_size <= RESTORABLE_BYTES:
                    snap.files[path.name] = (path.read_bytes(), st.st_size, st.st_mtime_ns)
        return snap

    def restore(self) -> None:
        """Remove what was added since, and put back the small files that changed."""
        for dirpath, dirnames, filenames in os.walk(self.root, topdown=True):
            rel = Path(dirpath).relative_to(self.root)
            for name in filenames:
                if str(rel / name) not in self.paths and name != LOCK_NAME:
                    (Path(dirpath) / name).unlink(missing_ok=True)
            for name in list(dirnames):
                if str(rel / name) not in self.paths:
                    shutil.rmtree(Path(dirpath) / name, ignore_errors=True)
                    dirnames.remove(name)
        for name, (data, size, mtime) in self.files.items():
            path = self.root / name
            try:
                st = path.stat()
                same = (st.st_size, st.st_mtime_ns) == (size, mtime)
            except FileNotFoundError:
                same = False
            if not same:
                atomic_write_bytes(path, data)


def _make_dirs(path: Path) -> list[Path]:
    """``mkdir -p``; returns the folders it created, outermost first."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


class RunFolder:
    """Context manager around a training run; see the module docstring."""

    def __init__(self, recipe: Recipe, start: StartCheck, resume: bool | str, overwrite: bool,
                 info: DistInfo) -> None:
        self.recipe, self.start, self.resume, self.overwrite = recipe, start, resume, overwrite
        self.info = info
        self.run_dir = start.run_dir
        self.lock: RunLock | None = None
        self.created: list[Path] = []
        self.snapshot: Snapshot | None = None
        self.aside: Path | None = None
        self.committed = False
        self.step = 0 if start.resume_from is None else start.resume_from[0]

    def __enter__(self) -> RunFolder:
        error: str | None = None
        failure: BaseException | None = None
        # Every rank has made its checks (on a folder nobody has written yet) before the main
        # rank starts writing.
        barrier()
        if self.info.is_main:
            try:
                self._open()
            except BaseException as exc:
                failure = exc
                self._rollback()
                self._release()
                error = str(exc) if isinstance(exc, UserError) else (
                    f"the main rank could not start the run ({type(exc).__name__}: {exc})")
        # Every rank learns the main rank's outcome, so a refusal stops all of them alike.
        error = broadcast_from_main(error)
        if failure is not None:
            raise failure
        if error is not None:
            raise UserError(error)
        barrier()
        return self

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _open(self) -> None:
        from ismctl.training.resume import check_run_start

        run_dir = self.run_dir
        self.created = _make_dirs(run_dir)
        self.lock = acquire(run_dir)
        if self.lock.stale:
            print(f"note: {run_dir}: {self.lock.stale}", flush=True)
        # Checked before, without the lock: another trainer may have started a run here since.
        check_run_start(run_dir, self.recipe, self.resume, self.overwrite)
        for damaged in self.start.damaged:
            kept = set_aside(damaged.path.parent)
            print(f"note: {damaged.path.parent.name} is damaged ({damaged.path.name}: "
                  f"{damaged.why}); resuming from step {self.step}, the damaged checkpoint is "
                  f"kept as {kept}", flush=True)
        if self.start.restart_in_place:
            print(f"note: {run_dir} has no checkpoint yet: the run restarts at step 0 in its "
                  "folder", flush=True)
        if not self.created:
            if self.overwrite:
                self._move_aside()
            else:
                self.snapshot = Snapshot.take(run_dir)
        (run_dir / "samples").mkdir(exist_ok=True)
        save_recipe(self.recipe, run_dir / "recipe.yaml")
        manifest_src = Path(self.recipe.data.path) / "manifest.json"
        atomic_write_text(run_dir / "manifest.json", manifest_src.read_text())

    def _move_aside(self) -> None:
        """``--overwrite``: the earlier run moves into a hidden folder inside the run folder
        (the lock stays where it is), deleted once the new run has made its first step."""
        children = [p for p in self.run_dir.iterdir()
                    if p.name != LOCK_NAME and not p.name.startswith(ASIDE_PREFIX)]
        self.aside = self.run_dir / f"{ASIDE_PREFIX}{os.getpid()}"
        shutil.rmtree(self.aside, ignore_errors=True)
        self.aside.mkdir()
        for child in children:
            os.replace(child, self.aside / child.name)

    def step_done(self, step: int) -> None:
        """Called after every training step: the first one makes the start final."""
        self.step = step
        if not self.committed:
            self._commit()

    def _commit(self) -> None:
        self.committed = True
        if self.info.is_main:
            if self.aside is not None:
                shutil.rmtree(self.aside, ignore_errors=True)
            for stale in self.run_dir.glob(f"{ASIDE_PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True)
            self.snapshot = None

    def lost(self) -> str:
        """What an abort now loses: the steps since the newest checkpoint."""
        ckpts = list_checkpoints(self.run_dir)
        last = ckpts[-1][0] if ckpts else 0
        if self.step <= last:
            return f"at step {self.step}: nothing lost (checkpoint step {last} is the newest)"
        since = f"the last checkpoint (step {last})" if ckpts else "the start (no checkpoint yet)"
        return f"at step {self.step}: the {self.step - last} step(s) since {since} are lost"

    def _rollback(self) -> None:
        if not self.info.is_main or self.committed:
            return
        try:
            if self.created:
                shutil.rmtree(self.created[0], ignore_errors=True)
            elif self.aside is not None:
                for child in self.run_dir.iterdir():
                    if child.name not in (LOCK_NAME, self.aside.name):
                        if child.is_dir() and not child.is_symlink():
                            shutil.rmtree(child, ignore_errors=True)
                        else:
                            child.unlink(missing_ok=True)
                for child in self.aside.iterdir():
                    os.replace(child, self.run_dir / child.name)
                self.aside.rmdir()
            elif self.snapshot is not None:
                self.snapshot.restore()
        finally:
            self.snapshot, self.aside = None, None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if exc_type is not None:
                self._rollback()
            elif not self.committed:
                self._commit()
        finally:
            self._release()
