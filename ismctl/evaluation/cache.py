"""The on-disk cache of evaluation artefacts (reference statistics, the digits classifier)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``$ISMCTL_CACHE/<parts>`` or ``~/.cache/ismctl/<parts>``; created on demand."""
    root = os.environ.get("ISMCTL_CACHE") or Path.home() / ".cache" / "ismctl"
    path = Path(root).expanduser().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
