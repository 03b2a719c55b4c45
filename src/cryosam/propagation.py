"""Cross-plane self-prompting: one click -> the particle's 3-D mask, for many clicks at once.

From a point (z, y, x) the three orthogonal planes through it are segmented with a point
prompt (YX at z, ZX at y, ZY at x). From each, a *chain* steps slice by slice in both
directions (+-z from the YX plane, +-y from ZX, +-x from ZY), prompting the segmenter with the
previous slice's mask (SAM: its low-res logits) and that mask's most confident point, and
stops when IoU(previous, new) < ``iou_threshold``, the new mask is empty or larger than the
area cap, or the volume ends. The instance is the union of the accepted 2-D masks.

Batching: every chain of every particle advances one slice per *step*; a step's prompts are
grouped by slice and sent to the segmenter together (``segmenter.max_batch`` prompts per
decoder pass, which for SAM may span several slices), and every slice is encoded once
(cached). ``PropagationConfig.batched = False`` runs the same algorithm one particle and one
slice at a time, the baseline the batching is measured against; both give the same masks.

The volume passed in is the RAW tomogram: it is rescaled per tomogram to [0, 1] from robust
percentiles (``clip_percentiles``) unless ``normalise=False``, when it must already be in [0, 1].

Membranes (``target="membrane"``) are sheets: their slices are thin curves, so consecutive
masks are compared after dilating both by ``membrane_tolerance`` pixels (a curve that moves by
a pixel keeps a high IoU, one that lengthens may cover the previous), there is no area cap,
axes the chains covered too little of are swept again from the sheet's middle, and a voxel is
kept when slices of two axes agree on it and it joins the click (``segmenters.membrane``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from cryosam.config import PropagationConfig
from cryosam.errors import InputError
from cryosam.instance_mask import InstanceMask
from cryosam.normalise import normalise_volume
from cryosam.progress import track
from cryosam.segmenters.base import COUNTERS, PromptBatch, Segmenter, to_slice
from cryosam.segmenters.membrane import GROWTH, VOTES, attached, cross_sections
from cryosam.utils import AXES, outside_volume

FIRST_MASK_SPREAD = 4.0  # first masks more than this times the smallest are outliers (leaks)
SIZE_CAP_FACTOR = 4.0  # with a known radius r, no 2-D mask may exceed this many times pi r^2


@dataclass
class PropagationResult:
    """One instance per prompt point (same order), a confidence each, and counters."""

    instances: list[InstanceMask]
    confidence: np.ndarray
    stats: dict = field(default_factory=dict)


@dataclass
class _Piece:
    """An accepted 2-D mask: slice ``index`` of ``axis``, crop at (row0, col0)."""

    axis: str
    index: int
    r0: int
    c0: int
    crop: np.ndarray


@dataclass
class _Chain:
    particle: int
    axis: str
    sign: int
    index: int
    prev: _Piece
    point: np.ndarray
    logits: np.ndarray | None
    cap: float
    steps: int = 0
    stop: str = ""


def _crop2d(mask: np.ndarray) -> tuple[int, int, np.ndarray] | None:
    rows = np.flatnonzero(mask.any(1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return int(r0), int(c0), mask[r0:r1, c0:c1].copy()


def _overlap2d(a: _Piece, b: _Piece, tolerance: int = 0) -> tuple[float, float]:
    """(IoU, share of ``a`` covered by ``b``) of two 2-D masks dilated by ``tolerance`` px."""
    ma, mb = a.crop, b.crop
    ra, ca, rb, cb = a.r0, a.c0, b.r0, b.c0
    if tolerance > 0:
        t = tolerance
        ma = ndi.binary_dilation(np.pad(ma, t), iterations=t)
        mb = ndi.binary_dilation(np.pad(mb, t), iterations=t)
        ra, ca, rb, cb = ra - t, ca - t, rb - t, cb - t
    r0, c0 = max(ra, rb), max(ca, cb)
    r1 = min(ra + ma.shape[0], rb + mb.shape[0])
    c1 = min(ca + ma.shape[1], cb + mb.shape[1])
    inter = 0
    if r1 > r0 and c1 > c0:
        inter = int(np.logical_and(ma[r0 - ra : r1 - ra, c0 - ca : c1 - ca],
                                   mb[r0 - rb : r1 - rb, c0 - cb : c1 - cb]).sum())
    area_a = int(ma.sum())
    union = area_a + int(mb.sum()) - inter
    return (inter / union if union else 0.0), (inter / area_a if area_a else 0.0)


def _full(piece: _Piece, shape: tuple[int, int]) -> np.ndarray:
    out = np.zeros(shape, bool)
    h, w = piece.crop.shape
    out[piece.r0 : piece.r0 + h, piece.c0 : piece.c0 + w] = piece.crop
    return out


def _instance(pieces: list[_Piece], votes: int = 1) -> InstanceMask:
    """Union of 2-D pieces as a sparse 3-D mask; with ``votes`` > 1, only the voxels that
    pieces of at least that many slice axes cover (fewer when fewer axes gave pieces)."""
    if not pieces:
        return InstanceMask.empty()
    boxes = []
    for p in pieces:
        h, w = p.crop.shape
        a = AXES.index(p.axis)
        lo = [p.r0, p.c0]
        hi = [p.r0 + h, p.c0 + w]
        lo.insert(a, p.index)
        hi.insert(a, p.index + 1)
        boxes.append((lo, hi))
    lo = np.min([b[0] for b in boxes], axis=0)
    hi = np.max([b[1] for b in boxes], axis=0)
    axes = sorted({p.axis for p in pieces})
    need = min(max(1, votes), len(axes))
    covered = np.zeros((len(axes) if need > 1 else 1, *(hi - lo)), bool)
    for p, (plo, phi) in zip(pieces, boxes, strict=True):
        sl = tuple(slice(plo[i] - lo[i], phi[i] - lo[i]) for i in range(3))
        view = covered[axes.index(p.axis) if need > 1 else 0][sl]
        a = AXES.index(p.axis)
        view |= np.expand_dims(p.crop, a)
    out = covered[0] if need == 1 else covered.sum(0, dtype=np.uint8) >= need
    return InstanceMask((int(lo[0]), int(lo[1]), int(lo[2])), out)  # votes: maybe not tight


def _check(volume: np.ndarray, points: np.ndarray) -> np.ndarray:
    if volume.ndim != 3:
        raise InputError(f"propagation needs a 3-D volume (z, y, x), got shape {volume.shape}")
    pts = np.asarray(points, dtype=np.float64)
    if pts.size == 0:
        return pts.reshape(0, 3)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise InputError(f"prompt points must be an (N, 3) z,y,x array, got shape {pts.shape}")
    if not np.all(np.isfinite(pts)):
        raise InputError("prompt points contain NaN or infinite coordinates; fix the point file")
    bad = outside_volume(pts, volume.shape)
    if bad.any():
        z, y, x = pts[np.flatnonzero(bad)[0]]
        raise InputError(
            f"prompt point x={x:g}, y={y:g}, z={z:g} lies outside the tomogram "
            f"(x<{volume.shape[2]}, y<{volume.shape[1]}, z<{volume.shape[0]}); "
            "check the point file's axis order and units (voxels)")
    return pts


def propagate(volume: np.ndarray, points: np.ndarray, segmenter: Segmenter,
              config: PropagationConfig | None = None, *,
              radius: float | None = None) -> PropagationResult:
    """Segment the particle under each (z, y, x) point in 3-D by cross-plane self-prompting.

    ``volume`` is the raw tomogram (normalised here, see the module docstring). Returns one
    sparse :class:`InstanceMask` per point, in order, a confidence per point (mean confidence
    of its accepted 2-D masks) and ``stats`` (encoder/decoder calls, slices visited, steps,
    stop reasons, time) for the run record. ``radius`` (voxels), the particles' expected size,
    caps every 2-D mask of a particle, the first three planes included, at
    ``SIZE_CAP_FACTOR * pi * radius^2`` (a leaking first mask then bounds nothing else).
    """
    cfg = config or PropagationConfig()
    t0 = time.perf_counter()
    volume = np.asarray(volume)
    pts = _check(volume, points)
    vol = normalise_volume(volume, cfg.clip_percentiles) if cfg.normalise else \
        np.asarray(volume, np.float32)  # normalise=False: the caller's [0, 1] volume (no copy)
    segmenter.set_volume(vol)
    before = {k: getattr(segmenter, k, 0) for k in COUNTERS}
    engine = _Engine(vol.shape, segmenter, cfg, radius)
    if cfg.batched:
        engine.run(list(range(len(pts))), pts, max_prompts=segmenter.max_batch)
    else:
        for i in track(range(len(pts)), "segmenting (one at a time)"):
            engine.run([i], pts, max_prompts=1, show=False)
    votes = VOTES if engine.membrane else 1
    instances = [_instance(engine.pieces.get(i, []), votes) for i in range(len(pts))]
    if engine.membrane:  # only the voted sheet joined to the click in 3-D, cropped
        instances = [InstanceMask(*attached(m.mask, m.offset, pts[i])) if m.n_voxels else m
                     for i, m in enumerate(instances)]
    conf = np.array([np.mean(engine.confs[i]) if engine.confs.get(i) else 0.0
                     for i in range(len(pts))], dtype=np.float32)
    visited = {a: len({k for (ax, k) in engine.visited if ax == a}) for a in AXES}
    stats = {
        "points": len(pts),
        **{k: getattr(segmenter, k, 0) - before[k] for k in COUNTERS},
        "cache_budget_mb": getattr(segmenter, "cache_budget_mb", None),
        "prompts": engine.prompts,  # one-call-per-particle-per-slice would make this many calls
        "slices_visited": visited,
        "distinct_slices_visited": len(engine.visited),
        "steps": engine.steps,
        "chain_lengths": {d: engine.lengths.get(d, 0) for d in cfg.directions},
        "stop_reasons": dict(sorted(engine.stops.items())),
        "batched": bool(cfg.batched),
        "segmenter": getattr(segmenter, "id", type(segmenter).__name__),
        "normalised": bool(cfg.normalise),
        "time_s": round(time.perf_counter() - t0, 4),
    }
    return PropagationResult(instances, conf, stats)


class _Engine:
    """The step-synchronous propagation state shared by batched and one-at-a-time runs."""

    def __init__(self, shape: tuple[int, ...], segmenter: Segmenter, cfg: PropagationConfig,
                 radius: float | None = None) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.seg = segmenter
        self.cfg = cfg
        self.membrane = cfg.target == "membrane"
        self.tol = max(0, int(cfg.membrane_tolerance)) if self.membrane else 0
        self.radius = float(radius) if radius and not self.membrane else None
        self.size_cap = (SIZE_CAP_FACTOR * np.pi * self.radius ** 2
                         if self.radius else np.inf)
        # particles: SAM keeps only candidates that overlap the previous slice's mask enough
        self.min_iou = None if self.membrane else float(cfg.iou_threshold)
        self.axes = [a for a in AXES if any(d[1] == a for d in cfg.directions)]
        self.pieces: dict[int, list[_Piece]] = {}
        self.confs: dict[int, list[float]] = {}
        self.visited: set[tuple[str, int]] = set()
        self.prompts = 0
        self.steps = 0
        self.lengths: dict[str, int] = {}
        self.stops: dict[str, int] = {}
        self.rejected: set[int] = set()  # prompts of the last call whose candidates all failed

    def _slice_shape(self, axis: str) -> tuple[int, int]:
        a = AXES.index(axis)
        rest = [s for i, s in enumerate(self.shape) if i != a]
        return rest[0], rest[1]

    def _call(self, prompts: list[tuple[str, int, np.ndarray, _Piece | None,
                                        np.ndarray | None, float]],
              max_prompts: int, what: str = ""
              ) -> list[tuple[np.ndarray, float, np.ndarray, np.ndarray | None]]:
        """Send prompts grouped by slice; at most ``max_prompts`` per segmenter call.
        ``what``: shown as the step's progress over the slices (the first masks of thousands
        of proposals take minutes)."""
        order = sorted(range(len(prompts)), key=lambda i: (prompts[i][0], prompts[i][1]))
        groups: dict[tuple[str, int], list[int]] = {}
        for i in order:
            groups.setdefault((prompts[i][0], prompts[i][1]), []).append(i)
        out: list = [None] * len(prompts)
        self.rejected = set()
        pending: list[tuple[PromptBatch, list[int]]] = []
        count = 0

        def flush() -> None:
            nonlocal pending, count
            if not pending:
                return
            results = self.seg.segment_batch([b for b, _ in pending])
            for (_, ids), res in zip(pending, results, strict=True):
                for k, i in enumerate(ids):
                    logits = None if res.logits is None else res.logits[k]
                    if res.rejected is not None and res.rejected[k]:
                        self.rejected.add(i)
                    out[i] = (res.masks[k], float(res.confidence[k]), res.points[k], logits)
            pending, count = [], 0

        for (axis, index), ids in track(list(groups.items()), what):
            shape = self._slice_shape(axis)
            for s in range(0, len(ids), max_prompts):
                part = ids[s : s + max_prompts]
                if count + len(part) > max_prompts:
                    flush()
                pts = np.stack([prompts[i][2] for i in part])
                prev = [prompts[i][3] for i in part]
                masks = None
                if all(p is not None for p in prev):
                    masks = np.stack([_full(p, shape) for p in prev])  # type: ignore[arg-type]
                lg = [prompts[i][4] for i in part]
                logits = np.stack(lg) if all(x is not None for x in lg) else None
                caps = np.array([prompts[i][5] for i in part], dtype=np.float64)
                pending.append((PromptBatch(axis, index, pts, masks, logits, caps,
                                            self.min_iou if masks is not None else None,
                                            self.radius), part))
                count += len(part)
                self.visited.add((axis, index))
            self.prompts += len(ids)
        flush()
        return out

    def _keep(self, i: int, piece: _Piece, conf: float) -> None:
        self.pieces.setdefault(i, []).append(piece)
        self.confs.setdefault(i, []).append(conf)

    def _stop(self, chain: _Chain, reason: str) -> None:
        chain.stop = reason
        self.stops[reason] = self.stops.get(reason, 0) + 1
        key = f"{'+' if chain.sign > 0 else '-'}{chain.axis}"
        self.lengths[key] = self.lengths.get(key, 0) + chain.steps

    def run(self, particles: list[int], pts: np.ndarray, max_prompts: int,
            show: bool = True) -> None:
        """Propagate ``particles`` (indices into ``pts``) to completion."""
        cfg = self.cfg
        fixed_cap = min(float(cfg.max_area) if cfg.max_area else np.inf, self.size_cap)
        first: list = []  # step 0: the three planes through each point
        for i in particles:
            for axis in self.axes:
                idx, rc = to_slice(pts[i : i + 1], axis)
                a = AXES.index(axis)
                index = int(np.clip(np.rint(idx[0]), 0, self.shape[a] - 1))
                first.append((axis, index, rc[0], None, None, fixed_cap))
        results = self._call(first, max_prompts, "first masks (slices)" if show else "")
        self.steps += 1
        starts: dict[int, dict[str, tuple[_Piece, np.ndarray, np.ndarray | None, float]]] = {}
        for (axis, index, *_), (mask, conf, point, logits), n in zip(
                first, results, np.repeat(particles, len(self.axes)), strict=True):
            crop = _crop2d(mask)
            if crop is not None:
                starts.setdefault(int(n), {})[axis] = (_Piece(axis, index, *crop), point,
                                                       logits, conf)
        chains: list[_Chain] = []
        for i in particles:
            got = starts.get(i, {})
            cap = fixed_cap
            if not self.membrane and cfg.max_area is None and got:
                areas = np.array([int(v[0].crop.sum()) for v in got.values()])
                ref = areas[areas <= FIRST_MASK_SPREAD * areas.min()].max()
                cap = min(float(cfg.area_factor) * float(ref), self.size_cap)
            if self.membrane and cfg.max_area is None:
                cap = np.inf
            for axis, (piece, point, logits, conf) in got.items():
                if piece.crop.sum() > cap:
                    continue  # an implausible (leaking) first mask: drop that plane
                self._keep(i, piece, conf)
                for d in cfg.directions:
                    if d[1] == axis:
                        chains.append(_Chain(i, axis, 1 if d[0] == "+" else -1, piece.index,
                                             piece, np.asarray(point, np.float64), logits, cap))
        for _ in track(self._steps(chains, max_prompts),
                       "propagating (chains ended)" if show else "", total=len(chains),
                       counts=int):
            pass
        if self.membrane:  # sheets: a second sweep across the slices the first one missed
            list(self._steps([c for i in particles if self.pieces.get(i)
                              for c in self._reseed(i, fixed_cap)], max_prompts))

    def _reseed(self, i: int, cap: float) -> list[_Chain]:
        """Membranes: chains along each axis whose slices covered too little of the sheet
        (see ``cross_sections``), both starting from the sheet's cross-section as a prompt."""
        pieces, found = self.pieces[i], _instance(self.pieces[i])
        done = {a: len({p.index for p in pieces if p.axis == a}) for a in self.axes}
        return [_Chain(i, axis, 1 if d[0] == "+" else -1, index - (d[0] == "+"),
                       _Piece(axis, index, r0, c0, crop), point, None, cap) for axis, index,
                r0, c0, crop, point in cross_sections(found.mask, found.offset, done)
                for d in self.cfg.directions if d[1] == axis]

    def _continues(self, prev: _Piece, new: _Piece) -> bool:
        """IoU(prev, new) >= ``iou_threshold``; membranes: of the masks dilated by the tolerance,
        or ``prev`` covered that much by ``new`` (the curve may lengthen, ``GROWTH``x at most)."""
        thr = self.cfg.iou_threshold
        iou, covered = _overlap2d(prev, new, self.tol)
        return iou >= thr or (self.membrane and covered >= thr
                              and new.crop.sum() <= GROWTH * prev.crop.sum())

    def _steps(self, chains: list[_Chain], max_prompts: int) -> Iterator[int]:
        """Grow every chain one slice a step until each has stopped; yields how many chains
        ended in each step (often 0: the progress of a long propagation)."""
        cfg = self.cfg
        active = list(chains)
        while active:
            before = len(active)
            live: list[_Chain] = []
            for ch in active:
                n = self.shape[AXES.index(ch.axis)]
                if not 0 <= ch.index + ch.sign < n:
                    self._stop(ch, "border")
                elif cfg.max_steps is not None and ch.steps >= cfg.max_steps:
                    self._stop(ch, "max_steps")
                else:
                    live.append(ch)
            if not live:
                yield before
                break
            prompts = [(ch.axis, ch.index + ch.sign, ch.point, ch.prev, ch.logits, ch.cap)
                       for ch in live]
            results = self._call(prompts, max_prompts)
            self.steps += 1
            active = []
            for j, (ch, (mask, conf, point, logits)) in enumerate(zip(live, results,
                                                                       strict=True)):
                crop = _crop2d(mask)
                if crop is None:  # no mask, or no candidate overlapped the previous one enough
                    self._stop(ch, "iou" if j in self.rejected else "empty")
                    continue
                piece = _Piece(ch.axis, ch.index + ch.sign, *crop)
                if piece.crop.sum() > ch.cap:
                    self._stop(ch, "area")
                    continue
                if not self._continues(ch.prev, piece):
                    self._stop(ch, "iou")
                    continue
                self._keep(ch.particle, piece, conf)
                ch.prev, ch.index, ch.steps = piece, piece.index, ch.steps + 1
                ch.point = np.asarray(point, np.float64)
                ch.logits = logits
                active.append(ch)
            yield before - len(active)
