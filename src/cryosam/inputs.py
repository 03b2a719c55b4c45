"""The first stages: load the tomogram and the clicks, normalise, probe the clicks (polarity,
size) and prepare what the models see (flip, bin). See :mod:`cryosam.stages` for the rest.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cryosam import io
from cryosam.config import CryosamConfig, PropagationConfig
from cryosam.errors import CryosamWarning, InputError
from cryosam.normalise import normalise_volume
from cryosam.probe import ClickProbe, bin_factor, membrane_bin_factor
from cryosam.probe import probe_clicks as probe_volume
from cryosam.query import SavedQuery
from cryosam.record import file_info
from cryosam.rescale import bin_volume, to_binned
from cryosam.utils import outside_volume, tomo_stem

TomogramLike = io.Tomogram | str | os.PathLike[str] | np.ndarray
# an (N, 3) z, y, x array or list of rows, a file, or a pandas DataFrame (read as a CSV)
PointsLike = np.ndarray | str | os.PathLike[str] | list[list[float]] | Any
VoxelSizeLike = float | tuple[float, float, float]  # Å; three: z, y, x


# --------------------------------------------------------------------------- load


@dataclass
class Inputs:
    """The tomogram and the clicks, in voxels (z, y, x)."""

    tomogram: io.Tomogram
    prompts: np.ndarray  # (P, 3)
    points_source: Path | None  # the points file, None for an array
    points_unit: str
    name: str  # the tomogram's name in STAR outputs
    negatives: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # (M, 3)
    negatives_source: Path | None = None
    # each click's data row in the points file or table (0-based); None: 0..P-1
    prompt_rows: np.ndarray | None = None

    def report(self) -> dict[str, Any]:
        """The run record's ``inputs``: the files' path, size and SHA-256, the tomogram's shape,
        voxel size and origin (Å), the clicks and the negatives (voxels), each along z, y, x."""
        tomo = self.tomogram
        return {
            "negative_points": (file_info(self.negatives_source) if self.negatives_source
                                else None),
            "negatives_zyx": self.negatives.tolist(),
            "tomogram": file_info(tomo.path),
            "shape_zyx": list(tomo.shape),
            "voxel_size_zyx": list(tomo.voxel_size) if tomo.voxel_size else None,
            "origin_zyx": list(tomo.origin),
            "points": file_info(self.points_source) if self.points_source else "array",
            "points_unit": self.points_unit,
            "tomo_name": self.name,
            "prompts_zyx": self.prompts.tolist(),
        }


def load_inputs(tomogram: TomogramLike, points: PointsLike, *,
                voxel_size: VoxelSizeLike | None = None, points_unit: str = "voxel",
                tomo_name: str | None = None, points_pixel_size: float | None = None,
                points_bin: int | None = None,
                negative_points: PointsLike | None = None) -> Inputs:
    """Read (or wrap) the tomogram and the clicks; clicks are checked against its shape.

    ``points_pixel_size`` (Å): the clicks' coordinates are pixels of that size (made on a
    differently binned copy) and are scaled to this tomogram's voxels; ``points_bin`` N says
    the same for clicks made on a copy binned N times. Negative clicks (structures that must
    not be picked) come from ``negative_points`` and from rows of the points file whose
    ``negative`` column is 1/true/yes or whose ``label`` column says negative."""
    tomo = _as_tomogram(tomogram, voxel_size)
    points_unit = io.normalise_unit(points_unit)
    if points_bin is not None:
        if tomo.mean_voxel_size is None:
            raise InputError("--points-bin needs the tomogram's voxel size; the header has "
                             "none, so pass --voxel-size")
        points_pixel_size = tuple(float(points_bin) * v for v in tomo.voxel_size)  # per axis
    own = tomo_stem(tomo.path) if tomo.path else None  # picks its rows of a multi-tomogram file
    if isinstance(points, str | os.PathLike):
        ps = io.read_points(points, shape=tomo.shape, voxel_size=tomo.voxel_size,
                            unit=points_unit, tomo_name=tomo_name,
                            pixel_size=points_pixel_size, own_tomo_name=own)
        prompts, source = np.asarray(ps.zyx, dtype=float).reshape(-1, 3), Path(points)
        flagged = io.negative_rows(ps)
        negatives = prompts[flagged]
        prompts, rows = prompts[~flagged], ps.file_rows[~flagged]
        if not len(prompts):
            raise InputError(f"{points}: every row is a negative click; click at least one "
                             "particle to find (a row without the negative flag)")
    else:
        ps = points_from_api(points, tomo, points_unit, points_pixel_size, "clicks", tomo_name)
        source = None
        flagged = io.negative_rows(ps)
        prompts, negatives = ps.zyx[~flagged], ps.zyx[flagged]
        rows = ps.file_rows[~flagged]
        if not len(ps):
            raise InputError("no points given; click at least one particle")
        if not len(prompts):
            raise InputError("every click is flagged negative; give at least one particle "
                             "to find")
        _check_array(prompts, tomo.shape, "click")
        _check_array(negatives, tomo.shape, "negative click")
    where = str(source) if source is not None else "clicks"
    click_at = [f"data row {r} of {where}" for r in rows]
    neg_at = [f"data row {r} of {where}" for r in ps.file_rows[flagged]]
    neg_source = None
    if negative_points is not None:
        if isinstance(negative_points, str | os.PathLike):
            ns = io.read_points(negative_points, shape=tomo.shape, voxel_size=tomo.voxel_size,
                                unit=points_unit, tomo_name=tomo_name,
                                pixel_size=points_pixel_size, own_tomo_name=own)
            more, neg_source = np.asarray(ns.zyx, float), Path(negative_points)
        else:
            ns = points_from_api(negative_points, tomo, points_unit, points_pixel_size,
                                 "negative_points", tomo_name)
            more = ns.zyx
            _check_array(more, tomo.shape, "negative click")
        negatives = np.vstack([negatives, more.reshape(-1, 3)])
        neg_at += [f"data row {r} of {neg_source or 'negative_points'}" for r in ns.file_rows]
    _check_apart(prompts, negatives, click_at, neg_at)
    name = tomo_name or own or "tomo"
    return Inputs(tomo, prompts, source, points_unit, name, negatives, neg_source, rows)


def points_from_api(points: Any, tomo: io.Tomogram, unit: str = "voxel",
                    pixel_size: float | Sequence[float] | None = None, what: str = "clicks",
                    tomo_name: str | None = None) -> io.PointSet:
    """Points given to the Python API as (z, y, x): an (N, 3) array or list of rows (one
    click may be a flat [z, y, x]), or a pandas DataFrame, read as a clicks CSV with its
    header (x, y, z columns by name, a ``negative`` or ``label`` column, a tomogram-name
    column selecting ``tomo_name``'s rows); one whose columns are not all named (such as
    ``pd.DataFrame(array)``) is an array. ``unit`` angstrom and ``pixel_size`` (the clicks
    are pixels of that many Å) convert to this tomogram's voxels as they do for a file."""
    if hasattr(points, "columns") and hasattr(points, "to_numpy") and not all(
            isinstance(c, str) for c in points.columns):  # pd.DataFrame(array): an array
        points = points.to_numpy()
    elif hasattr(points, "columns") and hasattr(points, "to_csv"):  # a DataFrame
        return io.read_points(Path(f"{what} (a table)"), text=points.to_csv(index=False),
                              voxel_size=tomo.voxel_size, unit=unit, tomo_name=tomo_name,
                              pixel_size=pixel_size, check_bounds=False)
    try:
        zyx = np.asarray(points, dtype=float)
    except (TypeError, ValueError):
        raise InputError(f"{what}: give (N, 3) z, y, x voxels as an array or a list of "
                         "rows, a pandas DataFrame with x, y, z columns, or a CSV/STAR "
                         f"file; got {type(points).__name__}") from None
    if zyx.ndim == 1 and zyx.size == 3:
        zyx = zyx.reshape(1, 3)
    if zyx.size == 0:
        zyx = zyx.reshape(0, 3)
    if zyx.ndim != 2 or zyx.shape[1] != 3:
        raise InputError(f"{what}: an array of shape {zyx.shape}; give one (z, y, x) row "
                         "per click, shape (N, 3)" + (" (transpose it?)" if zyx.ndim == 2
                                                      and zyx.shape[0] == 3 else ""))
    return io.PointSet(zyx=io.to_voxels(zyx, what, tomo.voxel_size, unit, pixel_size))


