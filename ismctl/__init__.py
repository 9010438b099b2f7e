"""ismctl: improved shortcut models (iSM) — train, sample, evaluate and ablate."""

__version__ = "0.1.0"
