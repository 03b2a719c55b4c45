"""RELION / Warp STAR point files in and out, through the ``starfile`` package.

Reading picks the particles block, selects one tomogram by name, scales pixel coordinates
when the file states a pixel size different from the tomogram's, and converts RELION-5
centred Å coordinates to voxels. :func:`write_picks_star` writes one ``data_particles`` block
with both column sets (``picks.star``); :func:`write_flavour_star` writes the exact flavour one
tool reads (:data:`STAR_FLAVOURS`: RELION-5, Warp/M, RELION-4). pandas and starfile are
imported when a STAR file is actually read or written, so that importing cryosam stays fast.

Centre convention (RELION-5 ``rlnCenteredCoordinate*Angst``): cryosam uses RELION's own,
centred Å = (voxel − size / 2) × voxel size with voxel centres at integers (0-based), which
RELION undoes as voxel = Å / voxel size + size / 2. cylindra centres at size / 2 − 1 (pytom
is reported to differ likewise), so the same particle reads one voxel apart between them.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cryosam._atomic import atomic_path
from cryosam.errors import InputError
from cryosam.io._common import (
    as_column,
    as_voxel_size,
    as_zyx,
    sizes_ok,
    sizes_text,
    third_party_quiet,
    warn,
)
from cryosam.io.names import select_tomogram, star_tomo_name

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["STAR_FLAVOURS", "StarOutputs", "read_particles", "read_star_points", "star_tomo_name",
           "star_tomo_names", "write_flavour_star", "write_picks_star"]

_STAR_PIXEL = ("rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ")
_STAR_CENTERED = (
    "rlnCenteredCoordinateXAngst",
    "rlnCenteredCoordinateYAngst",
    "rlnCenteredCoordinateZAngst",
)
_STAR_SCORES = ("rlnAutopickFigureOfMerit", "rlnLCCmax")
_NAME_COLUMNS = ("rlnTomoName", "rlnMicrographName")


def _read_star_blocks(path: Path) -> dict[str, object]:
    import starfile

    try:
        with third_party_quiet():
            blocks = starfile.read(path, always_dict=True, parse_as_string=list(_NAME_COLUMNS))
    except Exception as exc:
        raise InputError(
            f"{path}: could not be read as a STAR file ({type(exc).__name__}: {exc}); "
            "check it is a RELION STAR file"
        ) from None
    return dict(blocks)


def _particles_block(
    path: Path, blocks: Mapping[str, object]
) -> tuple[str, pd.DataFrame, object | None]:
    """(name, table, optics block or None) of the one block that holds coordinates."""
    import pandas as pd

    coord_names = set(_STAR_PIXEL) | set(_STAR_CENTERED)
    tables = {k: v for k, v in blocks.items() if isinstance(v, pd.DataFrame)}
    candidates = {k: v for k, v in tables.items() if coord_names & set(v.columns)}
    if not candidates:
        found = ", ".join(f"data_{k}" for k in blocks) or "none"
        if any("rlnTomoParticlesFile" in v.columns for v in tables.values()):
            hint = "this is an optimisation set: give the particles file it names"
        elif any("rlnTomoSizeX" in v.columns for v in tables.values()):
            hint = "this is a tomogram set: give the particles file"
        else:
            hint = "give a particles STAR file"
        raise InputError(
            f"{path}: no particle coordinates (rlnCoordinateX/Y/Z or "
            f"rlnCenteredCoordinateX/Y/ZAngst) in its data blocks ({found}); {hint}"
        )
    if "particles" in candidates:
        name = "particles"
    elif len(candidates) == 1:
        name = next(iter(candidates))
    else:
        listed = ", ".join(f"data_{k}" for k in candidates)
        raise InputError(
            f"{path}: {len(candidates)} data blocks hold coordinates ({listed}); cryosam reads "
            "one particles block: keep one (or name it data_particles)"
        )
    return name, candidates[name], blocks.get("optics")


def _name_column(df: pd.DataFrame) -> str | None:
    return next((c for c in _NAME_COLUMNS if c in df.columns), None)


def read_particles(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, object | None]:
    """The particles table of a STAR file and its optics block (None without one), names
    kept as text; one :class:`InputError` line when it cannot be read or holds none."""
    p = Path(path)
    _, df, optics = _particles_block(p, _read_star_blocks(p))
    return df, optics


def star_tomo_names(path: str | os.PathLike[str]) -> list[str]:
    """The tomogram names (rlnTomoName, else rlnMicrographName) in a STAR file, in file order."""
    df, _ = read_particles(path)
    column = _name_column(df)
    if column is None:
        return []
    return list(dict.fromkeys(str(v) for v in df[column]))


def _star_pixel_sizes(df: pd.DataFrame, optics: object | None) -> tuple[np.ndarray | None, str]:
    """Pixel size (Å) of each row's rlnCoordinate values, when the file states it."""
    import pandas as pd

    n = len(df)
    if isinstance(optics, pd.DataFrame) and len(optics):
        for column in ("rlnTomoTiltSeriesPixelSize", "rlnMicrographPixelSize"):
            if column not in optics.columns:
                continue
            if "rlnOpticsGroup" in df.columns and "rlnOpticsGroup" in optics.columns:
                lookup = dict(zip(optics["rlnOpticsGroup"], optics[column], strict=False))
                sizes = np.asarray([lookup.get(g, np.nan) for g in df["rlnOpticsGroup"]], float)
                if np.all(np.isfinite(sizes)):
                    return sizes, column
            if optics[column].nunique() == 1:
                return np.full(n, float(optics[column].iloc[0])), column
    if "rlnPixelSize" in df.columns:
        return df["rlnPixelSize"].to_numpy(dtype=float), "rlnPixelSize"
    if "rlnDetectorPixelSize" in df.columns and "rlnMagnification" in df.columns:
        detector = df["rlnDetectorPixelSize"].to_numpy(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            sizes = detector * 1e4 / df["rlnMagnification"].to_numpy(float)
        return sizes, "rlnDetectorPixelSize/rlnMagnification"
    return None, ""


def _star_numeric(
    path: Path, df: pd.DataFrame, columns: Sequence[str], rows: list[str]
) -> np.ndarray:
    """``columns`` as float64 (N, len(columns)); the first non-number names its row."""
    import pandas as pd

    out = np.empty((len(df), len(columns)), dtype=np.float64)
    for k, column in enumerate(columns):
        values = pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=float)
        bad = ~np.isfinite(values)
        if bad.any():
            i = int(np.argmax(bad))
            raw = df[column].iloc[i]
            raise InputError(
                f"{path}: {rows[i]}: {column} = {raw!r} is not a finite number; fix that row"
            )
        out[:, k] = values
    return out


