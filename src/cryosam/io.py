"""Tomograms and point files in and out (MRC via mrcfile, CSV, STAR via starfile).

Conventions (see DESIGN.md): arrays are indexed [z, y, x]; coordinates inside cryosam are
(z, y, x) float voxels with voxel centres at integers (0-based); files users see speak x,y,z.
Every problem with a user's file is raised as :class:`cryosam.errors.InputError` with one line
that names the file and the fix; recoverable oddities are reported with
``warnings.warn(..., CryosamWarning)``.
"""

from __future__ import annotations

import csv
import hashlib
import io as _stdio
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mrcfile
import numpy as np

from cryosam._atomic import atomic_path, atomic_write_text
from cryosam.errors import CryosamWarning, InputError

VoxelSize = tuple[float, float, float]  # Angstrom per voxel along (z, y, x)

__all__ = [
    "CryosamWarning",
    "PointSet",
    "Tomogram",
    "VoxelSize",
    "file_sha256",
    "read_points",
    "read_tomogram",
    "star_tomo_names",
    "write_mrc",
    "write_napari_csv",
    "write_picks_csv",
    "write_picks_star",
]


def _warn(message: str) -> None:
    warnings.warn(message, CryosamWarning, stacklevel=3)


def file_sha256(path: str | os.PathLike[str], chunk_size: int = 1 << 22) -> str:
    """SHA-256 hex digest of a file, read in chunks (for the run record's input checksums)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Tomograms
# --------------------------------------------------------------------------------------------

_MODE_NAMES = {0: "int8", 1: "int16", 2: "float32", 6: "uint16", 12: "float16"}
_UNSUPPORTED_MODES = {
    3: "complex int16 (Fourier transform)",
    4: "complex float32 (Fourier transform)",
    101: "packed 4-bit",
}
_IMOD_STAMP = 1146047817  # 'IMOD' as a little-endian int32, at header byte 152
_HEADER_BYTES = 1024
_SCAN_ELEMENTS = 1 << 24  # values per chunk when scanning a volume for NaN/inf and its range


@dataclass
class Tomogram:
    """A tomogram as cryosam uses it: float32 (z, y, x) voxels plus geometry from the header.

    ``data`` is a read-only memory map of the file when it holds uncompressed float32 (so a
    large tomogram is not read whole), otherwise an in-memory float32 copy.
    """

    data: np.ndarray
    voxel_size: VoxelSize | None  # Å per voxel (z, y, x); None when the header does not say
    origin: VoxelSize = (0.0, 0.0, 0.0)  # Å (z, y, x), from the MRC header's origin field
    path: Path | None = None
    mode: int | None = None  # MRC mode of the file
    file_dtype: str | None = None  # what the file stores, e.g. "uint8 (mode 0, unsigned)"
    memory_mapped: bool = False
    value_range: tuple[float, float] | None = None  # (min, max) of the data

    @property
    def shape(self) -> tuple[int, int, int]:
        """(D, H, W) = sizes along (z, y, x)."""
        d, h, w = self.data.shape
        return int(d), int(h), int(w)

    @property
    def mean_voxel_size(self) -> float | None:
        """The mean of the per-axis voxel sizes (Å), or None when unknown."""
        if self.voxel_size is None:
            return None
        return float(np.mean(self.voxel_size))

    def sha256(self) -> str | None:
        """SHA-256 of the file this tomogram was read from (None for in-memory tomograms)."""
        return file_sha256(self.path) if self.path is not None else None


def _compression(path: Path) -> str | None:
    with open(path, "rb") as fh:
        magic = fh.read(3)
    if magic[:2] == b"\x1f\x8b":
        return "gzip"
    if magic == b"BZh":
        return "bzip2"
    return None


def _voxel_size_override(path: Path, voxel_size: float | Sequence[float]) -> VoxelSize:
    try:
        vs = np.broadcast_to(np.asarray(voxel_size, dtype=float), (3,))
    except (TypeError, ValueError):
        raise InputError(
            f"{path}: --voxel-size {voxel_size!r} is not a number; give Å per voxel, e.g. 10.0"
        ) from None
    if not np.all(np.isfinite(vs)) or np.any(vs <= 0):
        raise InputError(f"{path}: --voxel-size must be a positive number of Å, got {voxel_size}")
    return float(vs[0]), float(vs[1]), float(vs[2])


def _header_voxel_size(path: Path, header: np.recarray) -> VoxelSize | None:
    """Voxel size (z, y, x) from CELLA / MX,MY,MZ; warn and return None when unset or odd."""
    cella = header.cella
    sizes_xyz = []
    for length, n in ((cella.x, header.mx), (cella.y, header.my), (cella.z, header.mz)):
        n = int(n)
        sizes_xyz.append(float(length) / n if n > 0 else 0.0)
    # header floats are float32: keep 6 significant digits (23.199951 -> 23.2)
    zyx = tuple(float(f"{s:.6g}") for s in (sizes_xyz[2], sizes_xyz[1], sizes_xyz[0]))
    if not all(math.isfinite(s) and s > 0 for s in zyx):
        shown = ", ".join(f"{s:g}" for s in zyx)
        _warn(
            f"{path}: the header gives no usable voxel size (z,y,x = {shown} Å); coordinates "
            "stay in voxels and Å conversions are unavailable; pass --voxel-size to set it"
        )
        return None
    if max(zyx) / min(zyx) - 1.0 > 1e-3:
        shown = ", ".join(f"{s:.4g}" for s in zyx)
        _warn(
            f"{path}: unequal voxel sizes in the header (z,y,x = {shown} Å); cryosam works in "
            "voxels and uses the per-axis sizes for Å conversions; pass --voxel-size to set one "
            "size for all axes"
        )
    return zyx


def _axis_permutation(path: Path, header: np.recarray) -> tuple[int, int, int] | None:
    """Transpose that brings file order (sections, rows, columns) to (z, y, x), if needed."""
    crs = (int(header.mapc), int(header.mapr), int(header.maps))
    if crs == (1, 2, 3):
        return None
    if sorted(crs) != [1, 2, 3]:
        if crs != (0, 0, 0):
            _warn(
                f"{path}: invalid axis order (mapc, mapr, maps) = {crs} in the header; "
                "assuming the standard order (columns = x, rows = y, sections = z)"
            )
        return None
    file_axes = (crs[2], crs[1], crs[0])  # spatial axis (1=x, 2=y, 3=z) of array axes 0, 1, 2
    perm = (file_axes.index(3), file_axes.index(2), file_axes.index(1))
    _warn(
        f"{path}: non-standard axis order (mapc, mapr, maps) = {crs}; the volume was "
        "transposed to (z, y, x)"
    )
    return perm


def _mode0_unsigned(header: np.recarray, raw: np.ndarray) -> bool:
    """Whether mode-0 bytes are unsigned (IMOD's convention) rather than signed (MRC2014).

    Decided as IMOD and mrcfile users do: the IMOD stamp and flags when present, then the
    header statistics (a maximum above 127 is only possible unsigned, a negative minimum only
    signed), and as a last resort the data: wrapped unsigned bytes look bimodal (values near
    both -128 and 127) when viewed as signed, so the reading with the smaller spread wins.
    """
    extra = bytes(header.extra2)
    stamp, flags = (int(v) for v in np.frombuffer(extra[40:48], dtype="<i4"))
    if stamp == _IMOD_STAMP:
        return not bool(flags & 1)
    dmin, dmax = float(header.dmin), float(header.dmax)
    if math.isfinite(dmin) and math.isfinite(dmax) and dmin <= dmax and (dmin, dmax) != (0, 0):
        if dmax > 127:
            return True
        if dmin < 0:
            return False
    flat = np.asarray(raw).reshape(-1)
    if flat.size > 1_000_000:
        flat = flat[:: flat.size // 1_000_000]
    signed = flat.view(np.int8).astype(np.float32)
    unsigned = flat.view(np.uint8).astype(np.float32)
    return bool(unsigned.std() < signed.std())


def _scan_values(path: Path, data: np.ndarray) -> tuple[float, float]:
    """(min, max) of ``data`` in z-chunks; refuse NaN or infinite values."""
    if data.size == 0:
        return 0.0, 0.0
    step = max(1, _SCAN_ELEMENTS // max(1, data.shape[1] * data.shape[2]))
    lo, hi, bad = math.inf, -math.inf, 0
    floating = np.issubdtype(data.dtype, np.floating)
    for start in range(0, data.shape[0], step):
        block = np.asarray(data[start : start + step])
        if floating:
            finite = np.isfinite(block)
            if not finite.all():
                bad += int(block.size - np.count_nonzero(finite))
                block = block[finite]
                if block.size == 0:
                    continue
        lo = min(lo, float(block.min()))
        hi = max(hi, float(block.max()))
    if bad:
        raise InputError(
            f"{path}: {bad} voxel(s) are NaN or infinite; fix the reconstruction or replace "
            "them (e.g. with the mean) before running cryosam"
        )
    return lo, hi


def _read_header(path: Path, compressed: bool) -> tuple[np.recarray, bool]:
    """Header of an MRC file read permissively; also whether the MAP stamp is present."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", permissive=True, header_only=True) as mrc:
                header = mrc.header.copy()
    except (EOFError, OSError) as exc:
        if compressed:
            raise InputError(
                f"{path}: the compressed file is truncated or corrupt ({exc}); copy it again "
                "or decompress it and check the MRC inside"
            ) from None
        raise InputError(
            f"{path}: not an MRC file ({exc}); give a tomogram in MRC format "
            "(.mrc, .rec, .map, optionally .gz/.bz2)"
        ) from None
    except Exception as exc:
        raise InputError(
            f"{path}: not an MRC file ({exc}); give a tomogram in MRC format "
            "(.mrc, .rec, .map, optionally .gz/.bz2)"
        ) from None
    has_stamp = bytes(header.map).startswith(b"MAP")
    return header, has_stamp


