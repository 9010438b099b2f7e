"""Progress of every long-running command: a rich bar in a terminal, plain lines otherwise.

Under ``sbatch``, ``nohup`` or ``| tee`` stdout is not a terminal and a live bar would show
nothing until it ends, so there each bar becomes a plain line (done/total, rate, elapsed,
ETA) printed at most every ``ISMCTL_LOG_INTERVAL`` seconds (default 30) and once at the end.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator

from rich.markup import escape
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

INTERVAL_ENV = "ISMCTL_LOG_INTERVAL"
DEFAULT_INTERVAL_S = 30.0


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def plain_interval() -> float:
    """Seconds between plain progress lines (``ISMCTL_LOG_INTERVAL``, default 30)."""
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


def format_duration(seconds: float | None) -> str:
    """``1d 02:03:04`` / ``0:03:04``; ``-`` when unknown."""
    if seconds is None or seconds != seconds or seconds in (float("inf"), float("-inf")):
        return "-"
    seconds = max(0, round(seconds))
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3_600)
    text = f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days}d {text:0>8}" if days else text


class RateColumn(ProgressColumn):
    """Items per second, in the bar's own unit (it/s, img/s, ...)."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-" if speed is None else f"{speed:,.1f} {self.unit}/s", style="cyan")


class PlainBar:
    """The bar as plain lines, for logs: one at most every ``interval`` s, one at the end."""

    def __init__(self, description: str, total: float, completed: float, unit: str,
                 interval: float) -> None:
        self.description, self.total, self.unit, self.interval = description, total, unit, interval
        self.done, self.start_done = completed, completed
        self.info = ""
        self.t_start = self.t_last = time.perf_counter()
        self.printed = completed

    def advance(self, n: float = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.t_last >= self.interval or (self.total and self.done >= self.total):
            self.line(now)

    def update(self, info: str) -> None:
        self.info = info

    def line(self, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        elapsed = now - self.t_start
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 and self.total else None
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        text = (f"{self.description}: {self.done:,.0f}/{self.total:,.0f} {self.unit}{share}, "
                f"{rate:,.1f} {self.unit}/s, elapsed {format_duration(elapsed)}, "
                f"eta {format_duration(eta)}")
        print(f"{text} {self.info}".rstrip(), flush=True)
        self.t_last, self.printed = now, self.done

    def close(self) -> None:
        if self.done != self.printed:
            self.line()


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
                 completed: float = 0, plain: bool = True) -> Iterator[Bar | PlainBar]:
    """A bar showing done/total, rate, elapsed and ETA, plus a free ``info`` text field
    (the trainer puts its losses there); a no-op when disabled. ``unit`` names what ``total``
    counts: ``"img"`` wherever images are counted (rates in img/s), ``"it"`` otherwise. When
    stdout is not a terminal: plain lines, or nothing with ``plain=False`` (for a caller that
    prints its own, like the trainer)."""
    if not enabled or not (plain or stdout_is_terminal()):
        yield Bar(None, None)
        return
    if not stdout_is_terminal():
        bar = PlainBar(description, total, completed, unit, plain_interval())
        yield bar
        bar.close()
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               RateColumn(unit), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
               TextColumn("{task.fields[info]}"))
    with Progress(*columns) as progress:
        # Descriptions name runs and folders: shown as written, not read as markup.
        task = progress.add_task(escape(description), total=total, completed=completed,
                                 info="")
        yield Bar(progress, task)
