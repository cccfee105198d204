"""Progress for a log file: without a TTY there is no rich bar, so `convert` and `cv` print a plain line
whenever 10 s or 10 % of the work have passed since the last one, whichever comes first, and `train`
one every 30 s or 10 % of an epoch's batches, e.g.

    convert: 1,200/3,000 images (40 %), 85 img/s, ETA 21 s
    train 3/30: 12/40 batches (30 %), 18.5 img/s, ETA 1 min

The library reports counts (a callback); the words are chosen here, at the edge."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

EVERY_S = 10.0  # a line at least this often while counted work goes on ...
EVERY_SHARE = 0.1  # ... or after this share of it, whichever comes first
TRAIN_EVERY_S = 30.0  # train's batches: an epoch is minutes, a line every 10 s would drown the epoch lines


def _rate(per_s: float) -> str:
    return f"{per_s:,.0f}" if per_s >= 100 else f"{per_s:.1f}" if per_s >= 1 else f"{per_s:.2f}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class ProgressLines:
    """Throttled `NAME: done/total UNIT (p %), r UNIT/s, ETA t` lines through `echo`."""

    def __init__(self, name: str, unit: str, rate_unit: str, echo: Callable[[str], None], *,
                 every_s: float = EVERY_S, every_share: float = EVERY_SHARE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name, self.unit, self.rate_unit, self.echo = name, unit, rate_unit, echo
        self.every_s, self.every_share, self.clock = every_s, every_share, clock
        self.total = 0
        self._lock = threading.Lock()  # cv's watcher thread and its main thread both report

    def step(self, description: str) -> None:
        """An uncounted step (`convert: writing train.beton`): one line as it starts."""
        self.echo(f"{self.name}: {description}")

    def start(self, total: int, done: int = 0) -> None:
        """Counted work begins; `done` units were finished before (a resumed cv), the rate leaves them out."""
        with self._lock:
            self.total, self._first = total, done
            self._t0 = self._last_t = self.clock()
            self._last_done = done

    def update(self, done: int, detail: str = "", rate: float | None = None) -> None:
        """`done` units so far: a line when 10 s or 10 % have passed since the last, and at the end.
        `rate`: the rate to show in rate_unit/s (default: units done per second)."""
        with self._lock:
            now = self.clock()
            finished = done >= self.total and self._last_done < self.total
            if not (finished or now - self._last_t >= self.every_s
                    or done - self._last_done >= self.every_share * self.total):
                return
            self._last_t, self._last_done = now, done
            self.echo(self.line(done, now, rate) + (f"; {detail}" if detail else ""))

    def line(self, done: int, now: float, rate: float | None = None) -> str:
        share = 100.0 * done / self.total if self.total else 100.0
        text = f"{self.name}: {done:,}/{self.total:,} {self.unit} ({share:.0f} %)"
        elapsed, new = now - self._t0, done - self._first
        if elapsed > 0 and new > 0:
            per_s = new / elapsed
            text += f", {_rate(per_s if rate is None else rate)} {self.rate_unit}/s"
            if done < self.total:
                text += f", ETA {_duration((self.total - done) / per_s)}"
        return text


def convert_reporter(lines: ProgressLines) -> Callable[[str, int, int | None], None]:
    """convert_dataset's `on_progress(step, done, total)` as lines: counted steps (decoding) by the count,
    the others (writing, hashing) once as they start."""

    def on_progress(step: str, done: int, total: int | None) -> None:
        if total is None:
            lines.step(step)
        elif done == 0:
            lines.step(f"{step} {total:,} {lines.unit}")
            lines.start(total)
        else:
            lines.update(done)

    return on_progress


def batch_reporter(echo: Callable[[str], None]) -> Callable[[str, int, int, float], None]:
    """train's `on_batches(description, done, total, images_per_s)` as lines: a training pass every 30 s or
    10 % of its batches; validation (a line an epoch follows it) every 30 s and at its end."""
    current: list[ProgressLines] = []

    def on_batches(description: str, done: int, total: int, images_per_s: float) -> None:
        if done == 0:
            share = EVERY_SHARE if description.startswith("train") else 1.0
            current[:] = [ProgressLines(description, "batches", "img", echo, every_s=TRAIN_EVERY_S,
                                        every_share=share)]
            current[0].start(total)
        elif current:
            current[0].update(done, rate=images_per_s)

    return on_batches


class EpochWatch:
    """cv's progress over all its runs, counted in epochs: a thread reads how many lines the running run's
    metrics file has (one per finished epoch) every `poll_s` and reports through `lines`.

    `runs` maps each run folder to its epochs; `done` lists the runs finished before (a rerun skips them).
    Use as a context manager; call `begin(run)` before a run trains and `end(run)` after it (a run that
    stopped early counts in full)."""

    def __init__(self, lines: ProgressLines, runs: dict[Path, int], done: set[Path], metrics_file: str,
                 poll_s: float = 1.0) -> None:
        self.lines, self.runs, self.done, self.metrics_file, self.poll_s = lines, runs, set(done), metrics_file, poll_s
        self.current: Path | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="cv-progress", daemon=True)

    def count(self) -> tuple[int, str]:
        """(epochs done over all runs, which epoch of which run trains now)."""
        done = sum(self.runs[r] for r in self.done)
        run = self.current
        if run is None or run in self.done:
            return done, ""
        metrics = run / self.metrics_file
        epochs = min(metrics.read_text().count("\n") if metrics.is_file() else 0, self.runs[run])
        return done + epochs, f"{run.name} epoch {epochs}/{self.runs[run]}"

    def begin(self, run: Path) -> None:
        self.current = run

    def end(self, run: Path) -> None:
        self.done.add(run)
        self.lines.update(*self.count())

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.lines.update(*self.count())

    def __enter__(self) -> EpochWatch:
        self.lines.start(sum(self.runs.values()), done=self.count()[0])
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