def _check_header(path: Path, header: np.recarray, has_stamp: bool) -> tuple[int, int, int]:
    """Refuse what is not a 3-D volume cryosam can read; return (nz, ny, nx) as stored."""
    not_mrc = (
        f"{path}: not an MRC file (no valid MRC header); give a tomogram in MRC format "
        "(.mrc, .rec, .map, optionally .gz/.bz2)"
    )
    mode = int(header.mode)
    nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    if min(nx, ny, nz) < 1 or max(nx, ny, nz) > 1 << 20 or int(header.nsymbt) < 0:
        raise InputError(not_mrc)
    if mode in _UNSUPPORTED_MODES:
        raise InputError(
            f"{path}: MRC mode {mode} ({_UNSUPPORTED_MODES[mode]}) is not a real-space "
            "tomogram cryosam can read; convert it to float32 (mode 2), e.g. with IMOD "
            "`newstack -mode 2`"
        )
    if mode not in _MODE_NAMES:
        if not has_stamp:
            raise InputError(not_mrc)
        raise InputError(
            f"{path}: unsupported MRC mode {mode}; convert it to float32 (mode 2), e.g. with "
            "IMOD `newstack -mode 2`"
        )
    if min(nx, ny, nz) == 1:
        raise InputError(
            f"{path}: a single 2-D image ({nx}×{ny}×{nz} x,y,z), not a volume; cryosam needs "
            "a 3-D tomogram (the reconstruction, not a projection or a slice)"
        )
    if int(header.mz) == 1 and nz > 1:
        raise InputError(
            f"{path}: a stack of {nz} 2-D images (mz = 1), not a tomogram; reconstruct the "
            "tilt series first, or fix the header (mz = nz) if it really is a volume"
        )
    return nz, ny, nx


