"""Point files in: the reader for prompts and picks (CSV, napari CSV, STAR); the CSV
writers are in :mod:`cryosam.io.csv_out`.

Inside cryosam points are (z, y, x) float voxels with voxel centres at integers (0-based);
the files users see speak x, y, z. STAR files are handed to :mod:`cryosam.io.star`.
"""

from __future__ import annotations

import csv
import math
import os
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cryosam.errors import InputError
from cryosam.io._common import ParsedPoints, as_voxel_size, sizes_ok, sizes_text, warn
from cryosam.io.names import CSV_NAME_COLUMNS, csv_name_column, select_tomogram
from cryosam.io.star import read_star_points
from cryosam.utils import outside_volume

__all__ = ["PointSet", "read_points", "to_voxels"]

_UNIT_ALIASES = {
    "voxel": "voxel", "voxels": "voxel", "vox": "voxel", "px": "voxel", "pixel": "voxel",
    "pixels": "voxel", "angstrom": "angstrom", "angstroms": "angstrom", "a": "angstrom",
    "å": "angstrom", "angst": "angstrom", "ang": "angstrom",
}
_COORD_HEADER = re.compile(
    r"^(?P<axis>[xyz])(?:\s*[\[(]\s*(?P<unit>[^\])]*)\s*[\])])?$", re.IGNORECASE
)
_NAPARI_AXES = {"axis-0": "z", "axis-1": "y", "axis-2": "x"}
_SEPARATORS = {"|": "'|'", ";": "';'"}  # refused: say which; tabs and spaces are read


@dataclass
class PointSet:
    """Points read from a file: (N, 3) float64 (z, y, x) voxels plus any extra columns.

    ``columns`` maps lower-case names (e.g. ``kind``, ``score``, ``instance_id``, ``index``,
    ``tomo_name``) to arrays of length N, numeric or string.
    """

    zyx: np.ndarray
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    source: Path | None = None
    rows: np.ndarray | None = None  # each point's data row in the file (0-based); None: 0..N-1

    def __len__(self) -> int:
        return int(self.zyx.shape[0])

    @property
    def file_rows(self) -> np.ndarray:
        """(N,) each point's data row in its file, header not counted (0-based): rows of other
        tomograms in a multi-tomogram file are counted too, so the number finds the row."""
        return (np.arange(len(self), dtype=np.int64) if self.rows is None
                else np.asarray(self.rows, dtype=np.int64))

    @property
    def xyz(self) -> np.ndarray:
        """The same points as (N, 3) x, y, z."""
        return self.zyx[:, ::-1]


_YES = {"1", "1.0", "true", "yes", "y", "t"}
_NO = {"0", "0.0", "false", "no", "n", "f", ""}
_NEGATIVE_LABELS = {"negative", "neg", "-", "-1", "-1.0", "background", "exclude"}
_POSITIVE_LABELS = {"positive", "pos", "+", "1", "1.0", "particle", "include"}


def negative_rows(points: PointSet) -> np.ndarray:
    """(N,) bool: the rows marked as negative clicks (structures not to pick), by a
    ``negative`` column (1/0, true/false, yes/no) or a ``label`` column (negative/positive).
    A value that is neither is refused with the row named."""
    out = np.zeros(len(points), dtype=bool)
    for name, truthy, falsy in (("negative", _YES, _NO), ("label", _NEGATIVE_LABELS,
                                                            _POSITIVE_LABELS)):
        if name not in points.columns:
            continue
        for i, value in enumerate(points.columns[name]):
            text = str(value).strip().lower()
            if text in truthy:
                out[i] = True
            elif text not in falsy:
                where = f"{points.source}: " if points.source else ""
                allowed = "1/0, true/false, yes/no" if name == "negative" else \
                    "negative or positive"
                raise InputError(f"{where}row {i + 1} has {name} {str(value)!r}; a {name} "
                                 f"column marks negative clicks: use {allowed}, or rename the "
                                 "column if it holds something else")
    return out