def _centered_to_voxels(
    path: Path, df: pd.DataFrame, shape: Sequence[int], vs: np.ndarray, rows: list[str]
) -> np.ndarray:
    """RELION-5: voxel = centered Å / voxel size + size / 2 (ParticleSet decentring)."""
    centered = _star_numeric(path, df, _STAR_CENTERED[::-1], rows)
    size = np.asarray([int(s) for s in shape], dtype=float)
    return centered / vs[None, :] + size[None, :] / 2.0


def _voxels_to_centered(zyx: np.ndarray, shape: Sequence[int], vs: np.ndarray) -> np.ndarray:
    """RELION-5 centred Å of (z, y, x) voxels: (voxel − size / 2) × voxel size."""
    size = np.asarray([int(s) for s in shape], dtype=float)
    return (zyx - size[None, :] / 2.0) * vs[None, :]


def _pixel_coordinates(
    path: Path,
    df: pd.DataFrame,
    optics: object | None,
    vs: np.ndarray | None,
    star_pixel_size: float | Sequence[float] | None,
    rows: list[str],
) -> np.ndarray:
    """rlnCoordinateX/Y/Z as (z, y, x), scaled to this tomogram's voxels when sizes differ."""
    zyx = _star_numeric(path, df, _STAR_PIXEL[::-1], rows)
    sizes, source = _star_pixel_sizes(df, optics)
    if star_pixel_size is None and sizes is not None and not sizes_ok(sizes):
        # 0, negative or NaN states nothing (as a header voxel size of 0): ignored, not
        bad = sizes[~(np.isfinite(sizes) & (sizes > 0))][0]  # scaling points onto voxel 0
        warn(f"{path}: {source} is {bad:g} Å, not a pixel size; ignored, the coordinates are "
             "taken as this tomogram's voxels (give --points-pixel-size if they are not)")
        sizes = None
    elif star_pixel_size is not None:
        given = np.asarray(star_pixel_size, dtype=np.float64)  # one size, or z, y, x
        sizes = np.broadcast_to(given, (len(df), *given.shape)).copy()
        source = "--points-pixel-size or --points-bin"
    if sizes is not None and vs is not None:
        factor = (sizes if sizes.ndim == 2 else sizes[:, None]) / vs[None, :]
        if np.any(np.abs(factor - 1.0) > 1e-3):
            shown = ", ".join(sizes_text(s) for s in np.unique(np.round(sizes, 4), axis=0))
            fix = ("" if star_pixel_size is not None else "; if they already are, pass "
                   "--points-pixel-size with the voxel size, or remove the pixel size from "
                   "the file")
            by = ", ".join(sizes_text(f) for f in np.unique(np.round(factor, 4), axis=0))
            warn(
                f"{path}: coordinates are in {shown} Å pixels "
                f"({source}) and the tomogram has {', '.join(f'{v:g}' for v in vs)} Å "
                f"voxels (z,y,x): scaled by {by} to this tomogram's voxels{fix}"
            )
            zyx = zyx * factor
    return zyx