def read_tomogram(
    path: str | os.PathLike[str], voxel_size: float | Sequence[float] | None = None
) -> Tomogram:
    """Read an MRC tomogram (.mrc/.rec/.map, also .gz/.bz2) as float32 (z, y, x).

    Modes int8, unsigned bytes in mode 0 (IMOD), int16, uint16, float16 and float32 are
    supported; uncompressed float32 is memory-mapped. Voxel size (Å, z,y,x) and origin come
    from the header unless ``voxel_size`` overrides the size. Non-standard axis orders are
    transposed to (z, y, x) with a warning. Raises :class:`InputError` for files that are
    missing, not MRC, 2-D images, image stacks, truncated, or hold NaN/inf.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: file not found; check the path to the tomogram")
    if p.is_dir():
        raise InputError(f"{p}: is a folder; give the tomogram's MRC file")
    if p.stat().st_size == 0:
        raise InputError(f"{p}: the file is empty; give a tomogram in MRC format")
    compression = _compression(p)
    header, has_stamp = _read_header(p, compression is not None)
    nz, ny, nx = _check_header(p, header, has_stamp)
    mode = int(header.mode)
    dtype = mrcfile.utils.data_dtype_from_header(header)
    nbytes = nz * ny * nx * dtype.itemsize
    offset = _HEADER_BYTES + int(header.nsymbt)

    if compression is None:
        size = p.stat().st_size
        if size < offset + nbytes:
            if not has_stamp and size < offset + nbytes // 2:
                raise InputError(
                    f"{p}: not an MRC file (no MAP stamp and the size does not match the "
                    "header); give a tomogram in MRC format (.mrc, .rec, .map)"
                )
            raise InputError(
                f"{p}: truncated: the header promises {nbytes} bytes of data but the file "
                f"holds {max(0, size - offset)}; copy or write the file again"
            )
        raw: np.ndarray = np.memmap(p, dtype=dtype, mode="r", offset=offset, shape=(nz, ny, nx))
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with mrcfile.open(p, mode="r", permissive=True) as mrc:
                    loaded = None if mrc.data is None else np.array(mrc.data)
        except (EOFError, OSError, ValueError) as exc:
            raise InputError(
                f"{p}: the {compression} file is truncated or corrupt ({exc}); copy it again"
            ) from None
        if loaded is None or loaded.size != nz * ny * nx:
            raise InputError(
                f"{p}: truncated: the header promises {nbytes} bytes of data but the "
                f"{compression} stream holds less; copy or write the file again"
            )
        raw = loaded.reshape(nz, ny, nx)

    file_dtype = _MODE_NAMES[mode]
    if mode == 0:
        unsigned = _mode0_unsigned(header, raw)
        file_dtype = "uint8 (unsigned bytes, IMOD convention)" if unsigned else "int8"
        data = np.asarray(raw).view(np.uint8 if unsigned else np.int8).astype(np.float32)
    elif dtype == np.dtype(np.float32) and isinstance(raw, np.memmap):
        data = raw
    else:
        data = np.asarray(raw).astype(np.float32)
    memory_mapped = data is raw

    perm = _axis_permutation(p, header)
    if perm is not None:
        data = data.transpose(perm)
    value_range = _scan_values(p, data)

    if voxel_size is not None:
        vs: VoxelSize | None = _voxel_size_override(p, voxel_size)
    else:
        vs = _header_voxel_size(p, header)
    org = header.origin
    origin_zyx = tuple(float(v) if math.isfinite(float(v)) else 0.0
                       for v in (org.z, org.y, org.x))
    return Tomogram(
        data=data,
        voxel_size=vs,
        origin=origin_zyx,  # type: ignore[arg-type]
        path=p,
        mode=mode,
        file_dtype=file_dtype,
        memory_mapped=memory_mapped,
        value_range=value_range,
    )


def write_mrc(
    path: str | os.PathLike[str],
    data: np.ndarray,
    voxel_size: float | Sequence[float] | None = None,
    origin: Sequence[float] | None = None,
) -> None:
    """Write a (z, y, x) volume as MRC, atomically, carrying voxel size (Å) and origin (Å, z,y,x).

    Boolean masks are stored as int8 (mode 0); integer label volumes keep int8/int16/uint16
    (uint8 becomes uint16, mode 6), other integers become int16 or uint16 when they fit and
    float32 otherwise (exact up to 2**24); floats are stored as float32.
    """
    arr = np.asarray(data)
    if arr.dtype == bool:
        arr = arr.astype(np.int8)
    elif np.issubdtype(arr.dtype, np.integer):
        if arr.dtype in (np.int8, np.int16, np.uint16):
            pass
        elif arr.dtype == np.uint8:
            arr = arr.astype(np.uint16)
        elif arr.size == 0 or (arr.min() >= -32768 and arr.max() <= 32767):
            arr = arr.astype(np.int16)
        elif arr.min() >= 0 and arr.max() <= 65535:
            arr = arr.astype(np.uint16)
        else:
            arr = arr.astype(np.float32)
    else:
        arr = arr.astype(np.float32)
    with atomic_path(path, suffix=".mrc") as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(arr))
            if voxel_size is not None:
                vs = np.broadcast_to(np.asarray(voxel_size, dtype=float), (3,))
                mrc.voxel_size = (float(vs[2]), float(vs[1]), float(vs[0]))  # x, y, z
            if origin is not None:
                oz, oy, ox = (float(v) for v in origin)
                mrc.header.origin = (ox, oy, oz)
            mrc.update_header_stats()


# --------------------------------------------------------------------------------------------
# Points
# --------------------------------------------------------------------------------------------


@dataclass
class PointSet:
    """Points read from a file: (N, 3) float64 (z, y, x) voxels plus any extra columns.

    ``columns`` maps lower-case names (e.g. ``kind``, ``score``, ``instance_id``, ``index``,
    ``tomo_name``) to arrays of length N, numeric or string.
    """

    zyx: np.ndarray
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    source: Path | None = None

    def __len__(self) -> int:
        return int(self.zyx.shape[0])

    @property
    def xyz(self) -> np.ndarray:
        """The same points as (N, 3) x, y, z."""
        return self.zyx[:, ::-1]


_UNIT_ALIASES = {
    "voxel": "voxel", "voxels": "voxel", "vox": "voxel", "px": "voxel", "pixel": "voxel",
    "pixels": "voxel", "angstrom": "angstrom", "angstroms": "angstrom", "a": "angstrom",
    "å": "angstrom", "angst": "angstrom", "ang": "angstrom",
}
_COORD_HEADER = re.compile(
    r"^(?P<axis>[xyz])(?:\s*[\[(]\s*(?P<unit>[^\])]*)\s*[\])])?$", re.IGNORECASE
)
_NAPARI_AXES = {"axis-0": "z", "axis-1": "y", "axis-2": "x"}
_SEPARATORS = {"\t": "tab", "|": "'|'", ";": "';'"}


def _normalise_unit(unit: str) -> str:
    key = str(unit).strip().lower()
    if key not in _UNIT_ALIASES:
        raise InputError(f"--points-unit {unit!r} is not known; use 'voxel' or 'angstrom'")
    return _UNIT_ALIASES[key]


def _as_voxel_size(voxel_size: float | Sequence[float] | None) -> np.ndarray | None:
    if voxel_size is None:
        return None
    vs = np.broadcast_to(np.asarray(voxel_size, dtype=float), (3,)).copy()
    if not np.all(np.isfinite(vs)) or np.any(vs <= 0):
        raise InputError(f"voxel size must be positive, got {voxel_size}; pass --voxel-size")
    return vs


def _is_star(path: Path, text: str) -> bool:
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
) -> PointSet:
    """Read points (prompts or picks) from CSV or STAR as (z, y, x) voxels.

    CSV: a header naming ``x,y,z`` (any case; extra columns kept), napari's
    ``axis-0,axis-1,axis-2`` (= z, y, x), or no header and exactly three columns x, y, z.
    Comma-separated only (tab, '|' or ';' files are refused with a fix). TARDIS-style
    ``X [A]`` headers are in Å and need ``unit="angstrom"``.

    STAR: ``rlnCoordinateX/Y/Z`` (pixels) or RELION-5 ``rlnCenteredCoordinateX/Y/ZAngst``
    (needs ``shape`` and ``voxel_size``: voxel = centered Å / voxel size + size / 2, RELION's
    own decentring). Several tomograms in one file need ``tomo_name``. When the STAR states the
    pixel size of its coordinates (``rlnTomoTiltSeriesPixelSize`` or ``rlnMicrographPixelSize``
    in the optics block, ``rlnPixelSize``, or ``rlnDetectorPixelSize``/``rlnMagnification``)
    and it differs from ``voxel_size``, the coordinates are scaled to this tomogram's voxels
    with a warning; ``star_pixel_size`` overrides the stated size. Origin shifts
    (``rlnOriginX/Y/Z[Angst]``) are not applied.

    ``unit="angstrom"`` divides CSV coordinates by ``voxel_size`` (Å from voxel 0; the header
    origin is not subtracted). With ``shape`` (D, H, W), points outside the volume (beyond the
    outer voxel edges) are refused unless ``check_bounds`` is False.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: file not found; check the path to the points file")
    if p.is_dir():
        raise InputError(f"{p}: is a folder; give a CSV or STAR points file")
    unit = _normalise_unit(unit)
    vs = _as_voxel_size(voxel_size)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(
            f"{p}: not a text file; give points as CSV (x,y,z) or a RELION STAR file"
        ) from None
    if not text.strip():
        raise InputError(f"{p}: the file is empty (no points); add at least one x,y,z point")

    if _is_star(p, text):
        if unit != "voxel":
            _warn(f"{p}: --points-unit is ignored for STAR files (their columns state units)")
        zyx, columns, labels = _read_star_points(p, shape, vs, tomo_name, star_pixel_size)
    else:
        zyx, columns, labels = _read_csv_points(p, text, unit, vs)
    if shape is not None and check_bounds:
        _check_bounds(p, zyx, shape, labels)
    return PointSet(zyx=zyx, columns=columns, source=p)


