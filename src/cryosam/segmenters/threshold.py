"""A weight-free promptable slice segmenter: local half-maximum region growing.

The offline/CPU baseline and the way the pipeline is checked end to end without weights.
Per slice (the "encoding", cached like SAM's embeddings): average ``slab`` neighbouring slices
each side, Gaussian-denoise, flip so particles are bright (raw cryo-ET: particles are dark),
and estimate the noise level robustly. Per prompt, in a window around the point:

1. the particle core level ``v`` is the denoised signal at the point (or, with a previous mask,
   a high percentile of the signal under that mask on this slice), the background ``b`` the
   median of the window outside the core / previous mask;
2. no mask when ``v - b < min_contrast * noise`` (left the particle: propagation stops);
3. cut at ``b + level * (v - b)`` (half maximum by default, which lands on the blurred edge),
   fill holes and keep the connected component under the point (or overlapping the previous
   mask most, or nearest within 2 px);
4. with a previous mask, a component that grew past ``1.5x`` its area is clipped to a dilation
   of it (touching neighbours); over the area cap, higher cuts are tried.

The confidence is the contrast-to-noise ratio squashed to [0, 1]: ``cnr / (cnr + 4)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from scipy import ndimage as ndi

from cryosam.backends import ThresholdOptions
from cryosam.config import SegmenterConfig
from cryosam.segmenters.base import (
    PromptBatch,
    SegmentResult,
    SliceSegmenterBase,
    caps_of,
    empty_result,
    slice_of,
)
from cryosam.segmenters.membrane import grow_membrane, ridge_map

_CROSS = ndi.generate_binary_structure(2, 1)  # 4-connectivity, ndimage's 2-D default
LEAK_FACTOR = 1.5  # a guided mask may grow to this many times the previous area unclipped
START_HALF_WINDOW = 24  # pixels each side of the point, doubled while the mask touches it
HOLLOW_SHARE = 0.7  # a click's wall is looked for within this share of the particle radius


class ThresholdSegmenter(SliceSegmenterBase):
    """Local half-maximum region growing from the point on a denoised slice."""

    def __init__(self, config: SegmenterConfig | None = None, target: str = "particle") -> None:
        cfg = config or SegmenterConfig(name="threshold")
        super().__init__(cfg.embedding_cache_mb)  # the denoised slices live in host memory
        opts: ThresholdOptions = cfg.backends["threshold"]
        self.sign = -1.0 if opts.polarity == "dark" else 1.0
        self.sigma = float(opts.smooth_sigma)
        self.slab = max(0, int(opts.slab))
        self.level = float(opts.level)
        # membranes: the bilayer's ridge is followed instead (see segmenters/membrane.py)
        self.membrane = target == "membrane"
        self.membrane_cut = float(opts.membrane_cut)
        self.min_contrast = float(opts.min_contrast)
        self.max_batch = max(1, int(cfg.decoder_batch_size))
        self.encode_batch = max(1, int(cfg.encoder_batch_size))
        self.id = (f"threshold:{opts.polarity}:s{self.sigma:g}:slab{self.slab}:"
                   f"l{self.level:g}:c{self.min_contrast:g}")
        if self.membrane:
            self.id += f":membrane{self.membrane_cut:g}"

    # -- per-slice encoding ---------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: SegmenterConfig, device: torch.device,
                    target: str = "particle") -> ThresholdSegmenter:
        """The registry's builder (CPU only: ``device`` is not used)."""
        return cls(cfg, target=target)

    def _encode(self, axis: str, indices: list[int]) -> list[tuple[np.ndarray, float]]:
        workers = min(torch.get_num_threads(), len(indices))
        if workers < 2:
            return [self._encode_one(axis, int(i)) for i in indices]
        # scipy's filters and numpy's partition release the GIL: slices in parallel
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(lambda i: self._encode_one(axis, int(i)), indices))

    def _encode_one(self, axis: str, index: int) -> tuple[np.ndarray, float]:
        key = (axis, int(index))
        if key in self._images or self._volume is None or self.slab == 0:
            img = self.image(axis, index)
        else:
            n = self._volume.shape["zyx".index(axis)]
            lo, hi = max(0, index - self.slab), min(n, index + self.slab + 1)
            img = np.mean([np.asarray(slice_of(self._volume, axis, i), np.float32)
                           for i in range(lo, hi)], axis=0)
        sig = self.sign * np.asarray(img, np.float32)
        if self.membrane:
            return ridge_map(sig)
        if self.sigma > 0:
            sig = ndi.gaussian_filter(sig, self.sigma, mode="nearest")
        # noise: robust spread of the fine detail left after a second smoothing
        detail = sig - ndi.gaussian_filter(sig, 2.0 * max(self.sigma, 1.0), mode="nearest")
        noise = 1.4826 * float(np.median(np.abs(detail - np.median(detail))))
        return sig.astype(np.float32), max(noise, 1e-6)

    def _nbytes(self, encoding: tuple[np.ndarray, float]) -> int:
        return int(encoding[0].nbytes)

    # -- prompts --------------------------------------------------------------------------
    def segment_batch(self, batches: Sequence[PromptBatch]) -> list[SegmentResult]:
        """Encode the batches' slices not cached yet, then grow every prompt's mask on its slice."""
        self.prepare([(b.axis, b.index) for b in batches])
        return [self._segment_slice(b, self.encoding(b.axis, b.index)) for b in batches]

    def _segment_slice(self, b: PromptBatch, encoding: tuple[np.ndarray, float]
                       ) -> SegmentResult:
        """Every prompt of one slice."""
        sig, noise = encoding
        res = empty_result(len(b), sig.shape)
        pts = np.asarray(b.points, np.float64).reshape(-1, 2)
        caps = caps_of(b)
        carry = np.full((len(b), 1), np.nan, np.float32)
        for k in range(len(b)):
            prev = None if b.prev_masks is None else np.asarray(b.prev_masks[k], bool)
            ref = None
            if b.prev_logits is not None and np.isfinite(b.prev_logits[k]).all():
                ref = float(np.asarray(b.prev_logits[k]).reshape(-1)[0])
            conf, point, carry[k, 0] = self._one(sig, noise, pts[k], prev, caps[k], ref,
                                                 res.masks[k], b.radius)
            res.confidence[k] = conf
            res.points[k] = point
        res.logits = carry
        self.decoder_calls += 1
        return res

    def _one(self, sig: np.ndarray, noise: float, point: np.ndarray, prev: np.ndarray | None,
             cap: float, ref: float | None, full: np.ndarray, radius: float | None = None
             ) -> tuple[float, np.ndarray, float]:
        """Segment one prompt into ``full`` (an all-False slice-sized mask); returns the
        confidence, the most confident point and the contrast to carry to the next slice."""
        h, w = sig.shape
        r = int(np.clip(np.rint(point[0]), 0, h - 1))
        c = int(np.clip(np.rint(point[1]), 0, w - 1))
        box = None if prev is None else _bbox(prev)
        if box is None:
            prev = None
            half, centre = START_HALF_WINDOW, (r, c)
        else:
            (rmin, rmax), (cmin, cmax) = box
            half = max(START_HALF_WINDOW, int(max(rmax - rmin, cmax - cmin) + 1))
            centre = ((rmin + rmax) // 2, (cmin + cmax) // 2)
        while True:
            r0, r1 = max(0, centre[0] - half), min(h, centre[0] + half + 1)
            c0, c1 = max(0, centre[1] - half), min(w, centre[1] + half + 1)
            win = sig[r0:r1, c0:c1]
            pw = None if prev is None else prev[r0:r1, c0:c1]
            mask, cnr, contrast = self._grow(win, noise, (r - r0, c - c0), pw, cap, ref,
                                             radius)
            touches = mask.any() and (
                (mask[0].any() and r0 > 0) or (mask[-1].any() and r1 < h)
                or (mask[:, 0].any() and c0 > 0) or (mask[:, -1].any() and c1 < w))
            if not touches or half >= max(h, w):
                break
            half *= 2
        box = _bbox(mask)
        if box is None:
            return 0.0, np.asarray(point, np.float32), np.nan
        full[r0:r1, c0:c1] = mask
        # most confident point: deepest inside the mask (ties: strongest signal); the
        # distances inside the mask are those of its bounding box padded by one pixel
        (br0, br1), (bc0, bc1) = box
        sub = mask[br0:br1 + 1, bc0:bc1 + 1]
        depth = ndi.distance_transform_edt(np.pad(sub, 1))[1:-1, 1:-1]
        score = depth + 1e-3 * (win[br0:br1 + 1, bc0:bc1 + 1] - win.min()) / (np.ptp(win) + 1e-9)
        br, bc = np.unravel_index(np.argmax(np.where(sub, score, -np.inf)), sub.shape)
        conf = float(cnr / (cnr + 4.0))
        return conf, np.array([br + br0 + r0, bc + bc0 + c0], np.float32), contrast

    def _grow(self, win: np.ndarray, noise: float, rc: tuple[int, int],
              prev: np.ndarray | None, cap: float, ref: float | None,
              radius: float | None = None) -> tuple[np.ndarray, float, float]:
        """The component of the window around ``rc`` above the half-maximum cut.

        ``ref`` is the particle's contrast on its first slice: following slices are cut at
        the same absolute level above their local background (a 3-D half maximum), and are
        empty once their own core falls below it. With the particle's ``radius`` and no
        previous mask, a point in a hollow centre (weaker than half the strongest signal
        within ``HOLLOW_SHARE x radius``) takes its level from that wall instead, and the
        wall's component (holes filled) is the mask. Returns (mask, cnr, reference contrast).
        """
        r = int(np.clip(rc[0], 0, win.shape[0] - 1))
        c = int(np.clip(rc[1], 0, win.shape[1] - 1))
        if self.membrane:
            return grow_membrane(win, noise, (r, c), prev, self.membrane_cut, self.min_contrast,
                                 ref)
        if prev is not None and prev.any():
            core = _erode(prev) if prev.sum() > 8 else prev
            core = core if core.any() else prev
            v = float(np.percentile(win[core], 75))
            outside = ~_dilate(prev, 2)
        else:
            r0, r1 = max(0, r - 1), r + 2
            c0, c1 = max(0, c - 1), c + 2
            v = float(win[r0:r1, c0:c1].mean())
            yy, xx = np.ogrid[: win.shape[0], : win.shape[1]]
            dist2 = (yy - r) ** 2 + (xx - c) ** 2
            outside = dist2 > 9
        b = float(np.median(win[outside])) if outside.any() else float(np.median(win))
        disk = None
        if prev is None and radius:
            near = dist2 <= max(2.0, HOLLOW_SHARE * radius) ** 2
            wall = float(win[near].max())
            if v - b < self.level * (wall - b):  # the point may sit in a lumen
                if not _surrounds(win > b + self.level * (wall - b), near, (r, c)):
                    return np.zeros(win.shape, bool), 0.0, np.nan  # background, not a lumen
                v, disk = wall, near
                outside = ~_dilate(near, 2)
                b = float(np.median(win[outside])) if outside.any() else b
        contrast = v - b
        cnr = contrast / noise
        c0 = contrast if ref is None else ref
        if cnr < self.min_contrast or contrast < self.level * c0:
            return np.zeros(win.shape, bool), 0.0, c0
        mask = np.zeros(win.shape, bool)
        for level in (self.level, self.level + 0.15, self.level + 0.3):
            mask = self._component(win > b + level * c0, (r, c), prev, disk)
            if prev is not None and prev.any() and mask.sum() > LEAK_FACTOR * prev.sum():
                grow = max(2, int(round(0.25 * np.sqrt(prev.sum() / np.pi))))
                mask &= _dilate(prev, grow)
                mask = self._component(mask, (r, c), prev)
            if mask.sum() <= cap:
                break
        return mask, cnr, c0

    @staticmethod
    def _component(binary: np.ndarray, rc: tuple[int, int], prev: np.ndarray | None,
                   disk: np.ndarray | None = None) -> np.ndarray:
        binary = _fill_holes(binary)
        labels, n = ndi.label(binary, _CROSS)
        if n == 0:
            return np.zeros(binary.shape, bool)
        r, c = rc
        lab = labels[r, c]
        ref = prev if prev is not None and prev.any() else disk
        if lab == 0 and ref is not None:
            counts = np.bincount(labels[ref], minlength=n + 1)
            counts[0] = 0
            lab = int(counts.argmax()) if counts.max() > 0 else 0
        if lab == 0:
            near = labels[max(0, r - 2) : r + 3, max(0, c - 2) : c + 3]
            found = near[near > 0]
            lab = int(np.bincount(found).argmax()) if found.size else 0
        return labels == lab if lab else np.zeros(binary.shape, bool)


SECTORS = 8  # a lumen's wall must show in this many directions around the point ...
SECTORS_NEEDED = 6  # ... at least this many of them


def _surrounds(above: np.ndarray, disk: np.ndarray, rc: tuple[int, int]) -> bool:
    """Whether the pixels of ``above`` within ``disk`` surround the point ``rc`` (a wall
    around a lumen, not a blob to one side)."""
    rows, cols = np.nonzero(above & disk)
    if not len(rows):
        return False
    angle = np.arctan2(rows - rc[0], cols - rc[1])
    sector = np.floor((angle + np.pi) / (2 * np.pi) * SECTORS).astype(int) % SECTORS
    return len(np.unique(sector)) >= SECTORS_NEEDED


def _dilate(mask: np.ndarray, iterations: int) -> np.ndarray:
    """``ndi.binary_dilation(mask, iterations=iterations)`` (4-neighbours, nothing beyond
    the border), by shifted copies: much cheaper on the small windows used here."""
    out = mask.copy()
    for _ in range(iterations):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    """``ndi.binary_erosion(mask)``: pixels whose 4-neighbours all lie in the mask (the
    border counts as outside)."""
    out = np.zeros_like(mask)
    out[1:-1, 1:-1] = (mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1]
                       & mask[1:-1, :-2] & mask[1:-1, 2:])
    return out


def _bbox(mask: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """((first row, last row), (first col, last col)) of a 2-D mask; None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if not len(rows):
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return (int(rows[0]), int(rows[-1])), (int(cols[0]), int(cols[-1]))


def _fill_holes(binary: np.ndarray) -> np.ndarray:
    """``ndi.binary_fill_holes(binary)``: the background not 4-connected to the image border
    becomes foreground (one labelling instead of an iterated dilation)."""
    background, n = ndi.label(~binary, _CROSS)
    if n == 0:
        return binary.copy()
    edge = np.zeros(n + 1, bool)
    for side in (background[0], background[-1], background[:, 0], background[:, -1]):
        edge[side] = True
    edge[0] = True  # the foreground itself
    return ~edge[background] | binary
