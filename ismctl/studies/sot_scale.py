"""sOT couplings at ImageNet scale: how straight the paths get, and how much the noise leaks.

A synthetic class-conditional data set with ImageNet latents' shape (4 x 32 x 32 = 4,096
dims, 1,000 balanced classes): ``x1 = mu_y + e`` with class means ``mu_c ~ N(0, r/(1+r) I)``
drawn once per seed and ``e ~ N(0, 1/(1+r) I)``, so every dimension has unit variance (like
scaled SD-VAE latents) and ``r`` is the ratio of between-class to within-class variance.

For every pool of ``n`` pairs (labels uniform, noise ``N(0, I)``) and every coupling
(``blind``, ``within_class``, ``hybrid:m`` = hybrid with ``min_group = m``) the study records
the per-pool ``coupling_stats`` (transport-cost reduction against independent pairing, and
the ``leakage`` statistic) and the time of the assignment. The class leakage is then measured
with linear probes that see the matched noise alone:

- ``probe``: a nearest-class-mean classifier (a linear classifier: ``argmax_c <v, m_c> -
  (||m_c||^2 - s^2 d / n_c) / 2``, the Bayes rule for isotropic Gaussian classes with the
  estimated means' norms debiased) fitted on the training pools and scored on held-out pools.
  The same probe on the independent noise is the floor (chance 1/classes) and on the data
  itself the ceiling, all with the same training budget.
- ``oracle``: the linear probe whose weights are the true class means (``argmax_c <v,
  mu_c>``), the limit of unlimited training data for leakage along the class means.

    python -m ismctl.studies.sot_scale run --pool 1024 --ratios 0.01,0.1,1 --seeds 0,1,2 \\
        --out docs/sot_at_scale/results.jsonl
    python -m ismctl.studies.sot_scale report docs/sot_at_scale/results.jsonl \\
        --markdown docs/sot_at_scale/tables.md

Each finished (pool, r, seed) appends one JSON line per coupling, so an interrupted run keeps
what it finished.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ismctl.data.coupling import coupling_stats, pair_pool

SHAPE = (4, 32, 32)


def parse_coupling(name: str) -> tuple[str, int]:
    """``blind`` / ``within_class`` / ``hybrid:m`` -> (mode, min_group)."""
    mode, _, group = name.partition(":")
    return mode, int(group) if group else 2


def class_means(ratio: float, classes: int, dim: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return math.sqrt(ratio / (1 + ratio)) * torch.randn(classes, dim, generator=gen)


def draw_pool(means: Tensor, ratio: float, n: int, gen: torch.Generator) -> tuple[Tensor, ...]:
    """(noise, data, labels) of one pool: balanced labels in expectation, unit variance."""
    y = torch.randint(0, means.shape[0], (n,), generator=gen)
    x1 = means[y] + math.sqrt(1 / (1 + ratio)) * torch.randn(n, means.shape[1], generator=gen)
    return torch.randn(n, means.shape[1], generator=gen), x1, y


class MeanProbe:
    """Nearest-class-mean linear probe, fitted from running class sums (O(n d) per pool)."""

    def __init__(self, classes: int, dim: int) -> None:
        self.sums = torch.zeros(classes, dim, dtype=torch.float64)
        self.counts = torch.zeros(classes, dtype=torch.float64)
        self.sq = 0.0

    def fit(self, v: Tensor, y: Tensor) -> None:
        self.sums.index_add_(0, y, v.double())
        self.counts += torch.bincount(y, minlength=len(self.counts)).double()
        self.sq += float(v.double().square().sum())

    def weights(self) -> tuple[Tensor, Tensor]:
        seen = self.counts > 0
        means = self.sums / self.counts.clamp_min(1)[:, None]
        n, dim = float(self.counts.sum()), self.sums.shape[1]
        # Pooled within-class variance per dim, to remove the d s^2 / n_c that sampling adds to
        # ||m_c||^2 (else classes with more training rows win on their smaller norm).
        within = (self.sq - float((self.sums.square().sum(1) / self.counts.clamp_min(1)).sum()))
        s2 = within / (dim * max(n - int(seen.sum()), 1))
        bias = -(means.square().sum(1) - s2 * dim / self.counts.clamp_min(1)) / 2
        bias[~seen] = -math.inf
        return means.float(), bias.float()


def accuracy(v: Tensor, y: Tensor, weights: Tensor, bias: Tensor | None = None) -> float:
    scores = v @ weights.T
    if bias is not None:
        scores += bias
    return float((scores.argmax(1) == y).float().mean())


def run_point(pool: int, ratio: float, seed: int, couplings: list[str], classes: int,
              train_samples: int, test_samples: int, solver: str) -> list[dict[str, Any]]:
    """All couplings at one (pool, r, seed): per-pool statistics, timings and the probes."""
    dim = math.prod(SHAPE)
    means = class_means(ratio, classes, dim, seed)
    gen = torch.Generator().manual_seed(10_000 * seed + 17)
    train_pools = max(1, math.ceil(train_samples / pool))
    test_pools = max(1, math.ceil(test_samples / pool))
    sources = ["independent", "data", *couplings]
    probes = {s: MeanProbe(classes, dim) for s in sources}
    stats: dict[str, list[dict[str, float]]] = defaultdict(list)
    seconds: dict[str, list[float]] = defaultdict(list)
    cpu: dict[str, list[float]] = defaultdict(list)
    tests: dict[str, list[Tensor]] = defaultdict(list)
    test_labels: list[Tensor] = []
    for p in range(train_pools + test_pools):
        x0, x1, y = draw_pool(means, ratio, pool, gen)
        views = {"independent": x0, "data": x1}
        stats["independent"].append(coupling_stats(x0, x0, x1, y))
        for name in couplings:
            mode, min_group = parse_coupling(name)
            start, start_cpu = time.perf_counter(), time.process_time()
            matched = pair_pool(x0.view(pool, *SHAPE), x1.view(pool, *SHAPE), y, mode=mode,
                                min_group=min_group, solver=solver).view(pool, dim)
            seconds[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            stats[name].append(coupling_stats(x0, matched, x1, y))
            views[name] = matched
        for source, v in views.items():
            if p < train_pools:
                probes[source].fit(v, y)
            else:
                tests[source].append(v)
        if p >= train_pools:
            test_labels.append(y)
    # Scoring 1,000 classes costs test rows x classes x d per probe: cap the rows scored.
    y_test = torch.cat(test_labels)[:test_samples]
    rows = []
    for source in sources:
        v = torch.cat(tests[source])[:test_samples]
        weights, bias = probes[source].weights()
        row = {
            "pool": pool, "ratio": ratio, "seed": seed, "coupling": source, "classes": classes,
            "dim": dim, "solver": solver, "train_samples": train_pools * pool,
            "test_samples": len(y_test),
            "probe_acc": accuracy(v, y_test, weights, bias),
            "oracle_acc": accuracy(v, y_test, means),
        }
        if source in stats:
            for key in ("cost_reduction", "leakage"):
                row[key] = statistics.fmean(s[key] for s in stats[source])
                row[key + "_pool_sd"] = statistics.pstdev(s[key] for s in stats[source])
        if source in seconds:
            row["seconds_per_pool"] = statistics.fmean(seconds[source])
            row["cpu_seconds_per_pool"] = statistics.fmean(cpu[source])
        rows.append(row)
    return rows


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    couplings = args.couplings.split(",")
    # Seeds outermost: an interrupted run still covers every r.
    for seed in (int(s) for s in args.seeds.split(",")):
        for ratio in (float(r) for r in args.ratios.split(",")):
            start = time.perf_counter()
            rows = run_point(args.pool, ratio, seed, couplings, args.classes,
                             args.train_samples, args.test_samples, args.solver)
            took = time.perf_counter() - start
            with out.open("a") as f:
                for row in rows:
                    f.write(json.dumps({**row, "point_seconds": took}) + "\n")
            print(f"pool {args.pool} r {ratio:g} seed {seed}: {took:.0f} s", flush=True)


def _mean_sd(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def report(path: Path) -> str:
    """Markdown tables (mean ± sd over seeds) from the JSON lines of ``run``."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["pool"], row["ratio"], row["coupling"])].append(row)
    order = ["independent", "data", "blind", "within_class"]
    coupling_names = sorted({row["coupling"] for row in rows},
                            key=lambda c: (order.index(c) if c in order else len(order), c))
    out = []
    for pool in sorted({row["pool"] for row in rows}):
        ratios = sorted({row["ratio"] for row in rows if row["pool"] == pool})
        chance = 100 / next(row["classes"] for row in rows if row["pool"] == pool)
        for title, key, scale, digits in (
                ("transport-cost reduction against independent pairing, %",
                 "cost_reduction", 100, 2),
                ("leakage statistic (class share of the noise variance), x 1e-3",
                 "leakage", 1000, 3),
                (f"probe accuracy, % (chance {chance:g})", "probe_acc", 100, 2),
                (f"oracle-weight probe accuracy, % (chance {chance:g})", "oracle_acc", 100, 2)):
            names = [c for c in coupling_names
                     if any(key in r for r in groups.get((pool, ratios[0], c), []))]
            if key in ("cost_reduction", "leakage"):
                names = [c for c in names if c != "data"]
            if not names:
                continue
            seeds = {len(groups[(pool, r, names[0])]) for r in ratios}
            out.append(f"**Pool {pool}: {title}** (seeds per cell: "
                       f"{'/'.join(str(s) for s in sorted(seeds))})\n")
            out.append("| r | " + " | ".join(names) + " |")
            out.append("|---" * (len(names) + 1) + "|")
            for r in ratios:
                cells = [_mean_sd([g[key] for g in groups.get((pool, r, c), []) if key in g],
                                  scale, digits) for c in names]
                out.append(f"| {r:g} | " + " | ".join(cells) + " |")
            out.append("")
        timed = [c for c in coupling_names if any(
            "cpu_seconds_per_pool" in g for r in ratios for g in groups.get((pool, r, c), []))]
        cells = [_mean_sd([g["cpu_seconds_per_pool"] for r in ratios
                           for g in groups.get((pool, r, c), [])], 1, 2) for c in timed]
        if timed:
            out.append(f"`pair_pool` CPU time per pool of {pool} (s, one thread, mean ± sd over "
                       "all points): "
                       + ", ".join(f"{c} {v}" for c, v in zip(timed, cells, strict=True)) + "\n")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ismctl.studies.sot_scale",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run a grid and append its results as JSON lines")
    p.add_argument("--pool", type=int, default=1024, help="pairs per assignment pool")
    p.add_argument("--ratios", default="0.01,0.03,0.1,0.3,1",
                   help="between- to within-class variance ratios r, comma separated")
    p.add_argument("--seeds", default="0,1,2", help="seeds (class means and pools)")
    p.add_argument("--couplings", default="blind,within_class,hybrid:4,hybrid:8",
                   help="couplings: blind, within_class, hybrid:MIN_GROUP")
    p.add_argument("--classes", type=int, default=1000, help="number of classes")
    p.add_argument("--train-samples", type=int, default=40960,
                   help="probe training rows (whole pools, at least one)")
    p.add_argument("--test-samples", type=int, default=8192,
                   help="probe test rows, from held-out pools (at least one pool is drawn)")
    p.add_argument("--solver", default="lapjv", help="assignment solver: scipy or lapjv")
    p.add_argument("--out", default="docs/sot_at_scale/results.jsonl", help="JSON lines file")
    r = sub.add_parser("report", help="markdown tables from the JSON lines")
    r.add_argument("results", type=Path, help="JSON lines written by run")
    r.add_argument("--markdown", type=Path, default=None, help="write the tables here")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args)
        return
    text = report(args.results)
    if args.markdown is not None:
        args.markdown.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
