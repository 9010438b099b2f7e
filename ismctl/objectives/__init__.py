"""Layer 4, the methods: one module per objective family (``shortcut``: sm and ism;
``meanflow``), the registry they enter (``registry``) and the guidance arithmetic they share
(``guidance``). Imports layers 0-3.

Importing the package registers every family.
"""

from __future__ import annotations

from ismctl.objectives import meanflow, shortcut
from ismctl.objectives.registry import (
    LossFn,
    Network,
    ObjectiveSpec,
    available_objectives,
    flow_jump,
    get_objective,
    jump_embedding,
    one_pass_sampler,
    register_objective,
)

__all__ = ["LossFn", "Network", "ObjectiveSpec", "available_objectives", "flow_jump",
           "get_objective", "jump_embedding", "meanflow", "one_pass_sampler",
           "register_objective", "shortcut"]
