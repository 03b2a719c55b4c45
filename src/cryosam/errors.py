"""User-facing errors: one clear line, exit code 2, no traceback unless --debug."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class CryosamError(Exception):
    """An error caused by the user's input or environment, reported as one line.

    The message should name the file (or option) at fault and say how to fix it.
    """


class InputError(CryosamError):
    """A tomogram, point file or option that cannot be used as given."""


class MissingWeightsError(CryosamError):
    """Model weights that are not on this machine; the message says how to get them.

    ``name`` is the model's name in ``cryosam weights download`` when it has one.
    """

    def __init__(self, message: str, name: str | None = None) -> None:
        super().__init__(message)
        self.name = name


class CryosamWarning(UserWarning):
    """Something about the input that cryosam could handle but the user should know.

    The CLI prints these as one ``warning: ...`` line each.
    """


class Terminated(BaseException):
    """Raised in the main thread when the process gets SIGTERM (what SLURM sends at the time
    limit), so that every ``finally`` and cleanup runs before the exit code 143."""


class Stopped(Exception):  # noqa: N818 - a stop, not an error
    """A command stopped by Ctrl-C or SIGTERM that has said what it kept: the CLI prints
    ``message`` as the one line and exits with ``code`` (130 or 143)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message, self.code = message, int(code)


@contextmanager
def collect_warnings() -> Iterator[list[str]]:
    """Collect the messages of the :class:`CryosamWarning` s shown inside the block (once
    each, in order) so that a run record can keep them; they are still shown as before
    (the CLI's one line, napari's notification, a batch worker's own collection)."""
    seen: list[str] = []
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: Any = None, line: str | None = None) -> None:
            if issubclass(category, CryosamWarning) and str(message) not in seen:
                seen.append(str(message))
            shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield seen


def keep_warnings(record: dict[str, Any], said: list[str]) -> None:
    """Add the warnings ``said`` to a run record's ``warnings`` (once each, in order): the
    pipeline's own, then what its caller saw around it (reading the files, writing them)."""
    record["warnings"] = list(dict.fromkeys([*record.get("warnings", []), *said]))
