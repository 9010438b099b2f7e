"""Data-set band statistics for the wavelet loss's normaliser (method §3.2).

The wavelet loss prices each DWT band's error relative to the signal in that band. The
price must be a property of the data, not of the batch: a normaliser estimated on each
micro-batch (velocity, guidance and consistency rows mixed) changes the loss with the number
of GPUs and the gradient-accumulation split. Here it is estimated once, from a fixed subset
of the prepared shards, and stored in the run directory (``band_stats.json``) so that a
resumed run keeps exactly the loss it started with.

What is measured. The flow part regresses the velocity ``v = x1 - x0`` with ``x0 ~ N(0, I)``
and ``x1`` a latent drawn as the loader draws it (``scale * (mean + std * eps)``, flipped
with probability 1/2 where the recipe flips). The DWT is orthonormal, so independent unit
noise adds exactly 1 to the variance and to the energy of every coefficient; only ``x1`` is
sampled, the noise is added analytically (exact for independent pairing; sOT correlates ``x0``
with ``x1`` and makes ``v`` somewhat smaller, which the normaliser ignores). Per band (the
three orientations of a level together, finest level first, then the approximation) this
stores, per coefficient:

- ``energy``: the raw mean square ``E[c^2]`` of ``x1``'s coefficients;
- ``variance``: the variance of each coefficient across samples, averaged over the band.

Which one normalises. At the maximum depth the approximation band is the per-channel mean
times ``sqrt(H W)``, so a data set with non-zero channel means has a huge *raw* energy there
(32x32 latents, unit white details, channel means +-0.5: 258 per coefficient against 2) and
the raw normaliser weights mean (colour, brightness) errors ~130x less than detail errors. The
*centred* energy (variance across samples) measures what a model has to predict in that band:
the part that differs from sample to sample, not the constant offset every sample shares. It
is the default normaliser (``loss.band_norm: variance``); ``energy`` keeps the raw one for
comparison. Where the channel means themselves vary from sample to sample (images differ in
colour and brightness) the mean band's variance is large too (an sd of 0.3 gives ~95 per
coefficient on 32x32), so ``loss.max_band_ratio`` (default 10) caps the spread of the weights:
no band is priced below a tenth of the dearest. ``python -m ismctl.losses`` prints the table.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ismctl.config.recipe import DataCfg, LossCfg
from ismctl.data.loader import draw_latents
from ismctl.data.manifest import Manifest, read_manifest
from ismctl.data.verify import decode, read_shard
from ismctl.losses.wavelet import dwt2, max_levels
from ismctl.system.distributed import barrier
from ismctl.utils.errors import UserError
from ismctl.utils.fileio import atomic_write_text

BAND_STATS_FILE = "band_stats.json"
# Fixed, so every seed of a study and every rank of a job sees the same normaliser.
STATS_SEED = 20_240_601
NOISE_VARIANCE = 1.0


@dataclass(frozen=True)
class BandStats:
    """Per-coefficient statistics of ``x1`` in each band, finest detail level first, then the
    approximation; ``key`` identifies the data and the transform they were measured for."""

    wavelet: str
    levels: int
    shape: tuple[int, int, int]
    samples: int
    coefficients: tuple[int, ...]
    energy: tuple[float, ...]
    variance: tuple[float, ...]
    key: str = ""

    @property
    def names(self) -> list[str]:
        _, height, width = self.shape
        details = [f"detail {lv} ({height >> lv}x{width >> lv} x3)"
                   for lv in range(1, self.levels + 1)]
        return [*details, f"approx ({height >> self.levels}x{width >> self.levels})"]

    def velocity(self, norm: str) -> list[float]:
        """Per-coefficient energy (``"energy"``) or variance (``"variance"``) of ``x1 - x0``."""
        values = self.energy if norm == "energy" else self.variance
        return [v + NOISE_VARIANCE for v in values]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> BandStats:
        data = json.loads(text)
        data["shape"] = tuple(data["shape"])
        for name in ("coefficients", "energy", "variance"):
            data[name] = tuple(data[name])
        return cls(**data)


def white_stats(shape: tuple[int, int, int], wavelet: str, levels: int) -> BandStats:
    """The statistics of unit-variance white data (every band alike, so uniform weights): the
    stand-in where no data set is at hand (benchmarks, unit tests)."""
    depth = min(levels, max_levels(shape[1], wavelet), max_levels(shape[2], wavelet))
    counts = band_sizes(shape, depth)
    return BandStats(wavelet, depth, shape, 0, counts, (1.0,) * len(counts),
                     (1.0,) * len(counts), key="white")


def band_sizes(shape: tuple[int, int, int], levels: int) -> tuple[int, ...]:
    channels, height, width = shape
    details = [3 * channels * (height >> lv) * (width >> lv) for lv in range(1, levels + 1)]
    return (*details, channels * (height >> levels) * (width >> levels))


def band_weights(stats: BandStats, norm: str, max_ratio: float | None) -> list[float]:
    """Per-coefficient weight of each band's squared error, relative to plain MSE.

    Weight ``1 / s_b`` for the velocity's per-coefficient statistic ``s_b``, the smallest
    raised to ``max(w) / max_ratio`` when capped, then scaled so that a white residual (the
    same error in every coefficient) costs exactly its MSE: ``sum_b n_b w_b = sum_b n_b``.
    A weight of 1 is MSE's price; 2 means the band's errors count twice as much.
    """
    if norm == "none":
        return [1.0] * len(stats.coefficients)
    raw = [1.0 / max(s, 1e-12) for s in stats.velocity(norm)]
    if max_ratio is not None:
        floor = max(raw) / max_ratio
        raw = [max(w, floor) for w in raw]
    total = sum(stats.coefficients)
    scale = total / sum(n * w for n, w in zip(stats.coefficients, raw, strict=True))
    return [w * scale for w in raw]


def _data_key(manifest: Manifest, wavelet: str, levels: int, samples: int, flip: bool) -> str:
    ident = json.dumps({"shards": [(s.name, s.sha256) for s in manifest.shards],
                        "scale": manifest.scale_factor, "wavelet": wavelet, "levels": levels,
                        "samples": samples, "flip": flip, "seed": STATS_SEED}, sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def _moments(root: Path, manifest: Manifest, count: int) -> torch.Tensor:
    """The first ``count`` samples in shard order. ``prepare-latents`` stores a fixed random
    permutation of the source list, so this is a random, class-mixed subset."""
    samples = itertools.chain.from_iterable(read_shard(root, s) for s in manifest.shards)
    arrays = [decode(s) for s in itertools.islice(samples, count)]
    return torch.from_numpy(np.stack(arrays)).float()


def measure_band_stats(x1: torch.Tensor, wavelet: str, levels: int, key: str = "") -> BandStats:
    """Band statistics of a stack of samples ``x1`` (N, C, H, W), accumulated in float64."""
    if x1.shape[0] < 2:
        raise UserError("band statistics: need at least 2 samples")
    shape = tuple(int(d) for d in x1.shape[1:])
    depth = min(levels, max_levels(shape[1], wavelet), max_levels(shape[2], wavelet))
    approx, details = dwt2(x1.double(), wavelet, depth)
    bands = [d.flatten(1) for d in details] + [approx.flatten(1)]
    energy = tuple(float(b.square().mean()) for b in bands)
    # Unbiased per-coefficient variance across samples, averaged over the band.
    variance = tuple(float(b.var(dim=0, unbiased=True).mean()) for b in bands)
    return BandStats(wavelet, depth, shape, int(x1.shape[0]), band_sizes(shape, depth), energy,
                     variance, key)


def dataset_band_stats(path: str | Path, wavelet: str, levels: int, samples: int = 4096,
                       flip: bool = False, batch: int = 512) -> BandStats:
    """Band statistics of the latents ``x1`` the loader draws from the prepared data at
    ``path``: the first ``samples`` samples in shard order, each drawn once with a fixed seed."""
    root = Path(path)
    manifest = read_manifest(root)
    count = min(samples, manifest.count)
    moments = _moments(root, manifest, count)
    gen = torch.Generator().manual_seed(STATS_SEED)
    x1 = torch.cat([draw_latents(moments[i:i + batch], manifest.scale_factor,
                                 flip and manifest.flip, gen)
                    for i in range(0, count, batch)])
    return measure_band_stats(x1, wavelet, levels,
                              _data_key(manifest, wavelet, levels, samples, flip))


def run_band_stats(run_dir: Path, data_path: str | Path, wavelet: str, levels: int,
                   samples: int, flip: bool, write: bool) -> BandStats:
    """The run's stored statistics when they were measured for this data and transform, else
    measured now (and written to ``run_dir / band_stats.json`` when ``write``)."""
    file = run_dir / BAND_STATS_FILE
    manifest = read_manifest(data_path)
    key = _data_key(manifest, wavelet, levels, samples, flip)
    if file.is_file():
        try:
            stored = BandStats.from_json(file.read_text())
        except (ValueError, TypeError, KeyError) as exc:
            raise UserError(f"{file}: not valid band statistics ({exc}); delete it to "
                            "measure them again") from exc
        if stored.key == key:
            return stored
    stats = dataset_band_stats(data_path, wavelet, levels, samples, flip)
    if write:
        atomic_write_text(file, stats.to_json())
    return stats


def band_stats_for_run(loss: LossCfg, data: DataCfg, run_dir: Path,
                       is_main: bool) -> BandStats | None:
    """The statistics a training run's loss is normalised by (None when its loss uses none):
    the main rank measures them, or finds them stored, and writes ``band_stats.json``; the
    other ranks then read that file, so every rank holds the same numbers."""
    if loss.name != "wavelet" or loss.band_norm == "none":
        return None
    args = (run_dir, data.path, loss.wavelet, loss.levels, loss.band_stats_samples, data.flip)
    stats = run_band_stats(*args, write=True) if is_main else None
    barrier()
    return stats if stats is not None else run_band_stats(*args, write=False)


def weight_table(stats: BandStats, max_ratio: float | None) -> str:
    """Markdown table: per band, the velocity's energy and variance per coefficient and the
    weight (relative to MSE) under each normaliser."""
    norms = ("energy", "variance")
    weights = {n: band_weights(stats, n, None) for n in norms}
    capped = band_weights(stats, "variance", max_ratio) if max_ratio else None
    head = ["band", "coefficients", "v energy / coef", "v variance / coef",
            "weight (raw energy)", "weight (variance)"]
    if capped is not None:
        head.append(f"weight (variance, ratio <= {max_ratio:g})")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    energy, variance = stats.velocity("energy"), stats.velocity("variance")
    for i, name in enumerate(stats.names):
        row = [name, str(stats.coefficients[i]), f"{energy[i]:.3g}", f"{variance[i]:.3g}",
               f"{weights['energy'][i]:.3g}", f"{weights['variance'][i]:.3g}"]
        if capped is not None:
            row.append(f"{capped[i]:.3g}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def latent_like(count: int = 4096, channels: int = 4, size: int = 32, seed: int = 0,
                channel_mean: float = 0.5, mean_spread: float = 0.0) -> torch.Tensor:
    """Synthetic latent-like samples: unit-variance white details around per-channel means
    ``channel_mean * (1, -1, 1, -1, ...)``, each sample's means shifted by
    ``N(0, mean_spread^2)`` (0: every sample shares the channel means)."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.tensor([(-1.0) ** c for c in range(channels)]).view(1, channels, 1, 1)
    shift = mean_spread * torch.randn(count, channels, 1, 1, generator=gen)
    return channel_mean * signs + shift + torch.randn(count, channels, size, size, generator=gen)


