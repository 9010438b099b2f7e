"""Everything ``train`` checks before it writes a byte, in one function that ``train --dry-run``
calls too: a recipe the run would refuse is refused by the dry run with the same line.

In order: the data (manifest, shards present, and for a data set small enough to read in a
moment every shard's sha256), the batch split (ranks x accumulation slots, the sOT pool
tiling the micro-batch, one batch per rank from the data), the network and the loss (built on
the meta device: no memory), the tracker's package (``run.tracker``), the run folder (it can
be written; a run there needs ``--resume`` or ``--overwrite``; a folder another trainer holds
is refused), the checkpoint a resume starts
from (the newest whose files pass their digests; damaged newer ones are reported), and a
``model.init_from`` file (read and mapped onto the network's shapes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ismctl.config.recipe import Recipe
from ismctl.data.manifest import Manifest, read_manifest
from ismctl.data.plan import batches_per_pool, batches_per_rank
from ismctl.data.verify import check_shards_exist, verify_shard
from ismctl.runs.integrity import DamagedFile
from ismctl.utils.errors import UserError
from ismctl.utils.fileio import check_writable

# Shards totalling less than this are checked against their digests before the run starts
# (the built-in digits: 0.3 MB, a few ms); larger data sets are checked shard by shard as the
# loader first opens each one.
VERIFY_AT_START_BYTES = 256 * 2**20


def run_directory(recipe: Recipe, recipe_path: str | None) -> Path:
    name = recipe.run.name or (Path(recipe_path).stem if recipe_path else "run")
    return Path(recipe.run.root) / name


@dataclass
class StartCheck:
    """What the checks found: everything the trainer needs before it writes."""

    manifest: Manifest
    slots: int
    micro: int
    run_dir: Path
    network: torch.nn.Module
    checkpoints: list[tuple[int, Path]]
    resume_from: tuple[int, Path] | None
    damaged: list[DamagedFile] = field(default_factory=list)
    pretrained: dict[str, torch.Tensor] | None = None
    restart_in_place: bool = False

    def notes(self) -> list[str]:
        out = [f"{d.path.parent.name} is damaged ({d.path.name}: {d.why}): resuming from "
               f"step {self.resume_from[0]}; it is kept as damaged-{d.path.parent.name}"
               for d in self.damaged if self.resume_from is not None]
        if self.restart_in_place:
            out.append(f"{self.run_dir} has no checkpoint yet: the run restarts at step 0 in "
                       "its folder")
        return out


def check_data(recipe: Recipe) -> Manifest:
    root = Path(recipe.data.path)
    manifest = read_manifest(root)
    check_shards_exist(root, manifest)
    if sum((root / s.name).stat().st_size for s in manifest.shards) < VERIFY_AT_START_BYTES:
        for info in manifest.shards:
            verify_shard(root, info)
    return manifest


def check_start(recipe: Recipe, recipe_path: str | None, resume: bool | str, overwrite: bool,
                world_size: int) -> StartCheck:
    """Run every check ``train`` makes before writing; raises UserError at the first refusal."""
    from ismctl.losses import build_loss
    from ismctl.networks.pretrained import check_init_from
    from ismctl.runs.checkpoint import checkpoint_files, model_from_recipe, newest_intact
    from ismctl.training.resume import check_run_start, holds_run
    from ismctl.training.runlock import check_unlocked
    from ismctl.training.tracking import check_tracker

    cfg, data = recipe.train, recipe.data
    manifest = check_data(recipe)
    slots = world_size * cfg.grad_accum
    if data.batch_size % slots:
        raise UserError(f"data.batch_size={data.batch_size}: not divisible by "
                        f"ranks x train.grad_accum = {slots}")
    micro = data.batch_size // slots
    # Each slot's loader solves one sOT assignment per coupling.pool_size samples of its own
    # stream, so the pool is the same on any number of ranks and accumulation steps.
    batches_per_pool(recipe.coupling.pool_size, micro,
                     f" (data.batch_size {data.batch_size} / {slots} = ranks x "
                     "train.grad_accum)")
    batches_per_rank(manifest.count, slots, micro)
    run_dir = run_directory(recipe, recipe_path)
    check_writable(run_dir, "run folder (run.root/run.name)", folder=True)
    # The network and the loss are built before the run folder is written, so a recipe they
    # refuse (a patch that does not tile the input, wrong detail weights) leaves nothing.
    with torch.device("meta"):
        network = model_from_recipe(recipe, manifest)
    build_loss(recipe.loss, network.input_size)
    check_tracker(recipe.run.tracker)
    check_unlocked(run_dir)
    ckpts = check_run_start(run_dir, recipe, resume, overwrite)
    resume_from, damaged = None, []
    if resume and ckpts:
        resume_from, damaged = newest_intact(ckpts, checkpoint_files(recipe))
        if resume_from is None:
            raise UserError(f"{run_dir}: no intact checkpoint to resume from (newest: "
                            f"{damaged[0]}); start over with --overwrite")
    restart = bool(resume) and not ckpts and holds_run(run_dir)
    # Read and mapped onto the network's shapes (on the meta device) before anything is
    # written, so a file of the wrong shapes leaves nothing; a resumed run does not read it.
    pretrained = check_init_from(network, recipe.model.init_from, resume_from is not None)
    return StartCheck(manifest=manifest, slots=slots, micro=micro, run_dir=run_dir,
                      network=network, checkpoints=ckpts, resume_from=resume_from,
                      damaged=damaged, pretrained=pretrained, restart_in_place=restart)
