"""Tomograms and point files in and out: MRC through mrcfile, CSV, STAR through starfile.

Arrays are indexed [z, y, x]; coordinates inside cryosam are (z, y, x) float voxels with voxel
centres at integers (0-based); files users see speak x, y, z. Every problem with a user's file
is raised as :class:`cryosam.errors.InputError` with one line that names the file and the fix;
recoverable oddities are reported with ``warnings.warn(..., CryosamWarning)``.

- :mod:`cryosam.io.mrc`: :class:`Tomogram`, :func:`read_tomogram`, :func:`write_mrc`
- :mod:`cryosam.io.points`: :class:`PointSet`, :func:`read_points` (CSV, napari CSV, and STAR
  through :mod:`cryosam.io.star`; :mod:`cryosam.io.names` picks a tomogram's rows)
- :mod:`cryosam.io.csv_out`: :func:`write_picks_csv`, :func:`write_napari_csv`
- :mod:`cryosam.io.star`: :func:`star_tomo_names`, :func:`write_picks_star`, and one file per
  tool: :data:`STAR_FLAVOURS`, :class:`StarOutputs`, :func:`star_tomo_name`,
  :func:`write_flavour_star`
- :mod:`cryosam.io.copick`: :func:`open_copick` → :class:`CopickSource` (tomogram, clicks),
  :func:`write_copick` (picks and instance segmentation back into the project)
"""

from __future__ import annotations

from cryosam.errors import CryosamWarning, InputError
from cryosam.io._common import VoxelSize
from cryosam.io.copick import (
    COPICK_USER,
    CopickSource,
    copick_results_missing,
    open_copick,
    write_copick,
)
from cryosam.io.csv_out import write_napari_csv, write_picks_csv
from cryosam.io.mrc import Tomogram, read_tomogram, scan_values, voxel_size_zyx, write_mrc
from cryosam.io.points import PointSet, negative_rows, normalise_unit, read_points, to_voxels
from cryosam.io.star import (
    STAR_FLAVOURS,
    StarOutputs,
    read_particles,
    star_tomo_name,
    star_tomo_names,
    write_flavour_star,
    write_picks_star,
)

__all__ = [
    "COPICK_USER",
    "STAR_FLAVOURS",
    "CopickSource",
    "CryosamWarning",
    "InputError",
    "PointSet",
    "StarOutputs",
    "Tomogram",
    "VoxelSize",
    "negative_rows",
    "normalise_unit",
    "copick_results_missing",
    "open_copick",
    "read_particles",
    "read_points",
    "read_tomogram",
    "scan_values",
    "star_tomo_name",
    "star_tomo_names",
    "to_voxels",
    "voxel_size_zyx",
    "write_copick",
    "write_flavour_star",
    "write_mrc",
    "write_napari_csv",
    "write_picks_csv",
    "write_picks_star",
]
