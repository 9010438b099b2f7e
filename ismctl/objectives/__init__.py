"""Layer 4, the methods: one module per objective family (``shortcut``: sm and ism;
``meanflow``), ismctl's own plugin declarations (``builtin``), the registry helpers
(``registry``) and the guidance arithmetic they share (``guidance``). Imports layers 0-3.

Objectives are plugins (ismctl.config.plugins, docs/extending.md): ismctl's own enter the
registry through the entry points of its package metadata, like anyone's. Importing this package
imports no method module and no torch.
"""

from __future__ import annotations

from ismctl.objectives.registry import (
    LossFn,
    Needs,
    Network,
    ObjectiveSpec,
    Sampling,
    available_objectives,
    flow_jump,
    get_objective,
    jump_embedding,
    one_pass_sampler,
    register_objective,
    sampling,
)

__all__ = ["LossFn", "Needs", "Network", "ObjectiveSpec", "Sampling", "available_objectives",
           "flow_jump", "get_objective", "jump_embedding", "one_pass_sampler",
           "register_objective", "sampling"]