def _warn_unapplied_origins(path: Path, df: pd.DataFrame) -> None:
    import pandas as pd

    origins = [c for c in df.columns if re.fullmatch(r"rlnOrigin[XYZ](Angst)?", str(c))]
    if not origins:
        return
    values = np.stack(
        [pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=float) for c in origins]
    )
    if np.any(np.nan_to_num(np.abs(values)) > 0):
        warn(
            f"{path}: rlnOrigin shifts are not applied; points are taken from "
            "rlnCoordinateX/Y/Z as picked"
        )


def _series_array(series: pd.Series) -> np.ndarray:
    import pandas as pd

    if pd.api.types.is_integer_dtype(series.dtype):
        return series.to_numpy(dtype=np.int64)
    if pd.api.types.is_numeric_dtype(series.dtype):
        return series.to_numpy(dtype=np.float64)
    return series.astype(str).to_numpy(dtype=str)


def read_star_points(
    path: Path,
    shape: Sequence[int] | None,
    vs: np.ndarray | None,
    tomo_name: str | None,
    star_pixel_size: float | None,
    own_name: str | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray], list[str], np.ndarray]:
    """(z, y, x) voxels, extra columns, row labels and data-row numbers (0-based, in the whole
    block) of one tomogram's points in a STAR file.

    The engine of :func:`cryosam.io.read_points` for STAR files (which documents the rules);
    ``vs`` is the tomogram's voxel size (z, y, x) or None; ``own_name`` the tomogram's file
    stem, which picks its rows when ``tomo_name`` is not given (:mod:`cryosam.io.names`).
    """
    blocks = _read_star_blocks(path)
    block, df, optics = _particles_block(path, blocks)
    if len(df) == 0:
        raise InputError(f"{path}: data_{block} has no rows (no points); give a file with points")
    df = df.reset_index(drop=True)
    rows_all = [f"row {i + 1} of data_{block}" for i in range(len(df))]
    column = _name_column(df)
    index = (np.arange(len(df)) if column is None else np.flatnonzero(
        select_tomogram(path, df[column].tolist(), tomo_name, own_name)))
    df = df.loc[index].reset_index(drop=True)
    rows = [rows_all[i] for i in index]

    has_pixel = all(c in df.columns for c in _STAR_PIXEL)
    has_centered = all(c in df.columns for c in _STAR_CENTERED)
    if not (has_pixel or has_centered):
        present = [c for c in (*_STAR_PIXEL, *_STAR_CENTERED) if c in df.columns]
        raise InputError(
            f"{path}: data_{block} has {', '.join(present)} but not all three axes; give "
            "rlnCoordinateX/Y/Z or rlnCenteredCoordinateX/Y/ZAngst"
        )
    if has_pixel:
        zyx = _pixel_coordinates(path, df, optics, vs, star_pixel_size, rows)
        if has_centered and shape is not None and vs is not None:
            other = _centered_to_voxels(path, df, shape, vs, rows)
            if np.max(np.abs(other - zyx)) > 1.0:
                warn(
                    f"{path}: rlnCoordinateX/Y/Z and rlnCenteredCoordinateX/Y/ZAngst disagree "
                    "by more than a voxel for this tomogram; using rlnCoordinateX/Y/Z"
                )
        _warn_unapplied_origins(path, df)
    else:
        stated = None
        if vs is None and "rlnPixelSize" in df.columns:  # the tomogram's voxel, per row (as
            sizes = df["rlnPixelSize"].to_numpy(dtype=float)  # cryosam writes; not the
            if len(np.unique(sizes)) == 1 and sizes_ok(sizes):  # tilt series' pixel)
                stated = float(sizes[0])
        missing = [what for what, gone in (("size", shape is None), ("voxel size", vs is None
                                                                    and stated is None)) if gone]
        if missing:
            raise InputError(
                f"{path}: RELION-5 centered coordinates (rlnCenteredCoordinateX/Y/ZAngst) need "
                f"the tomogram's {' and '.join(missing)}; give the tomogram (and --voxel-size if "
                "its header has none), or to cryosam evaluate "
                + " and ".join(o for o, gone in (("--shape z,y,x", shape is None),
                                                 ("--voxel-size", "voxel size" in missing))
                               if gone))
        if vs is None:
            vs = np.full(3, stated)
            warn(f"{path}: no voxel size given; using the file's rlnPixelSize {stated:g} Å "
                 "for its centered Å coordinates")
        zyx = _centered_to_voxels(path, df, shape, vs, rows)

    columns: dict[str, np.ndarray] = {}
    for column in _STAR_SCORES:
        if column in df.columns:
            columns["score"] = _star_numeric(path, df, [column], rows)[:, 0]
            break
    name_col = _name_column(df)
    if name_col is not None:
        columns["tomo_name"] = df[name_col].astype(str).to_numpy(dtype=str)
    for column in df.columns:
        if not str(column).startswith("rln"):
            columns[str(column).lower()] = _series_array(df[column])
    return zyx, columns, rows, index


