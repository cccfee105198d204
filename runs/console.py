"""Where a run's words go. Diagnostics (progress, per-epoch lines, warnings, "checked ...") go to stderr,
results (the closing table, the best epoch, the report's path) to stdout, so `> log` keeps the results
and `2> progress.log` the rest. In a log or pipe nothing wraps at 80 columns: a path stays on one line.

The progress bar shows on a terminal; `on_batches(description, done, total, images_per_s)` gets the same
counts everywhere (the CLI turns them into throttled lines when stderr is a log: cli/progress.py)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import Progress, TaskID

LOG_WIDTH = 200  # columns of a table printed to a log or pipe (a terminal uses its own width)

OnBatches = Callable[[str, int, int, float], None]  # (e.g. "train 3/30", batches done, of total, images/s)


def log_console(*, stderr: bool, quiet: bool = False) -> Console:
    """A rich Console that never wraps lines when it does not write to a terminal."""
    stream = sys.stderr if stderr else sys.stdout
    terminal = stream.isatty()
    return Console(stderr=stderr, quiet=quiet, markup=False, width=None if terminal else LOG_WIDTH,
                   soft_wrap=not terminal)


class BatchProgress(Progress):
    """rich's Progress whose `reported` task also goes to `on_batches` (start: done 0; then every update)."""

    def __init__(self, *columns: Any, on_batches: OnBatches | None = None, **kwargs: Any) -> None:
        super().__init__(*columns, **kwargs)
        self.on_batches = on_batches
        self.reported: TaskID | None = None

    def reset(self, task_id: TaskID, **kwargs: Any) -> None:
        super().reset(task_id, **kwargs)
        self._report(task_id)

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._report(task_id)

    def _report(self, task_id: TaskID) -> None:
        if self.on_batches is None or task_id != self.reported:
            return
        task = self._tasks[task_id]
        self.on_batches(task.description, int(task.completed), int(task.total or 0),
                        float(task.fields.get("ips", 0.0)))