def normalise_unit(unit: str, option: str = "--points-unit") -> str:
    """``voxel`` or ``angstrom`` for any of their spellings (px, Å, ...); refuse others,
    naming the ``option`` the unit came from."""
    key = str(unit).strip().lower()
    if key not in _UNIT_ALIASES:
        raise InputError(f"{option} {unit!r} is not known; use 'voxel' or 'angstrom'")
    return _UNIT_ALIASES[key]


def _is_star(path: Path, text: str) -> bool:
    """A ``.star`` name, or a first content line that opens a ``data_`` block."""
    if path.suffix.lower() == ".star":
        return True
    for line in text.splitlines():
        s = line.strip()
        if s and not s.startswith("#"):
            return s.startswith("data_")
    return False


def read_points(
    path: str | os.PathLike[str],
    *,
    shape: Sequence[int] | None = None,
    voxel_size: float | Sequence[float] | None = None,
    unit: str = "voxel",
    tomo_name: str | None = None,
    check_bounds: bool = True,
    star_pixel_size: float | None = None,
    pixel_size: float | Sequence[float] | None = None,
    own_tomo_name: str | None = None,
    every_tomogram: bool = False,
    empty_ok: bool = False,
    text: str | None = None,
    unit_option: str = "--points-unit",
) -> PointSet:
    """Read points (prompts or picks) from CSV or STAR as (z, y, x) voxels.

    CSV: a header naming ``x,y,z`` (any case; extra columns kept), napari's
    ``axis-0,axis-1,axis-2`` (= z, y, x), or no header and exactly three columns x, y, z.
    Separated by commas, or by tabs/spaces (IMOD ``model2point``: 3 columns, or 4-5 with the
    object and contour first); '|' or ';' files are refused with a fix. TARDIS-style
    ``X [A]`` headers are in Å and need ``unit="angstrom"``.

    STAR: ``rlnCoordinateX/Y/Z`` (pixels) or RELION-5 ``rlnCenteredCoordinateX/Y/ZAngst``
    (needs ``shape`` and ``voxel_size``: voxel = centered Å / voxel size + size / 2, RELION's
    own decentring). A tomogram-name column (STAR ``rlnTomoName``/``rlnMicrographName``, CSV
    ``tomo_name``, ``tomogram``, ...) selects the rows of ``tomo_name``, else of
    ``own_tomo_name`` (the tomogram's file stem; see :mod:`cryosam.io.names`); with
    ``every_tomogram`` (CSV) all rows are kept, names in ``columns``. ``empty_ok``: a CSV
    header without rows is zero points (a run that picked nothing), not an error. When the STAR
    states the pixel size of its coordinates (``rlnTomoTiltSeriesPixelSize`` or
    ``rlnMicrographPixelSize`` in the optics block, ``rlnPixelSize``, or
    ``rlnDetectorPixelSize``/``rlnMagnification``) and it differs from ``voxel_size``, the
    coordinates are scaled to this tomogram's voxels with a warning; ``star_pixel_size``
    overrides the stated size. Origin shifts (``rlnOriginX/Y/Z[Angst]``) are not applied.

    ``text``: the content, given instead of reading ``path`` (a table handed to the Python
    API, as CSV); ``path`` then only names it in messages. ``unit_option``: the option that
    sets ``unit``, as messages name it (``evaluate``'s TRUTH takes ``--truth-unit``).

    ``unit="angstrom"`` divides CSV coordinates by ``voxel_size`` (Å from voxel 0; the header
    origin is not subtracted). ``pixel_size`` (Å) says the coordinates are pixels of that size
    (clicks made on a differently binned copy): they are scaled to ``voxel_size``, with a
    warning; for STAR files it overrides the size the file states. With ``shape`` (D, H, W),
    points outside the volume (beyond the outer voxel edges) are refused unless
    ``check_bounds`` is False.
    """
    p = Path(path)
    unit = normalise_unit(unit, unit_option)
    vs = as_voxel_size(voxel_size)
    if text is None:
        text = _file_text(p)
    if not text.strip():
        raise InputError(f"{p}: the file is empty (no points); add at least one x,y,z point")

    if _is_star(p, text):
        if unit != "voxel":
            warn(f"{p}: {unit_option} is ignored for STAR files (their columns state units)")
        given = star_pixel_size if star_pixel_size is not None else pixel_size
        _check_pixel_size(given, p)  # (CSV: to_voxels checks it)
        zyx, columns, labels, rows = read_star_points(p, shape, vs, tomo_name, given,
                                                      own_tomo_name)
    else:
        zyx, columns, labels = _read_csv_points(p, text, unit, empty_ok, unit_option)
        rows = np.arange(len(zyx), dtype=np.int64)
        column = csv_name_column(columns)
        if column is not None and not every_tomogram:
            keep = select_tomogram(p, list(columns[column]), tomo_name, own_tomo_name)
            zyx, labels = zyx[keep], [lb for lb, k in zip(labels, keep, strict=True) if k]
            columns = {k: np.asarray(v)[keep] for k, v in columns.items()}
            rows = rows[keep]
        zyx = to_voxels(zyx, p, vs, unit, pixel_size)
    if shape is not None and check_bounds:
        _check_bounds(p, zyx, shape, labels)
    return PointSet(zyx=zyx, columns=columns, source=p, rows=np.asarray(rows, np.int64))


