"""Which metrics an evaluation computes, and which feature extractors and layers they need.

Metrics: ``fid``, ``isc`` and ``prc`` (Inception-v3), ``fd-dinov2`` (DINOv2 ViT-L/14), and
for the built-in digits dataset ``acc`` and ``fd-digits`` (the digits classifier, added
automatically there). Inception metrics need weights: a metric asked for on the command line
(``--metrics fid``) that cannot be computed stops the evaluation with a UserError naming what
to get, as FID without weights does on any data set but the digits; from a recipe's default
list, the Inception Score without torch-fidelity's weights (and on the digits every Inception
metric without any weights) is dropped with a note.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ismctl.evaluation.digits_classifier import (
    DIGITS_NAME,
    FEATURES,
    LOGITS,
    classifier_path,
    load_digits_classifier,
)
from ismctl.evaluation.dinov2 import DINOV2_NAME
from ismctl.evaluation.features import ExtractorSpec
from ismctl.evaluation.inception import (
    URL_INCEPTION_V3,
    InceptionChoice,
    find_inception,
    has_logits,
    missing_weights_message,
)
from ismctl.utils.errors import UserError

METRICS = ("fid", "isc", "prc", "fd-dinov2", "acc", "fd-digits", "cfd-digits", "spread-digits")
INCEPTION_METRICS = ("fid", "isc", "prc")
DIGITS_METRICS = ("acc", "fd-digits", "cfd-digits", "spread-digits")
# Metrics compared with reference statistics (the others need the samples only).
REFERENCE_METRICS = ("fid", "prc", "fd-dinov2", "fd-digits")
ALIASES = {"is": "isc", "pr": "prc", "fd_dinov2": "fd-dinov2", "fd_digits": "fd-digits",
           "accuracy": "acc", "fd-dino": "fd-dinov2", "cfd_digits": "cfd-digits",
           "spread_digits": "spread-digits", "spread": "spread-digits"}
# Values that describe rather than rank (best at 1, not at an end): never a selection metric.
DESCRIPTIVE = frozenset({"spread-digits"})
# Values where larger is better; every other one (FID and the other distances) is lower.
HIGHER_IS_BETTER = frozenset({"isc", "acc", "precision", "recall"})
# The value that picks the best guidance per step count when none is named. On the digits
# the class-conditional distance comes first: it sees both wrong classes and lost diversity,
# while Inception features of 8x8 digits mean little.
SELECT_PREFERENCE = ("fid", "fd-dinov2", "isc")
DIGITS_SELECT_PREFERENCE = ("cfd-digits", "fd-digits", "acc")
POOL = "2048"
INCEPTION_LOGITS = "logits_unbiased"
DINOV2_LAYER = "dinov2"


@dataclass
class Group:
    """One extractor run over every sample set: the layers to keep and the reference layer."""

    spec: ExtractorSpec
    layers: list[str]
    ref_layer: str | None = None
    need_ref_features: bool = False


@dataclass
class MetricPlan:
    metrics: list[str]
    groups: dict[str, Group] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    inception: InceptionChoice | None = None


def normalise_metrics(names: list[str]) -> list[str]:
    out: list[str] = []
    for raw in names:
        name = ALIASES.get(raw.strip().lower(), raw.strip().lower())
        if not name:
            continue
        if name not in METRICS:
            raise UserError(f"--metrics {raw}: unknown metric; choose from {', '.join(METRICS)}")
        if name not in out:
            out.append(name)
    return out


def plan_metrics(
    requested: list[str] | None,
    defaults: list[str],
    digits: bool,
    inception_weights: str | None = None,
) -> MetricPlan:
    """Resolve the metric list (``None`` = the recipe's defaults, plus the digits metrics)."""
    names = normalise_metrics(defaults if requested is None else requested)
    if digits and requested is None:
        names += [m for m in DIGITS_METRICS if m not in names]
    if not digits and (bad := [m for m in names if m in DIGITS_METRICS]):
        raise UserError(f"--metrics {','.join(bad)}: only for the built-in digits dataset")
    if not names:
        raise UserError("--metrics: no metric to compute")
    plan = MetricPlan(metrics=[])
    wanted = set(names)
    if wanted & set(INCEPTION_METRICS):
        wanted = _plan_inception(plan, wanted, names, digits, inception_weights,
                                 requested is not None)
    if digits and not wanted:
        plan.notes.append("no requested metric can be computed: acc and fd-digits instead")
        names += [m for m in DIGITS_METRICS if m not in names]
        wanted = set(DIGITS_METRICS)
    if "fd-dinov2" in wanted:
        plan.groups["dinov2"] = Group(ExtractorSpec(DINOV2_NAME), [DINOV2_LAYER], DINOV2_LAYER)
    if wanted & set(DIGITS_METRICS):
        load_digits_classifier()
        layers = [FEATURES] if wanted & {"fd-digits", "cfd-digits", "spread-digits"} else []
        layers += [LOGITS] if "acc" in wanted else []
        plan.groups["digits"] = Group(
            ExtractorSpec(DIGITS_NAME, classifier_path()), layers,
            ref_layer=FEATURES if "fd-digits" in wanted else None,
        )
    plan.metrics = [m for m in names if m in wanted]
    return plan


def selection_metric(values: list[str], requested: str | None = None,
                     digits: bool = False) -> str:
    """The value that ranks guidance strengths: ``requested`` (checked), else the first
    computed one of the preference lists (the digits list first for the digits)."""
    if requested is not None:
        name = ALIASES.get(requested.strip().lower(), requested.strip().lower())
        if name in DESCRIPTIVE:
            raise UserError(f"--select-by {requested}: describes diversity (best at 1, not at an "
                            "end of its range), so it cannot rank guidance strengths")
        if name not in values:
            raise UserError(f"--select-by {requested}: not among the computed values "
                            f"({', '.join(values)})")
        return name
    order = (DIGITS_SELECT_PREFERENCE if digits else ()) + SELECT_PREFERENCE
    ranked = [v for v in values if v not in DESCRIPTIVE] or values
    return next((m for m in order if m in ranked), ranked[0])


def _plan_inception(plan: MetricPlan, wanted: set[str], names: list[str], digits: bool,
                    inception_weights: str | None, asked: bool = False) -> set[str]:
    """Add the Inception group to ``plan``; returns the metrics still wanted. ``asked``: the
    metrics come from the command line, so what cannot be computed stops the evaluation; from
    the recipe's defaults, the Inception Score without its weights (and, on the digits, every
    Inception metric) is dropped with a note."""
    where = "--metrics" if asked else "eval.metrics"
    choice = find_inception(inception_weights)
    if choice is None:
        if asked or not digits:
            listed = ",".join(m for m in names if m in INCEPTION_METRICS)
            raise UserError(f"{where} {listed}: {missing_weights_message()}")
        dropped = [m for m in names if m in INCEPTION_METRICS]
        plan.notes.append(f"{', '.join(dropped)} skipped: {missing_weights_message()}")
        return wanted - set(INCEPTION_METRICS)
    plan.inception = choice
    if "isc" in wanted and not has_logits(choice.name):
        if asked:
            raise UserError(
                f"{where} isc: {choice.name} ({choice.source}) has no classifier head, so no "
                "Inception Score; pass torch-fidelity's weights with --inception-weights "
                f"(download {URL_INCEPTION_V3}), or leave isc out")
        plan.notes.append(
            f"isc skipped: {choice.name} ({choice.source}) has no classifier head; "
            "pass torch-fidelity's weights with --inception-weights for the Inception Score"
        )
        wanted = wanted - {"isc"}
    pool = bool(wanted & {"fid", "prc"})
    layers = ([POOL] if pool else []) + ([INCEPTION_LOGITS] if "isc" in wanted else [])
    if layers:
        plan.groups["inception"] = Group(
            ExtractorSpec(choice.name, choice.weights), layers,
            ref_layer=POOL if pool else None, need_ref_features="prc" in wanted,
        )
    return wanted
