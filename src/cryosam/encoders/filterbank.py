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

Only a few percent of a slice's cells clear the noise; all the others end up with one and the
same vector, so :meth:`FilterBankEncoder.encode_sparse` gives a slice's maps as that vector
plus the coded cells, which is what the feature extraction stores
(:class:`cryosam.features.sparse.SparseStack`), and the work is done for the coded cells only.

Channels: 5 per scale (``channel_names``). Scales should be spaced by at most half an octave;
the defaults suit dark particles of radius ~2-12 voxels (bin the tomogram, or scale
``sigmas``, for bigger ones).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from cryosam.encoders.base import as_batch
from cryosam.errors import CryosamError

if TYPE_CHECKING:
    from cryosam.backends import FilterBankOptions
    from cryosam.config import EncoderConfig

VERSION = "v3"
DEFAULT_SIGMAS = (1.0, 1.41, 2.0, 2.83, 4.0, 5.66, 8.0, 11.3)  # half-octave steps, voxels
RESPONSES = ("dark_blob", "dark_oblong", "dark_line", "bright_blob", "bright_line")
DARK_ISO_BINS = 3  # isotropy tuning curves of dark structures: blob, oblong, line
BRIGHT_ISO_BINS = 2  # of bright structures: blob, line
TUNING_OCTAVES = 0.22  # width of the scale tuning curves (at least 0.4 x the scale step)
THRESHOLD = 4.0  # a peak counts from this many noise deviations of its scale's response
SOFT_NORM = 3.0  # cell vectors are divided by (norm + SOFT_NORM), in standardised units
MAD_TO_STD = 1.4826
CHUNK_BYTES = 16 << 20  # largest FFT temporary of one encoder pass on the CPU


def _fft_size(n: int) -> int:
    """The smallest odd size >= ``n`` with no prime factor above 11 (a fast FFT length)."""
    m = n if n % 2 else n + 1
    while True:
        rest = m
        for p in (3, 5, 7, 11):
            while rest % p == 0:
                rest //= p
        if rest == 1:
            return m
        m += 2


def _lower_median(x: torch.Tensor) -> torch.Tensor:
    """``x.median(dim=-1).values`` (the lower median), by a partial sort on the CPU."""
    if x.device.type != "cpu":
        return x.median(dim=-1).values
    kth = (x.shape[-1] - 1) // 2
    part = np.partition(x.detach().numpy(), kth, axis=-1)[..., kth]
    return torch.from_numpy(np.ascontiguousarray(part))


