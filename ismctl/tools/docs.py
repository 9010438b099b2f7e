"""``ismctl docs``: the manual (``docs/*.md``) as shipped inside the package.

``ismctl/docs`` is a link to the clone's ``docs/`` folder; building the wheel copies its
Markdown files into the package, so what the help text and the recipes cite (``docs/method.md
§2``) is there wherever ismctl is installed, as ``ismctl docs method``.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path

from ismctl.utils.errors import UserError


def docs_dir() -> Path:
    return Path(str(resources.files("ismctl") / "docs"))


def shipped_docs() -> dict[str, Path]:
    """Name (the file name without ``.md``) -> file, sorted by name."""
    folder = docs_dir()
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.md"))}


def title(path: Path) -> str:
    """The first Markdown heading of a doc, without its hashes."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def find_doc(name: str) -> Path:
    """A doc by name: ``method``, ``method.md`` and ``docs/method.md`` all name the same."""
    docs = shipped_docs()
    key = Path(name).name.removesuffix(".md")
    if key in docs:
        return docs[key]
    close = difflib.get_close_matches(key, list(docs), n=3, cutoff=0.5)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise UserError(f"ismctl docs {name}: no such document{hint}; `ismctl docs` lists them: "
                    f"{', '.join(docs) or 'none shipped'}")
