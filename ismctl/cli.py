"""The `ismctl` command line: parse, call the core package, print.

Bad input raises UserError anywhere below; `main` turns it into one red line on stderr and
exit code 2 (`--debug`, anywhere on the command line, shows the traceback instead). A training
run stopped by SIGTERM or SIGUSR1 after writing its checkpoint exits with
`ismctl.system.preemption.PREEMPTED_EXIT_CODE` (75); stopped by Ctrl-C (after its checkpoint, or at
once on a second Ctrl-C) with 130 and one line saying what was kept or lost.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ismctl.system.preemption import (
    INTERRUPT,
    INTERRUPTED_EXIT_CODE,
    PREEMPTED_EXIT_CODE,
    Interrupted,
    Preempted,
)
from ismctl.utils.console import make_console
from ismctl.utils.errors import UserError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Improved shortcut models (iSM): prepare latents, train, sample, evaluate, ablate. "
         "The manual: `ismctl docs`.",
)
recipe_app = typer.Typer(no_args_is_help=True,
                         help="Inspect recipes: the shipped ones, the resolved values and the settable keys.")
app.add_typer(recipe_app, name="recipe")
data_app = typer.Typer(no_args_is_help=True, help="Check prepared data sets.")
app.add_typer(data_app, name="data")
console = make_console()
DEBUG = {"on": False}
# Old option names used in this command: said once it ends (in the error line if it fails, so
# that bad input stays one line).
RENAMED: list[str] = []

GUIDANCE_HELP = "Guidance strength w (delta convention: classic CFG scale s = 1 + w; w=0 is unguided)."
Threads = Annotated[int | None, typer.Option(help="torch intra-op threads (default: OMP_NUM_THREADS, else every usable core, shared by this node's torchrun processes; fewer are faster where other jobs hold cores).")]
Compile = Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the network first (pays off for many steps or samples).")]
Plugins = Annotated[list[str] | None, typer.Option("--plugin", help="A module that registers objectives and is not installed as a package (a module name, found in the working folder too, or a .py file); added to the recipe's objective.plugins (repeatable). docs/extending.md.")]
SLURM = "SLURM (--launch slurm)"
Nodes = Annotated[int | None, typer.Option("--nodes", help="--launch slurm: nodes per job (default 1).", rich_help_panel=SLURM)]
GpusPerNode = Annotated[int | None, typer.Option(help="--launch slurm: GPUs per node (default 0); one rank per GPU unless --nproc-per-node says otherwise.", rich_help_panel=SLURM)]
CpusPerTask = Annotated[int | None, typer.Option(help="--launch slurm: CPU cores per rank (default: the partition's).", rich_help_panel=SLURM)]
TimeLimit = Annotated[str | None, typer.Option("--time", help="--launch slurm: time limit per job, minutes or [D-]HH:MM:SS (default 24:00:00); a job stopped by it checkpoints and is requeued.", rich_help_panel=SLURM)]
Partition = Annotated[str | None, typer.Option(help="--launch slurm: partition.", rich_help_panel=SLURM)]
Account = Annotated[str | None, typer.Option(help="--launch slurm: account.", rich_help_panel=SLURM)]
Qos = Annotated[str | None, typer.Option(help="--launch slurm: quality of service.", rich_help_panel=SLURM)]
Sbatch = Annotated[list[str] | None, typer.Option("--sbatch", help="--launch slurm: an extra #SBATCH option, e.g. --sbatch=--constraint=a100 (repeatable).", rich_help_panel=SLURM)]
LaunchConfig = Annotated[Path | None, typer.Option(help="--launch slurm: a YAML file whose 'launch:' block sets any of these (and setup lines, signal_lead_s); flags win.", rich_help_panel=SLURM)]


def _version(value: bool) -> None:
    if value:
        import ismctl

        console.print(f"ismctl {ismctl.__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback of an error instead of one line (may also follow the command).")] = False,
) -> None:
    DEBUG["on"] = debug


def _renamed(new: int | None, old: int | None, new_name: str, old_name: str) -> int | None:
    """The value of an option that has an old, hidden spelling (kept for one release); the
    old spelling says the new one."""
    if old is None:
        return new
    if new is not None and new != old:
        raise UserError(f"{old_name} {old} and {new_name} {new}: the same option under its old "
                        f"and new name; give only {new_name}")
    RENAMED.append(f"{old_name} is now called {new_name}; the old name will go in a later "
                   "release")
    return old


def _guidance_value(text: str | None) -> float | str | None:
    """``--guidance`` of `sample`: a strength w, or 'best' (the one `ismctl eval` remembered)."""
    if text is None or text.strip().lower() == "best":
        return None if text is None else "best"
    try:
        return float(text)
    except ValueError:
        raise UserError(f"--guidance {text!r}: a strength w >= 0 (e.g. 0.5) or 'best'") from None


def _at_least(value: int | None, minimum: int, name: str) -> None:
    if value is not None and value < minimum:
        raise UserError(f"{name} {value}: must be >= {minimum}")


@contextlib.contextmanager
def _on_ctrl_c(what: str) -> Iterator[None]:
    """Ctrl-C in a command: one line saying what became of its work (typer would exit 130
    without a word)."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(what) from None


