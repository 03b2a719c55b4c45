"""The pipeline's stages as small functions, each with a typed input and output:

load → normalise → probe (polarity, size) → prepare (flip, bin) → clicks → features → query
→ match → segment proposals → (merge, then back to the input's voxels).

:class:`cryosam.pipeline.CryoSAM` calls them in order and times them; each output has a
``report()`` that becomes its part of the run record. Merging lives in :mod:`cryosam.merge`.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryosam import io, matching
from cryosam.config import CryosamConfig, MatchingConfig, PropagationConfig
from cryosam.encoders.base import SliceEncoder
from cryosam.errors import CryosamWarning, InputError
from cryosam.features import FeatureVolume, extract_features
from cryosam.merge import Plausibility, outside_instances, plausible
from cryosam.normalise import normalise_volume
from cryosam.probe import ClickProbe, bin_factor
from cryosam.probe import probe_clicks as probe_volume
from cryosam.propagation import InstanceMask, propagate
from cryosam.query import SavedQuery
from cryosam.record import file_info
from cryosam.rescale import (
    bin_volume,
    from_binned,
    to_binned,
    upsample_labels,
    upsample_mask,
)
from cryosam.result import Instance
from cryosam.segmenters.base import Segmenter
from cryosam.utils import tomo_stem

TomogramLike = io.Tomogram | str | os.PathLike[str] | np.ndarray
PointsLike = np.ndarray | str | os.PathLike[str] | list[list[float]]


# --------------------------------------------------------------------------- load


@dataclass
class Inputs:
    """The tomogram and the clicks, in voxels (z, y, x)."""

    tomogram: io.Tomogram
    prompts: np.ndarray  # (P, 3)
    points_source: Path | None  # the points file, None for an array
    points_unit: str
    name: str  # the tomogram's name in STAR outputs

    def report(self) -> dict[str, Any]:
        tomo = self.tomogram
        return {
            "tomogram": file_info(tomo.path),
            "shape_zyx": list(tomo.shape),
            "voxel_size_zyx": list(tomo.voxel_size) if tomo.voxel_size else None,
            "origin_zyx": list(tomo.origin),
            "points": file_info(self.points_source) if self.points_source else "array",
            "points_unit": self.points_unit,
            "tomo_name": self.name,
            "prompts_zyx": self.prompts.tolist(),
        }


def load_inputs(tomogram: TomogramLike, points: PointsLike, *, voxel_size: float | None = None,
                points_unit: str = "voxel", tomo_name: str | None = None,
                points_pixel_size: float | None = None,
                points_bin: int | None = None) -> Inputs:
    """Read (or wrap) the tomogram and the clicks; clicks are checked against its shape.

    ``points_pixel_size`` (Å): the clicks' coordinates are pixels of that size (made on a
    differently binned copy) and are scaled to this tomogram's voxels; ``points_bin`` N says
    the same for clicks made on a copy binned N times."""
    tomo = _as_tomogram(tomogram, voxel_size)
    if points_bin is not None:
        if tomo.mean_voxel_size is None:
            raise InputError("--points-bin needs the tomogram's voxel size; the header has "
                             "none, so pass --voxel-size")
        points_pixel_size = float(points_bin) * tomo.mean_voxel_size
    if isinstance(points, str | os.PathLike):
        ps = io.read_points(points, shape=tomo.shape, voxel_size=tomo.voxel_size,
                            unit=points_unit, tomo_name=tomo_name,
                            pixel_size=points_pixel_size)
        prompts, source = np.asarray(ps.zyx, dtype=float).reshape(-1, 3), Path(points)
    else:
        prompts, source = np.asarray(points, dtype=float).reshape(-1, 3), None
        if not len(prompts):
            raise InputError("no points given; click at least one particle")
    name = tomo_name or (tomo_stem(tomo.path) if tomo.path else "tomo")
    return Inputs(tomo, prompts, source, points_unit, name)


def load_tomogram(tomogram: TomogramLike, *, voxel_size: float | None = None,
                  tomo_name: str | None = None) -> Inputs:
    """Read (or wrap) a tomogram that has no clicks (a saved query supplies them)."""
    tomo = _as_tomogram(tomogram, voxel_size)
    name = tomo_name or (tomo_stem(tomo.path) if tomo.path else "tomo")
    return Inputs(tomo, np.zeros((0, 3)), None, "voxel", name)


def _as_tomogram(tomogram: TomogramLike, voxel_size: float | None) -> io.Tomogram:
    if isinstance(tomogram, io.Tomogram):
        if voxel_size is not None:
            return dataclasses.replace(tomogram, voxel_size=(float(voxel_size),) * 3)
        return tomogram
    if isinstance(tomogram, np.ndarray):
        if tomogram.ndim != 3:
            raise InputError(f"tomogram array has shape {tomogram.shape}; need a 3-D (z, y, x) "
                             "volume")
        data = np.asarray(tomogram, dtype=np.float32)
        if not np.isfinite(data).all():
            raise InputError("tomogram array holds NaN or inf values; clean it first")
        vs = (float(voxel_size),) * 3 if voxel_size else None
        return io.Tomogram(data=data, voxel_size=vs, origin=(0.0, 0.0, 0.0), path=None)
    return io.read_tomogram(tomogram, voxel_size=voxel_size)


def normalise(tomogram: io.Tomogram, cfg: PropagationConfig) -> np.ndarray:
    """One normalised [0, 1] copy that serves both models (the raw data may be mapped)."""
    return normalise_volume(tomogram.data, cfg.clip_percentiles)


# --------------------------------------------------------------------------- probe, prepare


def probe(volume: np.ndarray, inputs: Inputs, cfg: CryosamConfig) -> ClickProbe:
    """Polarity and particle size from the clicks (or from ``polarity``/``diameter``)."""
    radius = None
    if cfg.diameter is not None:
        vs = inputs.tomogram.mean_voxel_size
        if vs is None:
            raise InputError("--diameter is in Å but the tomogram has no voxel size; pass "
                             "--voxel-size")
        radius = cfg.diameter / 2.0 / vs
    return probe_volume(volume, inputs.prompts, polarity=cfg.polarity, radius=radius,
                        estimate_size=cfg.propagation.target == "particle")


def probe_from_query(saved: SavedQuery, inputs: Inputs, cfg: CryosamConfig) -> ClickProbe:
    """Polarity and size for a tomogram without clicks: the saved query's (``polarity`` and
    ``diameter`` still override them), with a warning when this tomogram's voxel size or
    the polarity differ from the query's source."""
    polarity = cfg.polarity if cfg.polarity != "auto" else saved.polarity
    saved.warn_data(inputs.tomogram.mean_voxel_size, polarity)
    radius, source = saved.radius, "query"
    if cfg.diameter is not None:
        vs = inputs.tomogram.mean_voxel_size
        if vs is None:
            raise InputError("--diameter is in Å but the tomogram has no voxel size; pass "
                             "--voxel-size")
        radius, source = cfg.diameter / 2.0 / vs, "diameter"
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

    def report(self) -> dict[str, Any]:
        return {"binning": self.factor, "shape_zyx": list(self.segmenter_volume.shape),
                "radius_voxels": None if self.radius is None else round(self.radius, 3),
                "flipped": self.flipped}


