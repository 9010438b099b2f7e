"""``ismctl train --launch slurm``: one training run as a requeueable SLURM job.

The job runs ``ismctl train <recipe> --auto-resume`` on every rank of its allocation
(``ismctl.system.slurm``); stopped by its time limit or a preemption it checkpoints and is
requeued, and the requeued job continues exactly where it stopped. The submitting command
returns at once with the job id; run again, it shows the job's state and submits again only a
run that is neither finished nor queued. Before submitting, it makes every check ``train``
makes (recipe, data, run folder), so bad input stops here, in one line, not in the queue.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from ismctl.config.recipe import Recipe, save_recipe
from ismctl.runs.checkpoint import list_checkpoints
from ismctl.system.slurm import Cell, CellState, Launcher, SlurmOptions, print_states
from ismctl.training.preflight import check_start, run_directory


def slurm_folder(run_dir: Path) -> Path:
    """Where a run's job scripts, logs and job ids live: beside its run folder."""
    return run_dir.with_name(run_dir.name + ".slurm")


def train_on_slurm(recipe: Recipe, recipe_path: str, options: SlurmOptions,
                   threads: int | None = None, submit: bool = True,
                   console: Console | None = None) -> CellState:
    """Submit the training run unless it is finished or queued; returns its state."""
    console = console or Console()
    run_dir = run_directory(recipe, recipe_path)
    # The job reads the recipe as resolved now, its run named, so that the file it was given
    # may change or go while it waits in the queue.
    named = recipe.model_copy(update={"run": recipe.run.model_copy(update={"name": run_dir.name})})
    folder = slurm_folder(run_dir)
    yaml_path = folder / "recipe.yaml"
    ckpts = list_checkpoints(run_dir) if run_dir.is_dir() else []
    done = bool(ckpts) and ckpts[-1][0] == recipe.train.steps
    cell = Cell(run_dir.name, [["train", str(yaml_path), "--auto-resume", "--no-progress",
                                *([] if threads is None else ["--threads", str(threads)])]],
                run_dir, done)
    launcher = Launcher(folder, options, f"ismctl-train-{run_dir.name}")
    state = launcher.states([cell])[0]
    if submit and state.state in ("new", "failed"):
        check_start(named, str(yaml_path), "auto", False, options.world_size)
        save_recipe(named, yaml_path)
        job = launcher.submit([cell])[0]
        state = CellState(cell.name, "submitted", job, launcher.record()[cell.name]["log"])
    print_states([state], console, f"ismctl train --launch slurm: {run_dir}")
    return state