def _slurm(launch: str | None, config: Path | None, nproc_per_node: int | None, **flags: object):
    """The SLURM options of ``--launch slurm`` (None without it; its flags alone are an error)."""
    from ismctl.system.slurm import slurm_options

    given = [k for k, v in flags.items() if v] + (["launch_config"] if config else [])
    if launch != "slurm":
        if given:
            raise UserError(f"--{given[0].replace('_', '-')}: only with --launch slurm")
        return None
    if nproc_per_node is None and flags.get("gpus_per_node"):
        nproc_per_node = flags["gpus_per_node"]  # type: ignore[assignment]
    return slurm_options(config, nproc_per_node=nproc_per_node, **flags)


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise UserError(f"{what} {text!r}: expected comma-separated integers, e.g. 1,4,128") from exc


@app.command("prepare-latents")
def prepare_latents_cmd(
    src: Annotated[str, typer.Argument(help="ImageFolder root (e.g. imagenet/train) or 'digits'.")],
    out: Annotated[Path | None, typer.Option(help="Output folder (default data/<name>).")] = None,
    resolution: Annotated[int, typer.Option(help="Centre-crop/resize side in pixels.")] = 256,
    vae: Annotated[str, typer.Option(help="diffusers AutoencoderKL: a Hub id (from the local cache, else downloaded) or a local folder written by save_pretrained (no network needed).")] = "stabilityai/sd-vae-ft-mse",
    batch_size: Annotated[int, typer.Option(help="Images per VAE batch.")] = 32,
    shard_size: Annotated[int, typer.Option(help="Samples per webdataset shard.")] = 1000,
    flip: Annotated[bool, typer.Option(help="Also store the latent of the horizontal flip.")] = True,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    num_workers: Annotated[int | None, typer.Option(help="Image-decoding worker processes (default 4, at most the cores available).")] = None,
    workers: Annotated[int | None, typer.Option(hidden=True, help="Old name of --num-workers.")] = None,
    threads: Threads = None,
) -> None:
    """Encode a dataset into webdataset shards + manifest.json (resumable, torchrun-aware)."""
    from ismctl.data.prepare import default_workers, prepare_latents
    from ismctl.system.runtime import set_threads

    num_workers = _renamed(num_workers, workers, "--num-workers", "--workers")
    _at_least(num_workers, 0, "--num-workers")
    set_threads(threads)

    with _on_ctrl_c("stopped by Ctrl-C; the finished shards are kept and the same command "
                    "continues with the rest"):
        manifest = prepare_latents(
            src, out=out, resolution=resolution, vae=vae, batch_size=batch_size,
            shard_size=shard_size, flip=flip, device=device,
            num_workers=default_workers() if num_workers is None else num_workers)
    console.print(f"[green]prepared[/] {manifest.count} samples, {manifest.num_classes} classes, "
                  f"{len(manifest.shards)} shards, {len(manifest.skipped)} skipped")


