"""A weight-free slice encoder: multi-scale, rotation-invariant filter responses.

For every scale sigma the filter bank computes, on each slice,

- the Gaussian-smoothed intensity,
- the scale-normalised gradient magnitude ``sigma * |grad G|``,
- the two scale-normalised Hessian eigenvalues ``sigma^2 * l1 >= sigma^2 * l2`` (their sum is
  the Laplacian of Gaussian; blobs give two strong eigenvalues of one sign, rods one),
- the local standard deviation in a Gaussian window.

All are invariant to in-plane rotation. They are averaged over ``patch_size`` x ``patch_size``
voxel patches and standardised per slice and channel (zero mean, unit variance: what cosine
matching needs), giving maps on the same patch-grid contract as DINOv2. It is the offline/CPU
baseline: it separates particles by size and shape, not by identity. The default scales suit
particles of radius ~2-8 voxels (bin the tomogram, or scale ``sigmas``, for bigger ones).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cryosam.encoders.base import as_batch
from cryosam.errors import CryosamError

RESPONSES = ("smooth", "gradient", "hessian_max", "hessian_min", "local_std")


def _gaussian_kernel(sigma: float, device: torch.device) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of (B, 1, H, W) images, borders replicated."""
    kernel = _gaussian_kernel(sigma, images.device)
    r = kernel.numel() // 2
    out = F.conv2d(F.pad(images, (0, 0, r, r), mode="replicate"), kernel.view(1, 1, -1, 1))
    return F.conv2d(F.pad(out, (r, r, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))


def _derivatives(images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Central first and second differences (dy, dx, dyy, dxx, dxy) of (B, 1, H, W)."""
    p = F.pad(images, (1, 1, 1, 1), mode="replicate")
    c = p[..., 1:-1, 1:-1]
    up, down = p[..., :-2, 1:-1], p[..., 2:, 1:-1]
    left, right = p[..., 1:-1, :-2], p[..., 1:-1, 2:]
    dy, dx = 0.5 * (down - up), 0.5 * (right - left)
    dyy, dxx = down - 2 * c + up, right - 2 * c + left
    dxy = 0.25 * (p[..., 2:, 2:] - p[..., 2:, :-2] - p[..., :-2, 2:] + p[..., :-2, :-2])
    return dy, dx, dyy, dxx, dxy


class FilterBankEncoder:
    """Multi-scale filter responses pooled to ``patch_size``-voxel patches."""

    def __init__(
        self,
        *,
        patch_size: int = 2,
        sigmas: Sequence[float] = (1.5, 3.0, 4.5, 6.5),
        device: torch.device | str = "cpu",
    ) -> None:
        if int(patch_size) < 1:
            raise CryosamError(f"filter bank patch size {patch_size}: must be at least 1 voxel")
        if not sigmas or min(sigmas) <= 0:
            raise CryosamError(f"filter bank sigmas {tuple(sigmas)}: need one or more > 0")
        self.patch_size = int(patch_size)
        self.sigmas = tuple(float(s) for s in sigmas)
        self.channels = len(RESPONSES) * len(self.sigmas)
        self.device = torch.device(device)

    @property
    def id(self) -> str:  # noqa: A003 - the protocol's name
        """Version, patch size and scales: everything that changes the maps."""
        return f"filterbank:v1:p{self.patch_size}:s{','.join(f'{s:g}' for s in self.sigmas)}"

    @property
    def channel_names(self) -> list[str]:
        """``<response>@<sigma>`` for every channel, in order."""
        return [f"{r}@{s:g}" for s in self.sigmas for r in RESPONSES]

    def grid_shape(self, height: int, width: int) -> tuple[int, int]:
        """One cell per ``patch_size`` voxels (rounded; the grid covers the slice exactly)."""
        return (max(1, round(height / self.patch_size)), max(1, round(width / self.patch_size)))

    def responses(self, batch: torch.Tensor, pool: int = 1) -> torch.Tensor:
        """(B, H, W) -> (B, C, H/pool, W/pool) filter responses, averaged over ``pool`` x
        ``pool`` patches and standardised per slice and channel."""
        images = batch[:, None].float()
        n = images.shape[0]
        maps = []
        for sigma in self.sigmas:
            both = gaussian_blur(torch.cat([images, images * images]), sigma)
            smooth, smooth_sq = both[:n], both[n:]
            dy, dx, dyy, dxx, dxy = _derivatives(smooth)
            s2 = sigma * sigma
            half_trace = 0.5 * (dyy + dxx)
            root = torch.sqrt(0.25 * (dyy - dxx) ** 2 + dxy * dxy)
            responses = (smooth, sigma * torch.sqrt(dy * dy + dx * dx), s2 * (half_trace + root),
                         s2 * (half_trace - root), torch.sqrt((smooth_sq - smooth * smooth)
                                                              .clamp_min(0.0)))
            maps += [F.avg_pool2d(r, pool) if pool > 1 else r for r in responses]
        out = torch.cat(maps, dim=1)
        mean = out.mean(dim=(2, 3), keepdim=True)
        std = out.std(dim=(2, 3), keepdim=True) if out[0, 0].numel() > 1 else torch.ones_like(mean)
        return (out - mean) / (std + 1e-6)

    def encode(self, slices: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, H, W) normalised slices -> (B, h, w, C) fp16 patch-averaged responses.

        A slice whose sides are not multiples of the patch size is first resized (by less
        than half a patch) so that the grid covers it exactly.
        """
        batch = as_batch(slices, self.device)
        gh, gw = self.grid_shape(batch.shape[1], batch.shape[2])
        p = self.patch_size
        with torch.inference_mode():
            if tuple(batch.shape[1:]) != (gh * p, gw * p):
                batch = F.interpolate(batch[:, None], size=(gh * p, gw * p), mode="bilinear",
                                      align_corners=False)[:, 0]
            out = self.responses(batch, pool=p)
            return out.permute(0, 2, 3, 1).contiguous().to(torch.float16)