def write_picks_star(
    path: str | os.PathLike[str],
    zyx: np.ndarray,
    *,
    tomo_name: str,
    voxel_size: float | Sequence[float] | None = None,
    shape: Sequence[int] | None = None,
    scores: np.ndarray | Sequence[float] | None = None,
    extra: Mapping[str, object] | None = None,
) -> None:
    """Write picks as a RELION particles STAR file (``data_particles``), atomically.

    Columns: ``rlnTomoName`` and ``rlnMicrographName`` (= ``tomo_name``),
    ``rlnCoordinateX/Y/Z`` in this tomogram's voxels (a generic file for scripts and
    cryosam itself; RELION-4 and Warp each want more: :func:`write_flavour_star`),
    ``rlnAutopickFigureOfMerit`` when ``scores`` are given, and RELION-5
    ``rlnCenteredCoordinateX/Y/ZAngst`` = (voxel − size / 2) × voxel size when both
    ``voxel_size`` and ``shape`` (D, H, W) are known. ``extra`` adds columns by name.
    """
    import pandas as pd
    import starfile

    pts = as_zyx(zyx)
    n = len(pts)
    table: dict[str, object] = {
        "rlnTomoName": [str(tomo_name)] * n,
        "rlnMicrographName": [str(tomo_name)] * n,
        "rlnCoordinateX": pts[:, 2],
        "rlnCoordinateY": pts[:, 1],
        "rlnCoordinateZ": pts[:, 0],
    }
    vs = as_voxel_size(voxel_size)
    if vs is not None and shape is not None:
        centered = _voxels_to_centered(pts, shape, vs)
        table["rlnCenteredCoordinateXAngst"] = centered[:, 2]
        table["rlnCenteredCoordinateYAngst"] = centered[:, 1]
        table["rlnCenteredCoordinateZAngst"] = centered[:, 0]
    if scores is not None:
        table["rlnAutopickFigureOfMerit"] = as_column("scores", scores, n).astype(float)
    for name, values in (extra or {}).items():
        if name in table:
            raise ValueError(f"extra column {name!r} is already written")
        table[name] = as_column(name, values, n)
    df = pd.DataFrame(table)
    with atomic_path(path, suffix=".star") as tmp, third_party_quiet():
        starfile.write({"particles": df}, tmp, float_format="%.6f")