def _check_apart(prompts: np.ndarray, negatives: np.ndarray, click_at: Sequence[str],
                 negative_at: Sequence[str]) -> None:
    """A negative click within a voxel of a click names the same structure as both: refuse
    it (it would silently change nothing, or drop the clicked particle's own matches).
    ``click_at``, ``negative_at``: where each came from ("data row 3 of clicks.csv")."""
    if not len(prompts) or not len(negatives):
        return
    gaps = np.linalg.norm(negatives[:, None, :] - prompts[None, :, :], axis=2)
    near = np.argwhere(gaps < 1.0)
    if len(near):
        j, i = (int(v) for v in near[0])
        z, y, x = negatives[j]
        raise InputError(f"the negative click at {negative_at[j]} (z,y,x = {z:g},{y:g},{x:g} "
                         f"voxels) lies on the click at {click_at[i]}: a structure cannot be "
                         "both; remove one of them (rows count from 0 after the header, as "
                         "picks.csv's click_row)")


def _check_array(zyx: np.ndarray, shape: tuple[int, int, int], what: str) -> None:
    """Points given as an array (the Python API's (z, y, x) voxels) must be finite and inside
    the tomogram; one line naming the first that is not."""
    finite = np.isfinite(zyx).all(axis=1)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        raise InputError(f"{what} {i} is not finite (z,y,x = {', '.join(map(str, zyx[i]))}); "
                         "drop it or give its coordinates")
    bad = outside_volume(zyx, shape)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        z, y, x = zyx[i]
        raise InputError(
            f"{what} {i} at z,y,x = {z:g},{y:g},{x:g} voxels lies outside the tomogram (z,y,x "
            f"size {shape[0]}×{shape[1]}×{shape[2]}); give (z, y, x) voxels of this tomogram "
            "(point files are x,y,z)")


