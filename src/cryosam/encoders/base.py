"""The slice-encoder contract and the geometry helpers every encoder shares.

An encoder turns a batch of 2-D slices into patch-grid feature maps. The grid covers the slice
exactly: along a slice side of extent ``A`` voxels mapped to ``a`` cells, cell ``i`` is centred
at voxel ``(i + 0.5) * A / a - 0.5``. :class:`cryosam.features.FeatureVolume` relies on that.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class SliceEncoder(Protocol):
    """Turns (B, H, W) normalised slices into (B, h, w, C) patch-grid maps.

    ``id`` names the model and its weights (hash) and every option that changes the output, so
    that caches and run records can tell encoders apart.
    """

    id: str
    patch_size: int
    channels: int

    def grid_shape(self, height: int, width: int) -> tuple[int, int]:
        """Patch-grid size (h, w) of the map of a ``height`` x ``width`` slice."""
        ...

    def encode(self, slices: np.ndarray) -> torch.Tensor:
        """Encode a (B, H, W) float32 batch normalised to [0, 1] per tomogram.

        Returns (B, h, w, C) maps (fp16) on the encoder's device, ``(h, w) = grid_shape(H, W)``.
        """
        ...


def grid_for_long_side(height: int, width: int, patches_long_side: int) -> tuple[int, int]:
    """Grid whose long side has ``patches_long_side`` cells and whose short side keeps the
    slice's aspect ratio, rounded to a whole number of cells (at least one)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"slice size must be positive, got {height}x{width}")
    n = int(patches_long_side)
    if height >= width:
        return n, max(1, round(n * width / height))
    return max(1, round(n * height / width)), n


def voxels_per_patch(encoder: SliceEncoder, height: int, width: int) -> tuple[float, float]:
    """How many voxels one map cell spans along each side of a ``height`` x ``width`` slice.

    The pipeline records it (the scale the model saw) in the run record.
    """
    gh, gw = encoder.grid_shape(height, width)
    return height / gh, width / gw


def aspect_change(encoder: SliceEncoder, height: int, width: int) -> float:
    """Relative change of aspect ratio caused by rounding the short side to whole patches."""
    gh, gw = encoder.grid_shape(height, width)
    return (gh / gw) / (height / width) - 1.0


def as_batch(slices: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Check a (B, H, W) batch and put it on ``device`` as float32."""
    if slices.ndim != 3:
        raise ValueError(f"expected a (B, H, W) batch of slices, got shape {tuple(slices.shape)}")
    if isinstance(slices, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))
    else:
        tensor = slices.float()
    return tensor.to(device)
