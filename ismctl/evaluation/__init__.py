"""Evaluation: FID / IS / precision-recall / FD-DINOv2 (and the built-in digits metrics) of a
checkpoint at chosen step counts and guidance strengths."""

from ismctl.evaluation.frechet import feature_stats, frechet_distance
from ismctl.evaluation.runner import evaluate

__all__ = ["evaluate", "feature_stats", "frechet_distance"]
