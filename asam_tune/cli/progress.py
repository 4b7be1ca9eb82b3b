"""Progress for long commands: a bar on a terminal, a plain line every few seconds in a log.

A rich progress bar switches itself off when stderr is not a terminal, so a Slurm or CI log
would show nothing until the command ends. ``Progress`` keeps the bar for terminals and
otherwise prints ``asam-tune: <what>: <done>/<total> (<pct>), <elapsed> s`` on an update once
``every_s`` seconds have passed since the start or the last line (a command that fails at once
prints only its error). The clock and the stream are injectable (tests).
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

PLAIN_EVERY_S = 5.0


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float = 0.0


class Progress:
    """``with Progress() as progress: task = progress.add_task("x", total=10); progress.update(task, ...)``.

    ``terminal``: None asks the stream; True draws a rich bar (transient), False prints lines.
    """

    def __init__(self, *, stream: IO[str] | None = None, terminal: bool | None = None,
                 every_s: float = PLAIN_EVERY_S, clock: Callable[[], float] = time.monotonic):
        self._stream = stream if stream is not None else sys.stderr
        if terminal is None:
            isatty = getattr(self._stream, "isatty", None)
            terminal = bool(isatty and isatty())
        self._terminal = terminal
        self._every_s = every_s
        self._clock = clock
        self._tasks: dict[int, _Task] = {}
        self._started = clock()
        self._last_line: float | None = None
        self._bar = None

    def __enter__(self) -> Progress:
        if self._terminal:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=Console(file=self._stream), transient=True)
            self._bar.__enter__()
        self._started = self._clock()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc_info)
            self._bar = None

    def add_task(self, description: str, total: float | None = None) -> int:
        if self._bar is not None:
            return self._bar.add_task(description, total=total)
        task_id = len(self._tasks)
        self._tasks[task_id] = _Task(description, total)
        self._line(self._tasks[task_id])
        return task_id

    def update(self, task_id: int, *, description: str | None = None, completed: float | None = None,
               total: float | None = None, advance: float | None = None) -> None:
        if self._bar is not None:
            options = {k: v for k, v in (("description", description), ("completed", completed),
                                         ("total", total), ("advance", advance)) if v is not None}
            self._bar.update(task_id, **options)
            return
        task = self._tasks[task_id]
        if description is not None:
            task.description = description
        if total is not None:
            task.total = total
        if completed is not None:
            task.completed = completed
        if advance is not None:
            task.completed += advance
        self._line(task)

    def _line(self, task: _Task) -> None:
        now = self._clock()
        if now - (self._started if self._last_line is None else self._last_line) < self._every_s:
            return
        self._last_line = now
        count = ""
        if task.total:
            count = f": {task.completed:g}/{task.total:g} ({task.completed / task.total:.0%})"
        elif task.completed:
            count = f": {task.completed:g} done"
        print(f"asam-tune: {task.description}{count}, {now - self._started:.0f} s", file=self._stream, flush=True)


__all__ = ["PLAIN_EVERY_S", "Progress"]