def to_voxels(zyx: np.ndarray, where: object, voxel_size: float | Sequence[float] | None,
              unit: str = "voxel", pixel_size: float | Sequence[float] | None = None
              ) -> np.ndarray:
    """(z, y, x) coordinates in ``unit`` (``angstrom``: Å from voxel 0, the header origin not
    subtracted) or in pixels of ``pixel_size`` Å (clicks made on a differently binned copy,
    said in a warning) as voxels of a tomogram of ``voxel_size``; CSV files and the Python
    API's arrays alike. Needing a voxel size that is unknown is one line naming ``where``."""
    vs = as_voxel_size(voxel_size)
    _check_pixel_size(pixel_size, where)
    if (unit == "angstrom" or pixel_size is not None) and vs is None:
        what = "coordinates in Å need" if unit == "angstrom" else "--points-pixel-size needs"
        raise InputError(f"{where}: {what} the tomogram's voxel size; the header has none, so "
                         "pass --voxel-size")
    if unit == "angstrom":
        zyx = zyx / vs
    if pixel_size is not None:
        factor = np.asarray(pixel_size, dtype=np.float64) / vs
        zyx = zyx * factor
        warn(f"{where}: coordinates in {sizes_text(pixel_size)} Å pixels scaled by "
             f"{sizes_text(factor)} to this tomogram's voxels")
    return zyx


def _check_pixel_size(given: float | Sequence[float] | None, where: object) -> None:
    """A points pixel size (one, or z, y, x) must be positive (0 moved every click to voxel
    0)."""
    if given is None:
        return
    values = np.asarray(given, dtype=np.float64)
    if not sizes_ok(values):
        raise InputError(f"{where}: a points pixel size of {sizes_text(values)} Å; give the "
                         "size of the pixels the clicks were made on (--points-pixel-size), a "
                         "positive number")


def _file_text(p: Path) -> str:
    """The text of the points file ``p``, or one line saying why it cannot be read."""
    if not p.exists():
        raise InputError(f"{p}: file not found; check the path to the points file")
    if p.is_dir():
        raise InputError(f"{p}: is a folder; give a CSV or STAR points file")
    if not p.is_file():  # a pipe would block forever, a device read without end
        raise InputError(f"{p}: not a regular file (a pipe or a device?); give a CSV or STAR "
                         "points file")
    try:
        raw = p.read_bytes()
        utf16 = raw[:2] in (b"\xff\xfe", b"\xfe\xff")  # with its mark: Excel's Unicode text
        text = raw.decode("utf-16" if utf16 else "utf-8-sig")
        head = text[:2000]  # a points file is mostly ASCII digits; binary is not
        if utf16 and (sum(c.isascii() for c in head) < 0.5 * len(head) or any(
                unicodedata.category(c) == "Cc" and c not in "\t\r\n" for c in head)):
            raise UnicodeDecodeError("utf-16", raw, 0, 2, "not text")
        return text
    except UnicodeDecodeError:
        raise InputError(
            f"{p}: not a text file; give points as CSV (x,y,z) or a RELION STAR file"
        ) from None