@app.command()
def train(
    recipe: Annotated[Path, typer.Argument(help="Recipe: a YAML file, or the name of a shipped recipe (`ismctl recipe list`), e.g. quickstart or ism_xl.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override, e.g. --set optim.lr=2e-4 (repeatable).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run from its newest intact checkpoint (a run stopped before its first checkpoint restarts at step 0); refused if the folder holds no run, or if the recipe changed more than steps, logging, workers.")] = False,
    auto_resume: Annotated[bool, typer.Option(help="Resume when the run has a checkpoint, else start it: one command line to requeue forever.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run of the same name (deleted once the new run has made its first step; kept if it fails before).")] = False,
    progress: Annotated[bool, typer.Option(help="Show the progress bar (plain log lines when stdout is not a terminal).")] = True,
    dry_run: Annotated[bool, typer.Option(help="Make every check the run makes (recipe, data and shard digests, batch split and sOT pool, model, init_from, run folder and its lock, the checkpoint a resume starts from), print the plan (batch per rank, pool, steps, checkpoints, disk) and write nothing.")] = False,
    threads: Threads = None,
    launch: Annotated[str | None, typer.Option(help="'slurm': submit the run as a requeueable SLURM job (needs pip install 'ismctl[slurm]') and return; run again, show its state and submit it again only if it is neither finished nor queued.", rich_help_panel=SLURM)] = None,
    nodes: Nodes = None,
    nproc_per_node: Annotated[int | None, typer.Option(help="--launch slurm: ranks per node (default: --gpus-per-node, else 1).", rich_help_panel=SLURM)] = None,
    gpus_per_node: GpusPerNode = None,
    cpus_per_task: CpusPerTask = None,
    time_limit: TimeLimit = None,
    partition: Partition = None,
    account: Account = None,
    qos: Qos = None,
    sbatch: Sbatch = None,
    launch_config: LaunchConfig = None,
    plugin: Plugins = None,
) -> None:
    """Train a shortcut model (single process, DDP under torchrun, or a SLURM job)."""
    from ismctl.config.recipe import load_recipe
    from ismctl.system.runtime import set_threads

    if launch not in (None, "slurm"):
        raise UserError(f"--launch {launch}: expected 'slurm' (torchrun runs `ismctl train` "
                        "itself: torchrun --nproc_per_node=N -m ismctl train ...)")
    slurm = _slurm(launch, launch_config, nproc_per_node, nodes=nodes,
                   gpus_per_node=gpus_per_node, cpus_per_task=cpus_per_task, time=time_limit,
                   partition=partition, account=account, qos=qos, sbatch=sbatch)
    if launch is None and nproc_per_node is not None:
        raise UserError("--nproc-per-node: only with --launch slurm")
    set_threads(threads)
    resolved = load_recipe(recipe, set_, plugin)
    if slurm is not None and not dry_run:
        if overwrite:
            raise UserError("--overwrite with --launch slurm: a requeued job would overwrite its "
                            "own run; move the old run folder away first")
        from ismctl.tools.cluster import train_on_slurm

        state = train_on_slurm(resolved, str(recipe), slurm, threads, console=console)
        if state.state == "failed":
            raise typer.Exit(1)
        return
    if dry_run:
        from ismctl.tools.recipe_info import plan_training, print_plan

        print_plan(plan_training(resolved, str(recipe), resume="auto" if auto_resume else resume,
                                 overwrite=overwrite), console)
        return
    from ismctl.training.trainer import train as run_training

    # In the training loop Ctrl-C checkpoints (ismctl.system.preemption); before it, the start is
    # taken back (ismctl.training.runfolder).
    with _on_ctrl_c("stopped by Ctrl-C before the first training step; the run folder is as "
                    "it was"):
        run_dir = run_training(resolved, str(recipe),
                               resume="auto" if auto_resume else resume, overwrite=overwrite,
                               progress=progress)
    console.print(f"[green]run written to[/] {escape(str(run_dir))}")