def prepare(volume: np.ndarray, raw: np.ndarray, inputs: Inputs, found: ClickProbe,
            cfg: CryosamConfig, *, encoder_dark: bool | None, segmenter_dark: bool) -> Work:
    """Flip a bright tomogram for the backends that see particles dark, and bin it when the
    particles are large in voxels. ``encoder_dark`` None: no encoder (no matching).

    The normalised ``volume`` is this run's own copy: it is flipped in place when every model
    wants the flip (no second full-size copy)."""
    bright = found.polarity == "bright"
    particle = cfg.propagation.target == "particle"
    factor = cfg.binning or (bin_factor(found.radius) if particle else 1)
    enc = cfg.encoder
    shared = tuple(enc.clip_percentiles) == tuple(cfg.propagation.clip_percentiles)
    seg_flip = bright and segmenter_dark
    enc_flip = bright and bool(encoder_dark)
    encoder_base = None
    if encoder_dark is not None:
        encoder_base = volume if shared else normalise_volume(raw, enc.clip_percentiles)
    if seg_flip and (encoder_base is None or (enc_flip and encoder_base is volume)):
        np.subtract(1.0, volume, out=volume)  # nobody needs the unflipped copy
        seg_vol = volume
        if encoder_base is not None and encoder_base is not volume:
            encoder_base = 1.0 - encoder_base
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
                {"segmenter": seg_flip, "encoder": enc_flip})


# --------------------------------------------------------------------------- clicks


