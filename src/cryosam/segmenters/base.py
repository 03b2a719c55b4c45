"""The 2-D promptable segmenter protocol, and what every backend shares.

A segmenter segments one slice of one axis of a tomogram: ``z`` slices are YX planes, ``y``
slices ZX planes and ``x`` slices ZY planes, so a slice pixel (row, col) is (y, x), (z, x) or
(z, y) respectively. Prompts are points in slice pixels (pixel centres at integer indices),
optionally with the previous slice's mask (and, for SAM, its low-resolution logits). The
per-slice work that does not depend on prompts (SAM's image embedding, the weight-free
backend's denoised slice) is computed once per (axis, index) and cached within a memory budget.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from cryosam.device import cache_budget_mb
from cryosam.errors import InputError
from cryosam.utils import AXES, volume_hash


def axis_number(axis: str) -> int:
    """0, 1, 2 for ``z``, ``y``, ``x``."""
    try:
        return AXES.index(axis)
    except ValueError:
        raise InputError(f"axis {axis!r} is not one of z, y, x") from None


def slice_of(volume: np.ndarray, axis: str, index: int) -> np.ndarray:
    """The 2-D slice ``index`` of ``volume`` (z, y, x) perpendicular to ``axis`` (a view)."""
    a = axis_number(axis)
    return volume[(slice(None),) * a + (int(index),)]


def slice_shape(shape: Sequence[int], axis: str) -> tuple[int, int]:
    """(rows, cols) of a slice perpendicular to ``axis`` in a volume of ``shape``."""
    a = axis_number(axis)
    rest = [int(s) for i, s in enumerate(shape) if i != a]
    return rest[0], rest[1]


def to_slice(zyx: np.ndarray, axis: str) -> tuple[np.ndarray, np.ndarray]:
    """Split (N, 3) zyx coordinates into (slice index along ``axis``, (N, 2) row/col)."""
    zyx = np.asarray(zyx, dtype=np.float64).reshape(-1, 3)
    a = axis_number(axis)
    keep = [i for i in range(3) if i != a]
    return zyx[:, a], zyx[:, keep]


def to_volume(index: np.ndarray | float, rc: np.ndarray, axis: str) -> np.ndarray:
    """Inverse of :func:`to_slice`: (N, 3) zyx from slice index and (N, 2) row/col."""
    rc = np.asarray(rc, dtype=np.float64).reshape(-1, 2)
    out = np.empty((rc.shape[0], 3), dtype=np.float64)
    a = axis_number(axis)
    keep = [i for i in range(3) if i != a]
    out[:, a] = index
    out[:, keep] = rc
    return out


@dataclass
class SegmentResult:
    """Masks for a batch of prompts on one slice, and what the next slice needs.

    ``masks`` (P, h, w) bool in slice pixels; ``confidence`` (P,) in [0, 1] (0 for an empty
    mask); ``points`` (P, 2) the most confident point of each mask in slice pixels (row, col),
    the next slice's point prompt; ``logits`` (P, L, L) low-resolution mask logits in the
    segmenter's own frame (SAM) to prompt the next slice with, or None.
    """

    masks: np.ndarray
    confidence: np.ndarray
    points: np.ndarray
    logits: np.ndarray | None = None
    rejected: np.ndarray | None = None  # (P,) bool: every candidate failed ``min_iou``


@dataclass
class PromptBatch:
    """Every prompt on one slice: points (P, 2) row/col, optional previous masks/logits and a
    per-prompt area cap in slice pixels (``inf`` or None: no cap). ``min_iou``: a segmenter
    that proposes several candidate masks keeps only those whose IoU with ``prev_masks`` is at
    least this, and returns an empty mask when none is left (the chain then stops). ``radius``:
