"""What the clicks say before any model runs: the particles' contrast polarity and size.

A scale-normalised Laplacian of Gaussian, ``sigma^2 * LoG``, is evaluated at each click over
scales of 1 to 32 voxels. Its extremum at the particle's scale (see
:func:`particle_extremum`) gives the size (a solid ball of radius ``r``
answers most at ``sigma = r / sqrt(3)``) and its sign the polarity (positive at a dark blob,
negative at a bright one). The clicks vote. Large scales are evaluated on a block-averaged
copy of the volume, so each probe costs the same few thousand voxels whatever the size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy import ndimage as ndi

Polarity = Literal["dark", "bright"]
SIGMAS = tuple(float(2.0 ** (k / 4)) for k in range(0, 21))  # 1 .. 32 voxels, quarter octaves
MAX_PROBED = 16  # clicks probed at most (they vote; more adds time, not information)


@dataclass
class ClickProbe:
    """Polarity and size of the clicked structures, with the evidence behind them."""

    polarity: Polarity
    polarity_source: str  # "clicks" (decided here), "given" or "query" (a saved query's)
    radius: float | None  # voxels (equivalent ball); None when unknown
    radius_source: str  # "clicks", "diameter", "query" or "none"
    responses: list[float] = field(default_factory=list)  # per probed click, at its scale
    radii: list[float] = field(default_factory=list)  # per probed click

    @property
    def clicks_radius(self) -> float | None:
        """The radius the clicks themselves show (:func:`clicks_size`; the one a run without
        ``--diameter`` takes): compared with a given ``--diameter``."""
        return clicks_size(self.radii, self.responses, self.polarity)

    @property
    def size_conflict(self) -> float | None:
        """The clicks' own radius when a given ``--diameter`` is over three times off it
        (larger or smaller), else None: said as a warning, or as the reason nothing was
        found."""
        seen = self.clicks_radius
        off = (self.radius_source == "diameter" and self.radius and seen
               and not 1 / 3 < self.radius / seen < 3)
        return seen if off else None

    @property
    def votes(self) -> dict[str, int]:
        """How many probed clicks look dark and how many bright."""
        return {"dark": sum(r > 0 for r in self.responses),
                "bright": sum(r < 0 for r in self.responses)}

    def report(self) -> dict[str, Any]:
        """The run record's ``probe``: polarity and radius (voxels) with their sources, the votes,
        and each probed click's radius (None where not found) and ``sigma^2 * LoG`` response."""
        return {
            "polarity": self.polarity, "polarity_source": self.polarity_source,
            "votes": self.votes, "radius_voxels": self.radius, "radius_source": self.radius_source,
            "click_radii": [round(r, 2) if math.isfinite(r) else None for r in self.radii],
            "click_responses": [round(r, 4) for r in self.responses],
        }