def _check_bounds(path: Path, zyx: np.ndarray, shape: Sequence[int], labels: list[str]) -> None:
    """Refuse points beyond the outer voxel edges (−0.5 … size − 0.5) of a (D, H, W) volume."""
    size = np.asarray([int(s) for s in shape], dtype=float)
    outside = outside_volume(zyx, shape)
    if outside.any():
        i = int(np.argmax(outside))
        z, y, x = zyx[i]
        d, h, w = (int(s) for s in size)
        more = int(outside.sum()) - 1
        extra = f" (and {more} more)" if more else ""
        raise InputError(
            f"{path}: {labels[i]}: point x,y,z = {x:.6g},{y:.6g},{z:.6g} voxels lies outside "
            f"the tomogram (x,y,z size {w}×{h}×{d}){extra}; check the columns are x,y,z in "
            "voxels of this tomogram (or use --points-unit angstrom / --voxel-size, or "
            "--points-pixel-size / --points-bin for clicks made on a differently binned copy)"
        )


# ------------------------------------------------------------------------------ CSV reading


def _parse_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


# header-less files, by column count: x y z, or IMOD model2point's object/contour columns first
_HEADERLESS = {3: ["x", "y", "z"], 4: ["object", "x", "y", "z"],
               5: ["object", "contour", "x", "y", "z"]}


def _csv_rows(path: Path, text: str) -> tuple[list[tuple[int, list[str]]], bool]:
    """(line number, fields) of every non-blank, non-comment line: comma-separated, or
    whitespace-separated (tabs or spaces, as IMOD's model2point writes); others refused.
    Also whether the file is comma-separated."""
    lines = [(i + 1, line) for i, line in enumerate(text.splitlines())]
    content = [(n, s) for n, s in lines if s.strip() and not s.lstrip().startswith("#")]
    if not content:
        raise InputError(f"{path}: no points in the file; add at least one x,y,z point")
    first = content[0][1]
    if "," not in first:
        for sep, name in _SEPARATORS.items():
            if sep in first:
                raise InputError(
                    f"{path}: line {content[0][0]} is {name}-separated; cryosam reads points "
                    "separated by commas, tabs or spaces: replace the separators"
                )
        if len(first.split()) > 1:  # whitespace-separated, e.g. IMOD model2point output
            return [(n, s.split()) for n, s in content], False
    reader = csv.reader((s for _, s in content), delimiter=",", skipinitialspace=True)
    return [(n, [f.strip() for f in row])
            for (n, _), row in zip(content, reader, strict=True)], True


def _column_array(values: list[str]) -> np.ndarray:
    """Numbers as int64/float64 when every non-empty value parses, strings otherwise."""
    parsed = [_parse_float(v) if v != "" else math.nan for v in values]
    if all(v is not None for v in parsed):
        arr = np.asarray(parsed, dtype=np.float64)
        integral = all(re.fullmatch(r"[+-]?\d+", v) for v in values)
        return arr.astype(np.int64) if integral else arr
    return np.asarray(values, dtype=str)


def _header_axes(path: Path, first: list[str], names: list[str], unit: str,
                 option: str = "--points-unit") -> dict[str, int]:
    """Column index of x, y and z named by a header; refuse a unit other than ``unit`` (set
    by ``option``)."""
    axis_col: dict[str, int] = {}
    header_unit: str | None = None
    for j, name in enumerate(names):
        m = _COORD_HEADER.match(name)
        if m and m.group("axis").lower() in axis_col:
            raise InputError(f"{path}: the header names {m.group('axis')} twice (columns "
                             f"{axis_col[m.group('axis').lower()] + 1} and {j + 1}); keep one")
        if m:
            axis_col[m.group("axis").lower()] = j
            if m.group("unit"):
                u = m.group("unit").strip().lower()
                if u not in _UNIT_ALIASES:
                    raise InputError(
                        f"{path}: column {first[j]!r} is in {m.group('unit')!r}, which "
                        "cryosam does not read; give coordinates in voxels or Å"
                    )
                header_unit = _UNIT_ALIASES[u]
    if len(axis_col) < 3:
        napari = {_NAPARI_AXES[n]: j for j, n in enumerate(names) if n in _NAPARI_AXES}
        if len(napari) == 3:
            axis_col = napari
    if len(axis_col) < 3:
        raise InputError(
            f"{path}: the header ({', '.join(first)}) names no x,y,z columns; name them "
            "x,y,z (or napari's axis-0,axis-1,axis-2 = z,y,x)"
        )
    if header_unit is not None and header_unit != unit:
        if header_unit == "angstrom":
            raise InputError(
                f"{path}: the coordinate columns ("
                f"{', '.join(first[axis_col[a]] for a in 'xyz')}) are in Å; pass "
                f"{option} angstrom (with the tomogram's voxel size)"
            )
        raise InputError(
            f"{path}: the coordinate columns say voxels but {option} {unit} was given; "
            f"drop {option} or fix the header"
        )
    return axis_col


