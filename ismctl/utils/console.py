"""The rich console every command prints through: at the terminal's width in a terminal, and
unwrapped in a log.

rich assumes 80 columns when its output is not a terminal (``sbatch``, ``nohup``, ``| tee``),
so a one-line report became two lines and a table squeezed its columns (cutting names to
``objective.mod…``). There, lines are left as long as they are (``COLUMNS``, when set, still
gives the width), and a table's title and caption, which rich wraps to the table's own width,
are printed as lines of their own above and below it.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console, ConsoleDimensions
from rich.table import Table

# The width assumed for a log: wide enough that no report line or table wraps.
LOG_WIDTH = 10_000


class LogConsole(Console):
    """A rich Console that does not wrap when its output is not a terminal."""

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self.is_terminal or self._width is not None or self._environ.get("COLUMNS"):
            return size
        return ConsoleDimensions(LOG_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]

    def print(self, *objects: Any, **kwargs: Any) -> None:
        if self.is_terminal or not any(isinstance(o, Table) for o in objects):
            super().print(*objects, **kwargs)
            return
        for obj in objects:
            if not isinstance(obj, Table):
                super().print(obj, **kwargs)
                continue
            title, caption = obj.title, obj.caption
            obj.title = obj.caption = None
            if title:
                super().print(title, **kwargs)
            super().print(obj, **kwargs)
            if caption:
                super().print(caption, **kwargs)
            obj.title, obj.caption = title, caption


def make_console(**kwargs: Any) -> Console:
    """``rich.console.Console(**kwargs)`` that does not wrap in logs."""
    return LogConsole(**kwargs)