def load_tomogram(tomogram: TomogramLike, *, voxel_size: VoxelSizeLike | None = None,
                  tomo_name: str | None = None) -> Inputs:
    """Read (or wrap) a tomogram that has no clicks (a saved query supplies them)."""
    tomo = _as_tomogram(tomogram, voxel_size)
    name = tomo_name or (tomo_stem(tomo.path) if tomo.path else "tomo")
    return Inputs(tomo, np.zeros((0, 3)), None, "voxel", name)


def _as_tomogram(tomogram: TomogramLike, voxel_size: float | None) -> io.Tomogram:
    tomo = _wrapped(tomogram, voxel_size)
    where = tomo.path if tomo.path is not None else "tomogram"
    low, high = tomo.value_range or io.scan_values(where, tomo.data)  # one chunked pass
    if low == high:  # a failed reconstruction or a blank export: nothing to segment
        raise InputError(f"{where}: every voxel is {low:g}; the tomogram is empty (a failed "
                         "reconstruction or export?): check the file")
    return tomo


def _wrapped(tomogram: TomogramLike, voxel_size: float | None) -> io.Tomogram:
    if isinstance(tomogram, str | os.PathLike):
        return io.read_tomogram(tomogram, voxel_size=voxel_size)
    vs = None if voxel_size is None else io.voxel_size_zyx(voxel_size, "tomogram", "voxel_size")
    if isinstance(tomogram, io.Tomogram):
        return tomogram if vs is None else dataclasses.replace(tomogram, voxel_size=vs)
    if not isinstance(tomogram, np.ndarray):
        raise InputError(f"tomogram: a {type(tomogram).__name__}; give a 3-D numpy array "
                         "(z, y, x), an MRC file's path or a cryosam.read_tomogram() result")
    if tomogram.ndim != 3:
        raise InputError(f"tomogram array has shape {tomogram.shape}; need a 3-D (z, y, x) "
                         "volume")
    data = np.asarray(tomogram, dtype=np.float32)
    return io.Tomogram(data=data, voxel_size=vs, origin=(0.0, 0.0, 0.0), path=None,
                       value_range=io.scan_values("tomogram array", data))


def normalise(tomogram: io.Tomogram, cfg: PropagationConfig) -> np.ndarray:
    """One normalised [0, 1] copy that serves both models (the raw data may be mapped)."""
    return normalise_volume(tomogram.data, cfg.clip_percentiles)


# --------------------------------------------------------------------------- probe, prepare


def diameter_radius(diameter: float, tomogram: io.Tomogram) -> float:
    """The particle radius in voxels of a ``--diameter`` in Å; one line when the tomogram
    has no voxel size or the particle would not fit in it (a diameter given in the wrong
    unit, which would bin the tomogram to nothing)."""
    vs = tomogram.mean_voxel_size
    if vs is None:
        raise InputError("--diameter is in Å but the tomogram has no voxel size; pass "
                         "--voxel-size")
    radius = float(diameter) / 2.0 / vs
    if not 2.0 * radius <= max(tomogram.shape):
        raise InputError(f"--diameter {diameter:g} Å is {2.0 * radius:.4g} voxels of {vs:g} Å, "
                         f"wider than the tomogram ({' x '.join(map(str, tomogram.shape))}); "
                         "give the particle's diameter in Å")
    return radius


