"""`python -m ismctl ...` (also what `torchrun -m ismctl train RECIPE` runs)."""

from ismctl.cli import main

main()
