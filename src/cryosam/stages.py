"""The pipeline's stages as small functions, each with a typed input and output:

load → normalise → probe (polarity, size) → prepare (flip, bin) → clicks → features → query
→ match → segment proposals → (merge, then back to the input's voxels).

:class:`cryosam.pipeline.CryoSAM` calls them in order and times them; each output has a
``report()`` that becomes its part of the run record. The first stages (load to prepare)
live in :mod:`cryosam.inputs`, the agreement with the clicks in :mod:`cryosam.score`, the
score cut in :mod:`cryosam.cut` and merging in :mod:`cryosam.merge`.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryosam import matching, score
from cryosam.config import CryosamConfig, MatchingConfig, PropagationConfig
from cryosam.encoders.base import SliceEncoder
from cryosam.errors import CryosamWarning, InputError
from cryosam.features import FeatureVolume, extract_features, turned
from cryosam.inputs import (  # noqa: F401 - the first stages, re-exported
    Inputs,
    PointsLike,
    TomogramLike,
    VoxelSizeLike,
    Work,
    load_inputs,
    load_tomogram,
    normalise,
    prepare,
    probe,
    probe_from_query,
)
from cryosam.instance_mask import InstanceMask
from cryosam.merge import off_point, outside_instances
from cryosam.probe import ClickProbe
from cryosam.propagation import propagate
from cryosam.query import SavedQuery
from cryosam.rescale import (
    from_binned,
    upsample_labels,
    upsample_mask,
)
from cryosam.result import Instance
from cryosam.segmenters.base import Segmenter

MIN_WORK_RADIUS = 2.0  # voxels: a particle binned smaller than this has no shape left
LARGEST_SHARE = 0.1  # a clicked particle's mask over this share of the tomogram is warned of

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
        """The run record's ``propagation.prompts``: propagation's counters for the clicks and
        ``duplicate_clicks``, the clicks merged with an earlier one on the same voxel."""
        return dict(self.stats)


def segment_clicks(work: Work, segmenter: Segmenter, cfg: PropagationConfig,
                   found: ClickProbe | None = None, source: Path | None = None,
                   file_rows: np.ndarray | None = None) -> Clicks:
    """3-D masks of the clicked particles; clicks with an empty mask are kept and warned of,
    and when every click comes out empty the run stops with one line saying why (naming the
    clicks file ``source``). ``file_rows``: each click's data row in its file, which the
    instances keep as ``click_row`` (default: its index among the clicks)."""
    # clicks on the same voxel are one click (the first row speaks for them, the others are
    # its merged_clicks)
    _, first, group = np.unique(np.rint(work.prompts).astype(np.int64), axis=0,
                                return_index=True, return_inverse=True)
    group = np.asarray(group).reshape(-1)
    order = np.argsort(first)  # groups in the order of their first row
    keep = first[order]
    prompts = work.prompts[keep]
    rows_of = (np.arange(len(work.prompts)) if file_rows is None
               else np.asarray(file_rows, dtype=np.int64))
    by_group = np.argsort(group, kind="stable")  # each group's clicks in row order, in one sort
    members = np.split(by_group, np.cumsum(np.bincount(group))[:-1])
    same = [tuple(int(rows_of[k]) for k in members[g][1:]) for g in order]
    res = propagate(work.segmenter_volume, prompts, segmenter, cfg, radius=work.radius)
    instances = [Instance(mask, np.asarray(p, float), 1.0, float(np.clip(c, 0.0, 1.0)),
                          int(rows_of[k]), merged_clicks=more)
                 for k, more, mask, p, c in zip(keep, same, res.instances, prompts,
                                                res.confidence, strict=True)]
    empty = [i.click_row for i in instances if i.n_voxels == 0]
    if instances and len(empty) == len(instances):
        message = nothing_found_message(found, work.factor, cfg.target)
        raise InputError(f"{source}: {message}" if source is not None else message)
    huge = [i for i in instances if i.n_voxels > LARGEST_SHARE * work.segmenter_volume.size]
    if huge and cfg.target == "particle":
        share = huge[0].n_voxels / work.segmenter_volume.size
        warnings.warn(f"click row {huge[0].click_row}'s mask holds {share:.0%} of the "
                      "tomogram: that is no single particle; check that the click sits on one, "
                      "the contrast (--polarity) and the size (--diameter)", CryosamWarning,
                      stacklevel=3)
    if empty:
        listed = ", ".join(str(r) for r in empty[:10]) + (", ..." if len(empty) > 10 else "")
        kept = ("they are kept as picks at the click, with score 0, but do not shape the query"
                if cfg.target == "particle" else "no membrane was found there")
        warnings.warn(f"{len(empty)} click(s) gave an empty mask (rows {listed}); {kept}",
                      CryosamWarning, stacklevel=3)
    stats = dict(res.stats)
    stats["duplicate_clicks"] = int(len(work.prompts) - len(keep))
    if stats["duplicate_clicks"]:
        binned = (f" of the {work.factor}x binned grid the run works on" if work.factor > 1
                  else "")
        warnings.warn(f"{stats['duplicate_clicks']} click(s) repeat an earlier click's voxel"
                      f"{binned} and were merged with it", CryosamWarning, stacklevel=3)
    return Clicks(instances, stats)


@dataclass
class Negatives:
    """The negative clicks' masks (structures that must not be picked) and what they did."""

    masks: list[InstanceMask]
    clicks: int
    dropped: dict[str, int] = field(default_factory=lambda: {"inside": 0, "similarity": 0,
                                                              "agreement": 0})

    def report(self) -> dict[str, Any]:
        """The run record's ``negatives``: negative clicks, how many gave a mask, and how many
        matches each test dropped (inside a mask, more similar, better agreement)."""
        return {"clicks": self.clicks, "masks": len(self.masks), "dropped": dict(self.dropped)}