@dataclass
class Clicks:
    """The clicked instances (one per click, in click order) and propagation's counters."""

    instances: list[Instance]
    stats: dict[str, Any]

    @property
    def masks(self) -> list[InstanceMask]:
        """The non-empty click masks: what the query and the size statistics come from."""
        return [i.mask for i in self.instances if i.n_voxels > 0]

    def report(self) -> dict[str, Any]:
        return dict(self.stats)


def segment_clicks(work: Work, segmenter: Segmenter, cfg: PropagationConfig,
                   found: ClickProbe | None = None) -> Clicks:
    """3-D masks of the clicked particles; clicks with an empty mask are kept and warned of,
    and when every click comes out empty the run stops with one line saying why."""
    # clicks on the same voxel are one click (the first row speaks for them)
    _, first = np.unique(np.rint(work.prompts).astype(np.int64), axis=0, return_index=True)
    rows = np.sort(first)
    prompts = work.prompts[rows]
    res = propagate(work.segmenter_volume, prompts, segmenter, cfg, radius=work.radius)
    instances = [Instance(mask, np.asarray(p, float), 1.0, float(np.clip(c, 0.0, 1.0)),
                          int(row))
                 for row, mask, p, c in zip(rows, res.instances, prompts, res.confidence,
                                            strict=True)]
    empty = [i.click_row for i in instances if i.n_voxels == 0]
    if instances and len(empty) == len(instances):
        raise InputError(nothing_found_message(found))
    if empty:
        listed = ", ".join(str(r) for r in empty[:10]) + (", ..." if len(empty) > 10 else "")
        warnings.warn(
            f"{len(empty)} click(s) gave an empty mask (rows {listed}); they are kept as "
            "picks at the click, with score 0, but do not shape the query", CryosamWarning,
            stacklevel=3)
    stats = dict(res.stats)
    stats["duplicate_clicks"] = int(len(work.prompts) - len(rows))
    if stats["duplicate_clicks"]:
        warnings.warn(f"{stats['duplicate_clicks']} click(s) repeat an earlier click's voxel "
                      "and were merged with it", CryosamWarning, stacklevel=3)
    return Clicks(instances, stats)


def nothing_found_message(found: ClickProbe | None) -> str:
    """Why no click gave a mask, and what to try."""
    head = "no particle found at any click"
    if found is not None:
        votes = found.votes
        other = "bright" if found.polarity == "dark" else "dark"
        if found.polarity_source == "given" and votes[other] > votes[found.polarity]:
            return (f"{head}: the contrast at the clicks looks {other}, not "
                    f"{found.polarity} — try --polarity {other} (or --polarity auto)")
    return (f"{head}: the clicks look like background; check that they are x,y,z voxels of "
            "this tomogram (axis order, --points-unit, --points-pixel-size) and sit on "
            "particles")


# --------------------------------------------------------------------------- features


@dataclass
class Features:
    """The tomogram's slice features and how they were made."""

    volume: FeatureVolume
    encoder_id: str

    def report(self) -> dict[str, Any]:
        fv = self.volume
        return {
            "encoder": self.encoder_id,
            "dim": int(fv.dim),
            "nbytes": int(fv.nbytes),
            "cache_hit": bool(fv.from_cache),
            "voxels_per_patch": fv.meta.get("voxels_per_patch"),
            "grids": fv.meta.get("grids"),
        }


def compute_features(work: Work, encoder: SliceEncoder, cfg: CryosamConfig,
                     device: torch.device,
                     cache_dir: str | os.PathLike[str] | None = None) -> Features:
    """Encode every slice along z, y, x of the prepared (normalised) volume, from the cache
    when it holds them."""
    enc = cfg.encoder
    assert work.encoder_volume is not None, "prepare() was told there is no encoder"
    fv = extract_features(
        work.encoder_volume, encoder, stride=enc.slice_stride, batch_size=enc.batch_size,
        device=device, cache_dir=cache_dir, clip_percentiles=None, reduce_to=enc.reduce_to)
    return Features(fv, encoder.id)


# --------------------------------------------------------------------------- query and match


@dataclass
class Query:
    """What matching looks for: the query vectors and the clicked particles' size."""

    vectors: torch.Tensor  # (Q, dim), L2-normalised
    nms_radius: float  # voxels
    particle_radius: float  # voxels, equivalent sphere of the median click mask