@app.command()
def sample(
    run: Annotated[Path, typer.Argument(help="Run directory or checkpoint folder.")],
    steps: Annotated[int, typer.Option(help="Sampling steps N: a power of two up to objective.base_steps (128) for sm and iSM runs, any N >= 1 for MeanFlow runs.")] = 4,
    guidance: Annotated[str | None, typer.Option(help=GUIDANCE_HELP + " 'best': the w that `ismctl eval` remembered for N steps (refused when there is none). Default: that w if there is one, else the recipe's eval.default_guidance.")] = None,
    double_guidance: Annotated[bool, typer.Option(help="Runs with guidance baked into training (sm, meanflow with omega): apply CFG on top of it (guides twice; not the authors' protocol).")] = False,
    num_samples: Annotated[int | None, typer.Option(help="Number of images (default 64).")] = None,
    num: Annotated[int | None, typer.Option(hidden=True, help="Old name of --num-samples.")] = None,
    class_: Annotated[int | None, typer.Option("--class", help="Class index for every image (default: class-balanced).")] = None,
    out: Annotated[Path, typer.Option(help="Output .png (grid), .npz (ADM format) or DIR/ (one PNG per sample, class in the name).")] = Path("samples.png"),
    which: Annotated[str, typer.Option(help="Weights: inference (EMA), target (EMA) or online.")] = "inference",
    seed: Annotated[int | None, typer.Option(help="Noise and label seed (default: the recipe's eval.seed).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per sampling batch (default: the recipe's eval.batch_size).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N (default: the recipe's train.device).")] = None,
    scale: Annotated[int | None, typer.Option(help="A .png grid: each pixel becomes SCALE x SCALE pixels (nearest neighbours); default: enough for the grid's longer side to reach 512 pixels.")] = None,
    threads: Threads = None,
    compile_: Compile = False,
) -> None:
    """Generate images from a trained run. A folder or an .npz is written as the samples are
    made: an interrupted job keeps them, and the same command continues it."""
    from ismctl.runs.checkpoint import load_for_sampling
    from ismctl.sampling.pngdir import is_png_folder
    from ismctl.sampling.protocol import choose_point, extrapolation_note
    from ismctl.sampling.streamout import write_samples
    from ismctl.system.runtime import set_threads

    num_samples = _renamed(num_samples, num, "--num-samples", "--num")
    num_samples = 64 if num_samples is None else num_samples
    _at_least(steps, 1, "--steps")
    _at_least(num_samples, 1, "--num-samples")
    _at_least(batch_size, 1, "--batch-size")
    _at_least(scale, 1, "--scale")
    set_threads(threads)
    if out.suffix not in (".npz", ".png") and not is_png_folder(out):
        raise UserError(f"--out {out}: use a .png (grid) or .npz (ADM samples) file name, or a "
                        "folder name without an extension (one PNG per sample)")
    if scale is not None and out.suffix != ".png":
        raise UserError(f"--scale {scale}: only for a .png grid (--out {out} keeps every "
                        "sample at its own size)")
    loaded = load_for_sampling(run, which=which, device=device, compile=compile_)
    ev = loaded.recipe.eval
    if class_ is not None and not 0 <= class_ < loaded.manifest.num_classes:
        raise UserError(f"--class {class_}: out of range 0..{loaded.manifest.num_classes - 1}")
    point, source = choose_point(loaded.recipe, loaded.run_dir, steps, _guidance_value(guidance),
                                 double_guidance)
    if note := extrapolation_note(loaded.recipe, [point]):
        _say("[bold yellow]warning:[/]", note)
    with _on_ctrl_c(f"stopped by Ctrl-C; {out} not written"):
        write_samples(loaded, out, num_samples, steps, point,
                      ev.seed if seed is None else seed,
                      ev.batch_size if batch_size is None else batch_size, class_, scale)
    console.print(f"[green]wrote[/] {escape(str(out))} ({num_samples} images, "
                  f"{escape(point.label())}, guidance from {escape(source)}, weights: "
                  f"{escape(which)}, step {loaded.step})")


