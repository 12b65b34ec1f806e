"""Progress of long CLI work (``suppress import`` / ``export``): on a terminal only.

rich draws it on stderr with the count, the rate and, when the total is known, the
ETA; when stderr is not a terminal (a pipe, a log file, cron) nothing is drawn, so
scripted output stays byte for byte what it was.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

STEP = 1000
"""Lines or entries between two updates: the per-item cost stays negligible."""


class _Rate(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f}/s")


class Meter:
    """One running count; ``advance`` is cheap, the drawing happens in rich's thread."""

    def __init__(self, progress: Progress | None, task: TaskID | None) -> None:
        self._progress = progress
        self._task = task
        self._pending = 0

    def advance(self, n: int = 1) -> None:
        if self._progress is None or self._task is None:
            return
        self._pending += n
        if self._pending >= STEP:
            self._progress.advance(self._task, self._pending)
            self._pending = 0

    def flush(self) -> None:
        if self._progress is not None and self._task is not None and self._pending:
            self._progress.advance(self._task, self._pending)
            self._pending = 0

    def lines(self, source: Iterable[str]) -> Iterator[str]:
        for line in source:
            self.advance()
            yield line
        self.flush()


@contextmanager
def meter(
    what: str, total: int | None, *, quiet: bool = False, stream: TextIO | None = None
) -> Iterator[Meter]:
    """A progress line for ``what`` on ``stream`` (stderr) when it is a terminal."""
    console = Console(file=stream or sys.stderr)
    if quiet or not console.is_terminal:
        yield Meter(None, None)
        return
    columns: list[ProgressColumn] = [TextColumn(what)]
    if total is not None:
        columns += [BarColumn(), MofNCompleteColumn(), _Rate(), TextColumn("ETA"),
                    TimeRemainingColumn()]  # fmt: skip
    else:
        columns += [TextColumn("{task.completed:,}"), _Rate(), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(what, total=total)
        m = Meter(progress, task)
        try:
            yield m
        finally:
            m.flush()


def count_lines(path: Path) -> int:
    """Lines in a file, read in binary blocks (about 1 s for 10 million addresses)."""
    n = 0
    last = b"\n"
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")
