"""Small helpers every stage shares: axis names, file hashing, byte sizes, memory, shapes.

One helper each, so that no module grows its own copy. Only the standard library and numpy
are imported here: this module sits at the bottom of the import graph.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from cryosam.errors import InputError

AXES = ("z", "y", "x")  # volume axes, in array order; slice stacks are named by these too

_MIB = 1 << 20


class Digest(Protocol):
    """What :mod:`hashlib` objects offer (so several digests can share one read)."""

    def update(self, data: bytes, /) -> None:
        """Add ``data`` to what the digest hashes (one call per chunk read)."""
        ...


def hash_file(path: str | os.PathLike[str], *digests: Digest,
              advance: Callable[[int], None] | None = None, chunk_size: int = 8 * _MIB) -> None:
    """Feed the bytes of ``path`` into every digest in one pass; ``advance(n)`` per chunk."""
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            for d in digests:
                d.update(chunk)
            if advance is not None:
                advance(len(chunk))


def sha256_file(path: str | os.PathLike[str],
                advance: Callable[[int], None] | None = None) -> str:
    """Full SHA-256 (hex) of a file, read in chunks: run-record checksums and weight checks."""
    digest = hashlib.sha256()
    hash_file(path, digest, advance=advance)
    return digest.hexdigest()


def format_bytes(n: int | float) -> str:
    """A byte count as a short human string in binary units (512 B, 358 MiB, 2.41 GiB)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit in ("B", "KiB") else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def rss_bytes() -> int:
    """Current resident memory of this process (Linux ``/proc``), 0 where unknown."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (``getrusage``; Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class RssSampler:
    """Polls this process's resident memory while a block runs: ``peak - base`` is what the
    block added (``getrusage``'s peak never goes down, so it cannot measure one block)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.base = self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def added(self) -> int:
        """Peak resident memory above the level at entry, in bytes."""
        return self.peak - self.base


def parse_shape(text: str, option: str = "--shape") -> tuple[int, int, int]:
    """``"64,160,160"`` (z,y,x; ``x`` also separates) → (64, 160, 160); one clear error else."""
    try:
        parts = tuple(int(v) for v in str(text).replace("x", ",").split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) <= 0:
        raise InputError(f"{option} {text!r}: give three positive integers z,y,x, "
                         "e.g. 64,160,160")
    return parts  # type: ignore[return-value]


def outside_volume(zyx: np.ndarray, shape: tuple[int, ...] | list[int]) -> np.ndarray:
    """(N,) bool: which (z, y, x) points lie beyond the outer voxel edges (-0.5 ... size - 0.5)
    of a volume of ``shape`` (its last three sizes)."""
    pts = np.asarray(zyx, dtype=np.float64).reshape(-1, 3)
    size = np.asarray([int(v) for v in list(shape)[-3:]], dtype=np.float64)
    return np.any((pts < -0.5) | (pts > size - 0.5), axis=1)


def tomo_stem(path: str | os.PathLike[str]) -> str:
    """A tomogram's name without folder and extensions (``TS_01.mrc.gz`` → ``TS_01``)."""
    name = Path(path).name
    for ext in (".gz", ".bz2"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    return Path(name).stem


def volume_hash(volume: np.ndarray) -> str:
    """Content hash of a tomogram (shape, dtype and every voxel; about 0.2 s for a
    200x512x512 float32 volume): the feature cache's key and the segmenter's same-volume
    test."""
    vol = np.ascontiguousarray(volume)
    digest = hashlib.blake2b(digest_size=32)
    digest.update(f"{vol.shape}:{vol.dtype.str};".encode())
    digest.update(memoryview(vol).cast("B"))
    return digest.hexdigest()


@contextlib.contextmanager
def committed() -> Iterator[None]:
    """The outputs are on disk: within the block (the summary a command prints after them)
    Ctrl-C and SIGTERM are ignored, so a late signal cannot turn a finished run into exit
    130/143 and a message that nothing was written. Main thread only; restored after."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in before:
        signal.signal(s, signal.SIG_IGN)
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
