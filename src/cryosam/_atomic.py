"""Atomic file writes: write to a temporary sibling, rename on success, remove on failure.

An interrupted run therefore never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    ``suffix`` defaults to the final suffix(es) of ``path`` so that libraries that infer the
    format from the extension (e.g. ``.mrc``, ``.png``) keep working.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(final.suffixes[-2:]) if final.suffixes else ""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".part{suffix}",
                                    dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give outputs the usual permissions
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
