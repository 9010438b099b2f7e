"""Where an evaluation's results live: no evaluation replaces another, an interrupted one resumes.

An evaluation is what it evaluated: the weights (their sha256 and which copy), the samples per
point, the seed, the reference, the metrics and the feature extractors behind them. Its points
(steps, w, sampler) are independent of each other, so

- while it runs, every finished point is saved to ``<out>.partial`` (rank 0, atomically): an
  interrupted evaluation keeps them, and the same command continues with the others;
- a ``results.json`` (or ``.partial``) of *another* evaluation at ``--out`` is refused before any
  work, with one line saying what differs and how to keep both (another ``--out``) or replace
  it (``--overwrite``);
- a ``results.json`` of the *same* evaluation keeps its points: those asked for again are not
  computed again, new ones are added to it.

Points that ask for files the stored point lacks (``--save-npz``, ``--save-png``) are
computed again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ismctl.utils.errors import UserError
from ismctl.utils.fileio import write_json

PARTIAL_SUFFIX = ".partial"
# The fields that name an evaluation, as messages spell them.
FIELD_NAMES = {"weights_sha256": "weights sha256", "weights": "weights",
               "num_samples": "samples per point", "seed": "seed", "reference": "reference",
               "metrics": "metrics", "extractors": "feature extractors"}

PointKey = tuple[int, float, str]


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + PARTIAL_SUFFIX)


def _reference(ref: Any) -> str | None:
    # The same folder named relatively or absolutely is the same reference.
    if ref is None:
        return None
    path = Path(str(ref)).expanduser()
    return str(path.resolve()) if path.exists() else str(ref)


def identity(weights_sha256: str | None, weights: str, num_samples: int, seed: int,
             reference: Any, metrics: list[str], extractors: dict[str, str]) -> dict[str, Any]:
    """What an evaluation evaluated (JSON values, comparable with a stored one)."""
    return {"weights_sha256": weights_sha256, "weights": weights, "num_samples": num_samples,
            "seed": seed, "reference": _reference(reference), "metrics": list(metrics),
            "extractors": dict(sorted(extractors.items()))}


def identity_of(results: dict[str, Any]) -> dict[str, Any]:
    """The identity of a stored ``results.json`` (also of those written before this module)."""
    ck, st = results.get("checkpoint") or {}, results.get("settings") or {}
    return identity(ck.get("sha256"), ck.get("weights", "inference"), st.get("num_samples"),
                    st.get("seed"), (results.get("reference") or {}).get("source"),
                    results.get("metrics") or [],
                    {k: v.get("identity") for k, v in
                     (results.get("feature_extractors") or {}).items()})


def point_key(point: dict[str, Any]) -> PointKey:
    return int(point["steps"]), float(point["guidance"]), str(point["sampler"])


def _read(path: Path, out: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"--out {out}: {path} is not readable results JSON ({exc}); give "
                        "another --out, or --overwrite to replace it") from None
    if not isinstance(data, dict) or not isinstance(data.get("points"), list):
        raise UserError(f"--out {out}: {path} is not written by `ismctl eval`; give another "
                        "--out, or --overwrite to replace it")
    return data


def _differences(stored: dict[str, Any], wanted: dict[str, Any]) -> str:
    return "; ".join(f"{FIELD_NAMES.get(k, k)} {_short(stored.get(k))} there, "
                     f"{_short(wanted[k])} here" for k in wanted if stored.get(k) != wanted[k])


def _short(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, dict):
        return ",".join(f"{v}" for v in value.values()) or "none"
    if isinstance(value, str) and len(value) == 64:
        return value[:12]
    return str(value)


def finished_points(out: Path, wanted: dict[str, Any], overwrite: bool) -> list[dict[str, Any]]:
    """The points of this evaluation already at ``out`` (its ``results.json``, then what an
    interrupted run left in ``.partial``); refuses another evaluation stored there."""
    if overwrite:
        return []
    points: dict[PointKey, dict[str, Any]] = {}
    for path, what in ((out, "another evaluation"),
                       (partial_path(out), "another, unfinished evaluation")):
        if not path.exists():
            continue
        data = _read(path, out)
        stored = data.get("identity") if path != out else identity_of(data)
        if stored != wanted:
            raise UserError(f"--out {out}: {path} holds {what} "
                            f"({_differences(stored or {}, wanted)}); give another --out to "
                            "keep both, or --overwrite to replace it")
        points.update({point_key(p): p for p in data["points"]})
    return list(points.values())


def reusable(point: dict[str, Any], save_npz: bool, save_png: bool) -> bool:
    """A stored point serves a new request when it has the files the request asks for."""
    return ((not save_npz or Path(point.get("npz") or "").is_file())
            and (not save_png or Path(point.get("png_folder") or "").is_dir()))


def save_partial(out: Path, wanted: dict[str, Any], points: list[dict[str, Any]]) -> None:
    write_json(partial_path(out), {
        "about": "points of an unfinished `ismctl eval`; the same command continues it",
        "identity": wanted, "points": points})


def finish(out: Path) -> None:
    partial_path(out).unlink(missing_ok=True)