class _Pyramid:
    """The volume block-averaged by 1, 2, 4, 8, ... (built once per probe, level by level)."""

    def __init__(self, volume: np.ndarray) -> None:
        self.levels: dict[int, np.ndarray] = {1: volume}

    def level(self, f: int) -> np.ndarray:
        if f not in self.levels:
            from cryosam.rescale import bin_volume

            self.levels[f] = bin_volume(self.level(f // 2), 2)
        return self.levels[f]


def scale_response(volume: np.ndarray | _Pyramid, zyx: np.ndarray,
                   sigmas: tuple[float, ...] = SIGMAS) -> np.ndarray:
    """``sigma^2 * LoG`` of ``volume`` at the point ``zyx`` for each sigma (voxels).

    A scale is evaluated on the volume block-averaged by a power of two ``f`` with
    ``sigma / f`` of 2-4 cells, on a crop of +-4 sigma: the same small cost at every scale."""
    pyramid = volume if isinstance(volume, _Pyramid) else _Pyramid(volume)
    centre = np.asarray(zyx, dtype=np.float64)
    out = np.zeros(len(sigmas))
    for k, sigma in enumerate(sigmas):
        f = 1 << max(0, int(math.floor(math.log2(max(sigma / 2.0, 1.0)))))
        grid = pyramid.level(f)
        pos = (centre + 0.5) / f - 0.5  # the click on this level
        s = sigma / f
        half = int(math.ceil(4.0 * s)) + 1
        lo = np.floor(pos).astype(int) - half
        idx = [np.clip(np.arange(a, a + 2 * half + 2), 0, n - 1)  # edges repeated at borders
               for a, n in zip(lo, grid.shape, strict=True)]
        crop = np.asarray(grid[np.ix_(*idx)], dtype=np.float32)
        log = ndi.gaussian_laplace(crop, s, mode="nearest")
        # scale-normalised in the level's own units (a cell is f voxels)
        out[k] = s**2 * float(ndi.map_coordinates(log, (pos - lo)[:, None], order=1)[0])
    return out


OPPOSITE_SHARE = 0.3  # a larger-scale extremum this strong (vs the strongest) is the particle


def particle_extremum(curve: np.ndarray) -> int:
    """Index of the scale at which ``curve`` (``scale_response``) describes the particle.

    Usually the strongest extremum. But the centre of a hollow particle (a ring, a barrel
    seen end-on) answers most at a small scale with the opposite sign (its lumen is brighter
    than its wall), while the particle itself answers at its own, larger scale. So among the
    local extrema at least ``OPPOSITE_SHARE`` as strong as the strongest, the one at the
    largest scale wins: background at still larger scales answers far more weakly."""
    mag = np.abs(curve)
    strongest = float(mag.max()) if len(mag) else 0.0
    best = int(np.argmax(mag))
    for k in range(len(curve) - 2, best, -1):  # from the largest scale down
        local = mag[k] >= mag[k - 1] and mag[k] >= mag[k + 1]
        if local and mag[k] >= OPPOSITE_SHARE * strongest:
            return k
    return best


def _peak_sigma(curve: np.ndarray, best: int) -> float:
    """The scale of the peak at index ``best``, refined by a parabola in log-scale."""
    if 0 < best < len(curve) - 1:
        a, b, c = curve[best - 1], curve[best], curve[best + 1]
        denom = a - 2 * b + c
        if denom < 0:
            shift = float(np.clip(0.5 * (a - c) / denom, -0.5, 0.5))
            return float(2.0 ** ((best + shift) / 4))
    return SIGMAS[best]


def probe_clicks(volume: np.ndarray, prompts: np.ndarray, *, polarity: str = "auto",
                 radius: float | None = None, estimate_size: bool = True) -> ClickProbe:
    """Decide the polarity (unless given) and the particle radius (unless given) from the
    clicks on a normalised ``volume``. ``estimate_size=False`` (membranes) skips the size."""
    pts = np.asarray(prompts, dtype=np.float64).reshape(-1, 3)
    if len(pts) > MAX_PROBED:  # spread over the whole list
        pts = pts[np.linspace(0, len(pts) - 1, MAX_PROBED).round().astype(int)]
    responses, radii = [], []
    pyramid = _Pyramid(volume)
    for p in pts:
        curve = scale_response(pyramid, p)
        best = particle_extremum(curve)
        responses.append(float(curve[best]))
        # a peak at the largest scale is no particle (a gradient, a slab), nor is one whose
        # diameter exceeds the tomogram's thinnest side: size unknown
        r = (float(_peak_sigma(np.abs(curve), best) * math.sqrt(3.0))
             if best < len(SIGMAS) - 1 else math.nan)
        radii.append(r if r <= min(volume.shape) / 2.0 else math.nan)
    if polarity in ("dark", "bright"):
        pol, pol_source = polarity, "given"
    else:
        votes = float(np.sum(np.sign(responses)))
        tie_break = float(np.sum(responses))
        pol = "dark" if (votes > 0 or (votes == 0 and tie_break >= 0)) else "bright"
        pol_source = "clicks"
    if radius is not None:
        r, r_source = float(radius), "diameter"
    elif estimate_size and radii:
        r = clicks_size(radii, responses, pol)  # type: ignore[arg-type]
        r_source = "clicks" if r is not None else "none"
    else:
        r, r_source = None, "none"
    return ClickProbe(pol, pol_source, r, r_source, responses, radii)  # type: ignore[arg-type]


def clicks_size(radii: list[float], responses: list[float], polarity: Polarity
                ) -> float | None:
    """The particle radius the clicks show: the median finite radius of the clicks whose
    strongest answer has ``polarity`` (of all sized clicks when none has); None without."""
    sized = [(r, s) for r, s in zip(radii, responses, strict=True) if math.isfinite(r)]
    agree = [r for r, s in sized if (s > 0) == (polarity == "dark")] or [r for r, _ in sized]
    return float(np.median(agree)) if agree else None


MEMBRANE_SCALE = 5.5  # voxels: the scale a bilayer answers the probe at on a 10 A grid
MEMBRANE_GRID = 10.0  # A: the voxel size the membrane segmenter's widths are set for
PLAUSIBLE_VOXEL = (2.0, 30.0)  # A: a header outside this is likely unset (1.0) or wrong


def membrane_bin_factor(scale: float | None, voxel_size: float | None = None) -> int:
    """Internal binning for membranes: the membrane segmenter's widths are set for a bilayer
    (~4 nm) on a :data:`MEMBRANE_GRID` grid, so a 5 A tomogram is binned 2x and a 2.5 A one
    4x. From a plausible ``voxel_size`` (the bilayer's thickness is physics); else from the
    scale the clicks answer the probe at (``scale`` voxels, about :data:`MEMBRANE_SCALE` on
    that grid, single clicks vary by a third); neither: no binning."""
    if voxel_size is not None and PLAUSIBLE_VOXEL[0] <= voxel_size <= PLAUSIBLE_VOXEL[1]:
        return max(1, int(round(MEMBRANE_GRID / voxel_size)))
    if scale is None or not math.isfinite(scale):
        return 1
    return max(1, int(round(scale / MEMBRANE_SCALE)))


def bin_factor(radius: float | None, largest: float = 12.0, aim: float = 8.0) -> int:
    """Internal binning for a particle of ``radius`` voxels: none up to ``largest``, else the
    smallest factor that brings it to at most ``aim`` voxels."""
    if radius is None or radius <= largest:
        return 1
    return int(math.ceil(radius / aim))


TAIL = 1e-3  # share of voxels in each tail of the LoG responses compared by looks_polarity
CLEAR = 0.1  # log-ratio of the tails from which a tomogram's contrast counts as clear


def looks_polarity(volume: np.ndarray, radius: float) -> tuple[Polarity | None, float]:
    """How a tomogram without clicks looks at the particle scale: dense matter (particles,
    membranes, gold) makes the strongest ``sigma^2 * LoG`` responses of one sign, noise of
    both. The log-ratio of the two tails (``TAIL`` of the voxels each) is positive when dark
    blobs dominate; beyond ``CLEAR`` either way it names the polarity, else None."""
    v = np.asarray(volume, dtype=np.float32)
    med = float(np.median(v))
    mad = 1.4826 * float(np.median(np.abs(v - med))) or 1.0
    sigma = max(float(radius) / math.sqrt(3.0), 0.8)
    response = sigma * sigma * ndi.gaussian_laplace((v - med) / mad, sigma)
    low, high = np.quantile(response, [TAIL, 1.0 - TAIL])
    if not (high > 0 > low):
        return None, 0.0
    ratio = math.log(float(high) / -float(low))
    return ("dark" if ratio > 0 else "bright") if abs(ratio) > CLEAR else None, ratio