# ------------------------------------------------------------------ one flavour per tool

# flavour -> file name, in the order they are written
STAR_FLAVOURS = {"relion5": "picks_relion5.star", "warp": "picks_warp.star",
                 "relion4": "picks_relion4.star"}
@dataclass(frozen=True)
class StarOutputs:
    """Which STAR flavours to write beside ``picks.star``, and the names in them.

    ``flavours`` None means relion5 and warp, plus relion4 when ``tilt_series_pixel_size``
    (Å) is given. ``tomo_name`` names the tomogram in every flavour (Warp adds ``.tomostar``);
    by default it is :func:`star_tomo_name` of the tomogram's file name. Invalid choices raise
    :class:`InputError` naming the CLI option, so a run fails before any work.
    """

    flavours: tuple[str, ...] | None = None
    tomo_name: str | None = None
    tilt_series_pixel_size: float | None = None

    def __post_init__(self) -> None:
        if self.flavours is not None:
            flavours = tuple(dict.fromkeys(str(f) for f in self.flavours))
            unknown = [f for f in flavours if f not in STAR_FLAVOURS]
            if unknown:
                raise InputError(f"--star {unknown[0]!r}: not a STAR flavour; choose from "
                                 f"{', '.join(STAR_FLAVOURS)}")
            object.__setattr__(self, "flavours", flavours)
        ts = self.tilt_series_pixel_size
        if ts is not None and not (math.isfinite(ts) and ts > 0):
            raise InputError(f"--tilt-series-pixel-size {ts}: give the tilt series' pixel size "
                             "in Å, a positive number")
        if "relion4" in self.selected() and ts is None:
            raise InputError("--star relion4: RELION-4 coordinates are unbinned tilt-series "
                             "pixels; give their size (--tilt-series-pixel-size Å) or drop it")
        if self.tomo_name is not None and not self.tomo_name.strip():
            raise InputError("--star-tomo-name is empty; give the tomogram's name, e.g. TS_01")

    def report(self) -> dict[str, object]:
        """What the STAR flavours were asked for: the flavours, the name given to the tomogram
        (None: from its file) and the tilt-series pixel size (RELION-4's coordinates)."""
        return {"flavours": list(self.selected()), "tomo_name": self.tomo_name,
                "tilt_series_pixel_size": self.tilt_series_pixel_size}

    def selected(self) -> tuple[str, ...]:
        """The flavours to write, in :data:`STAR_FLAVOURS` order for the default."""
        if self.flavours is not None:
            return self.flavours
        if self.tilt_series_pixel_size is not None:
            return tuple(STAR_FLAVOURS)
        return ("relion5", "warp")


