"""Compatibility name: the shortcut objectives now live in :mod:`ismctl.objectives.shortcut`."""

from ismctl.objectives.shortcut import (
    BootstrapPlan,
    NetInputs,
    bootstrap_target,
    call_fused,
    grid_times,
    guidance_finish,
    guidance_inputs,
    guidance_target,
    jump_levels,
    shortcut_loss,
    split_sizes,
)

__all__ = ["BootstrapPlan", "NetInputs", "bootstrap_target", "call_fused", "grid_times",
           "guidance_finish", "guidance_inputs", "guidance_target", "jump_levels",
           "shortcut_loss", "split_sizes"]
