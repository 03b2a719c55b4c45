"""How much a segmented match looks like the clicked particles, and the combined pick score.

The matching similarity alone ranks look-alikes of close size almost as high as the real
thing, so every match is also compared with the clicked particles' own masks (the
*references*) on three things it can be measured by without any training:

- **size**: the mask's voxel count against the references' (log ratio);
- **shape**: the mask's principal-axis ratios (how elongated or flat it is) against theirs;
- **density**: a rotation-invariant description of the density around the mask's centre —
  on ``SHELLS`` shells evenly spaced out to ``SHELL_REACH`` x the particle radius,
  the power of each spherical-harmonic degree 0..``DEGREES`` — correlated with the
  references' (a ring, a barrel, a dimer and a globule of one size differ here). These
  correlations sit close to 1 for any compact particle (the radial profile dominates), so the
  agreement is ``exp(-(1 - corr) / density_tolerance)``: a correlation one tolerance below 1
  divides the score by e. With three or more clicks, the clicks also say how far their own
  kind strays: each click's gap ``1 - corr`` to the mean of the others. A match whose gap is
  more than ``density_range`` times the largest of those lies outside the clicked kind and
  its density agreement is multiplied by ``OUTSIDE`` (so no automatic cut writes it, and it
  ranks below every match inside).

Each gives an agreement in [0, 1]; their product, times the similarity (above the matching
threshold, rescaled to (0, 1]: :func:`similarity_term`) and the segmenter's confidence, is
the pick score. The tolerances of size and shape are learned from the spread
among the clicked particles (several clicks of one kind vary; a single click uses the
defaults, which the CLI exposes). Clicks themselves score 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from cryosam.config import ScoreConfig
from cryosam.instance_mask import InstanceMask

DEGREES = 6  # spherical-harmonic degrees of the density description
SHELL_REACH = 1.5  # shells out to this many particle radii
SPHERE_POINTS = 256  # sample directions per shell
SHELLS = 10  # shells per description, whatever the particle's size in voxels
SMOOTH_SHARE = 0.2  # Gaussian smoothing first, sigma = this x the particle radius ...
SMOOTH_MIN = 0.8  # ... and at least this many voxels
OUTSIDE = 1e-4  # the density agreement's factor for a match outside the clicks' range


@dataclass
class Description:
    """What one mask is compared by."""

    log_size: float
    log_axes: np.ndarray  # (2,) log of the 2nd and 3rd principal-axis lengths over the 1st
    density: np.ndarray | None  # flattened shell x degree powers, standardised


@dataclass
class References:
    """The clicked particles' descriptions and the tolerances learned from them."""

    items: list[Description]
    size_sigma: float
    shape_sigma: float
    reach: float  # voxels: the shells' outer radius
    density_weight: float
    stats: dict[str, Any] = field(default_factory=dict)
    # 1 - correlation that costs a factor e (times the weight); ScoreConfig's
    density_tolerance: float = field(kw_only=True)
    density_limit: float | None = field(default=None, kw_only=True)  # beyond: outside the kind

    @cached_property
    def density(self) -> np.ndarray | None:
        """The references' mean density description, standardised (None without one)."""
        refs = [r.density for r in self.items if r.density is not None]
        if not refs:
            return None
        return _standardised(np.mean(refs, axis=0))

    @property
    def uses_density(self) -> bool:
        """Whether a match's density description would count (not for a version-1 query or
        ``density_weight`` 0): without it, matches are described by size and shape only."""
        return self.density is not None and self.density_weight > 0

    def agreement(self, d: Description) -> tuple[float, dict[str, float]]:
        """The agreement of ``d`` with the references (product of size, shape and density
        agreements), and the parts: those three and ``outside`` (1.0 when the density lies
        outside the clicked kind's range, else 0.0)."""
        sizes = np.array([r.log_size for r in self.items])
        size = math.exp(-0.5 * (float(np.min(np.abs(sizes - d.log_size))) / self.size_sigma) ** 2)
        axes = np.stack([r.log_axes for r in self.items])
        axes_gap = float(np.min(np.linalg.norm(axes - d.log_axes, axis=1)))
        shape = math.exp(-0.5 * (axes_gap / self.shape_sigma) ** 2)
        dens, outside = 1.0, False
        if self.uses_density and d.density is not None:
            corr = float(np.dot(self.density, d.density)) / len(d.density)
            gap = 1.0 - min(corr, 1.0)
            dens = math.exp(-self.density_weight * gap / self.density_tolerance)
            outside = self.density_limit is not None and gap > self.density_limit
            if outside:
                dens *= OUTSIDE
        return size * shape * dens, {"size": size, "shape": shape, "density": dens,
                                     "outside": float(outside)}