def build_query(features: Features, clicks: Clicks, cfg: CryosamConfig) -> Query:
    """Masked average of the features over the click masks; radii from the masks' sizes."""
    coords = [m.coords() for m in clicks.masks]
    vectors = matching.pool_query(features.volume, coords, seed=cfg.seed,
                                 mode=cfg.matching.query)
    radius = (cfg.matching.nms_radius if cfg.matching.nms_radius is not None
              else matching.nms_radius_from_masks(coords))
    return Query(vectors, float(radius), matching.particle_radius_from_masks(coords))


def query_from_saved(saved: SavedQuery, features: Features, cfg: CryosamConfig) -> Query:
    """The saved query's vectors and radii (``matching.nms_radius`` still overrides)."""
    saved.check_dim(int(features.volume.dim))
    radius = (cfg.matching.nms_radius if cfg.matching.nms_radius is not None
              else saved.nms_radius)
    return Query(torch.from_numpy(np.array(saved.vectors, dtype=np.float32)), float(radius),
                 float(saved.particle_radius))


@dataclass
class Matches:
    """Proposals from matching, and those worth segmenting (outside the clicked masks)."""

    zyx: np.ndarray  # (N, 3) every proposal
    similarity: np.ndarray  # (N,)
    outside_clicks: np.ndarray  # (N,) bool
    stats: matching.MatchStats
    query: Query

    def report(self) -> dict[str, Any]:
        return {
            "enabled": True,
            "nms_radius": self.query.nms_radius,
            "queries": int(self.query.vectors.shape[0]),
            "proposals": int(len(self.zyx)),
            "stats": self.stats.to_dict(),
            "proposals_inside_clicked": int((~self.outside_clicks).sum()),
        }


def match_query(features: Features, query: Query, clicks: Clicks, cfg: MatchingConfig,
                device: torch.device) -> Matches:
    """Hierarchical matching of the query over the tomogram, NMS and top-K."""
    found = matching.match(features.volume, query.vectors, cfg, nms_radius=query.nms_radius,
                           particle_radius=query.particle_radius, device=device)
    zyx = np.asarray(found.zyx, dtype=float).reshape(-1, 3)
    sim = np.asarray(found.scores, dtype=float).reshape(-1)
    outside = outside_instances(zyx, clicks.masks, features.volume.shape)
    return Matches(zyx, sim, outside, found.stats, query)


# --------------------------------------------------------------------------- proposals


@dataclass
class ProposalMasks:
    """Masks of the matches that look like the clicked particles, and why others went."""

    instances: list[Instance]
    rejected: dict[str, int] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        return dict(self.stats)


def segment_proposals(work: Work, matches: Matches, clicks: Clicks,
                      segmenter: Segmenter, cfg: CryosamConfig,
                      prop_cfg: PropagationConfig,
                      references: list[InstanceMask] | None = None) -> ProposalMasks:
    """Segment every match outside the clicks in 3-D (batched), keep the plausible ones.

    ``references``: the masks the plausibility filter compares with (default: the click
    masks; a saved query brings its own)."""
    zyx = matches.zyx[matches.outside_clicks]
    sim = matches.similarity[matches.outside_clicks]
    if not len(zyx):
        return ProposalMasks([])
    res = propagate(work.segmenter_volume, zyx, segmenter, prop_cfg, radius=work.radius)
    rule = Plausibility(cfg.min_size_ratio, cfg.max_size_ratio, cfg.max_elongation_ratio)
    refs = clicks.masks if references is None else references
    kept, rejected = plausible(res.instances, zyx, refs, prop_cfg.target, rule)
    instances = [Instance(res.instances[i], zyx[i], float(sim[i]),
                          float(np.clip(res.confidence[i], 0.0, 1.0))) for i in kept]
    return ProposalMasks(instances, rejected, dict(res.stats))


# --------------------------------------------------------------------------- back to the input


def to_input_grid(instances: list[Instance], labels: np.ndarray, factor: int,
                  shape: tuple[int, ...]) -> tuple[list[Instance], np.ndarray]:
    """Instances and labels of a binned run on the input's voxel grid (each binned voxel a
    block); seeds in input voxels. The identity when nothing was binned."""
    if factor == 1:
        return instances, labels
    out = [Instance(upsample_mask(i.mask, factor, shape), from_binned(i.seed, factor),
                    i.similarity, i.confidence, i.click_row) for i in instances]
    return out, upsample_labels(labels, factor, shape)