def _check_bounds(path: Path, zyx: np.ndarray, shape: Sequence[int], labels: list[str]) -> None:
    size = np.asarray([int(s) for s in shape], dtype=float)
    outside = np.any((zyx < -0.5) | (zyx > size - 0.5), axis=1)
    if outside.any():
        i = int(np.argmax(outside))
        z, y, x = zyx[i]
        d, h, w = (int(s) for s in size)
        more = int(outside.sum()) - 1
        extra = f" (and {more} more)" if more else ""
        raise InputError(
            f"{path}: {labels[i]}: point x,y,z = {x:.6g},{y:.6g},{z:.6g} voxels lies outside "
            f"the tomogram (x,y,z size {w}×{h}×{d}){extra}; check the columns are x,y,z in "
            "voxels of this tomogram (or use --points-unit angstrom / --voxel-size)"
        )


def _parse_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _csv_rows(path: Path, text: str) -> list[tuple[int, list[str]]]:
    lines = [(i + 1, line) for i, line in enumerate(text.splitlines())]
    content = [(n, s) for n, s in lines if s.strip() and not s.lstrip().startswith("#")]
    if not content:
        raise InputError(f"{path}: no points in the file; add at least one x,y,z point")
    first = content[0][1]
    if "," not in first:
        for sep, name in _SEPARATORS.items():
            if sep in first:
                raise InputError(
                    f"{path}: line {content[0][0]} is {name}-separated; cryosam reads "
                    "comma-separated points (x,y,z): replace the separators with commas"
                )
        if len(first.split()) > 1:
            raise InputError(
                f"{path}: line {content[0][0]} is space-separated; cryosam reads "
                "comma-separated points (x,y,z): replace the spaces with commas"
            )
    reader = csv.reader((s for _, s in content), delimiter=",", skipinitialspace=True)
    return [(n, [f.strip() for f in row]) for (n, _), row in zip(content, reader, strict=True)]


