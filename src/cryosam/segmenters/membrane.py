"""The threshold segmenter's membrane mode: follow the bilayer's thin ridge on each slice.

A membrane seen in a slice is a thin dark curve (the two leaflets blur into one band), and
its contrast varies along the curve: one intensity cut relative to the clicked point breaks
a vesicle's ring into arcs where the band is weak, and filling holes turns a closed ring into
a disc (the lumen). Here a slice is encoded as a *ridge map* instead: the scale-normalised
Hessian response to a bright line (after the polarity flip), maximised over a few scales,
with blobs suppressed (a blob curves down in both directions, a line in one). Per prompt:

1. the seed is the ridge maximum within 2 pixels of the point, or, with a previous mask, the
   previous mask's pixels (moved by up to ``SHIFT`` pixels) that are still on the ridge;
2. no mask when the seed's ridge strength is below ``min_contrast`` times the slice's ridge
   noise (the sheet has left the slice or faded: propagation stops);
3. the mask is every pixel above ``cut`` times the ridge noise connected to the seed
   (hysteresis from the seed; holes are never filled, so a ring stays a ring).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

RIDGE_SCALES = (2.0, 3.0, 4.0)  # Hessian scales (pixels): a blurred bilayer is ~4-8 pixels wide
FADE = 0.4  # a sheet whose ridge falls below this share of its first slice's has ended
REL = 0.4  # across the band, pixels weaker than this share of its crest are left out
CREST_REACH = 5  # pixels: the crest of a band is looked for this far on either side
SHIFT = 2  # a sheet moves by up to this many pixels from one slice to the next
VOTES = 2  # slice axes that must agree on a membrane voxel (a 2-D leak in one is dropped)
GROWTH = 2.0  # a slice mask that covers the previous one may be this many times its area
RESEED_SHARE = 0.5  # sweep again along an axis whose slices covered less of the sheet
_EIGHT = np.ones((3, 3), bool)


def ridge_map(image: np.ndarray, scales: tuple[float, ...] = RIDGE_SCALES
              ) -> tuple[np.ndarray, float]:
    """Bright-line strength of ``image`` and its robust noise level.

    With Hessian eigenvalues ``l1 <= l2`` at scale ``s``, a bright line has ``l1 << 0`` and
    ``l2 ~ 0``, a bright blob ``l1 ~ l2 << 0``: the strength is ``s^2 (-l1 - max(0, -l2))``
    (scale-normalised, so the best-fitting scale wins the maximum over ``scales``). The noise
    is the scaled median absolute deviation of ``-s^2 l1``, the unpenalised response.
    """
    img = np.asarray(image, np.float32)
    best = raw = None
    for s in scales:
        hrr = ndi.gaussian_filter(img, s, order=(2, 0), mode="nearest")
        hcc = ndi.gaussian_filter(img, s, order=(0, 2), mode="nearest")
        hrc = ndi.gaussian_filter(img, s, order=(1, 1), mode="nearest")
        half_trace = 0.5 * (hrr + hcc)
        spread = np.sqrt((0.5 * (hrr - hcc)) ** 2 + hrc**2)
        low, high = half_trace - spread, half_trace + spread
        line = -low * (s * s)
        strength = line - np.maximum(0.0, -high) * (s * s)
        best = strength if best is None else np.maximum(best, strength)
        raw = line if raw is None else np.maximum(raw, line)
    assert best is not None and raw is not None
    noise = 1.4826 * float(np.median(np.abs(raw - np.median(raw))))
    return np.maximum(best, 0.0).astype(np.float32), max(noise, 1e-6)


def grow_membrane(ridge: np.ndarray, noise: float, rc: tuple[int, int],
                  prev: np.ndarray | None, cut: float, min_contrast: float,
                  ref: float | None = None) -> tuple[np.ndarray, float, float]:
    """The ridge pixels above ``cut * noise`` connected to the seed at ``rc`` (or to the
    previous mask's pixels still on the ridge); returns (mask, cnr, the first slice's seed
    strength, carried as ``ref``: a sheet weaker than ``FADE`` times it has ended)."""
    empty = np.zeros(ridge.shape, bool)
    level = cut * noise
    if prev is not None and prev.any():
        # the curve is still there when most previous pixels have a ridge within SHIFT
        support = ndi.maximum_filter(ridge, size=2 * SHIFT + 1)[prev]
        v = float(np.median(support))
        if ref is not None and np.isfinite(ref) and v < FADE * ref:
            return empty, 0.0, ref
        near = ndi.binary_dilation(prev, iterations=SHIFT)
        seeds = near & (ridge > max(level, 0.5 * v))
    else:
        r, c = rc
        r0, c0 = max(0, r - 2), max(0, c - 2)
        local = ridge[r0 : r + 3, c0 : c + 3]
        if local.size == 0:
            return empty, 0.0, np.nan
        v = float(local.max())
        seeds = np.zeros(ridge.shape, bool)
        lr, lc = np.unravel_index(int(np.argmax(local)), local.shape)
        seeds[r0 + lr, c0 + lc] = True
    cnr = v / noise
    ref = v if ref is None or not np.isfinite(ref) else ref
    if cnr < min_contrast or not seeds.any():
        return empty, 0.0, ref
    # across the band, only the pixels within REL of its crest: the mask's width follows the
    # bilayer's, whichever scale answered (a wider scale's flanks are not the membrane)
    crest = ndi.maximum_filter(ridge, size=2 * CREST_REACH + 1)
    labels, n = ndi.label((ridge > level) & (ridge >= REL * crest), _EIGHT)
    keep = np.unique(labels[seeds])
    keep = keep[keep > 0]
    if not keep.size:
        return empty, 0.0, ref
    return np.isin(labels, keep), cnr, ref


def attached(mask: np.ndarray, offset: tuple[int, int, int], point: np.ndarray,
             reach: float = 3.0) -> tuple[tuple[int, int, int], np.ndarray]:
    """The 26-connected parts of a 3-D ``mask`` (at ``offset``) within ``reach`` voxels of
    ``point`` (volume voxels), or its largest part when none is, as (offset, tight crop):
    pieces of other structures the slices picked up that do not join the clicked sheet in
    3-D are dropped."""
    point = np.asarray(point, np.float64) - np.asarray(offset)
    labels, n = ndi.label(mask, np.ones((3, 3, 3), bool))
    lo = np.maximum(np.floor(point - reach).astype(int), 0)
    hi = np.minimum(np.ceil(point + reach).astype(int) + 1, mask.shape)
    near = labels[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    keep = np.unique(near[near > 0])
    if not keep.size:
        keep = np.array([int(np.argmax(np.bincount(labels.ravel())[1:])) + 1]) if n else keep
    kept = np.isin(labels, keep)
    box = np.argwhere(kept)
    if not box.size:
        return (0, 0, 0), np.zeros((0, 0, 0), bool)
    a, b = box.min(0), box.max(0) + 1
    return (tuple(int(o + v) for o, v in zip(offset, a, strict=True)),  # type: ignore[return-value]
            kept[a[0] : b[0], a[1] : b[1], a[2] : b[2]])


def cross_sections(mask: np.ndarray, offset: tuple[int, int, int], done: dict[str, int],
                   share: float = RESEED_SHARE
                   ) -> list[tuple[str, int, int, int, np.ndarray, np.ndarray]]:
    """Where to sweep a sheet again: for each axis in ``done`` (slices of it already
    segmented) covering less than ``share`` of the 3-D ``mask``'s extent along it (the
    click's plane saw the sheet face-on, or its chain stopped early), the slice
    through the mask's median there, as (axis, index, row0, col0, crop, point), in volume
    pixels; ``point`` is a pixel of the cross-section."""
    coords = np.argwhere(mask)
    out = []
    for axis, count in done.items():
        a = "zyx".index(axis)
        extent = int(coords[:, a].max() - coords[:, a].min() + 1)
        if count >= share * extent:
            continue
        local = int(np.median(coords[:, a]))
        section = mask.take(local, axis=a)
        rows, cols = np.nonzero(section)
        if not rows.size:
            continue
        r0, c0 = (o for k, o in enumerate(offset) if k != a)
        crop = section[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        mid = len(rows) // 2
        out.append((axis, local + offset[a], int(rows.min()) + r0, int(cols.min()) + c0, crop,
                    np.array([rows[mid] + r0, cols[mid] + c0], np.float64)))
    return out