def segment_negatives(work: Work, segmenter: Segmenter, cfg: PropagationConfig) -> Negatives:
    """3-D masks of the negative clicks (an empty one is warned of and left out)."""
    if not len(work.negatives):
        return Negatives([], 0)
    res = propagate(work.segmenter_volume, work.negatives, segmenter, cfg, radius=work.radius)
    masks = [m for m in res.instances if m.n_voxels > 0]
    if len(masks) < len(work.negatives):
        warnings.warn(f"{len(work.negatives) - len(masks)} negative click(s) gave an empty mask "
                      "and exclude nothing; put them on the structure not to pick",
                      CryosamWarning, stacklevel=3)
    return Negatives(masks, int(len(work.negatives)))


def nothing_found_message(found: ClickProbe | None, factor: int = 1,
                          target: str = "particle") -> str:
    """Why no click gave a mask (the run worked ``factor`` x binned), and what to try."""
    if target != "particle":
        return ("no membrane found at any click: the clicks look like background or the "
                "inside of a vesicle; click on the bilayer itself (check that they are x,y,z "
                "voxels of this tomogram)")
    head = "no particle found at any click"
    if found is not None:
        votes = found.votes
        other = "bright" if found.polarity == "dark" else "dark"
        if found.polarity_source == "given" and votes[other] > votes[found.polarity]:
            return (f"{head}: the contrast at the clicks looks {other}, not "
                    f"{found.polarity} — try --polarity {other} (or --polarity auto)")
        seen = found.size_conflict
        if seen is not None:
            return (f"{head}: --diameter makes the particle's radius {found.radius:.1f} "
                    f"voxels, but at the clicks it looks like {seen:.1f} voxels; check --diameter "
                    "(in Å) or leave it out")
        if found.radius and factor > 1 and found.radius / factor < MIN_WORK_RADIUS:
            most = max(1, int(found.radius // MIN_WORK_RADIUS))
            return (f"{head}: binned {factor}x, the {found.radius:.1f}-voxel particle is "
                    f"{found.radius / factor:.1f} voxels, too small to segment; use "
                    f"--binning {most} or less (or leave it out)")
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
        """The run record's ``features``: encoder, feature dim, bytes held, whether the feature
        cache had them, and the encoder's voxels per patch and grids."""
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
    nms_radius: float  # work voxels
    particle_radius: float  # voxels, equivalent sphere of the median click mask
    negatives: torch.Tensor | None = None  # (M, dim): one per negative click, L2-normalised
    factor: int = 1  # the run's binning: nms_radius x factor is in the input's voxels

    def matched(self, turns: bool) -> Query:
        """The query as matching scores it: with ``turns``, its vectors and the negatives'
        followed by their copies turned about the beam axis (:func:`features.turned`)."""
        if not turns:
            return self
        neg = None if self.negatives is None else turned(self.negatives)
        return replace(self, vectors=turned(self.vectors), negatives=neg)


def given_nms_radius(cfg: CryosamConfig, factor: int) -> float | None:
    """``matching.nms_radius`` (the input's voxels, like every coordinate a user gives) on
    the binned work grid; None when not given."""
    given = cfg.matching.nms_radius
    return None if given is None else float(given) / max(int(factor), 1)


def build_query(features: Features, clicks: Clicks, cfg: CryosamConfig,
                negatives: Negatives | None = None, factor: int = 1) -> Query:
    """Masked average of the features over the click masks; radii from the masks' sizes;
    one vector per negative click's mask. ``factor``: the run's binning."""
    coords = [m.coords() for m in clicks.masks]
    vectors = matching.pool_query(features.volume, coords, seed=cfg.seed,
                                 mode=cfg.matching.query)
    radius = given_nms_radius(cfg, factor)
    if radius is None:
        radius = matching.nms_radius_from_masks(coords)
    neg = None
    if negatives is not None and negatives.masks:
        neg_coords = [m.coords() for m in negatives.masks]
        neg = matching.pool_query(features.volume, neg_coords, seed=cfg.seed, mode="max")
        neg = neg[: len(neg_coords)]
    return Query(vectors, float(radius), matching.particle_radius_from_masks(coords), neg,
                 int(factor))


def query_from_saved(saved: SavedQuery, features: Features, cfg: CryosamConfig,
                     factor: int) -> Query:
    """The saved query's vectors and radii (on its grid, which is this run's work grid:
    ``matching.nms_radius``, in the input's voxels, still overrides). ``factor``: this run's
    binning (:meth:`SavedQuery.binning_for`)."""
    saved.check_dim(int(features.volume.dim))
    radius = given_nms_radius(cfg, factor)
    if radius is None:
        radius = saved.nms_radius
    neg = (torch.from_numpy(np.array(saved.negatives, dtype=np.float32))
           if saved.negatives is not None and len(saved.negatives) else None)
    return Query(torch.from_numpy(np.array(saved.vectors, dtype=np.float32)), float(radius),
                 float(saved.particle_radius), neg, int(factor))


@dataclass
class Matches:
    """Proposals from matching, and those worth segmenting (outside the clicked masks)."""

    zyx: np.ndarray  # (N, 3) every proposal
    similarity: np.ndarray  # (N,)
    outside_clicks: np.ndarray  # (N,) bool
    stats: matching.MatchStats
    query: Query

    def report(self) -> dict[str, Any]:
        """The run record's ``matching``: NMS radius (input and work voxels), query vectors,
        proposals, the matching stats and how many proposals fell inside the clicked masks."""
        return {
            "enabled": True,
            "nms_radius": self.query.nms_radius * self.query.factor,  # the input's voxels
            "nms_radius_work_voxels": self.query.nms_radius,
            "queries": int(self.query.vectors.shape[0]),
            "proposals": int(len(self.zyx)),
            "stats": self.stats.to_dict(),
            "proposals_inside_clicked": int((~self.outside_clicks).sum()),
        }


def match_query(features: Features, query: Query, clicks: Clicks, cfg: MatchingConfig,
                device: torch.device, negatives: Negatives | None = None) -> Matches:
    """Hierarchical matching of the query over the tomogram, NMS and top-K.

    With negative clicks, a proposal inside a negative mask, or more similar to a negative
    click's query than to the positive query, is not segmented (counted in ``negatives``)."""
    scored = query.matched(cfg.turns)
    found = matching.match(features.volume, scored.vectors, cfg, nms_radius=query.nms_radius,
                           particle_radius=query.particle_radius, device=device)
    zyx = np.asarray(found.zyx, dtype=float).reshape(-1, 3)
    sim = np.asarray(found.scores, dtype=float).reshape(-1)
    outside = outside_instances(zyx, clicks.masks, features.volume.shape)
    if negatives is not None and len(zyx):
        free = outside_instances(zyx, negatives.masks, features.volume.shape)
        negatives.dropped["inside"] += int((outside & ~free).sum())
        outside &= free
        if query.negatives is not None and outside.any():
            neg_sim = matching.similarity(features.volume, zyx, scored.negatives)
            closer = outside & (neg_sim > sim)
            negatives.dropped["similarity"] += int(closer.sum())
            outside &= ~closer
    return Matches(zyx, sim, outside, found.stats, query)


# --------------------------------------------------------------------------- proposals


@dataclass
class ProposalMasks:
    """Masks of the matches, scored against the clicked particles, and why others went."""

    instances: list[Instance]
    rejected: dict[str, int] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    references: dict[str, Any] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        """The run record's ``propagation.proposals``: propagation's counters for the matches
        (the masks rejected are counted in ``matching.rejected``)."""
        return dict(self.stats)


def references_of(work: Work, masks: list[InstanceMask], cfg: CryosamConfig,
                  reach: float | None = None) -> score.References | None:
    """What the proposals are compared with: the clicked masks' size, shape and density.
    ``reach``: describe the density on these shells (negatives use the clicks', so that one
    description of a match serves both comparisons)."""
    if cfg.propagation.target != "particle":
        return None
    return score.learn_references(masks, work.segmenter_volume, cfg.score, reach=reach)


def segment_proposals(work: Work, matches: Matches, clicks: Clicks,
                      segmenter: Segmenter, cfg: CryosamConfig,
                      prop_cfg: PropagationConfig,
                      references: score.References | None = None,
                      negatives: Negatives | None = None,
                      negative_references: score.References | None = None) -> ProposalMasks:
    """Segment every match outside the clicks in 3-D (batched) and score each mask's
    agreement with the clicked particles (:mod:`cryosam.score`).

    Empty masks and masks not centred on their match are dropped; with negative clicks, so
    is a mask that agrees better with the negatives than with the clicked particles.
    ``references``: what the masks are compared with (default: the click masks; a saved
    query brings its own)."""
    zyx = matches.zyx[matches.outside_clicks]
    sim = matches.similarity[matches.outside_clicks]
    if not len(zyx):
        return ProposalMasks([])
    res = propagate(work.segmenter_volume, zyx, segmenter, prop_cfg, radius=work.radius)
    refs = references if references is not None else references_of(work, clicks.masks, cfg)
    neg_refs = negative_references
    if neg_refs is None and refs is not None and negatives is not None and negatives.masks:
        neg_refs = references_of(work, negatives.masks, cfg, reach=refs.reach)
    rejected = {"empty": 0, "off_point": 0}
    instances = []
    # a density description costs a smoothing and a projection per match: only when it counts
    described = (work.segmenter_volume if any(r is not None and r.uses_density
                                              for r in (refs, neg_refs)) else None)
    for i, mask in enumerate(res.instances):
        if mask.n_voxels == 0:
            rejected["empty"] += 1
            continue
        if prop_cfg.target == "particle" and off_point(mask, zyx[i]):
            rejected["off_point"] += 1
            continue
        agreement, outside = 1.0, False
        if refs is not None:
            desc = score.describe(mask, described, refs.reach)
            agreement, parts = refs.agreement(desc)
            outside = bool(parts["outside"])
            if neg_refs is not None and negatives is not None:
                if neg_refs.reach != refs.reach:  # a saved query's, made elsewhere
                    desc = score.describe(mask, described, neg_refs.reach)
                against, _ = neg_refs.agreement(desc)
                if against > agreement:
                    negatives.dropped["agreement"] += 1
                    continue
        instances.append(Instance(mask, zyx[i], float(sim[i]),
                                  float(np.clip(res.confidence[i], 0.0, 1.0)),
                                  agreement=float(agreement), outside=outside,
                                  similarity_term=score.similarity_term(
                                      float(sim[i]), cfg.matching.sim_threshold)))
    return ProposalMasks(instances, rejected, dict(res.stats),
                         refs.stats if refs is not None else {})


# --------------------------------------------------------------------------- back to the input


def instances_to_input_grid(instances: list[Instance], factor: int,
                            shape: tuple[int, ...]) -> list[Instance]:
    """Instances of a binned run on the input's voxel grid (each binned voxel a block),
    seeds in input voxels. The identity when nothing was binned."""
    if factor == 1:
        return instances
    return [dataclasses.replace(i, mask=upsample_mask(i.mask, factor, shape),
                                seed=from_binned(i.seed, factor)) for i in instances]


def to_input_grid(instances: list[Instance], labels: np.ndarray, factor: int,
                  shape: tuple[int, ...]) -> tuple[list[Instance], np.ndarray]:
    """Instances and labels of a binned run on the input's voxel grid."""
    if factor == 1:
        return instances, labels
    return (instances_to_input_grid(instances, factor, shape),
            upsample_labels(labels, factor, shape))