@app.command("eval")
def eval_cmd(
    run: Annotated[Path | None, typer.Argument(help="Run or checkpoint (default: the latest run).")] = None,
    steps: Annotated[str | None, typer.Option(help="Comma-separated step counts (default: the recipe's eval.steps).")] = None,
    guidance: Annotated[str | None, typer.Option(help=GUIDANCE_HELP + " Numbers and START:STOP:STEP ranges, e.g. 0:4:0.5 (default: the recipe's eval.guidance); the best per step count is reported and remembered. 'best': each step count at its remembered best.")] = None,
    double_guidance: Annotated[bool, typer.Option(help="Runs with guidance baked into training (sm, meanflow with omega): apply CFG on top of it (guides twice; not the authors' protocol).")] = False,
    select_by: Annotated[str | None, typer.Option(help="Value that picks the best w per step count (default: fid, else fd-dinov2, else cfd-digits, ...).")] = None,
    remember: Annotated[bool | None, typer.Option("--remember/--no-remember", help="Store the best w per step count in the run for `ismctl sample` (latest checkpoint only). Default: when every point has at least the recipe's eval.num_samples samples, so a quick, smaller evaluation does not replace it.")] = None,
    num_samples: Annotated[int | None, typer.Option(help="Samples per point (default: the recipe's eval.num_samples).")] = None,
    ref: Annotated[str | None, typer.Option(help="Reference: ADM .npz, image folder, or (default: the recipe's eval.ref, else) the training shards.")] = None,
    metrics: Annotated[str | None, typer.Option(help="fid,isc,prc,fd-dinov2 (digits adds acc,fd-digits,cfd-digits; default: the recipe's eval.metrics).")] = None,
    out: Annotated[Path | None, typer.Option(help="results.json path (default: RUN/eval/step-N/results.json). One evaluation per file: a file of another evaluation (other weights, samples, seed, reference or metrics) is refused; the points of the same evaluation found there are not computed again.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace what --out holds (another evaluation, or finished points of this one) instead of refusing or reusing it.")] = False,
    inception_weights: Annotated[str | None, typer.Option(help="Local Inception-v3 weights file (offline FID).")] = None,
    save_npz: Annotated[bool, typer.Option(help="Also write each sample set as an ADM .npz.")] = False,
    save_png: Annotated[bool, typer.Option(help="Also write each sample set as a folder of PNGs (one per sample, class in the name).")] = False,
    which: Annotated[str, typer.Option(help="Weights: inference (EMA), target (EMA) or online.")] = "inference",
    batch_size: Annotated[int | None, typer.Option(help="Sampling batch size per rank (default: the recipe's eval.batch_size).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of noise and labels (default: the recipe's eval.seed).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N (default: the recipe's train.device).")] = None,
    threads: Threads = None,
    compile_: Compile = False,
) -> None:
    """FID / IS / precision-recall at chosen step counts and guidance strengths."""
    from ismctl.evaluation import evaluate
    from ismctl.objectives.guidance import parse_guidance
    from ismctl.system.runtime import set_threads

    _at_least(num_samples, 2, "--num-samples")
    _at_least(batch_size, 1, "--batch-size")
    set_threads(threads)
    with _on_ctrl_c("stopped by Ctrl-C; every point finished so far is kept (a .partial file "
                    "beside the results) and the same command continues with the rest"):
        evaluate(None if run is None else str(run),
                 None if steps is None else _int_list(steps, "--steps"),
                 None if guidance in (None, "best") else parse_guidance(guidance), num_samples,
                 ref, None if metrics is None else [m.strip() for m in metrics.split(",")],
                 out, inception_weights, save_npz, batch_size, seed, device=device,
                 double_guidance=double_guidance, select_by=select_by, remember=remember,
                 at_best=guidance == "best", compile=compile_, which=which, save_png=save_png,
                 overwrite=overwrite)


