"""A weight-free slice encoder: scale-selective, rotation-invariant blob and line codes.

Cosine matching needs features whose *direction* says what a structure is, not merely that it
is dark: a map of smoothed intensities or Laplacians points every dark thing (and every dark
noise clump) the same way. So each patch-grid cell gets a *population code* of the structure
centred on it:

1. the scale-normalised Laplacian of Gaussian ``sigma^2 * (Ixx + Iyy)`` at every scale of
   ``sigmas`` (one FFT of the slice, every scale computed from it);
2. its peak over scale, located to a fraction of a scale step: the structure's size
   (a dark disk of radius ``R`` peaks near ``sigma = R / sqrt(2)``);
3. the peak's strength above the slice's noise (median absolute deviation of that scale's
   response, times ``threshold``): weak noise clumps get no code at all;
4. its isotropy ``lambda_min / lambda_max`` of the Hessian at the peak scale (1 for a disk,
   0 for a line or a membrane seen edge-on);
5. strength x tuning curve over scale (Gaussian in log2 sigma, ``TUNING_OCTAVES`` wide) x
   tuning curve over isotropy (blob, oblong, line for dark structures; blob, line for bright
   ones), so that structures of a different size or shape land in different channels.

Each channel is then standardised per slice (background cells share one point, away from any
code) and each cell's vector is softly scaled to unit length, so that the three planes of a
voxel weigh alike: a particle that looks right in one plane only (a filament seen end-on)
scores lower than one that looks right in all three. Everything is invariant to in-plane
rotation and to affine intensity changes.

Channels: 5 per scale (``channel_names``). Scales should be spaced by at most half an octave;
the defaults suit dark particles of radius ~2-12 voxels (bin the tomogram, or scale
``sigmas``, for bigger ones).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from cryosam.encoders.base import as_batch
from cryosam.errors import CryosamError

if TYPE_CHECKING:
    from cryosam.backends import FilterBankOptions
    from cryosam.config import EncoderConfig

VERSION = "v2"
DEFAULT_SIGMAS = (1.0, 1.41, 2.0, 2.83, 4.0, 5.66, 8.0, 11.3)  # half-octave steps, voxels
RESPONSES = ("dark_blob", "dark_oblong", "dark_line", "bright_blob", "bright_line")
DARK_ISO_BINS = 3  # isotropy tuning curves of dark structures: blob, oblong, line
BRIGHT_ISO_BINS = 2  # of bright structures: blob, line
TUNING_OCTAVES = 0.22  # width of the scale tuning curves (at least 0.4 x the scale step)
THRESHOLD = 4.0  # a peak counts from this many noise deviations of its scale's response
SOFT_NORM = 3.0  # cell vectors are divided by (norm + SOFT_NORM), in standardised units
MAD_TO_STD = 1.4826


def _median_pad(images: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    """Pad (B, 1, H, W) images with each image's median: no mirrored copies of particles."""
    med = images.flatten(1).median(dim=1).values.view(-1, 1, 1, 1)
    return F.pad(images - med, (pad_w, pad_w, pad_h, pad_h)) + med


def _tuning(value: torch.Tensor, centres: torch.Tensor, width: float) -> torch.Tensor:
    """Gaussian tuning curves: (B, h, w) values -> (B, len(centres), h, w)."""
    diff = value[:, None] - centres.view(1, -1, 1, 1)
    return torch.exp(-0.5 * (diff / width) ** 2)


