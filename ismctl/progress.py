"""Rich progress bars with rate and ETA, shared by every long-running command."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second, in the bar's own unit (it/s, img/s, ...)."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-" if speed is None else f"{speed:,.1f} {self.unit}/s", style="cyan")


class Bar:
    def __init__(self, progress: Progress | None, task: int | None) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def update(self, info: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, info=info)


@contextlib.contextmanager
def progress_bar(description: str, total: float, enabled: bool = True, unit: str = "it",
                 completed: float = 0) -> Iterator[Bar]:
    """A bar showing done/total, rate, elapsed and ETA, plus a free ``info`` text field
    (the trainer puts its losses there); a no-op when disabled."""
    if not enabled:
        yield Bar(None, None)
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               RateColumn(unit), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
               TextColumn("{task.fields[info]}"))
    with Progress(*columns) as progress:
        task = progress.add_task(description, total=total, completed=completed, info="")
        yield Bar(progress, task)