def _column_array(values: list[str]) -> np.ndarray:
    """Numbers as int64/float64 when every non-empty value parses, strings otherwise."""
    parsed = [_parse_float(v) if v != "" else math.nan for v in values]
    if all(v is not None for v in parsed):
        arr = np.asarray(parsed, dtype=np.float64)
        integral = all(re.fullmatch(r"[+-]?\d+", v) for v in values)
        return arr.astype(np.int64) if integral else arr
    return np.asarray(values, dtype=str)


def _read_csv_points(
    path: Path, text: str, unit: str, vs: np.ndarray | None
) -> tuple[np.ndarray, dict[str, np.ndarray], list[str]]:
    rows = _csv_rows(path, text)
    first_line, first = rows[0]
    has_header = all(_parse_float(f) is None for f in first)
    if has_header:
        names = [f.strip().strip('"').strip().lower() for f in first]
        data_rows = rows[1:]
        if not data_rows:
            raise InputError(f"{path}: a header but no points; add at least one point below it")
        axis_col: dict[str, int] = {}
        header_unit: str | None = None
        for j, name in enumerate(names):
            m = _COORD_HEADER.match(name)
            if m and m.group("axis").lower() not in axis_col:
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
                    "--points-unit angstrom (with the tomogram's voxel size)"
                )
            raise InputError(
                f"{path}: the coordinate columns say voxels but --points-unit {unit} was given; "
                "drop --points-unit or fix the header"
            )
    else:
        if len(first) != 3:
            raise InputError(
                f"{path}: line {first_line} has {len(first)} columns and the file has no "
                "header; give three columns x,y,z or add a header naming x,y,z"
            )
        names = ["x", "y", "z"]
        axis_col = {"x": 0, "y": 1, "z": 2}
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

    if unit == "angstrom":
        if vs is None:
            raise InputError(
                f"{path}: coordinates in Å need the tomogram's voxel size; the header has none, "
                "so pass --voxel-size"
            )
        coords = coords / vs
    used = set(axis_col.values())
    columns: dict[str, np.ndarray] = {}
    for j, name in enumerate(names):
        if j not in used:
            columns[name] = _column_array([fields[j] for _, fields in data_rows])
    return coords, columns, labels