def similarity_term(similarity: float, threshold: float) -> float:
    """The matching similarity above the threshold matches had to reach, rescaled to (0, 1]:
    a match just at the threshold barely counts, a perfect one counts fully."""
    span = max(1.0 - float(threshold), 1e-6)
    return float(np.clip((float(similarity) - float(threshold)) / span, 1e-6, 1.0))


def principal_log_axes(mask: InstanceMask) -> np.ndarray:
    """Log of the 2nd and 3rd principal-axis lengths over the 1st (0, 0 for a ball)."""
    coords = mask.coords().astype(np.float64)
    if len(coords) < 4:
        return np.zeros(2)
    ev = np.sort(np.linalg.eigvalsh(np.cov(coords.T) + 1e-3 * np.eye(3)))[::-1]
    return 0.5 * np.log(np.maximum(ev[1:], 1e-6) / max(ev[0], 1e-6))


@lru_cache(maxsize=4)
def _sphere(degrees: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fibonacci directions (n, 3) as z, y, x, the least-squares projector onto the
    spherical harmonics up to ``degrees`` and each coefficient's degree."""
    from scipy.special import sph_harm_y

    i = np.arange(n) + 0.5
    polar = np.arccos(1.0 - 2.0 * i / n)
    azimuth = (math.pi * (1.0 + math.sqrt(5.0)) * i) % (2.0 * math.pi)
    dirs = np.stack([np.cos(polar), np.sin(polar) * np.sin(azimuth),
                     np.sin(polar) * np.cos(azimuth)], axis=1)
    harmonics = np.stack([sph_harm_y(n_, m, polar, azimuth) for n_ in range(degrees + 1)
                          for m in range(-n_, n_ + 1)], axis=1)
    degree = np.array([n_ for n_ in range(degrees + 1) for _ in range(-n_, n_ + 1)])
    return dirs, np.linalg.pinv(harmonics), degree


def density_description(volume: np.ndarray, centre: np.ndarray, reach: float) -> np.ndarray:
    """Rotation-invariant density around ``centre``: per shell, the signed mean (degree 0)
    and the power of degrees 1..DEGREES; standardised (zero mean, unit variance). The
    volume is smoothed on a crop around the centre only. Shells and smoothing scale with
    ``reach``, so a particle sampled twice as finely is described the same way."""
    dirs, projector, degree = _sphere(DEGREES, SPHERE_POINTS)
    reach = max(float(reach), 1.5)
    shells = (np.arange(SHELLS) + 0.5) * reach / SHELLS
    sigma = max(SMOOTH_MIN, SMOOTH_SHARE * reach / SHELL_REACH)
    c = np.asarray(centre, np.float64)
    half = int(math.ceil(shells[-1] + 4.0 * sigma + 1.0))
    lo = np.maximum(np.floor(c).astype(int) - half, 0)
    hi = np.minimum(np.floor(c).astype(int) + half + 2, np.asarray(volume.shape))
    crop = np.asarray(volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], np.float32)
    crop = ndi.gaussian_filter(crop, sigma, mode="nearest")
    pts = (c - lo)[None, None, :] + shells[:, None, None] * dirs[None]
    values = ndi.map_coordinates(crop, pts.reshape(-1, 3).T, order=1, mode="nearest")
    coef = values.reshape(len(shells), -1) @ projector.T
    out = np.empty((len(shells), DEGREES + 1))
    out[:, 0] = coef[:, 0].real
    for n_ in range(1, DEGREES + 1):
        out[:, n_] = np.sqrt((np.abs(coef[:, degree == n_]) ** 2).sum(axis=1))
    flat = out.ravel()
    return (flat - flat.mean()) / (flat.std() + 1e-9)


