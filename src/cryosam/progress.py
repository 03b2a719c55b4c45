"""Progress of long steps: a bar on a terminal; in a log (a SLURM job, nohup, a pipe) one
plain line every ``LOG_EVERY`` seconds while a step runs, so short steps add nothing and a
long one shows it is alive; nothing with --quiet."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_QUIET = False
LOG_EVERY = 30.0  # seconds between two progress lines in a log


def set_quiet(quiet: bool) -> None:
    """Silence (or re-enable) every progress bar in this process, and cryosam's own log
    lines below warnings (another library may have sent INFO logs to the terminal)."""
    global _QUIET
    _QUIET = quiet
    logging.getLogger("cryosam").setLevel(logging.WARNING if quiet else logging.NOTSET)


def settle_quiet(asked: bool) -> bool:
    """A command's ``-q`` joins ``cryosam -q`` (given before the command): returns whether
    either asked for quiet, and silences the process when one did."""
    if asked:
        set_quiet(True)
    return _QUIET


def enabled() -> bool:
    """True when progress should be drawn: not quiet and stderr is a terminal."""
    return not _QUIET and sys.stderr.isatty()


def track(iterable: Iterable[T], description: str, total: int | None = None,
          log: bool = True, counts: Callable[[T], int] | None = None) -> Iterator[T]:
    """Iterate over ``iterable`` with a rich progress bar when :func:`enabled`; else, unless
    quiet or ``log`` is False, with a line on stderr every :data:`LOG_EVERY` seconds.
    ``counts``: how far each item moves the count (default 1; 0 for an item that only shows
    the step is alive, as a propagation step that ended no chain). An empty ``description``
    shows nothing (a step run inside another that shows its own progress)."""
    if not description:
        yield from iterable
        return
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    step = counts or (lambda _: 1)
    if not enabled():
        if _QUIET or not log:
            yield from iterable
        else:
            yield from _logged(iterable, description, total, step)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in iterable:
            yield item
            bar.advance(task, step(item))


def _logged(iterable: Iterable[T], description: str, total: int | None,
            step: Callable[[T], int]) -> Iterator[T]:
    """``iterable`` with a plain progress line every :data:`LOG_EVERY` seconds (done, share,
    elapsed and an estimate of what is left), and one when it ends if any was written."""
    start = last = time.perf_counter()
    done = 0
    for item in iterable:
        yield item
        done += step(item)
        now = time.perf_counter()
        if now - last >= LOG_EVERY:
            last = now
            _line(description, done, total, now - start)
    if last > start:
        _line(description, done, total, time.perf_counter() - start, finished=True)


def _line(description: str, done: int, total: int | None, elapsed: float,
          finished: bool = False) -> None:
    of = f"/{total} ({done / total:.0%})" if total else ""
    left = (f", about {clock(elapsed / done * (total - done))} left"
            if total and done and not finished else "")
    state = "done in" if finished else "after"
    print(f"cryosam: {description} {done}{of} {state} {clock(elapsed)}{left}",
          file=sys.stderr, flush=True)


def clock(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else \
        f"{s // 60}:{s % 60:02d}"
