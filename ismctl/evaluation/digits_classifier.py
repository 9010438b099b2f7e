"""A built-in metric for the digits dataset that needs no download.

A small CNN is trained on scikit-learn's 1,797 8x8 digits (the data shipped in its wheel,
method §6) with a fixed seed, a fixed 80/20 split and one CPU thread, so every machine
builds the same weights in a few seconds; they are cached on disk. It gives

- ``acc``: the share of generated images the classifier assigns to the class they were
  generated for (does the image show the requested digit?), and
- ``fd-digits``: the Frechet distance in its 128-d penultimate feature space against the
  real digits (an FID analogue for 8x8 images, where Inception features mean little), and
- ``cfd-digits``: the same distance per class (the samples generated for class ``c`` against
  the real digits of class ``c``), averaged over the classes. Unlike ``fd-digits`` it sees
  samples of the wrong class, and a model that ignores its label cannot score well on it.
- ``spread-digits``: within-class diversity, the features' spread per class relative to the
  real digits' (1 = as diverse as the data), averaged over the classes.

Pixels are the dataset's 0..16 intensities mapped to uint8 by ``round(v * 255 / 16)`` and then
to [-1, 1] by ``u / 127.5 - 1``, the range the pixel-space model generates. Images that are
not 8x8 are area-resized to 8x8; colour images are averaged to one channel.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from ismctl.evaluation.cache import cache_dir
from ismctl.evaluation.frechet import feature_stats, frechet_distance
from ismctl.utils.fileio import atomic_path

DIGITS_NAME = "digits-cnn"
FEATURES = "digits-features"
LOGITS = "digits-logits"
VERSION = 1
SEED = 0
HOLDOUT = 0.2
EPOCHS = 15
BATCH = 32
SIDE = 8


def digits_dataset() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 images (1797, 8, 8, 1) and int64 labels (1797,)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.rint(data.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, data.target.astype(np.int64)


def split_indices(n: int, holdout: float = HOLDOUT,
                  seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random (train, held-out) split of ``range(n)``."""
    perm = np.random.default_rng(seed).permutation(n)
    cut = n - int(round(n * holdout))
    return np.sort(perm[:cut]), np.sort(perm[cut:])


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float (N, 1, 8, 8) in [-1, 1] (channel mean, area resize)."""
    x = images.to(torch.float32).mean(dim=1, keepdim=True)
    if x.shape[-2:] != (SIDE, SIDE):
        x = F.interpolate(x, size=(SIDE, SIDE), mode="area")
    return x / 127.5 - 1.0


class DigitsNet(nn.Module):
    """Two 3x3 convolutions, a 2x2 max-pool and a 128-d hidden layer."""

    def __init__(self, num_classes: int = 10, width: int = 32, hidden: int = 128) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * (SIDE // 2) ** 2, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc1(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    # One thread fixes the order of every float reduction: same weights on any core count.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # Random +-1 pixel translations (zero = background fill): generated digits are rarely
    # centred exactly like the scans, and the classifier should not care.
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2,), generator=gen).tolist()
    return padded[..., dy : dy + SIDE, dx : dx + SIDE]


@torch.no_grad()
def accuracy(net: DigitsNet, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((net(x).argmax(dim=1) == y).float().mean())


def train_digits_classifier(seed: int = SEED, epochs: int = EPOCHS) -> tuple[DigitsNet, float]:
    """Train on the fixed split; return the network and its held-out accuracy."""
    images, labels = digits_dataset()
    train_idx, test_idx = split_indices(len(labels), seed=seed)
    x = to_unit_range(torch.from_numpy(images).permute(0, 3, 1, 2))
    y = torch.from_numpy(labels)
    with _single_thread():
        torch.manual_seed(seed)
        net = DigitsNet()
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(net.parameters(), lr=2e-3, weight_decay=1e-4)
        xt, yt = x[train_idx], y[train_idx]
        net.train()
        for _ in range(epochs):
            for batch in torch.randperm(len(yt), generator=gen).split(BATCH):
                loss = F.cross_entropy(net(_shift(xt[batch], gen)), yt[batch])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        net.eval().requires_grad_(False)
        held_out = accuracy(net, x[test_idx], y[test_idx])
    return net, held_out


def classifier_path() -> Path:
    # Every training setting is in the name: changing one never reuses stale cached weights.
    name = f"{DIGITS_NAME}-v{VERSION}-seed{SEED}-holdout{HOLDOUT}-e{EPOCHS}-b{BATCH}"
    return cache_dir("digits_classifier") / f"{name}.safetensors"


def load_digits_classifier(path: Path | None = None) -> tuple[DigitsNet, float]:
    """The cached classifier (trained and written atomically on first use) and its
    held-out accuracy."""
    path = path or classifier_path()
    if path.is_file():
        net = DigitsNet()
        net.load_state_dict(load_file(str(path)))
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        return net.eval().requires_grad_(False), float(meta.get("held_out_accuracy", "nan"))
    net, held_out = train_digits_classifier()
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"held_out_accuracy": repr(held_out)})
    return net, held_out


def class_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Share of samples whose arg-max class is the class they were generated for."""
    return float(np.mean(np.argmax(logits, axis=1) == np.asarray(labels)))