@app.command()
def ablate(
    recipe: Annotated[Path | None, typer.Argument(help="Full iSM recipe: a file or a shipped recipe's name (default ism_xl).")] = None,
    disable: Annotated[str | None, typer.Option(help="Components to switch off, comma-separated: intrinsic-guidance, interval-guidance, wavelet, sot, twin-ema.")] = None,
    cumulative: Annotated[bool, typer.Option(help="The paper's table: baseline, then each component added in turn.")] = False,
    baseline: Annotated[str | None, typer.Option(help="Recipe of the cumulative table's first row, trained and evaluated like the others (default: sm_<size>.yaml beside an ism_<size>.yaml recipe, the published SM settings; else 'components-off', the recipe with its five components off).")] = None,
    launch: Annotated[str | None, typer.Option(help="'torchrun': train/evaluate each variant as a torchrun job, one after another; 'slurm': each run (variant x seed) as a SLURM job (one job array), submitted at once (needs pip install 'ismctl[slurm]'); run the command again to see the cells' states and resubmit only those neither done nor queued.")] = None,
    nproc_per_node: Annotated[int, typer.Option(help="GPUs (ranks) per variant with --launch torchrun or slurm.")] = 1,
    sweep: Annotated[str | None, typer.Option(help="One variant per value of a recipe field, e.g. guidance.w_max=2,3.5,5 (brackets keep list values: loss.detail_weights=[4,2,1],2); one value adds a single variant.")] = None,
    seeds: Annotated[str | None, typer.Option(help="Training seeds, one run per variant and seed, e.g. 0,1,2 (tables show mean +- sd).")] = None,
    report: Annotated[str, typer.Option(help="File stem of the report in the ablation folder (several studies can share a folder and its runs).")] = "ablation",
    nnodes: Annotated[int, typer.Option(help="Nodes per variant with --launch torchrun; every node runs this command.")] = 1,
    node_rank: Annotated[int, typer.Option(help="This node's rank, 0..nnodes-1 (node 0 writes the report).")] = 0,
    rdzv_endpoint: Annotated[str | None, typer.Option(help="HOST:PORT where the nodes meet (c10d rendezvous), usually node 0's.")] = None,
    rdzv_id: Annotated[str, typer.Option(help="Rendezvous id prefix shared by all nodes of this ablation.")] = "ismctl-ablate",
    rdzv_backend: Annotated[str, typer.Option(help="torchrun rendezvous backend.")] = "c10d",
    method: Annotated[list[str] | None, typer.Option("--method", help="Compare methods instead of ablating one recipe: NAME:RECIPE[:KEY=V1,V2,...], a recipe (any objective) and its knob grid, one variant per value (repeatable; the first method's evaluation settings for all). E.g. --method sm:sm_quickstart:guidance.cfg_scale=1,1.5,2 --method ism:quickstart.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override applied to every variant (repeatable).")] = None,
    plugin: Plugins = None,
    dry_run: Annotated[bool, typer.Option(help="Print the variants, their runs and the points each is evaluated at; train and write nothing.")] = False,
    out: Annotated[Path | None, typer.Option(help="Ablation folder (default runs/ablate-<recipe>, runs/compare-<methods> with --method).")] = None,
    eval_num_samples: Annotated[int | None, typer.Option(help="Samples per evaluation point (default: the recipe's).")] = None,
    inception_weights: Annotated[str | None, typer.Option(help="Local Inception-v3 weights file (offline FID).")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    threads: Threads = None,
    status: Annotated[bool, typer.Option(help="--launch slurm: submit nothing; show each cell's state and write the report of the variants finished so far.", rich_help_panel=SLURM)] = False,
    nodes_: Nodes = None,
    gpus_per_node: GpusPerNode = None,
    cpus_per_task: CpusPerTask = None,
    time_limit: TimeLimit = None,
    partition: Partition = None,
    account: Account = None,
    qos: Qos = None,
    sbatch: Sbatch = None,
    launch_config: LaunchConfig = None,
) -> None:
    """Train and evaluate recipe variants (iSM components switched off, a swept field, or
    several methods' recipes and knob grids), each at its own best guidance per step count,
    over one or more seeds."""
    from ismctl.system.launch import Torchrun
    from ismctl.system.runtime import set_threads
    from ismctl.tools.ablate import run_ablation

    _at_least(eval_num_samples, 2, "--eval-num-samples")
    slurm = _slurm(launch, launch_config, None if nproc_per_node == 1 else nproc_per_node,
                   nodes=nodes_,
                   gpus_per_node=gpus_per_node, cpus_per_task=cpus_per_task, time=time_limit,
                   partition=partition, account=account, qos=qos, sbatch=sbatch)
    if status and slurm is None:
        raise UserError("--status: only with --launch slurm")
    set_threads(threads)
    nodes = Torchrun(nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint,
                     rdzv_id=rdzv_id, rdzv_backend=rdzv_backend)
    run_ablation(None if recipe is None else str(recipe),
                 None if disable is None else [c.strip() for c in disable.split(",") if c.strip()],
                 cumulative, launch=launch, nproc_per_node=nproc_per_node, overrides=set_,
                 out=out, eval_num_samples=eval_num_samples, inception_weights=inception_weights,
                 progress=progress, seeds=None if seeds is None else _int_list(seeds, "--seeds"),
                 sweep=sweep, nodes=nodes, threads=threads, report_name=report,
                 baseline=baseline, slurm=slurm, submit=not status,
                 methods=method, plugins=plugin, dry_run=dry_run)


@app.command()
def bench(
    out: Annotated[Path | None, typer.Option(help="JSON output file (default bench.json; gpu-check.json with --full).")] = None,
    presets: Annotated[str | None, typer.Option(help="Comma-separated presets (default: tiny/2 on CPU, where tiny/2,B/2 adds ~10 min on 2 cores; B/2,XL/2 on GPU).")] = None,
    quick: Annotated[bool, typer.Option(help="A reduced run (tiny preset, few iterations).")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    threads: Threads = None,
    full: Annotated[bool, typer.Option(help="The GPU check: B/2 and XL/2, eager/compiled x fp32/bf16, plus a 200-step run (needs CUDA).")] = False,
) -> None:
    """Step-time split, component overheads, loader and sampling throughput, MFU on GPU."""
    from ismctl.tools.bench import run_bench
    from ismctl.utils.fileio import check_writable

    names = None if presets is None else [p.strip() for p in presets.split(",")]
    out = out or Path("gpu-check.json" if full else "bench.json")
    check_writable(out, "--out")
    if full:
        from ismctl.system.runtime import set_threads
        from ismctl.tools.gpu_check import PRESETS, CheckFailed, run_gpu_check

        set_threads(threads)
        try:
            run_gpu_check(out, names or PRESETS, device=device)
        except CheckFailed as exc:
            make_console(stderr=True).print(f"[bold red]gpu-check failed:[/] {escape(str(exc))}", soft_wrap=True,
                                       highlight=False)
            raise typer.Exit(1) from exc
        return
    run_bench(out, names, quick=quick, device=device, threads=threads)


@app.command("export")
def export_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory or checkpoint folder.")],
    out: Annotated[Path, typer.Option(help="Folder to write (config.json, model.safetensors, README.md model card, ...).")],
    which: Annotated[str, typer.Option(help="Weights: inference (EMA), target (EMA) or online.")] = "inference",
    results: Annotated[Path | None, typer.Option(help="Evaluation results.json for the model card (default: the one `ismctl eval` wrote for this checkpoint, if any).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out folder.")] = False,
) -> None:
    """Write a self-contained model folder that `ismctl.load_model` loads without the run."""
    from ismctl.tools.export import export_run

    folder = export_run(run, out, which=which, results=results, overwrite=overwrite)
    console.print(f"[green]exported[/] {escape(str(run))} to {escape(str(folder))}")


@app.command("docs")
def docs_cmd(
    name: Annotated[str | None, typer.Argument(help="A document, e.g. method (docs/method.md, which the help text and recipes cite as 'method §N'); without it, the list.")] = None,
    path: Annotated[bool, typer.Option("--path", help="Print where the file is instead of its text.")] = False,
) -> None:
    """The manual shipped with ismctl (docs/*.md), e.g. `ismctl docs method`."""
    from ismctl.tools.docs import find_doc, shipped_docs, title

    if name is None:
        docs = shipped_docs()
        width = max((len(n) for n in docs), default=0)
        for doc, file in docs.items():
            print(f"{doc:<{width}}  {title(file)}")
        return
    file = find_doc(name)
    print(file if path else file.read_text(encoding="utf-8"), end="\n" if path else "")


@data_app.command("check")
def data_check(
    folder: Annotated[Path, typer.Argument(help="A folder written by `ismctl prepare-latents`.")],
) -> None:
    """Check every shard of a prepared data set: its sha256 against manifest.json, every
    sample readable with the manifest's shape and a label in range, the counts."""
    from ismctl.data.manifest import read_manifest
    from ismctl.data.verify import REPAIR, check_dataset
    from ismctl.utils.progress import progress_bar

    shards = len(read_manifest(folder).shards)
    with progress_bar(f"checking {folder}", total=shards, unit="shard") as bar:
        report = check_dataset(folder, on_shard=bar.advance)
    for problem in report.problems:
        make_console(stderr=True).print(problem, soft_wrap=True, highlight=False, markup=False)
    if report.bad:
        raise UserError(f"{folder}: {len(report.bad)} of {report.shards} shards are damaged; "
                        f"{REPAIR.replace('it (', 'them (')}")
    console.print(f"{folder}: {report.samples:,} samples in {report.shards} shards "
                  f"({report.bytes / 1e6:,.1f} MB), all intact (sha256 as in manifest.json, "
                  "every sample readable)", highlight=False, markup=False, soft_wrap=True)


@recipe_app.command("show")
def recipe_show(
    recipe: Annotated[Path | None, typer.Argument(help="Recipe YAML or a shipped recipe's name (default: the built-in defaults).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override, e.g. --set optim.lr=2e-4 (repeatable).")] = None,
    plugin: Plugins = None,
) -> None:
    """Every field of the resolved recipe, its value and where it came from."""
    from ismctl.tools.recipe_info import print_resolved, resolve_with_sources

    print_resolved(*resolve_with_sources(recipe, set_, plugin), console)


@recipe_app.command("list")
def recipe_list() -> None:
    """The recipes shipped with ismctl, one line each: the name to pass to `train`, and what
    it is."""
    from ismctl.tools.recipe_info import print_shipped

    print_shipped(console)


@recipe_app.command("keys")
def recipe_keys(plugin: Plugins = None) -> None:
    """Every settable recipe key (for the YAML file or --set) with its default and meaning, and
    the own keys of every registered plugin objective."""
    from ismctl.tools.recipe_info import print_keys

    print_keys(console, plugin)


def main() -> None:
    # --debug may follow the command (`ismctl train r.yaml --debug`); the root option reads it.
    if "--debug" in sys.argv[1:]:
        sys.argv = [sys.argv[0], "--debug", *[a for a in sys.argv[1:] if a != "--debug"]]
    DEBUG["on"] = False
    RENAMED.clear()
    try:
        app()
    except UserError as exc:
        if DEBUG["on"]:
            raise
        _say("[bold red]error:[/]", str(exc) + "".join(f" (note: {n})" for n in RENAMED))
        sys.exit(2)
    except SystemExit as stop:
        for note in RENAMED if not stop.code else []:
            _say("[yellow]note:[/]", note)
        raise
    except Preempted as exc:
        if exc.signal_name == INTERRUPT.name:
            _say("[bold yellow]interrupted:[/]", str(exc))
            sys.exit(INTERRUPTED_EXIT_CODE)
        _say("[bold yellow]preempted:[/]", str(exc))
        sys.exit(PREEMPTED_EXIT_CODE)
    except Interrupted as exc:
        # Ctrl-C in a command that says what it kept or lost (a bare KeyboardInterrupt is
        # turned into exit code 130 by typer itself).
        if DEBUG["on"]:
            raise
        _say("[bold yellow]interrupted:[/]", str(exc) or "stopped by Ctrl-C")
        sys.exit(INTERRUPTED_EXIT_CODE)


def _say(label: str, text: str) -> None:
    """One line on stderr: a styled label, then ``text`` as it is (markup escaped, so
    ``'ismctl[fid]'`` or ``--set a=[bold]`` print as written)."""
    make_console(stderr=True).print(f"{label} {escape(text)}", soft_wrap=True, highlight=False)
