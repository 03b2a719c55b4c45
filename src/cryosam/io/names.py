"""Which rows of a points file belong to this tomogram, by the tomogram-name column.

RELION and Warp STAR files (``rlnTomoName``, ``rlnMicrographName``) and combined CSV files
(``tomo_name``, ``tomogram``, ...) often hold the points of many tomograms. A name the user
gives (``--tomo-name``) must be in the file; without one, the tomogram's own file name picks
its rows, so ``cryosam segment TS_01.mrc --points all.star`` reads TS_01's points only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from cryosam.errors import InputError
from cryosam.io._common import warn

# lower-case CSV headers that name the tomogram a row belongs to, in order of preference
CSV_NAME_COLUMNS = ("rlntomoname", "rlnmicrographname", "tomo_name", "tomogram", "tomo")


def csv_name_column(columns: Iterable[str]) -> str | None:
    """The lower-case CSV column (of ``columns``) that names each row's tomogram, if any."""
    present = set(columns)
    return next((c for c in CSV_NAME_COLUMNS if c in present), None)


_TOMO_SUFFIXES = re.compile(r"(\.(gz|bz2|mrc|mrcs|rec|map|st|ali|tomostar|zarr|em|xml))+$",
                            re.IGNORECASE)
_WARP_SUFFIX = re.compile(r"_\d+(?:\.\d+)?Apx(?:_[A-Za-z0-9]+)*$")  # TS_01_10.00Apx


def star_tomo_name(name: str) -> str:
    """The tomogram's name as RELION and Warp list it: no folder or extension, no RELION-5
    ``rec_`` prefix, no Warp ``_<pixel size>Apx`` suffix (``rec_TS_01.mrc`` and
    ``TS_01_10.00Apx.mrc`` → ``TS_01``)."""
    base = name.strip().replace("\\", "/").rsplit("/", 1)[-1]
    base = _TOMO_SUFFIXES.sub("", base) or base
    base = base[4:] if base.startswith("rec_") and len(base) > 4 else base
    return _WARP_SUFFIX.sub("", base) or base


def name_key(name: str) -> str:
    """A tomogram name without folders, ``:suffix`` and a tomogram file's extensions
    (``a/TS_1.tomostar`` → ``TS_1``): how a STAR row and a file name are matched when they
    are not spelled alike. Other dots are part of the name (``L1.2_TS_01`` stays whole:
    cutting at the first dot made every tomogram of lamella L1.2 one)."""
    base = name.strip().replace("\\", "/").rsplit("/", 1)[-1]
    base = base.split(":", 1)[0]
    return _TOMO_SUFFIXES.sub("", base) or base


def shown(names: Sequence[str]) -> str:
    """At most ten names, comma-separated, for a message."""
    return ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")


def rows_named(values: Sequence[object], name: str) -> np.ndarray:
    """(N,) bool: the rows of ``values`` (tomogram names, one per row) that name ``name``:
    exactly, else by :func:`name_key`, else as RELION and Warp list tomograms
    (:func:`star_tomo_name`: ``rec_TS_01`` and ``TS_01_10.00Apx`` are TS_01), else by the
    part before the first dot when that names one tomogram. Each distinct name is compared
    once (a dataset file has many rows per tomogram)."""
    distinct, row_of = np.unique(np.array([str(v) for v in values], dtype=object),
                                 return_inverse=True)
    return _matching(distinct, name)[np.asarray(row_of).reshape(-1)]


def _matching(values: np.ndarray, name: str) -> np.ndarray:
    """:func:`rows_named` over distinct ``values``."""
    mask = values == name
    for key in (name_key, star_tomo_name):
        if not mask.any():
            mask = np.array([key(v) == key(name) for v in values], dtype=bool)
    if not mask.any():  # TS_01.denoised.mrc for TS_01: the part before the first dot, when
        # that names exactly one tomogram of the file (L1.2_TS_01 and L1.2_TS_02 do not)
        cut = np.array([_before_dot(v) == _before_dot(name) for v in values], dtype=bool)
        if len(set(values[cut])) == 1:
            mask = cut
    return mask


def _before_dot(name: str) -> str:
    return name_key(name).split(".", 1)[0]


def select_tomogram(path: Path, values: Sequence[object], tomo_name: str | None,
                    own_name: str | None = None) -> np.ndarray:
    """A boolean mask of the rows whose tomogram name (``values``) is this tomogram's.

    ``tomo_name`` (the user's ``--tomo-name``) must match (exactly, else by :func:`name_key`).
    Without it, ``own_name`` (the tomogram's file stem) selects its rows when the file has
    any; a file of one other tomogram is used with a warning; a file of several, none of them
    this one, is refused with the names it holds."""
    vals = np.array([str(v) for v in values], dtype=object)
    names = list(dict.fromkeys(vals))
    if tomo_name is not None:
        mask = rows_named(vals, tomo_name)
        if not mask.any():
            raise InputError(f"{path}: no points for tomogram {tomo_name!r}; it holds "
                             f"{shown(names)}: pass one of these with --tomo-name")
        return mask
    if own_name is not None:
        mask = rows_named(vals, own_name)
        if mask.any():
            return mask
    if len(names) > 1:
        mine = f", none of them this tomogram ({own_name})" if own_name else ""
        raise InputError(f"{path}: holds points for {len(names)} tomograms ({shown(names)})"
                         f"{mine}; choose one with --tomo-name")
    if own_name is not None and names:
        warn(f"{path}: its points are for tomogram {names[0]!r}, not {own_name!r} (this "
             f"tomogram's file name); using them: pass --tomo-name {names[0]} to say so, "
             "or check that they belong to this tomogram")
    return np.ones(len(vals), dtype=bool)
