"""Progress bars for long steps: shown on a terminal, silent in logs and with --quiet."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_QUIET = False


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


def track(iterable: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate over ``iterable`` with a rich progress bar when :func:`enabled`."""
    if not enabled():
        yield from iterable
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in iterable:
            yield item
            bar.advance(task)
