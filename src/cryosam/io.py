"""Tomograms and point files in and out (MRC via mrcfile, CSV, STAR via starfile)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import mrcfile
import numpy as np

from cryosam._atomic import atomic_path

VoxelSize = tuple[float, float, float]  # Angstrom per voxel along (z, y, x)


def write_mrc(
    path: str | os.PathLike[str],
    data: np.ndarray,
    voxel_size: float | Sequence[float] | None = None,
    origin: Sequence[float] | None = None,
) -> None:
    """Write a (z, y, x) volume as MRC, atomically, carrying voxel size (Å) and origin (Å, z,y,x).

    Boolean masks are stored as int8 (mode 0), label volumes as int16 or float32 when they do
    not fit, floats as float32.
    """
    arr = np.asarray(data)
    if arr.dtype == bool:
        arr = arr.astype(np.int8)
    elif np.issubdtype(arr.dtype, np.integer):
        if arr.size and (arr.min() < -32768 or arr.max() > 32767):
            arr = arr.astype(np.float32)
        elif arr.dtype not in (np.int8, np.int16, np.uint8, np.uint16):
            arr = arr.astype(np.int16)
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
