"""The built-in digits metric: classifier accuracy, determinism, fd-digits."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from ismctl.evaluation.digits_classifier import (
    DIGITS_NAME,
    FEATURES,
    LOGITS,
    class_accuracy,
    class_conditional_fd,
    class_spread,
    classifier_path,
    digits_dataset,
    load_digits_classifier,
    split_indices,
    train_digits_classifier,
)
from ismctl.evaluation.features import ExtractorSpec, features_from_images
from ismctl.evaluation.frechet import feature_stats, frechet_distance
from ismctl.evaluation.reference import load_reference


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as m:
        m.setenv("ISMCTL_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def classifier(cache):
    net, held_out = load_digits_classifier()
    return net, held_out


@pytest.fixture(scope="module")
def real_features(classifier):
    images, labels = digits_dataset()
    spec = ExtractorSpec(DIGITS_NAME, classifier_path())
    return images, labels, features_from_images(spec, [FEATURES, LOGITS], images, batch_size=500)


def test_dataset_pixels_follow_the_stored_mapping():
    images, labels = digits_dataset()
    data = load_digits()
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.uint8
    # prepare-latents stores v / 8 - 1 in [-1, 1]; decoding gives round((x + 1) * 127.5).
    want = np.rint((data.images / 8.0 - 1.0 + 1.0) * 127.5).astype(np.uint8)
    np.testing.assert_array_equal(images[..., 0], want)
    np.testing.assert_array_equal(labels, data.target)


def test_held_out_accuracy(classifier):
    net, held_out = classifier
    images, labels = digits_dataset()
    _, test_idx = split_indices(len(labels))
    # Recomputed here from the raw held-out images, independent of the training code's number.
    x = torch.from_numpy(images[test_idx]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        acc = (net(x).argmax(1).numpy() == labels[test_idx]).mean()
    assert acc >= 0.95
    assert held_out == pytest.approx(acc, abs=1e-6)
    train_idx, test_idx = split_indices(len(labels))
    assert not set(train_idx) & set(test_idx) and len(train_idx) + len(test_idx) == 1797


def test_training_is_deterministic_and_cache_round_trips(classifier):
    a, _ = train_digits_classifier(epochs=2)
    b, _ = train_digits_classifier(epochs=2)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    c, _ = train_digits_classifier(seed=1, epochs=2)
    assert not torch.equal(a.fc2.weight, c.fc2.weight)
    cached, held_out = load_digits_classifier()  # from the file written by the fixture
    for x, y in zip(classifier[0].state_dict().values(), cached.state_dict().values(),
                    strict=True):
        assert torch.equal(x, y)
    assert held_out == classifier[1]


def test_accuracy_of_real_digits_with_their_labels(real_features):
    _, labels, feats = real_features
    assert class_accuracy(feats[LOGITS], labels) >= 0.97
    shuffled = np.random.default_rng(0).permutation(labels)
    assert class_accuracy(feats[LOGITS], shuffled) < 0.3
    logits = np.eye(3)[[0, 1, 2, 2]]
    assert class_accuracy(logits, np.array([0, 1, 2, 0])) == 0.75


def test_fd_digits_real_vs_real_is_zero_and_noise_is_far(real_features):
    images, _, feats = real_features
    ref = load_reference("digits", ExtractorSpec(DIGITS_NAME, classifier_path()), FEATURES, 8)
    assert ref.count == 1797 and ref.features.shape == (1797, 128)
    mu, sigma = feature_stats(feats[FEATURES])
    same = frechet_distance(mu, sigma, ref.mu, ref.sigma)
    assert abs(same) < 1e-4
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, images.shape, dtype=np.uint8)
    spec = ExtractorSpec(DIGITS_NAME, classifier_path())
    f_noise = features_from_images(spec, [FEATURES], noise, batch_size=500)[FEATURES]
    far = frechet_distance(*feature_stats(f_noise), ref.mu, ref.sigma)
    # Half the real digits against the other half: sampling noise only.
    half = frechet_distance(*feature_stats(feats[FEATURES][::2]),
                            *feature_stats(feats[FEATURES][1::2]))
    assert far > 10 * half > 0


def _sqrt_psd_trace(a: np.ndarray, b: np.ndarray) -> float:
    """tr((A B)^(1/2)) through the symmetric form A^(1/2) B A^(1/2) (numpy eigh only)."""
    vals, vecs = np.linalg.eigh(a)
    root = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    inner = np.linalg.eigvalsh(root @ b @ root)
    return float(np.sqrt(np.clip(inner, 0, None)).sum())


def test_class_conditional_fd_matches_a_per_class_numpy_reference(real_features):
    images, labels, feats = real_features
    f = feats[FEATURES].astype(np.float64)
    assert abs(class_conditional_fd(f, labels)) < 1e-3
    # Every other digit of each class, scored against all digits of that class.
    rows = np.arange(len(labels)) % 2 == 0
    want = []
    for c in range(10):
        gen, real = f[rows & (labels == c)], f[labels == c]
        mu1, mu2 = gen.mean(0), real.mean(0)
        s1, s2 = np.cov(gen, rowvar=False), np.cov(real, rowvar=False)
        want.append((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2)
                    - 2 * _sqrt_psd_trace(s1, s2))
    assert class_conditional_fd(f[rows], labels[rows]) == pytest.approx(np.mean(want), rel=1e-4)


def test_class_conditional_fd_sees_wrong_classes_that_fd_digits_misses(real_features):
    _, labels, feats = real_features
    f = feats[FEATURES]
    ref = feature_stats(f)
    # Real digits under rotated labels: the same image set, so the unconditional distance is
    # zero, but every class receives another digit.
    rotated = (labels + 1) % 10
    assert frechet_distance(*feature_stats(f), *ref) < 1e-4
    assert class_conditional_fd(f, rotated) > 100 * max(class_conditional_fd(f, labels), 1e-3)


def test_class_spread_is_one_for_real_digits_and_sees_collapse(real_features):
    """spread-digits against a numpy reference: 1 for the real digits themselves, ~1 for a
    random half of them, 0 when every sample of a class is the same image, and 1/2 when each
    class's features are pulled halfway to their mean (the covariance scales by 1/4)."""
    _, labels, feats = real_features
    f = feats[FEATURES].astype(np.float64)
    assert class_spread(f, labels) == pytest.approx(1.0, abs=1e-9)
    rows = np.arange(len(labels)) % 2 == 0
    want = np.mean([np.sqrt(np.trace(np.cov(f[rows & (labels == c)], rowvar=False))
                            / np.trace(np.cov(f[labels == c], rowvar=False))) for c in range(10)])
    assert class_spread(f[rows], labels[rows]) == pytest.approx(want, rel=1e-9)
    assert 0.9 < want < 1.1
    collapsed = np.stack([f[np.flatnonzero(labels == c)[0]] for c in labels])
    assert class_spread(collapsed, labels) == pytest.approx(0.0, abs=1e-9)
    means = np.stack([f[labels == c].mean(0) for c in range(10)])
    shrunk = means[labels] + 0.5 * (f - means[labels])
    assert class_spread(shrunk, labels) == pytest.approx(0.5, rel=1e-9)
