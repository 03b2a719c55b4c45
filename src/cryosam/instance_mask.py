"""One particle's 3-D mask, stored as a bool crop and its offset: what propagation makes and
the score, the merge and saved queries read (a tomogram-sized mask per particle would not fit).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class InstanceMask:
    """A sparse 3-D mask: a bool crop ``mask`` whose [0, 0, 0] sits at voxel ``offset``."""

    offset: tuple[int, int, int]
    mask: np.ndarray

    @classmethod
    def empty(cls) -> InstanceMask:
        """A mask with no voxels: a (0, 0, 0) crop at the origin."""
        return cls((0, 0, 0), np.zeros((0, 0, 0), bool))

    @classmethod
    def from_dense(cls, dense: np.ndarray) -> InstanceMask:
        """Crop a full-size bool volume to its bounding box."""
        coords = np.argwhere(dense)
        if coords.size == 0:
            return cls.empty()
        lo, hi = coords.min(0), coords.max(0) + 1
        crop = dense[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].astype(bool)
        return cls((int(lo[0]), int(lo[1]), int(lo[2])), crop)

    @property
    def n_voxels(self) -> int:
        """How many voxels the mask holds (0 for an empty one)."""
        return int(self.mask.sum())

    @property
    def bbox(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """((z0, y0, x0), (z1, y1, x1)), end exclusive."""
        z0, y0, x0 = self.offset
        dz, dy, dx = self.mask.shape
        return (z0, y0, x0), (z0 + dz, y0 + dy, x0 + dx)

    def coords(self) -> np.ndarray:
        """(n, 3) voxel indices (z, y, x) of the mask."""
        return np.argwhere(self.mask) + np.asarray(self.offset, dtype=np.int64)

    def centroid(self) -> np.ndarray:
        """Mean voxel position (z, y, x); NaN for an empty mask."""
        if self.n_voxels == 0:
            return np.full(3, np.nan)
        return self.coords().mean(0)

    def paste(self, into: np.ndarray, value: int | float | bool = True) -> None:
        """Write ``value`` into ``into`` (a full volume) wherever the mask is set (clipped)."""
        lo = np.asarray(self.offset)
        hi = lo + np.asarray(self.mask.shape)
        a = np.maximum(lo, 0)
        b = np.minimum(hi, into.shape)
        if np.any(b <= a):
            return
        crop = self.mask[a[0] - lo[0] : b[0] - lo[0], a[1] - lo[1] : b[1] - lo[1],
                         a[2] - lo[2] : b[2] - lo[2]]
        into[a[0] : b[0], a[1] : b[1], a[2] : b[2]][crop] = value

    def to_dense(self, shape: tuple[int, int, int]) -> np.ndarray:
        """The mask as a full bool volume of ``shape`` (z, y, x), clipped to it."""
        out = np.zeros(shape, bool)
        self.paste(out, True)
        return out

    def union(self, other: InstanceMask) -> InstanceMask:
        """The voxels of either mask, as one sparse mask."""
        if not other.n_voxels:
            return self
        if not self.n_voxels:
            return other
        (a0, a1), (b0, b1) = self.bbox, other.bbox
        lo, hi = np.minimum(a0, b0), np.maximum(a1, b1)
        out = np.zeros(tuple(int(v) for v in hi - lo), dtype=bool)
        for m, start in ((self, np.subtract(a0, lo)), (other, np.subtract(b0, lo))):
            z, y, x = (int(v) for v in start)
            dz, dy, dx = m.mask.shape
            out[z:z + dz, y:y + dy, x:x + dx] |= m.mask
        return InstanceMask(tuple(int(v) for v in lo), out)

    def iou(self, other: InstanceMask) -> float:
        """Intersection over union of two sparse masks (0 when both are empty)."""
        inter = 0
        (a0, a1), (b0, b1) = self.bbox, other.bbox
        lo = np.maximum(a0, b0)
        hi = np.minimum(a1, b1)
        if np.all(hi > lo) and self.n_voxels and other.n_voxels:
            sa = tuple(slice(lo[i] - a0[i], hi[i] - a0[i]) for i in range(3))
            sb = tuple(slice(lo[i] - b0[i], hi[i] - b0[i]) for i in range(3))
            inter = int(np.logical_and(self.mask[sa], other.mask[sb]).sum())
        union = self.n_voxels + other.n_voxels - inter
        return inter / union if union else 0.0
