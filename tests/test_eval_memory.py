"""Evaluation in bounded memory: images are made, scored and written batch by batch, so the
peak memory of ``evaluate`` does not grow with the number of samples, and an interrupted
evaluation takes up its finished chunks again.

The peak is measured in a fresh process per sample count (its VmHWM): a network that lands
every sample on a real digit and a stand-in decoder that blows each 8x8 digit up to 256x256 RGB
(196,608 bytes per image, as an ImageNet-256 sample), scored by the digits classifier (which
sees the same 8x8 digit again). Holding every image, as before, 8,000 samples take 1.2 GB more
than 2,000.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ismctl.evaluation.chunks as chunks
import ismctl.runs.checkpoint as checkpoint
import ismctl.sampling.generate as generate
from ismctl.config.recipe import Recipe
from ismctl.data.encoders import to_uint8
from ismctl.data.manifest import Manifest, ShardInfo
from ismctl.evaluation import evaluate
from ismctl.evaluation.digits_classifier import digits_dataset
from ismctl.runs.checkpoint import LoadedRun

SIDE = 256
# Between processes evaluating the same thing, the peak varies by up to ~120 MB on a busy
# machine (measured: 926 to 1,048 MiB, a chunk of 1,000 images being 196 MB), in either
# direction; holding the images would add 1,180 MB at 8,000 samples, 4.6 times this margin.
MARGIN = 256 * 2**20


class TemplateNet(nn.Module):
    """F(x, t, d, c, w) = (T_c - x) / (1 - t): every jump lands on the line to the class
    template T_c (a real digit), so the samples are digits the classifier knows."""

    def __init__(self) -> None:
        super().__init__()
        images, labels = digits_dataset()
        first = [int(np.flatnonzero(labels == c)[0]) for c in range(10)]
        templates = torch.from_numpy(images[first]).permute(0, 3, 1, 2).float() / 127.5 - 1
        self.register_buffer("templates", torch.cat([templates, templates.mean(0, True)]))
        self.num_classes = 10

    def forward(self, x, t, d, c, w):  # noqa: ANN001, ANN201 - the network's signature
        return (self.templates[c] - x) / (1 - t).view(-1, 1, 1, 1)


class Upsampler:
    """A stand-in decoder: each 8x8 latent pixel becomes a 32x32 block, in 3 channels."""

    name, scale_factor = "identity", 1.0

    def __init__(self, side: int) -> None:
        self.side = side

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        block = self.side // latents.shape[-1]
        small = to_uint8(latents)  # (B, 8, 8, 1)
        big = small.repeat_interleave(block, 1).repeat_interleave(block, 2)
        return big.expand(-1, -1, -1, 3).contiguous()


def loaded_run(root: Path) -> LoadedRun:
    manifest = Manifest(count=1797, num_classes=10, class_names=[str(i) for i in range(10)],
                        encoder="identity", scale_factor=1.0, resolution=8, channels=1,
                        latent_size=8, flip=False,
                        shards=[ShardInfo(name="s.tar", count=1797, sha256="0")], skipped=[])
    return LoadedRun(model=TemplateNet(), recipe=Recipe(), manifest=manifest,
                     run_dir=root / "run", checkpoint=root / "run" / "checkpoints" /
                     "step-0000042", step=42, sha256="ab" * 32, mode="intrinsic",
                     device=torch.device("cpu"))


def use_run(run: LoadedRun, side: int | None, patch: pytest.MonkeyPatch) -> None:
    patch.setattr(checkpoint, "load_for_sampling", lambda *a, **k: run)
    if side is not None:
        patch.setattr(generate, "load_encoder", lambda *a, **k: Upsampler(side))


def peak_rss(num: int, out: Path, cache: Path) -> tuple[int, dict]:
    """(VmHWM in bytes, results) of one evaluation of ``num`` samples in a fresh process."""
    done = subprocess.run([sys.executable, __file__, str(num), str(out)], capture_output=True,
                          text=True, check=False, timeout=900,
                          env={**dict(__import__("os").environ), "ISMCTL_CACHE": str(cache),
                               "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    line = json.loads(done.stdout.strip().splitlines()[-1])
    return line["vm_hwm"], json.loads(out.read_text())


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_number_of_samples(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    peak_rss(200, tmp_path / "warm.json", cache)  # the digits classifier, trained once
    small, few = peak_rss(2000, tmp_path / "small.json", cache)
    large, many = peak_rss(8000, tmp_path / "large.json", cache)
    print(f"peak RSS: 2,000 samples {small / 2**20:.0f} MiB, 8,000 samples "
          f"{large / 2**20:.0f} MiB at {SIDE}x{SIDE}x3")
    # Holding the images would add 6,000 x 196,608 bytes (1,180 MB). Only growth counts.
    assert large - small < MARGIN
    for results in (few, many):
        assert results["points"][0]["metrics"]["acc"] == 1.0
        assert results["points"][0]["num_samples"] in (2000, 8000)


def test_interrupted_evaluation_resumes_from_finished_chunks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISMCTL_CACHE", str(tmp_path / "cache"))
    use_run(loaded_run(tmp_path), None, monkeypatch)
    args = ([1], [0.0, 0.5], 300, None, ["acc", "fd-digits", "cfd-digits"])
    kwargs = dict(inception_weights=None, save_npz=True, batch_size=50, seed=7, device="cpu",
                  progress=False)
    monkeypatch.setattr(chunks, "CHUNK_SAMPLES", 100)
    whole = evaluate(None, *args, tmp_path / "whole" / "results.json", **kwargs)

    made: list[int] = []
    iter_images = generate.iter_images

    def counted(*a, **k):  # noqa: ANN002, ANN003, ANN202 - wraps the real generator
        for indices, images, labels in iter_images(*a, **k):
            made.extend(indices.tolist())
            yield indices, images, labels

    monkeypatch.setattr(generate, "iter_images", counted)
    write = chunks._write_chunk
    writes: list[Path] = []

    def stop_after_four(path: Path, *a) -> None:  # noqa: ANN002
        if len(writes) == 4:
            raise KeyboardInterrupt
        write(path, *a)
        writes.append(path)

    out = tmp_path / "stopped" / "results.json"
    monkeypatch.setattr(chunks, "_write_chunk", stop_after_four)
    with pytest.raises(KeyboardInterrupt):
        evaluate(None, *args, out, **kwargs)
    # Point w=0 made (3 chunks), then one chunk of w=0.5; the next one's samples were made but
    # not yet written when the evaluation stopped.
    assert len(made) == 500 and not out.exists()
    monkeypatch.setattr(chunks, "_write_chunk", write)
    made.clear()
    again = evaluate(None, *args, out, **kwargs)
    assert sorted(made) == list(range(100, 300))
    for mine, theirs in zip(again["points"], whole["points"], strict=True):
        assert mine["metrics"] == theirs["metrics"]
        with np.load(mine["npz"]) as a, np.load(theirs["npz"]) as b:
            np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
            np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    assert not (out.parent / "results-chunks").exists()


def _child(num: int, out: Path) -> None:
    with pytest.MonkeyPatch.context() as patch:
        use_run(loaded_run(out.parent), SIDE, patch)
        evaluate(None, [1], [0.0], num, None, ["acc", "fd-digits"], out, None, save_npz=False,
                 batch_size=250, seed=0, device="cpu", progress=False)
    hwm = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text()
               .splitlines() if line.startswith("VmHWM:"))
    print(json.dumps({"vm_hwm": hwm}))


if __name__ == "__main__":
    _child(int(sys.argv[1]), Path(sys.argv[2]))