the particle's expected radius (from the clicks' probe), a hint a segmenter may use to find
the particle around a point that falls in its hollow centre."""

    axis: str
    index: int
    points: np.ndarray
    prev_masks: np.ndarray | None = None
    prev_logits: np.ndarray | None = None
    max_area: np.ndarray | None = None
    min_iou: float | None = None
    radius: float | None = None  # the particle's expected radius in pixels (None: unknown)

    def __len__(self) -> int:
        return int(np.asarray(self.points).reshape(-1, 2).shape[0])


# the Segmenter counters a run records (the work done, the encodings dropped for the budget;
# a segmenter without one counts 0)
COUNTERS = ("encoder_calls", "decoder_calls", "slices_encoded", "cache_evictions")


@runtime_checkable
class Segmenter(Protocol):
    """A 2-D promptable segmenter of tomogram slices (SAM or the weight-free baseline).

    ``encoder_calls`` counts per-slice encoding passes (batches), ``slices_encoded`` the slices
    they covered, ``decoder_calls`` prompt-decoding passes (SAM: one mask-decoder forward for a
    whole batch of prompts; weight-free: one per slice request). ``max_batch`` is how many
    prompts one decoder pass takes; callers group requests up to it. Segmenters built on
    :class:`SliceSegmenterBase` also report ``cache_evictions`` and ``cache_budget_mb``.
    """

    id: str
    encoder_calls: int
    decoder_calls: int
    slices_encoded: int
    max_batch: int

    def set_volume(self, volume: np.ndarray) -> None:
        """Use ``volume`` (z, y, x), normalised to [0, 1], as the source of slices; clears
        the cache."""
        ...

    def set_slice(self, axis: str, index: int, image: np.ndarray) -> None:
        """Register one 2-D slice image in [0, 1] under (axis, index) (e.g. a single image)."""
        ...

    def prepare(self, keys: Sequence[tuple[str, int]]) -> None:
        """Compute (batched) the per-slice encodings of ``keys`` that are not cached yet."""
        ...

    def segment(
        self,
        axis: str,
        index: int,
        points: np.ndarray,
        prev_masks: np.ndarray | None = None,
        prev_logits: np.ndarray | None = None,
        max_area: np.ndarray | None = None,
    ) -> SegmentResult:
        """Segment every prompt on one slice in one decoder pass."""
        ...

    def segment_batch(self, batches: Sequence[PromptBatch]) -> list[SegmentResult]:
        """Segment the prompts of several slices; one result per batch, in order."""
        ...


class ByteLRU:
    """An LRU mapping bounded by total bytes (per-slice encodings within a memory budget).

    ``budget_bytes`` may be a function, asked once, at the first :meth:`put` or read of
    :attr:`budget`: a budget taken from the memory free when the cache starts filling."""

    def __init__(self, budget_bytes: int | Callable[[], int]) -> None:
        self._budget = budget_bytes
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self.nbytes = 0
        self.evictions = 0

    @property
    def budget(self) -> int:
        """The budget in bytes (0 at least); a budget function is called here, once."""
        if callable(self._budget):
            self._budget = self._budget()
        return max(0, int(self._budget))

    def __contains__(self, key: Any) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Any) -> Any | None:
        """The value under ``key``, which becomes the most recently used, or None."""
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: Any, value: Any, nbytes: int) -> None:
        """Store ``value`` (``nbytes``) under ``key``, then evict the least recently used items
        until within the budget; the newest stays even if it alone exceeds it."""
        if key in self._items:
            self.nbytes -= self._items.pop(key)[1]
        self._items[key] = (value, int(nbytes))
        self.nbytes += int(nbytes)
        while self.nbytes > self.budget and len(self._items) > 1:
            _, (_, size) = self._items.popitem(last=False)
            self.nbytes -= size
            self.evictions += 1

    def discard(self, key: Any) -> None:
        """Drop ``key`` if present (not counted as an eviction)."""
        item = self._items.pop(key, None)
        if item is not None:
            self.nbytes -= item[1]

    def clear(self) -> None:
        """Drop every item (not counted as evictions)."""
        self._items.clear()
        self.nbytes = 0


class SliceSegmenterBase:
    """Slice storage, the encoding cache and the counters shared by the backends.

    Subclasses implement ``_encode(axis, indices) -> list`` (one encoding per index, with
    ``_nbytes(enc)``) and ``segment_batch``.
    """

    id: str = "base"
    max_batch: int = 64
    encode_batch: int = 8

    def __init__(self, cache_mb: int | None, cache_device: str | torch.device = "cpu") -> None:
        self.encoder_calls = 0
        self.decoder_calls = 0
        self.slices_encoded = 0
        self._volume: np.ndarray | None = None
        self._digest: str | None = None  # content hash of _volume, once needed
        self._images: dict[tuple[str, int], np.ndarray] = {}
        # sized at the first encoding, when the other models of the run are loaded too
        self._cache = ByteLRU(lambda: cache_budget_mb(torch.device(cache_device), cache_mb)
                              * 2**20)

    @property
    def cache_budget_mb(self) -> int:
        """The encoding cache's budget in MiB (``embedding_cache_mb``; None: automatic, see
        :func:`cryosam.device.cache_budget_mb`), fixed at the first encoding."""
        return self._cache.budget // 2**20

    # -- slices ---------------------------------------------------------------------------
    def set_volume(self, volume: np.ndarray) -> None:
        """Segment slices of ``volume`` from now on (it must not change while in use). The
        cached encodings are kept when it is the current volume or holds the same voxels (the
        clicks and then the proposals of one query, or a second query on the same tomogram;
        compared by hash), and dropped otherwise."""
        volume = np.asarray(volume)
        if volume.ndim != 3:
            raise InputError(f"segmenter volume must be 3-D (z, y, x), got shape {volume.shape}")
        same, digest = False, None
        if self._volume is not None and volume is self._volume:
            same, digest = True, self._digest
        elif (self._volume is not None and volume.shape == self._volume.shape
              and volume.dtype == self._volume.dtype):
            if self._digest is None:
                self._digest = volume_hash(self._volume)
            digest = volume_hash(volume)
            same = digest == self._digest
        self._volume, self._digest = volume, digest
        if not same:
            self._images.clear()
            self._cache.clear()

    def set_slice(self, axis: str, index: int, image: np.ndarray) -> None:
        """Use ``image`` (2-D, in [0, 1]) as slice (axis, index), before the volume's own;
        its cached encoding, if any, is dropped."""
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 2:
            raise InputError(f"slice image must be 2-D, got shape {image.shape}")
        key = (axis, int(index))
        self._images[key] = image
        self._cache.discard(key)

    def image(self, axis: str, index: int) -> np.ndarray:
        """The slice image in [0, 1] (float32)."""
        key = (axis, int(index))
        if key in self._images:
            return self._images[key]
        if self._volume is None:
            raise InputError(f"no image for slice {axis}={index}: call set_volume or set_slice")
        return np.asarray(slice_of(self._volume, axis, index), dtype=np.float32)

    def image_shape(self, axis: str, index: int) -> tuple[int, int]:
        """(rows, cols) of slice (axis, index) from the shapes alone (``prepare`` groups by it)."""
        key = (axis, int(index))
        if key in self._images:
            return self._images[key].shape  # type: ignore[return-value]
        if self._volume is None:
            raise InputError(f"no image for slice {axis}={index}: call set_volume or set_slice")
        return slice_shape(self._volume.shape, axis)

    # -- encodings ------------------------------------------------------------------------
    def _encode(self, axis: str, indices: list[int]) -> list[Any]:  # pragma: no cover
        raise NotImplementedError

    def _nbytes(self, encoding: Any) -> int:  # pragma: no cover
        raise NotImplementedError

    def prepare(self, keys: Sequence[tuple[str, int]]) -> None:
        """Encode the slices of ``keys`` not cached yet, ``encode_batch`` at a time per axis
        and slice shape, and cache them (counted in ``encoder_calls`` and ``slices_encoded``)."""
        missing: dict[tuple[str, tuple[int, int]], list[int]] = {}
        seen: set[tuple[str, int]] = set()
        for axis, index in keys:
            key = (axis, int(index))
            if key in self._cache or key in seen:
                continue
            seen.add(key)
            # slices of one axis (and shape) are encoded together
            missing.setdefault((axis, self.image_shape(axis, index)), []).append(int(index))
        for (axis, _), indices in missing.items():
            for start in range(0, len(indices), max(1, self.encode_batch)):
                chunk = indices[start : start + max(1, self.encode_batch)]
                encodings = self._encode(axis, chunk)
                self.encoder_calls += 1
                self.slices_encoded += len(chunk)
                for index, enc in zip(chunk, encodings, strict=True):
                    self._cache.put((axis, index), enc, self._nbytes(enc))

    def encoding(self, axis: str, index: int) -> Any:
        """The cached encoding of a slice, computing it if needed."""
        enc = self._cache.get((axis, int(index)))
        if enc is None:
            self.prepare([(axis, int(index))])
            enc = self._cache.get((axis, int(index)))
            if enc is None:  # budget smaller than one slice: encode without caching
                enc = self._encode(axis, [int(index)])[0]
        return enc

    # -- prompts --------------------------------------------------------------------------
    def segment_batch(self, batches: Sequence[PromptBatch]) -> list[SegmentResult]:
        """Segment the prompts of several slices, one result per batch in order (each backend's)."""
        raise NotImplementedError  # pragma: no cover

    def segment(
        self,
        axis: str,
        index: int,
        points: np.ndarray,
        prev_masks: np.ndarray | None = None,
        prev_logits: np.ndarray | None = None,
        max_area: np.ndarray | None = None,
    ) -> SegmentResult:
        """Every prompt on one slice as one :class:`PromptBatch` (no ``min_iou``, no radius)."""
        batch = PromptBatch(axis, int(index), np.asarray(points, dtype=np.float64).reshape(-1, 2),
                            prev_masks, prev_logits, max_area)
        return self.segment_batch([batch])[0]

    @property
    def cache_evictions(self) -> int:
        """Encodings dropped for the budget so far (each is encoded again when needed)."""
        return self._cache.evictions


def caps_of(batch: PromptBatch) -> np.ndarray:
    """The per-prompt area caps of a batch as floats (``inf`` = none)."""
    n = len(batch)
    if batch.max_area is None:
        return np.full(n, np.inf)
    caps = np.asarray(batch.max_area, dtype=np.float64).reshape(-1)
    if caps.size == 1 and n != 1:
        caps = np.full(n, caps[0])
    return np.where(np.isfinite(caps) & (caps > 0), caps, np.inf)


def empty_result(n: int, shape: tuple[int, int]) -> SegmentResult:
    """A result with ``n`` empty masks of ``shape``."""
    return SegmentResult(np.zeros((n, *shape), bool), np.zeros(n, np.float32),
                         np.full((n, 2), np.nan, np.float32), None)