def probe(volume: np.ndarray, inputs: Inputs, cfg: CryosamConfig) -> ClickProbe:
    """Polarity and particle size from the clicks (or from ``polarity``/``diameter``)."""
    radius = None
    if cfg.diameter is not None and cfg.propagation.target == "particle":  # membranes: none
        radius = diameter_radius(cfg.diameter, inputs.tomogram)
    found = probe_volume(volume, inputs.prompts, polarity=cfg.polarity, radius=radius,
                         estimate_size=cfg.propagation.target == "particle")
    seen = found.size_conflict
    if seen is not None:
        warnings.warn(f"--diameter {cfg.diameter:g} Å is a radius of {radius:.1f} voxels, but "
                      f"at the clicks the particle looks like {seen:.1f} voxels; check --diameter "
                      "(in Å, the whole particle) or leave it out", CryosamWarning,
                      stacklevel=3)
    return found


def probe_from_query(saved: SavedQuery, inputs: Inputs, cfg: CryosamConfig,
                     flips: bool = False, binning: int | None = None) -> ClickProbe:
    """Polarity and size for a tomogram without clicks: the saved query's (``polarity`` and
    ``diameter`` still override them), with a warning when this tomogram's voxel size or
    the polarity differ from the query's source (not the polarity when the encoder
    ``flips`` every tomogram to dark particles: :meth:`SavedQuery.warn_data`)."""
    polarity = cfg.polarity if cfg.polarity != "auto" else saved.polarity
    saved.warn_data(inputs.tomogram.mean_voxel_size, polarity, flips, binning,
                    given=cfg.binning is not None)
    radius, source = saved.radius, "query"
    theirs, mine = saved.source.get("voxel_size"), inputs.tomogram.mean_voxel_size
    if radius is not None and theirs and mine:  # the query's particle in this tomogram's voxels
        radius = float(radius) * float(theirs) / float(mine)
    if cfg.diameter is not None:
        radius, source = diameter_radius(cfg.diameter, inputs.tomogram), "diameter"
    return ClickProbe(polarity, "given" if cfg.polarity != "auto" else "query",  # type: ignore[arg-type]
                      radius, source)


@dataclass
class Work:
    """What the models see: the volumes after the polarity flip and the binning, the clicks
    and the particle radius on that grid."""

    segmenter_volume: np.ndarray
    encoder_volume: np.ndarray | None  # None when matching is off
    prompts: np.ndarray
    factor: int  # binning: 1 = the input's voxels
    radius: float | None  # particle radius in work voxels
    flipped: dict[str, bool]
    negatives: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # work voxels

    def report(self) -> dict[str, Any]:
        """The run record's ``work``: the binning factor, the work grid's shape (z, y, x), the
        particle radius in work voxels and which models were given the flipped volume."""
        return {"binning": self.factor, "shape_zyx": list(self.segmenter_volume.shape),
                "radius_voxels": None if self.radius is None else round(self.radius, 3),
                "flipped": self.flipped}


def prepare(volume: np.ndarray, raw: np.ndarray, inputs: Inputs, found: ClickProbe,
            cfg: CryosamConfig, *, encoder_dark: bool | None, segmenter_dark: bool) -> Work:
    """Flip a bright tomogram for the backends that see particles dark, and bin it when the
    particles are large in voxels (membranes: when their bilayer is, at fine voxel sizes).
    ``encoder_dark`` None: no encoder (no matching).

    The normalised ``volume`` is this run's own copy: it is flipped in place when every model
    wants the flip (no second full-size copy)."""
    bright = found.polarity == "bright"
    particle = cfg.propagation.target == "particle"
    factor = cfg.binning or (bin_factor(found.radius) if particle else membrane_bin_factor(
        found.clicks_radius, inputs.tomogram.mean_voxel_size))
    enc = cfg.encoder
    shared = tuple(enc.clip_percentiles) == tuple(cfg.propagation.clip_percentiles)
    seg_flip = bright and segmenter_dark
    enc_flip = bright and bool(encoder_dark)
    encoder_base = None
    if encoder_dark is not None:
        encoder_base = volume if shared else normalise_volume(raw, enc.clip_percentiles)
    if seg_flip and (encoder_base is None or (enc_flip and encoder_base is volume)):
        np.subtract(1.0, volume, out=volume)  # nobody needs the unflipped copy
        seg_vol = volume  # an encoder base that is this volume is flipped with it
    else:
        seg_vol = 1.0 - volume if seg_flip else volume
        if encoder_base is not None and enc_flip:
            encoder_base = 1.0 - encoder_base
    seg_binned = bin_volume(seg_vol, factor)
    enc_binned = None
    if encoder_base is not None:
        enc_binned = seg_binned if encoder_base is seg_vol else bin_volume(encoder_base, factor)
    radius = None if found.radius is None else found.radius / factor
    return Work(seg_binned, enc_binned, to_binned(inputs.prompts, factor), factor, radius,
                {"segmenter": seg_flip, "encoder": enc_flip},
                to_binned(inputs.negatives, factor))