# --------------------------------------------------------------------------------------------
# STAR
# --------------------------------------------------------------------------------------------

_STAR_PIXEL = ("rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ")
_STAR_CENTERED = (
    "rlnCenteredCoordinateXAngst",
    "rlnCenteredCoordinateYAngst",
    "rlnCenteredCoordinateZAngst",
)
_STAR_SCORES = ("rlnAutopickFigureOfMerit", "rlnLCCmax")


def _read_star_blocks(path: Path) -> dict[str, object]:
    import starfile

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blocks = starfile.read(path, always_dict=True)
    except Exception as exc:
        raise InputError(
            f"{path}: could not be read as a STAR file ({type(exc).__name__}: {exc}); "
            "check it is a RELION STAR file"
        ) from None
    return dict(blocks)


def _particles_block(path: Path, blocks: Mapping[str, object]):
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


def star_tomo_names(path: str | os.PathLike[str]) -> list[str]:
    """The tomogram names (rlnTomoName, else rlnMicrographName) in a STAR file, in file order."""
    p = Path(path)
    _, df, _ = _particles_block(p, _read_star_blocks(p))
    column = _name_column(df)
    if column is None:
        return []
    return list(dict.fromkeys(str(v) for v in df[column]))


def _name_column(df) -> str | None:
    for column in ("rlnTomoName", "rlnMicrographName"):
        if column in df.columns:
            return column
    return None


