"""Internal binning: work on a block-averaged copy of a tomogram whose particles are large
in voxels, and map every result back onto the input's voxel grid exactly.

Binned voxel ``j`` covers input voxels ``[j*b, (j+1)*b)``, so a point at input coordinate ``x``
sits at binned coordinate ``(x + 0.5) / b - 0.5``. Volumes are padded at the far edges by
repeating the last voxels, and upsampled labels are cropped back to the input's shape.
"""

from __future__ import annotations

import numpy as np

from cryosam.instance_mask import InstanceMask


def bin_volume(volume: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor``-voxel blocks (float32); the identity for ``factor`` 1."""
    if factor == 1:
        return volume
    b = int(factor)
    pad = [(0, (-s) % b) for s in volume.shape]
    v = np.pad(volume, pad, mode="edge") if any(p[1] for p in pad) else volume
    d, h, w = (s // b for s in v.shape)
    out = np.zeros((d, h, w), dtype=np.float32)
    for z in range(d):  # slab by slab: no full-size float64 temporary
        slab = v[z * b:(z + 1) * b].reshape(b, h, b, w, b)
        out[z] = slab.mean(axis=(0, 2, 4), dtype=np.float32)
    return out


def to_binned(zyx: np.ndarray, factor: int) -> np.ndarray:
    """Input voxel coordinates → binned ones."""
    return (np.asarray(zyx, dtype=np.float64) + 0.5) / factor - 0.5


def from_binned(zyx: np.ndarray, factor: int) -> np.ndarray:
    """Binned voxel coordinates → input ones."""
    return (np.asarray(zyx, dtype=np.float64) + 0.5) * factor - 0.5


def upsample_mask(mask: InstanceMask, factor: int, shape: tuple[int, ...]) -> InstanceMask:
    """A binned sparse mask on the input grid (each voxel becomes a block), cropped to
    ``shape``."""
    if factor == 1 or mask.n_voxels == 0:
        return mask
    b = int(factor)
    crop = mask.mask
    for axis in range(3):
        crop = np.repeat(crop, b, axis=axis)
    offset = [int(o) * b for o in mask.offset]
    stop = [min(o + s, int(n)) for o, s, n in zip(offset, crop.shape, shape, strict=True)]
    crop = crop[tuple(slice(0, e - o) for o, e in zip(offset, stop, strict=True))]
    return InstanceMask((offset[0], offset[1], offset[2]), crop)


def upsample_labels(labels: np.ndarray, factor: int, shape: tuple[int, ...]) -> np.ndarray:
    """A binned label volume on the input grid (nearest), cropped to ``shape``."""
    if factor == 1:
        return labels
    out = labels
    for axis in range(3):
        out = np.repeat(out, factor, axis=axis)
    return np.ascontiguousarray(out[: shape[0], : shape[1], : shape[2]])
