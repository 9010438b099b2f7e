"""The names a recipe is checked against, kept here so the recipe imports none of the code
they name (the networks, the losses): the configuration layer stays at the bottom.

Each table is the source its layer reads: ``ismctl.networks.model`` builds its presets from
``PRESETS``, and ``ismctl.losses`` refuses to register a loss whose name is not in
``LOSS_NAMES`` (a new loss adds its name here, where the recipe sees it).
"""

from __future__ import annotations

# Backbone sizes of the DiT family (Peebles & Xie 2023, table 1) plus a CPU-sized one.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 128, "depth": 4, "num_heads": 4},
    "S": {"hidden_size": 384, "depth": 12, "num_heads": 6},
    "B": {"hidden_size": 768, "depth": 12, "num_heads": 12},
    "L": {"hidden_size": 1024, "depth": 24, "num_heads": 16},
    "XL": {"hidden_size": 1152, "depth": 28, "num_heads": 16},
}

# The per-sample losses of ``ismctl.losses`` (``loss.name``).
LOSS_NAMES: tuple[str, ...] = ("mse", "wavelet")