def _name_key(name: str) -> str:
    base = name.strip().replace("\\", "/").rsplit("/", 1)[-1]
    base = base.split(":", 1)[0]
    return base.split(".", 1)[0]


def _select_tomogram(path: Path, df, tomo_name: str | None):
    column = _name_column(df)
    if column is None:
        return df
    values = df[column].astype(str)
    names = list(dict.fromkeys(values))
    if tomo_name is None:
        if len(names) > 1:
            shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            raise InputError(
                f"{path}: holds points for {len(names)} tomograms ({shown}); choose one "
                "with --tomo-name"
            )
        return df
    mask = values == tomo_name
    if not mask.any():
        mask = values.map(_name_key) == _name_key(tomo_name)
    if not mask.any():
        shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        raise InputError(
            f"{path}: no points for tomogram {tomo_name!r}; it holds {shown}: pass one of "
            "these with --tomo-name"
        )
    return df[mask.to_numpy()]


def _star_pixel_sizes(df, optics) -> tuple[np.ndarray | None, str]:
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
        sizes = df["rlnDetectorPixelSize"].to_numpy(float) * 1e4 / df["rlnMagnification"].to_numpy(
            float
        )
        return sizes, "rlnDetectorPixelSize/rlnMagnification"
    return None, ""


def _star_numeric(path: Path, df, columns: Sequence[str], rows: list[str]) -> np.ndarray:
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


def _read_star_points(
    path: Path,
    shape: Sequence[int] | None,
    vs: np.ndarray | None,
    tomo_name: str | None,
    star_pixel_size: float | None,
) -> tuple[np.ndarray, dict[str, np.ndarray], list[str]]:
    blocks = _read_star_blocks(path)
    block, df, optics = _particles_block(path, blocks)
    if len(df) == 0:
        raise InputError(f"{path}: data_{block} has no rows (no points); give a file with points")
    df = df.reset_index(drop=True)
    rows_all = [f"row {i + 1} of data_{block}" for i in range(len(df))]
    index = _select_tomogram(path, df, tomo_name).index.to_numpy()
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
        zyx = _star_numeric(path, df, _STAR_PIXEL[::-1], rows)
        sizes, source = _star_pixel_sizes(df, optics)
        if star_pixel_size is not None:
            sizes, source = np.full(len(df), float(star_pixel_size)), "star_pixel_size"
        if sizes is not None and vs is not None:
            factor = sizes[:, None] / vs[None, :]
            if np.any(np.abs(factor - 1.0) > 1e-3):
                shown = np.unique(np.round(sizes, 4))
                _warn(
                    f"{path}: coordinates are in {', '.join(f'{s:g}' for s in shown)} Å pixels "
                    f"({source}) and the tomogram has {', '.join(f'{v:g}' for v in vs)} Å "
                    f"voxels (z,y,x): scaled by {np.unique(np.round(factor, 4))[0]:g} to "
                    "this tomogram's voxels; if they already are, state the pixel size "
                    "(star_pixel_size) or remove it from the file"
                )
                zyx = zyx * factor
        if has_centered and shape is not None and vs is not None:
            other = _centered_to_voxels(path, df, shape, vs, rows)
            if np.max(np.abs(other - zyx)) > 1.0:
                _warn(
                    f"{path}: rlnCoordinateX/Y/Z and rlnCenteredCoordinateX/Y/ZAngst disagree "
                    "by more than a voxel for this tomogram; using rlnCoordinateX/Y/Z"
                )
        origins = [c for c in df.columns if re.fullmatch(r"rlnOrigin[XYZ](Angst)?", str(c))]
        if origins:
            import pandas as pd

            values = np.stack(
                [pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=float) for c in origins]
            )
            if np.any(np.nan_to_num(np.abs(values)) > 0):
                _warn(
                    f"{path}: rlnOrigin shifts are not applied; points are taken from "
                    "rlnCoordinateX/Y/Z as picked"
                )
    else:
        if shape is None or vs is None:
            raise InputError(
                f"{path}: RELION-5 centered coordinates (rlnCenteredCoordinateX/Y/ZAngst) need "
                "the tomogram's size and voxel size; give the tomogram (and --voxel-size if its "
                "header has none)"
            )
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
    return zyx, columns, rows


