"""YAML that refuses duplicate keys.

PyYAML's loaders keep the last of two equal keys in one mapping, so a recipe that sets
``optim: {lr: 1e-4}`` twice, or ``lr`` twice inside it, silently trains with whichever came
last. ``safe_load_unique`` reads like ``yaml.safe_load`` but raises a ``ConstructorError``
with the line and column of the second key, which the callers already turn into one line.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` whose mappings may not repeat a key."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        # Only the keys written in this mapping count: a key may override one brought in by
        # a merge key (<<), which SafeLoader flattens into the mapping afterwards.
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader reports it below
                continue
            if first is not None:
                raise ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"duplicate key {key!r}, first set on line {first.line + 1}",
                    key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def safe_load_unique(text: str) -> Any:
    """``yaml.safe_load(text)``, with a repeated key in any mapping an error."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
