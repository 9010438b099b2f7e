"""Layer 1, the recipe: pydantic models of every setting, YAML loading with ``extends:`` and
``--set``, the shipped recipes by name, and the names the recipe validates against (``names``).
Imports only ``ismctl.utils``.
"""
