"""``ismctl export RUN --out DIR``: a trained model as a self-contained folder.

    DIR/model.safetensors   the inference-EMA weights, with the metadata of every ismctl
                            weights file (architecture, recipe, data summary, step, role)
    DIR/config.json         architecture, what sampling needs (objective, sampler, classes,
                            input shape, encoder and latent scale), the guidance per step
                            count, the conventions that running the network without ismctl
                            needs (embedding scales, the jump-size table, the null class,
                            the sampler, the output range), the resolved recipe and the data
                            summary
    DIR/guidance.json       the run's remembered best guidance per step count (when evaluated)
    DIR/results.json        the evaluation of the exported checkpoint (when found)
    DIR/recipe.yaml         the resolved recipe
    DIR/README.md           a model card: what it is, how it was trained, how well it samples

:func:`ismctl.tools.api.load_model` loads the folder without the run. The folder is written under
a temporary name next to ``DIR`` and renamed into place, so ``DIR`` is either complete or
absent. The encoder (e.g. the Stable Diffusion VAE) is named, not copied.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

import ismctl
from ismctl.config.recipe import Recipe, load_recipe
from ismctl.data.encoders import IDENTITY
from ismctl.data.manifest import Manifest, read_manifest
from ismctl.evaluation.report import value_names
from ismctl.networks.model import FREQ_DIM, num_levels
from ismctl.networks.unwrap import unwrap_model
from ismctl.objectives import get_objective, sampling
from ismctl.runs.checkpoint import (
    WEIGHT_FILES,
    data_summary,
    file_sha256,
    load_weights,
    model_config,
    model_from_recipe,
    recipe_sha256,
    resolve_checkpoint,
    save_weights,
    verified_weights,
    weights_metadata,
)
from ismctl.sampling.protocol import BEST_FILE, default_guidance, read_best, run_sampler
from ismctl.tools.api import EXPORT_CONFIG, EXPORT_FORMAT, EXPORT_WEIGHTS
from ismctl.utils.errors import UserError
from ismctl.utils.fileio import check_writable


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])


def find_results(run_dir: Path, step: int) -> Path | None:
    """The evaluation of checkpoint ``step`` that ``ismctl eval`` writes by default."""
    path = run_dir / "eval" / f"step-{step:07d}" / "results.json"
    return path if path.is_file() else None


def _read_results(path: Path) -> dict[str, Any]:
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"--results {path}: not readable JSON ({exc})") from exc
    if not isinstance(results, dict) or not isinstance(results.get("points"), list) or \
            not isinstance(results.get("metrics"), list):
        raise UserError(f"--results {path}: not a results.json written by `ismctl eval`")
    return results


def guidance_table(recipe: Recipe, best: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per step count, the w that sampling uses by default and where it comes from."""
    steps = sorted({*best, *recipe.eval.default_guidance, *recipe.eval.steps})
    table = {}
    for s in steps:
        if s in best:
            b = best[s]
            table[str(s)] = {"guidance": float(b["guidance"]), "sampler": b["sampler"],
                             "source": f"{BEST_FILE}: best {b.get('metric', '?')} "
                                       f"{_fmt(b.get('value'))} at step "
                                       f"{b.get('checkpoint_step', '?')}"}
        else:
            conditional = run_sampler(recipe) == "conditional"
            table[str(s)] = {"guidance": 0.0 if conditional else default_guidance(recipe, s),
                             "sampler": run_sampler(recipe),
                             "source": "recipe eval.default_guidance"}
    return table


