"""MRC tomograms in and out.

mrcfile parses the header, opens .gz/.bz2, memory-maps uncompressed data and computes the voxel
size. On top of it this module keeps what a tomogram reader needs and mrcfile leaves to its
users: 2-D images, image stacks, Fourier modes and NaN/inf voxels are refused with one line
naming the file and the fix; IMOD's unsigned bytes in mode 0 are read as unsigned; a
non-standard axis order is transposed to (z, y, x); unusable or unequal voxel sizes are warned
about. Arrays are indexed [z, y, x].
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
from mrcfile.dtypes import HEADER_DTYPE

from cryosam._atomic import atomic_path
from cryosam.errors import InputError
from cryosam.io._common import VoxelSize, as_triple, sizes_ok, third_party_quiet, warn
from cryosam.utils import sha256_file

__all__ = ["Tomogram", "read_tomogram", "scan_values", "write_mrc"]

_MODE_NAMES = {0: "int8", 1: "int16", 2: "float32", 6: "uint16", 12: "float16"}
_UNSUPPORTED_MODES = {
    3: "complex int16 (Fourier transform)",
    4: "complex float32 (Fourier transform)",
    101: "packed 4-bit",
}
# IMOD writes 'IMOD' (this little-endian int32) at header byte 152 and its flags at byte 156;
# mrcfile has no field for them: they sit inside its ``extra2`` field.
_IMOD_STAMP = 1146047817
_IMOD_STAMP_AT = 152 - HEADER_DTYPE.fields["extra2"][1]
_SCAN_ELEMENTS = 1 << 24  # values per chunk when scanning a volume for NaN/inf and its range
_MRC_FIX = "give a tomogram in MRC format (.mrc, .rec, .map, optionally .gz/.bz2)"


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
    # index of the first voxel along (z, y, x) in the header's grid: (nzstart, nystart, nxstart)
    start: tuple[int, int, int] = (0, 0, 0)

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
        return sha256_file(self.path) if self.path is not None else None


@dataclass(frozen=True)
class _Header:
    """What the reader needs from a file before touching its data."""

    fields: np.recarray  # mrcfile's parsed 1024-byte header (a copy)
    voxel_xyz: tuple[float, float, float]  # mrcfile's voxel_size: CELLA / (MX, MY, MZ)
    has_stamp: bool  # the MAP stamp of MRC2000+; old headers lack it
    compression: str | None  # "gzip", "bzip2" or None


def _compression(path: Path) -> str | None:
    """The compression of ``path`` by its magic bytes (known before mrcfile gets to fail)."""
    with open(path, "rb") as fh:
        magic = fh.read(3)
    if magic[:2] == b"\x1f\x8b":
        return "gzip"
    if magic == b"BZh":
        return "bzip2"
    return None


def _read_header(path: Path) -> _Header:
    """The header of an MRC file, read permissively by mrcfile (old headers are common)."""
    compression = _compression(path)
    try:
        with third_party_quiet(), np.errstate(divide="ignore", invalid="ignore"):
            with mrcfile.open(path, mode="r", permissive=True, header_only=True) as mrc:
                fields = mrc.header.copy()
                vs = mrc.voxel_size
                voxel_xyz = (float(vs.x), float(vs.y), float(vs.z))
    except Exception as exc:
        if compression is not None and isinstance(exc, (EOFError, OSError)):
            raise InputError(
                f"{path}: the compressed file is truncated or corrupt ({exc}); copy it again "
                "or decompress it and check the MRC inside"
            ) from None
        raise InputError(f"{path}: not an MRC file ({exc}); {_MRC_FIX}") from None
    has_stamp = bytes(fields.map).startswith(b"MAP")
    return _Header(fields, voxel_xyz, has_stamp, compression)


def _check_header(path: Path, hdr: _Header) -> tuple[int, int, int]:
    """Refuse what is not a 3-D volume cryosam can read; return (nz, ny, nx) as stored.

    Image stacks are recognised by MZ = 1 < NZ rather than by the space group, because IMOD
    writes space group 0 (mrcfile's "image stack") for its tomograms too.
    """
    header = hdr.fields
    not_mrc = f"{path}: not an MRC file (no valid MRC header); {_MRC_FIX}"
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
        if not hdr.has_stamp:
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
    mz = int(header.mz)
    if int(header.ispg) >= 401 and 1 < mz < nz and nz % mz == 0:  # the MRC volume-stack flag
        raise InputError(
            f"{path}: a stack of {nz // mz} volumes of {mz} sections each (space group "
            f"{int(header.ispg)}), not one tomogram; split it and give one volume"
        )
    return nz, ny, nx


def _read_data(path: Path, hdr: _Header, shape: tuple[int, int, int]) -> np.ndarray:
    """The stored values as (sections, rows, columns): a read-only memory map when uncompressed
    (after checking the file holds all of it), else decompressed into memory."""
    nbytes = math.prod(shape) * mrcfile.utils.data_dtype_from_header(hdr.fields).itemsize
    if hdr.compression is None:
        offset = hdr.fields.nbytes + int(hdr.fields.nsymbt)
        size = path.stat().st_size
        if size < offset + nbytes:
            if not hdr.has_stamp and size < offset + nbytes // 2:
                raise InputError(
                    f"{path}: not an MRC file (no MAP stamp and the size does not match the "
                    "header); give a tomogram in MRC format (.mrc, .rec, .map)"
                )
            raise InputError(
                f"{path}: truncated: the header promises {nbytes} bytes of data but the file "
                f"holds {max(0, size - offset)}; copy or write the file again"
            )
        with third_party_quiet(), mrcfile.mmap(path, mode="r", permissive=True) as mrc:
            mapped = mrc.data  # the memmap stays valid (and read-only) after mrcfile closes
        if mapped is None:
            raise InputError(f"{path}: the data block could not be mapped; {_MRC_FIX}")
        return mapped.reshape(shape)
    try:
        with third_party_quiet(), mrcfile.open(path, mode="r", permissive=True) as mrc:
            loaded = None if mrc.data is None else np.array(mrc.data)
    except (EOFError, OSError, ValueError) as exc:
        raise InputError(
            f"{path}: the {hdr.compression} file is truncated or corrupt ({exc}); copy it again"
        ) from None
    if loaded is None or loaded.size != math.prod(shape):
        raise InputError(
            f"{path}: truncated: the header promises {nbytes} bytes of data but the "
            f"{hdr.compression} stream holds less; copy or write the file again"
        )
    return loaded.reshape(shape)


def _mode0_unsigned(header: np.recarray, raw: np.ndarray) -> bool:
    """Whether mode-0 bytes are unsigned (IMOD's convention) rather than signed (MRC2014).

    Decided as IMOD and mrcfile users do: the IMOD stamp and flags when present, then the
    header statistics (a maximum above 127 is only possible unsigned, a negative minimum only
    signed), and as a last resort the data: wrapped unsigned bytes look bimodal (values near
    both -128 and 127) when viewed as signed, so the reading with the smaller spread wins.
    """
    extra = bytes(header.extra2)[_IMOD_STAMP_AT : _IMOD_STAMP_AT + 8]
    stamp, flags = (int(v) for v in np.frombuffer(extra, dtype="<i4"))
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


def _axis_permutation(path: Path, header: np.recarray) -> tuple[int, int, int] | None:
    """Transpose that brings file order (sections, rows, columns) to (z, y, x), if needed."""
    crs = (int(header.mapc), int(header.mapr), int(header.maps))
    if crs == (1, 2, 3):
        return None
    if sorted(crs) != [1, 2, 3]:
        if crs != (0, 0, 0):
            warn(
                f"{path}: invalid axis order (mapc, mapr, maps) = {crs} in the header; "
                "assuming the standard order (columns = x, rows = y, sections = z)"
            )
        return None
    file_axes = (crs[2], crs[1], crs[0])  # spatial axis (1=x, 2=y, 3=z) of array axes 0, 1, 2
    perm = (file_axes.index(3), file_axes.index(2), file_axes.index(1))
    warn(
        f"{path}: non-standard axis order (mapc, mapr, maps) = {crs}; the volume was "
        "transposed to (z, y, x)"
    )
    return perm


def scan_values(path: object, data: np.ndarray) -> tuple[float, float]:
    """(min, max) of ``data`` in z-chunks, so a memory map is never read whole; NaN/inf are
    refused in one line naming ``path`` (a file, or what the data is)."""
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


def _header_voxel_size(path: Path, voxel_xyz: tuple[float, float, float]) -> VoxelSize | None:
    """Voxel size (z, y, x) from mrcfile's reading of the header; warn when unusable or odd."""
    # header floats are float32: keep 6 significant digits (23.199951 -> 23.2); a size
    # mrcfile could not compute (MX, MY or MZ of 0) shows as 0, and so does -0
    zyx = tuple(float(f"{s:.6g}") if math.isfinite(s) and s != 0 else 0.0
                for s in voxel_xyz[::-1])
    if not all(s > 0 for s in zyx):
        shown = ", ".join(f"{s:g}" for s in zyx)
        warn(
            f"{path}: the header gives no usable voxel size (z,y,x = {shown} Å); coordinates "
            "stay in voxels and Å conversions are unavailable; pass --voxel-size to set it"
        )
        return None
    if max(zyx) / min(zyx) - 1.0 > 1e-3:
        shown = ", ".join(f"{s:.4g}" for s in zyx)
        warn(
            f"{path}: unequal voxel sizes in the header (z,y,x = {shown} Å); cryosam works in "
            "voxels and uses the per-axis sizes for Å conversions; pass --voxel-size to set one "
            "size for all axes"
        )
    return zyx  # type: ignore[return-value]


def voxel_size_zyx(voxel_size: float | Sequence[float], where: object,
                   option: str = "--voxel-size") -> VoxelSize:
    """A user's voxel size (one number or z, y, x) as (z, y, x) Å; refuse, naming ``where``
    and the ``option`` it came from, what is not positive finite numbers."""
    try:
        vs = as_triple(voxel_size)
    except (TypeError, ValueError):
        raise InputError(
            f"{where}: {option} {voxel_size!r} is not a number; give Å per voxel, e.g. 10.0 "
            "(or three, z, y, x)") from None
    if not sizes_ok(vs):
        raise InputError(f"{where}: {option} must be a positive number of Å, got {voxel_size}")
    return float(vs[0]), float(vs[1]), float(vs[2])


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
    if not p.is_file():
        raise InputError(f"{p}: not a regular file (a pipe or a device?); give the tomogram's "
                         "MRC file")
    if p.stat().st_size == 0:
        raise InputError(f"{p}: the file is empty; give a tomogram in MRC format")
    hdr = _read_header(p)
    shape = _check_header(p, hdr)
    raw = _read_data(p, hdr, shape)
    header = hdr.fields
    mode = int(header.mode)

    file_dtype = _MODE_NAMES[mode]
    if mode == 0:
        unsigned = _mode0_unsigned(header, raw)
        file_dtype = "uint8 (unsigned bytes, IMOD convention)" if unsigned else "int8"
        data = np.asarray(raw).view(np.uint8 if unsigned else np.int8).astype(np.float32)
    elif raw.dtype == np.dtype(np.float32) and isinstance(raw, np.memmap):
        data = raw
    else:
        data = np.asarray(raw).astype(np.float32)
    memory_mapped = data is raw

    perm = _axis_permutation(p, header)
    if perm is not None:
        data = data.transpose(perm)
    value_range = scan_values(p, data)

    if voxel_size is not None:
        vs: VoxelSize | None = voxel_size_zyx(voxel_size, p)
    else:
        vs = _header_voxel_size(p, hdr.voxel_xyz)
    org = header.origin
    origin_zyx = tuple(float(v) if math.isfinite(float(v)) else 0.0
                       for v in (org.z, org.y, org.x))
    starts = (int(header.nzstart), int(header.nystart), int(header.nxstart))  # as stored
    start_zyx = starts if perm is None else (starts[perm[0]], starts[perm[1]], starts[perm[2]])
    return Tomogram(data=data, voxel_size=vs, origin=origin_zyx,  # type: ignore[arg-type]
                    path=p, mode=mode, file_dtype=file_dtype, memory_mapped=memory_mapped,
                    value_range=value_range, start=start_zyx)


def _storage_array(data: np.ndarray) -> np.ndarray:
    """``data`` in the smallest MRC mode that holds it exactly (see :func:`write_mrc`)."""
    arr = np.asarray(data)
    if arr.dtype == bool:
        return arr.astype(np.int8)
    if not np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.float32)
    if arr.dtype in (np.int8, np.int16, np.uint16):
        return arr
    if arr.dtype == np.uint8:
        return arr.astype(np.uint16)
    if arr.size == 0 or (arr.min() >= -32768 and arr.max() <= 32767):
        return arr.astype(np.int16)
    if arr.min() >= 0 and arr.max() <= 65535:
        return arr.astype(np.uint16)
    return arr.astype(np.float32)


def write_mrc(
    path: str | os.PathLike[str],
    data: np.ndarray,
    voxel_size: float | Sequence[float] | None = None,
    origin: Sequence[float] | None = None,
    start: Sequence[int] | None = None,
) -> None:
    """Write a (z, y, x) volume as MRC, atomically, carrying voxel size (Å), origin (Å, z,y,x)
    and the first voxel's index (``start``, z,y,x: the header's nzstart, nystart, nxstart).

    Boolean masks are stored as int8 (mode 0); integer label volumes keep int8/int16/uint16
    (uint8 becomes uint16, mode 6), other integers become int16 or uint16 when they fit and
    float32 otherwise (exact up to 2**24); floats are stored as float32.
    """
    arr = _storage_array(data)
    with atomic_path(path, suffix=".mrc") as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(arr))
            if voxel_size is not None:
                vs = as_triple(voxel_size)
                mrc.voxel_size = (float(vs[2]), float(vs[1]), float(vs[0]))  # x, y, z
            if origin is not None:
                oz, oy, ox = (float(v) for v in origin)
                mrc.header.origin = (ox, oy, oz)
            if start is not None:
                h = mrc.header
                h.nzstart, h.nystart, h.nxstart = (int(v) for v in start)
            mrc.update_header_stats()
            # mrcfile stamps the creation time into label 0: a fixed label keeps identical
            # runs byte-identical (the time is in run.json)
            mrc.header.label[0] = f"{'Created by cryosam':40s}{'':>39s} ".encode()
            mrc.header.nlabl = 1