class FilterBankEncoder:
    """Scale- and shape-tuned codes of the structure at every ``patch_size``-voxel patch."""

    def __init__(
        self,
        *,
        patch_size: int = 2,
        sigmas: Sequence[float] = DEFAULT_SIGMAS,
        device: torch.device | str = "cpu",
    ) -> None:
        if int(patch_size) < 1:
            raise CryosamError(f"filter bank patch size {patch_size}: must be at least 1 voxel")
        if not sigmas or min(sigmas) <= 0:
            raise CryosamError(f"filter bank sigmas {tuple(sigmas)}: need one or more > 0")
        self.patch_size = int(patch_size)
        self.sigmas = tuple(sorted({float(s) for s in sigmas}))
        self.channels = len(RESPONSES) * len(self.sigmas)
        self.device = torch.device(device)
        logs = np.log2(self.sigmas)
        step = float(np.mean(np.diff(logs))) if len(logs) > 1 else 1.0
        self.tuning_octaves = max(TUNING_OCTAVES, 0.4 * step)

    @classmethod
    def from_config(cls, cfg: EncoderConfig, device: torch.device) -> FilterBankEncoder:
        """The registry's builder: patch size and scales from ``cfg.options``."""
        options: FilterBankOptions = cfg.options
        return cls(patch_size=options.patch, sigmas=options.sigmas, device=device)

    @staticmethod
    def geometry_from_options(
        options: FilterBankOptions,
    ) -> tuple[Callable[[int, int], tuple[int, int]], int]:
        """(grid_shape, channels) without building the bank: for memory estimates."""
        fb = FilterBankEncoder(patch_size=options.patch, sigmas=options.sigmas)
        return fb.grid_shape, fb.channels

    @property
    def id(self) -> str:  # noqa: A003 - the protocol's name
        """Version, patch size and scales: everything that changes the maps."""
        return (f"filterbank:{VERSION}:p{self.patch_size}:"
                f"s{','.join(f'{s:g}' for s in self.sigmas)}")

    @property
    def channel_names(self) -> list[str]:
        """``<response>@<sigma>`` for every channel, in order."""
        return [f"{r}@{s:g}" for s in self.sigmas for r in RESPONSES]

    def grid_shape(self, height: int, width: int) -> tuple[int, int]:
        """One cell per ``patch_size`` voxels (rounded; the grid covers the slice exactly)."""
        return (max(1, round(height / self.patch_size)), max(1, round(width / self.patch_size)))

    # ----------------------------------------------------------------------- filtering

    def hessians(self, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, h, w) patch-averaged slices -> scale-normalised Laplacian and Hessian anisotropy
        ``sigma^2 * |lambda_1 - lambda_2|``, each (B, K, h, w), from one FFT per slice."""
        b, h, w = cells.shape
        cell_sigmas = [s / self.patch_size for s in self.sigmas]  # in cells
        reach = int(math.ceil(3.0 * max(cell_sigmas))) + 1
        # odd padded sizes: no Nyquist frequency, so the operators are exactly symmetric
        hh, ww = h + 2 * reach, w + 2 * reach
        extra_h, extra_w = 1 - hh % 2, 1 - ww % 2
        padded = _median_pad(cells[:, None], reach, reach)
        padded = F.pad(padded, (0, extra_w, 0, extra_h), mode="replicate")[:, 0]
        hh, ww = padded.shape[-2:]
        spectrum = torch.fft.rfft2(padded)
        ky = torch.fft.fftfreq(hh, device=cells.device).view(-1, 1) * (2 * math.pi)
        kx = torch.fft.rfftfreq(ww, device=cells.device).view(1, -1) * (2 * math.pi)
        k2 = ky * ky + kx * kx
        ops = []
        for s in cell_sigmas:
            gauss = torch.exp(-0.5 * s * s * k2) * (s * s)
            ops += [-gauss * ky * ky, -gauss * kx * kx, -gauss * ky * kx]
        ops_t = torch.stack(ops)  # (3K, hh, ww/2+1)
        maps = torch.fft.irfft2(spectrum[:, None] * ops_t[None], s=(hh, ww))
        maps = maps[..., reach:reach + h, reach:reach + w].reshape(b, len(cell_sigmas), 3, h, w)
        dyy, dxx, dxy = maps.unbind(2)
        laplacian = dyy + dxx
        anisotropy = torch.sqrt((dyy - dxx) ** 2 + 4.0 * dxy * dxy)
        return laplacian, anisotropy

    def _peak_scale(self, response: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Peak over scale of (B, K, h, w): value, index, and log2 scale refined by a parabola
        through the peak and its neighbours."""
        logs = torch.log2(torch.tensor(self.sigmas, device=response.device))
        value, index = response.max(dim=1)
        k = response.shape[1]
        if k < 3:
            return value, index, logs[index]
        mid = index.clamp(1, k - 2)
        y0 = response.gather(1, (mid - 1)[:, None])[:, 0]
        y1 = response.gather(1, mid[:, None])[:, 0]
        y2 = response.gather(1, (mid + 1)[:, None])[:, 0]
        curv = y0 - 2.0 * y1 + y2
        offset = torch.where(curv < 0, 0.5 * (y0 - y2) / curv.clamp_max(-1e-12),
                             torch.zeros_like(curv)).clamp(-0.5, 0.5)
        offset = torch.where(index == mid, offset, torch.zeros_like(offset))
        base = logs[mid]
        step = torch.where(offset >= 0, logs[(mid + 1).clamp(max=k - 1)] - base,
                           base - logs[(mid - 1).clamp(min=0)])
        return value, index, base + offset * step

    def _codes(self, response: torch.Tensor, anisotropy: torch.Tensor, noise: torch.Tensor,
               iso_bins: int) -> torch.Tensor:
        """Population codes (B, iso_bins, K, h, w) of the structures ``response`` peaks on."""
        value, index, log_scale = self._peak_scale(response)
        noise_at = noise.expand_as(response).gather(1, index[:, None])[:, 0]
        strength = torch.relu(value - THRESHOLD * noise_at)
        aniso = anisotropy.gather(1, index[:, None])[:, 0]
        isotropy = ((value - aniso) / (value + aniso).clamp_min(1e-12)).clamp(0.0, 1.0)
        logs = torch.log2(torch.tensor(self.sigmas, device=response.device))
        scale_code = _tuning(log_scale, logs, self.tuning_octaves)  # (B, K, h, w)
        iso_centres = torch.linspace(1.0, 0.0, iso_bins, device=response.device)
        iso_code = _tuning(isotropy, iso_centres, 0.5 / (iso_bins - 1))
        iso_code = iso_code / iso_code.sum(dim=1, keepdim=True)  # (B, bins, h, w)
        return (strength[:, None, None] * iso_code[:, :, None] * scale_code[:, None])

    def responses(self, batch: torch.Tensor, pool: int = 1) -> torch.Tensor:
        """(B, H, W) slices -> (B, C, H/pool, W/pool) standardised, cell-normalised codes."""
        images = batch[:, None].float()
        cells = (F.avg_pool2d(images, pool) if pool > 1 else images)[:, 0]
        laplacian, anisotropy = self.hessians(cells)
        flat = laplacian.flatten(2)
        centre = flat.median(dim=2, keepdim=True).values
        noise = ((flat - centre).abs().median(dim=2, keepdim=True).values * MAD_TO_STD)
        noise = noise[..., None]  # (B, K, 1, 1)
        dark = self._codes(laplacian, anisotropy, noise, DARK_ISO_BINS)
        bright = self._codes(-laplacian, anisotropy, noise, BRIGHT_ISO_BINS)
        codes = torch.cat([dark, bright], dim=1)  # (B, 5, K, h, w): response-major
        b, _, k, h, w = codes.shape
        out = codes.transpose(1, 2).reshape(b, k * len(RESPONSES), h, w)  # scale-major
        if h * w > 1:
            mean = out.mean(dim=(2, 3), keepdim=True)
            std = out.std(dim=(2, 3), keepdim=True)
            out = (out - mean) / (std + 1e-6)
        return out / (out.norm(dim=1, keepdim=True) + SOFT_NORM)

    def encode(self, slices: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, H, W) normalised slices -> (B, h, w, C) fp16 codes.

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