def print_band_weights(data: str | None = None, wavelet: str = "haar", levels: int = 5,
                       samples: int = 4096, max_ratio: float | None = 10.0,
                       mean_spread: float = 0.0) -> str:
    """Print (and return) the band-weight table of a prepared data set (``data``: its folder)
    or, with None, of synthetic latent-like data: 32x32x4, unit white details, channel means
    +-0.5, each sample's means shifted by ``N(0, mean_spread^2)``."""
    if data is None:
        x1 = latent_like(samples, mean_spread=mean_spread)
        stats = measure_band_stats(x1, wavelet, levels, "latent-like")
        title = (f"synthetic latent-like data: 32x32x4, unit white details, channel means "
                 f"+-0.5 shifted per sample by N(0, {mean_spread:g}^2); {samples} samples, "
                 f"{wavelet}, L = {stats.levels}")
    else:
        stats = dataset_band_stats(data, wavelet, levels, samples)
        title = f"{data}: {stats.samples} samples, {wavelet}, L = {stats.levels}"
    text = f"{title}\n\n{weight_table(stats, max_ratio)}"
    print(text)
    return text


__all__ = ["BAND_STATS_FILE", "BandStats", "band_stats_for_run", "band_weights",
           "dataset_band_stats", "latent_like", "measure_band_stats", "print_band_weights",
           "run_band_stats", "weight_table", "white_stats"]
