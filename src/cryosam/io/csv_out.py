"""Picks out as CSV: cryosam's ``picks.csv`` (x, y, z voxels and per-pick columns) and
napari's points CSV (index, axis-0..2 = z, y, x), both written atomically and read back by
:func:`cryosam.io.read_points`."""

from __future__ import annotations

import csv
import io as _stdio
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from cryosam._atomic import atomic_write_text
from cryosam.io._common import as_column, as_zyx

__all__ = ["write_napari_csv", "write_picks_csv"]


def _format_value(value: object, digits: int = 6) -> str:
    """A CSV cell: integers as integers, floats shortest with at most ``digits`` decimals."""
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        if v == int(v) and abs(v) < 1e15:
            return str(int(v))
        return np.format_float_positional(v, precision=digits, unique=True, trim="-")
    return str(value)


def _csv_text(header: Sequence[str], columns: Sequence[np.ndarray], digits: Sequence[int]) -> str:
    buf = _stdio.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    n = len(columns[0]) if columns else 0
    for i in range(n):
        writer.writerow(
            [_format_value(col[i], d) for col, d in zip(columns, digits, strict=True)]
        )
    return buf.getvalue()


def write_picks_csv(
    path: str | os.PathLike[str],
    zyx: np.ndarray,
    columns: Mapping[str, object] | None = None,
) -> None:
    """Write picks as CSV ``x,y,z,<columns...>`` (voxels), atomically.

    ``columns`` (e.g. ``score``, ``instance_id``, ``n_voxels``) are written in the order given;
    :func:`read_points` reads the file back to the same points and columns.
    """
    pts = as_zyx(zyx)
    n = len(pts)
    names = ["x", "y", "z"]
    cols = [pts[:, 2], pts[:, 1], pts[:, 0]]
    digits = [3, 3, 3]
    for name, values in (columns or {}).items():
        if name.lower() in ("x", "y", "z"):
            raise ValueError(f"column name {name!r} clashes with the coordinates")
        names.append(name)
        cols.append(as_column(name, values, n))
        digits.append(6)
    atomic_write_text(path, _csv_text(names, cols, digits))


def write_napari_csv(
    path: str | os.PathLike[str],
    zyx: np.ndarray,
    columns: Mapping[str, object] | None = None,
) -> None:
    """Write points as napari's points CSV ``index,axis-0,axis-1,axis-2`` (= z, y, x),
    atomically; ``columns`` (e.g. ``score``, ``instance_id``) follow, in the order given, and
    napari reads them as point properties."""
    pts = as_zyx(zyx)
    n = len(pts)
    names = ["index", "axis-0", "axis-1", "axis-2"]
    cols = [np.arange(n), pts[:, 0], pts[:, 1], pts[:, 2]]
    digits = [0, 3, 3, 3]
    for name, values in (columns or {}).items():
        if name.lower() in names:
            raise ValueError(f"column name {name!r} clashes with napari's index/axis columns")
        names.append(name)
        cols.append(as_column(name, values, n))
        digits.append(6)
    atomic_write_text(path, _csv_text(names, cols, digits))
