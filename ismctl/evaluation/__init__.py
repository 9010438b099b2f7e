"""Evaluation: FID / IS / precision-recall / FD-DINOv2 (and the built-in digits metrics) of a
checkpoint at chosen step counts and guidance strengths."""

from typing import Any

from ismctl.evaluation.frechet import feature_stats, frechet_distance

__all__ = ["evaluate", "feature_stats", "frechet_distance"]


def __getattr__(name: str) -> Any:
    # ``evaluate`` pulls in torch-fidelity and the samplers: loaded on first use only, so
    # light users of this package (the .npz writer of ``ismctl sample``) stay fast to import.
    if name == "evaluate":
        from ismctl.evaluation.runner import evaluate

        return evaluate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