def write_flavour_star(
    path: str | os.PathLike[str],
    flavour: str,
    zyx: np.ndarray,
    *,
    tomo_name: str,
    voxel_size: float | Sequence[float] | None = None,
    shape: Sequence[int] | None = None,
    scores: np.ndarray | Sequence[float] | None = None,
    tilt_series_pixel_size: float | None = None,
) -> None:
    """Write picks as the STAR file one tool reads (``flavour`` in :data:`STAR_FLAVOURS`).

    - ``relion5``: ``rlnTomoName``, ``rlnCenteredCoordinateX/Y/ZAngst`` (the module's centre
      convention; needs ``voxel_size`` and ``shape``), ``rlnPixelSize`` (the tomogram's voxel
      size, Å, when the same along every axis); no optics block: RELION-5 takes the optics
      from its tomograms.star.
    - ``warp``: ``rlnMicrographName`` ``NAME.tomostar``, ``rlnCoordinateX/Y/Z`` in this
      tomogram's pixels (0-based) and, when known, ``rlnPixelSize``; Warp multiplies every
      axis by one pixel size, so anisotropic voxels are written in pixels of their mean size.
    - ``relion4``: ``data_optics`` (``rlnOpticsGroup``, ``rlnOpticsGroupName``,
      ``rlnTomoTiltSeriesPixelSize``) and ``data_particles`` with ``rlnTomoName``,
      ``rlnCoordinateX/Y/Z`` in unbinned tilt-series pixels (voxel × voxel size /
      ``tilt_series_pixel_size``) and ``rlnOpticsGroup``.

    Each adds ``rlnAutopickFigureOfMerit`` when ``scores`` are given; written atomically.
    """
    import pandas as pd
    import starfile

    pts = as_zyx(zyx)
    n = len(pts)
    vs = as_voxel_size(voxel_size)
    name = str(tomo_name)
    table: dict[str, object] = {}
    blocks: dict[str, pd.DataFrame] = {}
    if flavour == "relion5":
        if vs is None or shape is None:
            raise ValueError("the relion5 flavour needs voxel_size and shape")
        coords, column = _voxels_to_centered(pts, shape, vs), "rlnCenteredCoordinate{}Angst"
        table["rlnTomoName"] = [name] * n
    elif flavour == "warp":  # Å = coordinate x rlnPixelSize (Warp's --coords_angpix): one
        # size for all axes, so anisotropic voxels are written in pixels of their mean size
        coords = pts if vs is None else pts * vs[None, :] / float(np.mean(vs))
        column = "rlnCoordinate{}"
        table["rlnMicrographName"] = [name if name.endswith(".tomostar")
                                      else f"{name}.tomostar"] * n
    elif flavour == "relion4":
        if vs is None or tilt_series_pixel_size is None:
            raise ValueError("the relion4 flavour needs voxel_size and tilt_series_pixel_size")
        coords, column = pts * vs[None, :] / float(tilt_series_pixel_size), "rlnCoordinate{}"
        table["rlnTomoName"] = [name] * n
        blocks["optics"] = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": [
            "opticsGroup1"], "rlnTomoTiltSeriesPixelSize": [float(tilt_series_pixel_size)]})
    else:
        raise ValueError(f"unknown STAR flavour {flavour!r}; choose from {list(STAR_FLAVOURS)}")
    for k, axis in enumerate("XYZ"):
        table[column.format(axis)] = coords[:, 2 - k]
    if flavour == "relion4":
        table["rlnOpticsGroup"] = np.ones(n, dtype=np.int64)
    if scores is not None:
        table["rlnAutopickFigureOfMerit"] = as_column("scores", scores, n).astype(float)
    if vs is not None and (flavour == "warp" or (flavour == "relion5" and np.ptp(vs) == 0)):
        table["rlnPixelSize"] = np.full(n, float(np.mean(vs)))  # (RELION-5: isotropic only)
    blocks["particles"] = pd.DataFrame(table)
    with atomic_path(path, suffix=".star") as tmp, third_party_quiet():
        starfile.write(blocks, tmp, float_format="%.6f")