@functools.lru_cache(maxsize=1)
def class_reference_stats() -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Per class, the mean and covariance of the classifier features of all real digits."""
    net, _ = load_digits_classifier()
    images, labels = digits_dataset()
    with torch.no_grad(), _single_thread():
        feats = net.features(to_unit_range(torch.from_numpy(images).permute(0, 3, 1, 2)))
    feats = feats.numpy()
    return tuple(feature_stats(feats[labels == c]) for c in range(int(labels.max()) + 1))


def class_conditional_fd(features: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes of the Frechet distance between the features of the samples generated
    for that class and those of its real digits (classes with < 2 samples are skipped)."""
    labels = np.asarray(labels)
    dists = []
    for c, (mu, sigma) in enumerate(class_reference_stats()):
        rows = features[labels == c]
        if len(rows) >= 2:
            dists.append(frechet_distance(*feature_stats(rows), mu, sigma))
    if not dists:
        raise ValueError("cfd-digits: no class has two samples")
    return float(np.mean(dists))


def class_spread(features: np.ndarray, labels: np.ndarray) -> float:
    """Diversity: per class, the spread of the samples' features relative to the real digits',
    sqrt(tr Cov(samples of c) / tr Cov(real digits of c)), averaged over the classes with at
    least two samples. 1 is the real data's within-class diversity; below 1 the samples of a
    class are more alike than real digits (a model trading diversity for accuracy), above 1
    they scatter more. A distance such as cfd-digits mixes this with the error of the mean."""
    labels = np.asarray(labels)
    ratios = []
    for c, (_, sigma) in enumerate(class_reference_stats()):
        rows = features[labels == c]
        if len(rows) >= 2:
            ratios.append(np.sqrt(np.trace(np.cov(rows, rowvar=False)) / np.trace(sigma)))
    if not ratios:
        raise ValueError("spread-digits: no class has two samples")
    return float(np.mean(ratios))


class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity extractor: uint8 (N, 3, H, W) -> 128-d features and 10 logits."""

    def __init__(
        self,
        name: str,
        features_list: list[str],
        feature_extractor_weights_path: str | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(name, features_list)
        path = Path(feature_extractor_weights_path) if feature_extractor_weights_path else None
        self.net, self.held_out_accuracy = load_digits_classifier(path)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"expected uint8 images (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
        h = self.net.features(to_unit_range(x))
        out = {FEATURES: h, LOGITS: self.net.fc2(h)}
        return tuple(out[name] for name in self.features_list)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return (FEATURES, LOGITS)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"fid": FEATURES, "kid": FEATURES, "prc": FEATURES, "isc": LOGITS}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, SIDE, SIDE, dtype=torch.uint8)


if DIGITS_NAME not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(DIGITS_NAME, DigitsFeatureExtractor)