def _median_pad(images: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
    """Pad (B, 1, H, W) images with each image's median: no mirrored copies of particles.
    ``pad``: (left, right, top, bottom)."""
    med = _lower_median(images.flatten(1)).view(-1, 1, 1, 1)
    return F.pad(images - med, pad) + med


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
        self._cell_sigmas = [s / self.patch_size for s in self.sigmas]  # in cells
        self._logs = torch.log2(torch.tensor(self.sigmas))
        self._ops: dict[tuple[int, int, str], torch.Tensor] = {}

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

    def _operators(self, hh: int, ww: int, device: torch.device) -> torch.Tensor:
        """(3K, hh, ww//2+1) real spectra of the scale-normalised Laplacian, Hessian
        difference ``d_yy - d_xx`` and ``2 d_xy`` at every scale (cached per padded size)."""
        key = (hh, ww, str(device))
        ops = self._ops.get(key)
        if ops is None:
            ky = torch.fft.fftfreq(hh, device=device).view(-1, 1) * (2 * math.pi)
            kx = torch.fft.rfftfreq(ww, device=device).view(1, -1) * (2 * math.pi)
            k2, diff, cross = ky * ky + kx * kx, ky * ky - kx * kx, 2.0 * ky * kx
            gauss = [torch.exp(-0.5 * s * s * k2) * (s * s) for s in self._cell_sigmas]
            ops = torch.stack([-g * k2 for g in gauss] + [-g * diff for g in gauss]
                              + [-g * cross for g in gauss])
            self._ops = {key: ops}  # one slice size at a time: z, then y, then x
        return ops

    def hessians(self, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, h, w) patch-averaged slices -> scale-normalised Laplacian and Hessian anisotropy
        ``sigma^2 * |lambda_1 - lambda_2|``, each (B, K, h, w), from one FFT per slice.

        Slices are padded with their median to an odd size with only small prime factors (no
        Nyquist frequency, so the operators are exactly symmetric, and a fast FFT)."""
        b, h, w = cells.shape
        k = len(self.sigmas)
        reach = int(math.ceil(3.0 * max(self._cell_sigmas))) + 1
        hh, ww = _fft_size(h + 2 * reach), _fft_size(w + 2 * reach)
        padded = _median_pad(cells[:, None], (reach, ww - w - reach, reach, hh - h - reach))
        spectrum = torch.fft.rfft2(padded[:, 0])[:, None] * self._operators(hh, ww, cells.device)
        # the inverse transform one axis at a time, keeping only the slice's rows in between
        rows = torch.fft.ifft(spectrum, dim=-2)[..., reach:reach + h, :]
        maps = torch.fft.irfft(rows, n=ww, dim=-1)[..., reach:reach + w]
        laplacian = maps[:, :k].contiguous()
        anisotropy = torch.hypot(maps[:, k:2 * k], maps[:, 2 * k:])
        return laplacian, anisotropy

    def _peak_scale(self, response: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """log2 scale of the peak over scale of (n, K) responses at ``index`` (n,), refined by
        a parabola through the peak and its neighbours."""
        logs = self._logs.to(response.device)
        k = response.shape[1]
        if k < 3:
            return logs[index]
        mid = index.clamp(1, k - 2)
        y0, y1, y2 = response.gather(1, torch.stack([mid - 1, mid, mid + 1], 1)).unbind(1)
        curv = y0 - 2.0 * y1 + y2
        offset = torch.where(curv < 0, 0.5 * (y0 - y2) / curv.clamp_max(-1e-12),
                             torch.zeros_like(curv)).clamp(-0.5, 0.5)
        offset = torch.where(index == mid, offset, torch.zeros_like(offset))
        base = logs[mid]
        step = torch.where(offset >= 0, logs[(mid + 1).clamp(max=k - 1)] - base,
                           base - logs[(mid - 1).clamp(min=0)])
        return base + offset * step

    def _codes(self, laplacian: torch.Tensor, anisotropy: torch.Tensor, noise: torch.Tensor,
               sign: float, iso_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Population codes of the structures ``sign * laplacian`` peaks on, for the cells
        where the peak clears the noise (every other cell's code is exactly zero).

        Returns the flat indices ``b * h * w + cell`` of those cells and their codes
        (n, iso_bins, K)."""
        b, k, h, w = laplacian.shape
        flat = laplacian.view(b, k, h * w)
        value, index = flat.max(dim=1) if sign > 0 else flat.min(dim=1)
        if sign < 0:
            value = -value
        strength = value - THRESHOLD * noise.gather(1, index)  # (B, N)
        active = torch.nonzero(strength.view(-1) > 0).view(-1)
        slices, cells = active // (h * w), active % (h * w)
        strength, index = strength.view(-1)[active], index.view(-1)[active]
        value = value.view(-1)[active]
        response = flat.permute(0, 2, 1)[slices, cells]  # (n, K)
        if sign < 0:
            response = -response
        log_scale = self._peak_scale(response, index)
        aniso = anisotropy.view(b, k, h * w)[slices, index, cells]
        isotropy = ((value - aniso) / (value + aniso).clamp_min(1e-12)).clamp(0.0, 1.0)
        logs = self._logs.to(laplacian.device)
        scale_code = torch.exp(-0.5 * ((log_scale[:, None] - logs) / self.tuning_octaves) ** 2)
        centres = torch.linspace(1.0, 0.0, iso_bins, device=laplacian.device)
        iso_code = torch.exp(-0.5 * ((isotropy[:, None] - centres) / (0.5 / (iso_bins - 1)))
                             ** 2)
        iso_code = iso_code / iso_code.sum(dim=1, keepdim=True)  # (n, bins)
        return active, strength[:, None, None] * iso_code[:, :, None] * scale_code[:, None]

    def responses(self, batch: torch.Tensor, pool: int = 1,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, H, W) slices -> (B, H/pool, W/pool, C) standardised, cell-normalised codes."""
        background, coded, rows = self.sparse_responses(batch, pool)
        b, h, w = coded.shape
        out = background.to(dtype)[:, None, :].expand(b, h * w, -1).contiguous()
        out.view(-1, out.shape[-1])[coded.view(-1)] = rows.to(dtype)
        return out.view(b, h, w, -1)

    def sparse_responses(self, batch: torch.Tensor, pool: int = 1
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, H, W) slices -> the codes of :meth:`responses` as (background (B, C), coded
        (B, h, w) bool, rows (m, C)): every cell of a slice has that slice's background
        vector except the coded ones, whose vectors are ``rows`` in C order.

        Each channel is standardised over the slice's cells, then each cell's vector is divided
        by (its norm + ``SOFT_NORM``). Only the few cells whose structure clears the noise have
        a code; every other cell of a slice gets the same vector, so the statistics and the
        normalisation are computed from the coded cells alone (the same result as computing
        them over every cell, at a fraction of the work and memory).
        """
        images = batch[:, None].float()
        cells = (F.avg_pool2d(images, pool) if pool > 1 else images)[:, 0]
        laplacian, anisotropy = self.hessians(cells)
        b, k, h, w = laplacian.shape
        n, channels = h * w, len(RESPONSES) * k
        flat = laplacian.view(b, k, n)
        centre = _lower_median(flat)
        noise = _lower_median((flat - centre[..., None]).abs()) * MAD_TO_STD  # (B, K)
        parts = []
        for sign, bins, first in ((1.0, DARK_ISO_BINS, 0), (-1.0, BRIGHT_ISO_BINS, DARK_ISO_BINS)):
            active, codes = self._codes(laplacian, anisotropy, noise, sign, bins)
            parts.append((active, codes.transpose(1, 2), first, bins))  # (n_active, K, bins)
        del laplacian, anisotropy, flat
        # the cells with any code, in order (so each slice's cells are contiguous)
        coded = torch.zeros(b * n, dtype=torch.bool, device=batch.device)
        for active, *_ in parts:
            coded[active] = True
        row = torch.cumsum(coded, 0) - 1
        which = torch.nonzero(coded).view(-1)
        code = torch.zeros((len(which), k, len(RESPONSES)), device=batch.device)
        for active, codes, first, bins in parts:
            code[row[active], :, first:first + bins] = codes
        code = code.view(len(which), channels)  # scale-major, like the channels
        bounds = torch.searchsorted(which, torch.arange(b + 1, device=batch.device) * n)
        if n > 1:  # per-slice channel mean and (unbiased) std over all cells, zeros included
            code64 = code.double()
            zero = code64.new_zeros((1, channels))
            sums = torch.cat([zero, code64.cumsum(0)])[bounds].diff(dim=0)  # (B, C)
            squares = torch.cat([zero, (code64 * code64).cumsum(0)])[bounds].diff(dim=0)
            mean = sums / n
            var = ((squares - sums * mean) / (n - 1)).clamp_min(0.0)
            scale = (1.0 / (var.sqrt() + 1e-6)).float()
            background = (-mean).float() * scale  # the standardised vector of a code-less cell
        else:
            scale = torch.ones((b, channels), device=batch.device)
            background = torch.zeros((b, channels), device=batch.device)
        base = background / (background.norm(dim=1, keepdim=True) + SOFT_NORM)
        slices = torch.repeat_interleave(torch.arange(b, device=batch.device), bounds.diff())
        vec = code * scale[slices] + background[slices]
        rows = vec / (vec.norm(dim=1, keepdim=True) + SOFT_NORM)
        return base, coded.view(b, h, w), rows

    def encode(self, slices: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, H, W) normalised slices -> (B, h, w, C) fp16 codes.

        A slice whose sides are not multiples of the patch size is first resized (by less
        than half a patch) so that the grid covers it exactly.
        """
        batch = self._fit(as_batch(slices, self.device))
        with torch.inference_mode():
            return self.responses(batch, pool=self.patch_size, dtype=torch.float16)

    def encode_sparse(self, slices: np.ndarray | torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`encode`'s maps as (background (B, C), coded (B, h, w) bool, rows (m, C)), all
        fp16 but ``coded``: most cells of a slice share its background vector (see
        :meth:`sparse_responses`), so the feature extraction stores only the others."""
        batch = self._fit(as_batch(slices, self.device))
        chunks = batch.split(self._chunk(*batch.shape[1:]))
        workers = min(torch.get_num_threads(), len(chunks)) if self.device.type == "cpu" else 1
        if workers > 1:
            # one single-threaded worker per chunk of slices rather than every operation split
            # over all threads: no thread waits at each of the many small operations' barriers
            # (on a shared machine they cost more than the work)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                with ThreadPoolExecutor(workers) as pool:
                    parts = list(pool.map(self._sparse_chunk, chunks))
            finally:
                torch.set_num_threads(threads)
        else:
            parts = [self._sparse_chunk(chunk) for chunk in chunks]
        if len(parts) == 1:
            return parts[0]
        return tuple(torch.cat(p) for p in zip(*parts, strict=True))  # type: ignore[return-value]

    def _sparse_chunk(self, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            background, coded, rows = self.sparse_responses(chunk, pool=self.patch_size)
            return background.to(torch.float16), coded, rows.to(torch.float16)

    def _chunk(self, height: int, width: int) -> int:
        """Slices filtered together on the CPU: each FFT temporary stays under
        ``CHUNK_BYTES``, so the allocator reuses its memory from one chunk to the next instead
        of mapping (and the kernel zeroing) fresh pages for every batch."""
        if self.device.type != "cpu":
            return 1 << 30
        gh, gw = self.grid_shape(height, width)
        reach = int(math.ceil(3.0 * max(self._cell_sigmas))) + 1
        hh, ww = _fft_size(gh + 2 * reach), _fft_size(gw + 2 * reach)
        per_slice = 3 * len(self.sigmas) * hh * (ww // 2 + 1) * 8  # complex64 spectra
        return max(1, CHUNK_BYTES // per_slice)

    def _fit(self, batch: torch.Tensor) -> torch.Tensor:
        """Resize slices (by less than half a patch) so that the grid covers them exactly."""
        gh, gw = self.grid_shape(batch.shape[1], batch.shape[2])
        p = self.patch_size
        if tuple(batch.shape[1:]) != (gh * p, gw * p):
            with torch.inference_mode():
                batch = F.interpolate(batch[:, None], size=(gh * p, gw * p), mode="bilinear",
                                      align_corners=False)[:, 0]
        return batch