def _check_imod_columns(path: Path, line: int, rows: list[tuple[int, list[str]]],
                        commas: bool, leading: int) -> None:
    """Four or five columns without a header are IMOD model2point's object (and contour)
    numbers before x y z: whitespace-separated whole numbers. Anything else (``x,y,z,score``)
    is refused rather than read with its columns shifted."""
    if not leading:
        return
    whole = all((v := _parse_float(f[k])) is not None and math.isfinite(v) and v.is_integer()
                and v >= 0
                for _, f in rows if len(f) > leading for k in range(leading))
    if commas or not whole:
        cols = "object" if leading == 1 else "object and contour"
        raise InputError(f"{path}: line {line} has {3 + leading} columns and the file has no "
                         f"header; only IMOD model2point's {cols} numbers before x y z are read "
                         "without one: add a header naming x,y,z and the other columns (e.g. "
                         "x,y,z,score)")


def _read_csv_points(path: Path, text: str, unit: str, empty_ok: bool = False,
                     unit_option: str = "--points-unit") -> ParsedPoints:
    """(z, y, x) as written, extra columns and row labels of a CSV points file (``unit``:
    the one its header may state; :func:`to_voxels` converts)."""
    rows, commas = _csv_rows(path, text)
    first_line, first = rows[0]
    if all(_parse_float(f) is None for f in first):  # a header
        names = [f.strip().strip('"').strip().lower() for f in first]
        data_rows = rows[1:]
        if not data_rows and not empty_ok:
            raise InputError(f"{path}: a header but no points; add at least one point below it")
        axis_col = _header_axes(path, first, names, unit, unit_option)
    else:
        if len(first) not in _HEADERLESS:
            raise InputError(
                f"{path}: line {first_line} has {len(first)} columns and the file has no "
                "header; give three columns x y z (IMOD model2point: optionally object and "
                "contour first) or add a header naming x,y,z"
            )
        names = _HEADERLESS[len(first)]
        _check_imod_columns(path, first_line, rows, commas, len(names) - 3)
        axis_col = {a: names.index(a) for a in "xyz"}
        data_rows = rows

    ncol = len(names)
    coords = np.empty((len(data_rows), 3), dtype=np.float64)
    labels: list[str] = []
    for i, (line_no, fields) in enumerate(data_rows):
        if len(fields) != ncol:
            raise InputError(
                f"{path}: line {line_no} has {len(fields)} values but {ncol} columns are "
                "expected; fix that line"
            )
        for k, axis in enumerate("zyx"):
            raw = fields[axis_col[axis]]
            value = _parse_float(raw)
            if value is None:
                raise InputError(
                    f"{path}: line {line_no}: {axis} = {raw!r} is not a number; fix that line"
                )
            if not math.isfinite(value):
                raise InputError(
                    f"{path}: line {line_no}: {axis} is {raw}; give a finite coordinate"
                )
            coords[i, k] = value
        labels.append(f"line {line_no}")

    used = set(axis_col.values())
    columns: dict[str, np.ndarray] = {}
    for j, name in enumerate(names):
        if j not in used:  # a tomogram-name column stays text: 001 is not 1
            cells = [fields[j] for _, fields in data_rows]
            columns[name] = (np.asarray(cells, dtype=str) if name in CSV_NAME_COLUMNS
                             else _column_array(cells))
    return coords, columns, labels
