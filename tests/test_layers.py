"""The package's architecture as a test: every module sits in a layer (ismctl/README.md), imports
only its own layer or the ones below, and the import graph has no cycle. Imports inside
functions count as much as those at the top: a lazy import that reaches up is still a loop.
Also: every module imports, and the names the recipe validates against match their registries.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ismctl"

# Subpackage (or top-level module) -> layer; a module may import layers <= its own.
LAYERS = {
    "utils": 0, "config": 1, "system": 2, "networks": 3, "data": 3, "objectives": 4,
    "losses": 4, "runs": 5, "sampling": 6, "training": 7, "evaluation": 7, "tools": 8,
    "studies": 9, "cli": 9, "__main__": 10, "__init__": 10,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return LAYERS["__init__"]
    return LAYERS[parts[1]]


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every ismctl module ``path`` imports, anywhere in the file (TYPE_CHECKING-only imports
    excepted: they never run)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not node.module.startswith("ismctl"):
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ismctl")}
    return {m for m in found if m in modules}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_every_module_sits_in_a_layer() -> None:
    for name in _modules():
        _layer(name)   # KeyError: a new subpackage needs a layer here and in ismctl/README.md


def test_no_module_imports_a_layer_above_its_own() -> None:
    upward = [f"{a} (layer {_layer(a)}) -> {b} (layer {_layer(b)})"
              for a, deps in _graph().items() for b in deps
              if _layer(b) > _layer(a) and a != "ismctl" and b != "ismctl"]
    assert upward == []


def test_the_import_graph_has_no_cycle() -> None:
    """Packages import their own modules (``__init__`` re-exports), so a package is part of a
    cycle only through a module that imports the package back."""
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt == "ismctl":   # the root holds only the version and lazy names
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            pytest.fail(" -> ".join(cycle))


@pytest.mark.parametrize("name", sorted(set(_modules()) - {"ismctl.__main__"}))
def test_every_module_imports(name: str) -> None:
    importlib.import_module(name)


def test_recipe_names_match_their_registries() -> None:
    from ismctl.config.names import LOSS_NAMES, PRESETS
    from ismctl.losses import available_losses
    from ismctl.networks.model import build_model

    assert sorted(LOSS_NAMES) == available_losses()
    for size in PRESETS:
        assert build_model(f"{size}/8", input_size=8, in_channels=1, num_classes=2).depth == \
            PRESETS[size]["depth"]