def _fmt(value: Any) -> str:
    if not isinstance(value, int | float) or value != value:
        return "-"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def _results_markdown(results: dict[str, Any]) -> list[str]:
    names = value_names(results["metrics"])
    best = results.get("best", {})
    settings = results.get("settings", {})
    lines = [f"{settings.get('num_samples', '?')} samples per point, checkpoint step "
             f"{results.get('checkpoint', {}).get('step', '?')}; * marks the best "
             f"{results.get('select_by', '')} per step count.", "",
             "| steps | w | sampler | " + " | ".join(names) + " |",
             "|---:|---:|---|" + "---:|" * len(names)]
    for p in sorted(results["points"], key=lambda p: (p["steps"], p["sampler"], p["guidance"])):
        b = best.get(str(p["steps"]))
        star = "*" if b and (b["guidance"], b["sampler"]) == (p["guidance"], p["sampler"]) else ""
        lines.append(f"| {p['steps']} | {p['guidance']:g}{star} | {p['sampler']} | "
                     + " | ".join(_fmt(p["metrics"].get(n)) for n in names) + " |")
    return lines


def model_card(name: str, config: dict[str, Any], recipe: Recipe,
               results: dict[str, Any] | None, num_params: int) -> str:
    """The export's README.md."""
    s, m, data = config["sampling"], config["model"], config["data"]
    obj = recipe.objective
    kind = get_objective(obj.mode).description or f"A {obj.mode} model"
    steps = (f"in 1 to {obj.base_steps} steps (powers of two)"
             if sampling(recipe).steps == "dyadic" else "in any number of steps")
    space = (f"{data['encoder']} latents ({s['in_channels']}x{s['input_size']}x"
             f"{s['input_size']}, scale factor {data['scale_factor']:g})"
             if data["encoder"] != IDENTITY else
             f"pixels ({s['in_channels']}x{s['input_size']}x{s['input_size']})")
    lines = [
        f"# {name}", "",
        f"{kind}, backbone {m['preset']} ({num_params / 1e6:.1f} M parameters), "
        f"class-conditional over {data['num_classes']} classes, sampling {space} "
        f"{steps}. Exported by ismctl "
        f"{config['ismctl_version']}.", "",
        "## Use", "",
        "```python",
        "from ismctl import load_model",
        "model = load_model(\"path/to/this/folder\")  # device=\"cuda\" for a GPU",
        "images = model.sample(num=16, steps=4, class_labels=3)  # uint8 (16, H, W, C)",
        "```", "",
        "Without `guidance`, sampling uses the guidance below for its step count (the nearest "
        "listed step count otherwise). Guidance is the delta convention: w = 0 is unguided, "
        "classic CFG scale s = 1 + w.",
    ]
    if data["encoder"] != IDENTITY:
        lines += ["", f"Decoding needs the encoder `{data['encoder']}` (loaded by diffusers from "
                      "its cache or the Hugging Face Hub); it is not part of this folder."]
    lines += ["", "## Training", "",
              f"- checkpoint step {config['step']} of train.steps {recipe.train.steps}, "
              f"global batch {recipe.data.batch_size}, weights: {config['role']} "
              f"(inference EMA decay {recipe.ema.inference_decay:g})",
              f"- objective {obj.mode}, base_steps {obj.base_steps}, loss {recipe.loss.name}, "
              f"guidance w in training up to {recipe.guidance.w_max:g}",
              f"- recipe sha256 `{config['recipe_sha256']}` (the resolved recipe: "
              "recipe.yaml and below)",
              f"- weights sha256 `{config['weights_sha256']}`", "",
              "## Guidance per step count", "",
              "| steps | w | sampler | chosen by |", "|---:|---:|---|---|"]
    lines += [f"| {k} | {v['guidance']:g} | {v['sampler']} | {v['source']} |"
              for k, v in config["sampling"]["guidance"].items()]
    lines += ["", "## Evaluation", ""]
    lines += _results_markdown(results) if results else [
        "Not evaluated (no results.json for this checkpoint; `ismctl eval RUN` writes one)."]
    lines += ["", "## Recipe", "", "```yaml",
              yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def conventions(network: torch.nn.Module, recipe: Recipe, manifest: Manifest) -> dict[str, Any]:
    """What running the exported network needs beyond its weights and shapes, stated so that
    it can be reimplemented without ismctl (``docs/export.md``; ``docs/standalone_sampler.py``
    does it in plain PyTorch)."""
    net = unwrap_model(network)
    table = not net.continuous_jumps
    levels = num_levels(net.base_steps)
    identity = manifest.encoder == IDENTITY
    return {
        "network": "F(x_t, t, d, y, w): the average velocity of a jump of size d starting at "
                   "time t, so x_{t+d} = x_t + d F. Inputs: x (B, C, H, W) float, t, d, w (B,) "
                   "float, y (B,) long.",
        "time": "t runs from noise (t = 0, x ~ N(0, I)) to data (t = 1); x_t = (1 - t) x0 + "
                "t x1",
        "embeddings": {
            "sum": "the adaLN conditioning is t_embedder(t) + d_embedder(d) + "
                   "y_embedder(y) + w_embedder(w)",
            "sinusoid": f"features [cos(a f), sin(a f)], f_i = exp(-ln("
                        f"{net.t_embedder.max_period:g}) i / {FREQ_DIM // 2}) for i < "
                        f"{FREQ_DIM // 2}, a = scale x value; then Linear, SiLU, Linear "
                        "(mlp.0, mlp.2)",
            "max_period": net.t_embedder.max_period,
            "t_scale": net.t_embedder.scale,
            "w_scale": net.w_embedder.scale,
            "d": ({"kind": "table",
                   "rows": [0.0] + [2.0 ** -k for k in range(levels - 1)],
                   "rule": f"row 0 is d = 0 (the instantaneous velocity); row k + 1 is "
                           f"d = 2^-k for k = 0..{levels - 2}; any other d is not an input"}
                  if table else
                  {"kind": "continuous", "scale": net.d_embedder.scale,
                   "rule": "any d in [0, 1], embedded by a sinusoid like t"}),
            "null_class": net.num_classes,
            "label_rows": net.num_classes + 1,
        },
        "blocks": "DiT with adaLN-Zero: LayerNorm (no affine, eps 1e-6); modulation "
                  "SiLU then Linear to 6 D, chunks (shift1, scale1, gate1, shift2, scale2, "
                  "gate2); x + gate1 attn(norm1(x) (1 + scale1) + shift1), then the MLP "
                  "(GELU, tanh approximation) likewise; attention with fused qkv, "
                  "scaled by 1/sqrt(head_dim); fixed 2D sin-cos positions (pos_embed)",
        "output": "final layer: LayerNorm, modulation to (shift, scale), Linear to "
                  "patch x patch x C per token; tokens (g, g) -> (B, g, g, p, p, C) -> "
                  "permute (0, 5, 1, 3, 2, 4) -> (B, C, g p, g p)",
        "sampler": {
            "mode": run_sampler(recipe),
            "steps": (f"N a power of two from 1 to {net.base_steps}" if table
                      else "any N >= 1"),
            "jumps": sampling(recipe).jumps,
            "update": "x_0 ~ N(0, I); for i < N: x <- x + (1 / N) F(x, i / N, d_i, y, w) with "
                      "d_i = 1 / N (jumps 'step') or d_i = 1 - i / N (jumps 'to_end': the "
                      "jump to the data end, of which each step goes 1 / N)",
            "intrinsic": "one pass, w given to the network (guidance.json or the table "
                         "below gives w per N)",
            "conditional": "one pass with w = 0 (guidance is baked into the weights)",
            "cfg": "two passes with w = 0, labels y and null_class: v = v_y + w (v_y - v_null)",
            "flow_jump": net.flow_jump,
            "flow_cfg": "N Euler steps of the instantaneous velocity with two-pass CFG: as cfg, "
                        "but d = flow_jump at every step (0, or 1/M for an sm network, whose "
                        "flow is trained at the finest jump's embedding)",
            "guidance_convention": "delta: CFG scale s = 1 + w",
        },
        "output_range": ("the sampled x is the image in [-1, 1]: uint8 = round((clamp(x, -1, "
                         "1) + 1) 127.5)" if identity else
                         f"the sampled x is a VAE latent times scale_factor "
                         f"({manifest.scale_factor:g}): decode x / scale_factor with "
                         f"{manifest.encoder} to an image in [-1, 1], then uint8 = "
                         "round((clamp(image, -1, 1) + 1) 127.5)"),
        "scale_factor": manifest.scale_factor,
        "encoder": manifest.encoder,
    }


def export_run(run: str | Path, out: str | Path, which: str = "inference",
               results: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write the export folder ``out`` for a run or checkpoint; returns ``out``.

    ``which`` picks the weights (the inference EMA by default; an EMA the recipe switched
    off falls back to the online weights). ``results``: an evaluation results.json (default:
    the one ``ismctl eval`` wrote for this checkpoint, if any).
    """
    if which not in WEIGHT_FILES:
        raise UserError(f"--which {which!r}: choose from {', '.join(WEIGHT_FILES)}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"--out {out}: already exists; pass --overwrite to replace it")
    check_writable(out, "--out", folder=True)
    run_dir, ckpt = resolve_checkpoint(run)
    recipe = load_recipe(run_dir / "recipe.yaml")
    manifest = read_manifest(run_dir / "manifest.json")
    step = _step_of(ckpt)
    role = which
    weights_file = ckpt / WEIGHT_FILES[which]
    if not weights_file.is_file():
        role, weights_file = "online", ckpt / WEIGHT_FILES["online"]
    if not weights_file.is_file():
        raise UserError(f"{ckpt}: no weights file {weights_file.name} in this checkpoint")
    verified_weights(run_dir, ckpt, weights_file)
    network = model_from_recipe(recipe, manifest)
    load_weights(network, weights_file)
    results_path = Path(results) if results is not None else find_results(run_dir, step)
    if results_path is not None and not results_path.is_file():
        raise UserError(f"--results {results_path}: not found")
    evaluation = _read_results(results_path) if results_path is not None else None
    best = read_best(run_dir)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_weights(network, tmp / EXPORT_WEIGHTS,
                     weights_metadata(network, role, step, recipe, manifest))
        config = {
            "format": EXPORT_FORMAT, "ismctl_version": ismctl.__version__,
            "weights": EXPORT_WEIGHTS, "weights_sha256": file_sha256(tmp / EXPORT_WEIGHTS),
            "role": role, "step": step, "recipe_sha256": recipe_sha256(recipe),
            "model": {"preset": recipe.model.preset, **model_config(network)},
            "sampling": {
                "objective_mode": recipe.objective.mode, "sampler": run_sampler(recipe),
                "base_steps": recipe.objective.base_steps,
                "num_classes": manifest.num_classes, "input_size": manifest.latent_size,
                "in_channels": manifest.channels, "encoder": manifest.encoder,
                "scale_factor": manifest.scale_factor, "resolution": manifest.resolution,
                "guidance_convention": "delta: guided v = v_c + w (v_c - v_null), "
                                       "CFG scale 1 + w",
                "guidance": guidance_table(recipe, best),
            },
            "conventions": conventions(network, recipe, manifest),
            "data": data_summary(manifest),
            "recipe": recipe.model_dump(mode="json"),
            "source": {"run": str(run_dir), "checkpoint": str(ckpt),
                       "results": None if results_path is None else str(results_path)},
        }
        (tmp / EXPORT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "recipe.yaml").write_text(
            yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
        if (run_dir / BEST_FILE).is_file():
            shutil.copyfile(run_dir / BEST_FILE, tmp / BEST_FILE)
        if results_path is not None:
            shutil.copyfile(results_path, tmp / "results.json")
        num_params = sum(p.numel() for p in network.parameters())
        (tmp / "README.md").write_text(
            model_card(run_dir.name, config, recipe, evaluation, num_params))
        if out.exists():
            old = out.parent / f".old-{out.name}-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
