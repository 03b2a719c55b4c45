"""Helpers shared by the io modules: warnings, voxel sizes, point arrays, output columns.

This module imports nothing else from :mod:`cryosam.io`, so every io module can use it
without creating an import cycle.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import numpy as np

from cryosam.errors import CryosamWarning, InputError

VoxelSize = tuple[float, float, float]  # Angstrom per voxel along (z, y, x)
# what a point-file reader returns: (N, 3) z, y, x voxels, extra columns by name, and a label
# per point ("line 4", "row 2 of data_particles") for error messages
ParsedPoints = tuple[np.ndarray, dict[str, np.ndarray], list[str]]


def warn(message: str) -> None:
    """Report a recoverable oddity of a user's file as a :class:`CryosamWarning`.

    ``stacklevel=3`` attributes it to the caller of the function that calls :func:`warn`.
    """
    warnings.warn(message, CryosamWarning, stacklevel=3)


def as_triple(value: float | Sequence[float]) -> np.ndarray:
    """One number or three (z, y, x) as a float (3,) array; TypeError/ValueError otherwise."""
    return np.broadcast_to(np.asarray(value, dtype=float), (3,)).copy()


def sizes_ok(sizes: np.ndarray) -> bool:
    """Whether every voxel size is a finite positive number of Å."""
    return bool(np.all(np.isfinite(sizes)) and np.all(sizes > 0))


def as_voxel_size(voxel_size: float | Sequence[float] | None) -> np.ndarray | None:
    """A caller's voxel size as a (z, y, x) array, None when unknown; refuse non-positive."""
    if voxel_size is None:
        return None
    vs = as_triple(voxel_size)
    if not sizes_ok(vs):
        raise InputError(f"voxel size must be positive, got {voxel_size}; pass --voxel-size")
    return vs


def as_zyx(zyx: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """Points to write as a finite float64 (N, 3) z, y, x array (ValueError otherwise)."""
    arr = np.asarray(zyx, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, 3)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"points must be an (N, 3) array of z, y, x; got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("points must be finite")
    return arr


def as_column(name: str, values: object, n: int) -> np.ndarray:
    """An extra output column as an (n,) array; a scalar is repeated n times."""
    arr = np.asarray(values)
    if arr.ndim == 0:
        arr = np.full(n, arr[()])
    if arr.shape != (n,):
        raise ValueError(f"column {name!r} has shape {arr.shape}; expected ({n},)")
    return arr


@contextlib.contextmanager
def third_party_quiet() -> Iterator[None]:
    """Silence mrcfile's and starfile's own warnings: cryosam checks and reports these itself."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def sizes_text(sizes: float | Sequence[float] | np.ndarray) -> str:
    """One size, or three along z/y/x when they differ, for a message ("10", "2/2/4 (z/y/x)")."""
    values = np.round(np.asarray(sizes, dtype=np.float64).reshape(-1), 4)
    if len(set(values.tolist())) == 1:
        return f"{values[0]:g}"
    return "/".join(f"{v:g}" for v in values) + " (z/y/x)"
