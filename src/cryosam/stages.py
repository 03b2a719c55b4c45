"""The pipeline's stages as small functions, each with a typed input and output:

load → normalise → clicks → features → query → match → segment proposals → (merge).

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
from cryosam.propagation import InstanceMask, propagate
from cryosam.record import file_info
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
                points_unit: str = "voxel", tomo_name: str | None = None) -> Inputs:
    """Read (or wrap) the tomogram and the clicks; clicks are checked against its shape."""
    tomo = _as_tomogram(tomogram, voxel_size)
    if isinstance(points, str | os.PathLike):
        ps = io.read_points(points, shape=tomo.shape, voxel_size=tomo.voxel_size,
                            unit=points_unit, tomo_name=tomo_name)
        prompts, source = np.asarray(ps.zyx, dtype=float).reshape(-1, 3), Path(points)
    else:
        prompts, source = np.asarray(points, dtype=float).reshape(-1, 3), None
        if not len(prompts):
            raise InputError("no points given; click at least one particle")
    name = tomo_name or (tomo_stem(tomo.path) if tomo.path else "tomo")
    return Inputs(tomo, prompts, source, points_unit, name)


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


def segment_clicks(volume: np.ndarray, prompts: np.ndarray, segmenter: Segmenter,
                   cfg: PropagationConfig) -> Clicks:
    """3-D masks of the clicked particles; clicks with an empty mask are kept and warned of."""
    res = propagate(volume, prompts, segmenter, cfg)
    instances = [Instance(mask, np.asarray(p, float), 1.0, float(np.clip(c, 0.0, 1.0)), row)
                 for row, (mask, p, c) in enumerate(zip(res.instances, prompts, res.confidence,
                                                        strict=True))]
    empty = [i.click_row for i in instances if i.n_voxels == 0]
    if empty:
        warnings.warn(
            f"{len(empty)} click(s) gave an empty mask (rows {empty}); they are kept as picks "
            "at the click, with score 0, but do not shape the query", CryosamWarning,
            stacklevel=3)
    return Clicks(instances, dict(res.stats))


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


def compute_features(volume: np.ndarray, raw: np.ndarray, encoder: SliceEncoder,
                     cfg: CryosamConfig, device: torch.device,
                     cache_dir: str | os.PathLike[str] | None = None) -> Features:
    """Encode every slice along z, y, x (from the cache when it holds them).

    The normalised ``volume`` is reused when the encoder normalises the same way; otherwise
    the ``raw`` data is normalised with the encoder's own percentiles.
    """
    enc = cfg.encoder
    shared = tuple(enc.clip_percentiles) == tuple(cfg.propagation.clip_percentiles)
    fv = extract_features(
        volume if shared else raw, encoder, stride=enc.slice_stride,
        batch_size=enc.batch_size, device=device, cache_dir=cache_dir,
        clip_percentiles=None if shared else enc.clip_percentiles, reduce_to=enc.reduce_to)
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
    vectors = matching.pool_query(features.volume, coords, seed=cfg.seed)
    radius = (cfg.matching.nms_radius if cfg.matching.nms_radius is not None
              else matching.nms_radius_from_masks(coords))
    return Query(vectors, float(radius), matching.particle_radius_from_masks(coords))


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


def segment_proposals(volume: np.ndarray, matches: Matches, clicks: Clicks,
                      segmenter: Segmenter, cfg: CryosamConfig,
                      prop_cfg: PropagationConfig) -> ProposalMasks:
    """Segment every match outside the clicks in 3-D (batched), keep the plausible ones."""
    zyx = matches.zyx[matches.outside_clicks]
    sim = matches.similarity[matches.outside_clicks]
    if not len(zyx):
        return ProposalMasks([])
    res = propagate(volume, zyx, segmenter, prop_cfg)
    rule = Plausibility(cfg.min_size_ratio, cfg.max_size_ratio, cfg.max_elongation_ratio)
    kept, rejected = plausible(res.instances, zyx, clicks.masks, prop_cfg.target, rule)
    instances = [Instance(res.instances[i], zyx[i], float(sim[i]),
                          float(np.clip(res.confidence[i], 0.0, 1.0))) for i in kept]
    return ProposalMasks(instances, rejected, dict(res.stats))
