"""ismctl: improved shortcut models (iSM) — train, sample, evaluate and ablate.

The Python API (:mod:`ismctl.tools.api`)::

    from ismctl import load_model
    model = load_model("runs/quickstart")        # a run, a checkpoint, an export or weights
    images = model.sample(num=16, steps=4, class_labels=3)   # uint8 (16, H, W, C)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Model", "__version__", "export_run", "init_from_pretrained", "load_model"]

if TYPE_CHECKING:
    from ismctl.networks.pretrained import init_from_pretrained
    from ismctl.tools.api import Model, load_model
    from ismctl.tools.export import export_run

# Imported on first use, so `import ismctl` (and the command line's start) stays light.
_LAZY = {"Model": "ismctl.tools.api", "load_model": "ismctl.tools.api",
         "export_run": "ismctl.tools.export", "init_from_pretrained": "ismctl.networks.pretrained"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ismctl' has no attribute {name!r}")