def _series_array(series) -> np.ndarray:
    import pandas as pd

    if pd.api.types.is_integer_dtype(series.dtype):
        return series.to_numpy(dtype=np.int64)
    if pd.api.types.is_numeric_dtype(series.dtype):
        return series.to_numpy(dtype=np.float64)
    return series.astype(str).to_numpy(dtype=str)


def _centered_to_voxels(
    path: Path, df, shape: Sequence[int], vs: np.ndarray, rows: list[str]
) -> np.ndarray:
    """RELION-5: voxel = centered Å / voxel size + size / 2 (ParticleSet decentring)."""
    centered = _star_numeric(path, df, _STAR_CENTERED[::-1], rows)
    size = np.asarray([int(s) for s in shape], dtype=float)
    return centered / vs[None, :] + size[None, :] / 2.0


def _voxels_to_centered(zyx: np.ndarray, shape: Sequence[int], vs: np.ndarray) -> np.ndarray:
    size = np.asarray([int(s) for s in shape], dtype=float)
    return (zyx - size[None, :] / 2.0) * vs[None, :]


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------


def _as_zyx(zyx: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    arr = np.asarray(zyx, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, 3)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"points must be an (N, 3) array of z, y, x; got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("points must be finite")
    return arr


def _as_column(name: str, values: object, n: int) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim == 0:
        arr = np.full(n, arr[()])
    if arr.shape != (n,):
        raise ValueError(f"column {name!r} has shape {arr.shape}; expected ({n},)")
    return arr


def _format_value(value: object, digits: int = 6) -> str:
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
    pts = _as_zyx(zyx)
    n = len(pts)
    names = ["x", "y", "z"]
    cols = [pts[:, 2], pts[:, 1], pts[:, 0]]
    digits = [3, 3, 3]
    for name, values in (columns or {}).items():
        if name.lower() in ("x", "y", "z"):
            raise ValueError(f"column name {name!r} clashes with the coordinates")
        names.append(name)
        cols.append(_as_column(name, values, n))
        digits.append(6)
    atomic_write_text(path, _csv_text(names, cols, digits))


def write_napari_csv(path: str | os.PathLike[str], zyx: np.ndarray) -> None:
    """Write points as napari's points CSV ``index,axis-0,axis-1,axis-2`` (= z, y, x)."""
    pts = _as_zyx(zyx)
    cols = [np.arange(len(pts)), pts[:, 0], pts[:, 1], pts[:, 2]]
    atomic_write_text(path, _csv_text(["index", "axis-0", "axis-1", "axis-2"], cols, [0, 3, 3, 3]))


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
    ``rlnCoordinateX/Y/Z`` in this tomogram's voxels (what RELION 3/4 and Warp read),
    ``rlnAutopickFigureOfMerit`` when ``scores`` are given, and RELION-5
    ``rlnCenteredCoordinateX/Y/ZAngst`` = (voxel − size / 2) × voxel size when both
    ``voxel_size`` and ``shape`` (D, H, W) are known. ``extra`` adds columns by name.
    """
    import pandas as pd
    import starfile

    pts = _as_zyx(zyx)
    n = len(pts)
    table: dict[str, object] = {
        "rlnTomoName": [str(tomo_name)] * n,
        "rlnMicrographName": [str(tomo_name)] * n,
        "rlnCoordinateX": pts[:, 2],
        "rlnCoordinateY": pts[:, 1],
        "rlnCoordinateZ": pts[:, 0],
    }
    vs = _as_voxel_size(voxel_size)
    if vs is not None and shape is not None:
        centered = _voxels_to_centered(pts, shape, vs)
        table["rlnCenteredCoordinateXAngst"] = centered[:, 2]
        table["rlnCenteredCoordinateYAngst"] = centered[:, 1]
        table["rlnCenteredCoordinateZAngst"] = centered[:, 0]
    if scores is not None:
        table["rlnAutopickFigureOfMerit"] = _as_column("scores", scores, n).astype(float)
    for name, values in (extra or {}).items():
        if name in table:
            raise ValueError(f"extra column {name!r} is already written")
        table[name] = _as_column(name, values, n)
    df = pd.DataFrame(table)
    with atomic_path(path, suffix=".star") as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            starfile.write({"particles": df}, tmp, float_format="%.6f")