def describe(mask: InstanceMask, volume: np.ndarray | None, reach: float) -> Description:
    """Size, shape and (with a volume) density of one non-empty mask."""
    dens = None if volume is None else density_description(volume, mask.centroid(), reach)
    return Description(math.log(max(mask.n_voxels, 1)), principal_log_axes(mask), dens)


def learn_references(masks: Sequence[InstanceMask], volume: np.ndarray | None,
                     cfg: ScoreConfig, densities: Sequence[np.ndarray] | None = None,
                     reach: float | None = None) -> References | None:
    """The clicked particles' descriptions; tolerances are the configured ones or, with
    several clicks, their own spread when that is wider. None without a non-empty mask.

    ``densities`` and ``reach`` (a saved query's, made on its own tomogram) stand in for the
    density descriptions when ``volume`` is None."""
    refs = [m for m in masks if m.n_voxels > 0]
    if not refs:
        return None
    radius = float(np.median([(3.0 * m.n_voxels / (4.0 * math.pi)) ** (1.0 / 3.0)
                              for m in refs]))
    reach = SHELL_REACH * radius if reach is None else float(reach)
    items = [describe(m, volume, reach) for m in refs]
    if volume is None and densities is not None and len(densities) == len(items):
        for item, dens in zip(items, densities, strict=True):
            item.density = np.asarray(dens, np.float64)
    size_sigma, shape_sigma = cfg.size_tolerance, cfg.shape_tolerance
    if len(items) > 2:  # a spread needs a few clicks to mean anything
        size_sigma = max(size_sigma, float(np.std([d.log_size for d in items], ddof=1)))
        axes = np.stack([d.log_axes for d in items])
        spread = float(np.sqrt(((axes - axes.mean(0)) ** 2).sum(1).mean()))
        shape_sigma = max(shape_sigma, spread)
    limit = _density_limit(items, cfg.density_range if cfg.density_weight > 0 else 0.0)
    stats = {"clicks": len(items), "size_tolerance": round(size_sigma, 4),
             "shape_tolerance": round(shape_sigma, 4),
             "density_tolerance": round(cfg.density_tolerance, 4),
             "density_limit": None if limit is None else round(limit, 5),
             "reach_voxels": round(reach, 3),
             "median_voxels": int(np.median([m.n_voxels for m in refs]))}
    return References(items, size_sigma, shape_sigma, reach, cfg.density_weight,
                      density_tolerance=cfg.density_tolerance, density_limit=limit,
                      stats=stats)


def _standardised(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance along the last axis (each row of a stack on its own)."""
    return (x - x.mean(-1, keepdims=True)) / (x.std(-1, keepdims=True) + 1e-9)


def _density_limit(items: Sequence[Description], density_range: float) -> float | None:
    """``density_range`` x the largest leave-one-out gap ``1 - corr`` between a click's
    density description and the others' mean: how far the clicked kind itself strays. None
    with fewer than three described clicks or a range of 0 (no limit; also when the density
    does not count, ``density_weight`` 0)."""
    dens = [d.density for d in items if d.density is not None]
    if density_range <= 0 or len(dens) < 3 or len(dens) < len(items):
        return None
    stack = np.stack(dens)  # (n, m), each row standardised
    others = _standardised((stack.sum(0) - stack) / (len(stack) - 1))  # row j: all but j
    gaps = 1.0 - (others * stack).sum(1) / stack.shape[1]
    return density_range * float(gaps.max())
