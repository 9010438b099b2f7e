"""The Python API: load a run, a checkpoint or an ismctl weights file and sample in three
lines; the images are the command line's (same sampler, noise, labels and guidance)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ismctl import load_model
from ismctl.config.recipe import load_recipe, save_recipe
from ismctl.data.manifest import read_manifest
from ismctl.runs.checkpoint import (
    WEIGHT_FILES,
    list_checkpoints,
    load_for_sampling,
    model_from_recipe,
    save_checkpoint,
)
from ismctl.sampling.generate import generate_images, image_grid
from ismctl.sampling.protocol import choose_point, remember_best
from ismctl.utils.errors import UserError

REPO = Path(__file__).resolve().parent.parent
QUICK = REPO / "recipes" / "quickstart.yaml"


def make_run(root: Path, name: str = "api", step: int = 4) -> Path:
    """A run folder as training leaves it (recipe, manifest, one checkpoint with the three
    weight sets), with random weights: sampling and loading see a non-trivial network
    without the cost of training one."""
    from ismctl.data.prepare import prepare_latents

    data = root / "data"
    if not (data / "manifest.json").is_file():
        prepare_latents("digits", out=data, progress=False)
    recipe = load_recipe(QUICK, [f"data.path={data}", f"run.root={root}", f"run.name={name}"])
    run_dir = root / name
    run_dir.mkdir(parents=True)
    save_recipe(recipe, run_dir / "recipe.yaml")
    shutil.copyfile(data / "manifest.json", run_dir / "manifest.json")
    manifest = read_manifest(data)
    nets = {}
    for i, role in enumerate(WEIGHT_FILES):
        torch.manual_seed(i)
        net = model_from_recipe(recipe, manifest)
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0.0, 0.05)
        nets[role] = net
    save_checkpoint(run_dir, step, nets, {"step": step, "recipe": recipe.model_dump(mode="json")})
    return run_dir


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs"))


def test_three_lines_give_the_command_lines_images(run: Path) -> None:
    model = load_model(run, device="cpu")
    images = model.sample(num=6, steps=4, class_labels=np.int64(3), guidance=0.5, device="cpu")
    assert images.shape == (6, 8, 8, 1) and images.dtype == torch.uint8
    # The same as the sample command's path: load_for_sampling + generate_images.
    loaded = load_for_sampling(run, device="cpu")
    point, _ = choose_point(loaded.recipe, loaded.run_dir, 4, 0.5)
    expected, labels = generate_images(loaded, 6, 4, point.guidance, 0, 6,
                                       labels=torch.full((6,), 3), sampler=point.sampler)
    assert torch.equal(images, expected) and (labels == 3).all()
    # Sample i depends only on (seed, i): batch size and call order change nothing.
    again, got_labels = model.sample(num=6, steps=4, class_labels=[3] * 6, guidance=0.5,
                                     batch_size=4, return_labels=True)
    assert torch.equal(again, images) and (got_labels == 3).all()
    assert model.step == list_checkpoints(run)[-1][0] and model.role == "inference"


def test_default_guidance_is_the_remembered_one(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    model = load_model(copy, device="cpu")
    w, source = model.guidance_for(4)
    assert w == 0.25 and "default_guidance" in source  # quickstart: {1: 0.5, 4: 0.25, ...}
    remember_best(copy, {4: {"guidance": 0.75, "sampler": "intrinsic", "metric": "fd-digits",
                             "value": 1.0, "candidates": 3, "checkpoint_step": 4}})
    w, source = model.guidance_for(4)
    assert w == 0.75 and "guidance.json" in source
    default = model.sample(num=4, steps=4, seed=3)
    assert torch.equal(default, model.sample(num=4, steps=4, seed=3, guidance=0.75))
    assert not torch.equal(default, model.sample(num=4, steps=4, seed=3, guidance=0.0))


def test_a_weights_file_alone_is_enough(run: Path, tmp_path: Path) -> None:
    ckpt = list_checkpoints(run)[-1][1]
    alone = tmp_path / "weights.safetensors"
    shutil.copyfile(ckpt / "inference_ema.safetensors", alone)
    model = load_model(alone, device="cpu")
    assert model.role == "inference" and model.num_classes == 10
    reference = load_model(run, device="cpu")
    kwargs = {"num": 5, "steps": 2, "guidance": 0.5, "seed": 1}
    assert torch.equal(model.sample(**kwargs), reference.sample(**kwargs))
    # Inside its run, the file also finds the run's remembered guidance.
    in_run = load_model(ckpt / "inference_ema.safetensors", device="cpu")
    assert in_run.guidance_dir == run


def test_online_weights_and_checkpoint_folder(run: Path) -> None:
    ckpt = list_checkpoints(run)[-1][1]
    online = load_model(ckpt, which="online", device="cpu")
    assert online.role == "online"
    assert not torch.equal(online.sample(num=2, steps=1, guidance=0.0),
                           load_model(ckpt, device="cpu").sample(num=2, steps=1, guidance=0.0))


def test_bad_input_is_a_user_error(run: Path, tmp_path: Path) -> None:
    model = load_model(run, device="cpu")
    with pytest.raises(UserError, match="not found"):
        load_model(tmp_path / "missing")
    plain = tmp_path / "plain.safetensors"
    save_file(load_file(str(list_checkpoints(run)[-1][1] / "online.safetensors")), str(plain))
    with pytest.raises(UserError, match="no ismctl metadata"):
        load_model(plain)
    with pytest.raises(UserError, match="class_labels"):
        model.sample(num=2, class_labels=11)
    with pytest.raises(UserError, match="class_labels"):
        model.sample(num=3, class_labels=[1, 2])
    with pytest.raises(UserError, match="num"):
        model.sample(num=0)
    for steps in (3, 0, -4, 256):
        with pytest.raises(UserError, match="steps"):
            model.sample(num=2, steps=steps)
    with pytest.raises(UserError, match="seed"):
        model.sample(num=2, seed=-1)
    with pytest.raises(UserError, match="which"):
        load_model(run, which="best")


@pytest.mark.parametrize(("n", "nrow", "channels"), [(100, 10, 1), (64, None, 3), (7, None, 1),
                                                     (30, 10, 3)])
def test_image_grid_matches_a_brute_force_tiling(n: int, nrow: int | None,
                                                 channels: int) -> None:
    """torchvision's make_grid behind image_grid: row-major tiles, 1-pixel white border."""
    images = torch.randint(0, 255, (n, 5, 6, channels), dtype=torch.uint8)
    grid = image_grid(images, nrow)
    cols = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    expected = np.full((rows * 6 + 1, cols * 7 + 1, channels), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        expected[1 + r * 6: r * 6 + 6, 1 + c * 7: c * 7 + 7] = images[i].numpy()
    assert grid.dtype == np.uint8 and np.array_equal(grid, expected)
