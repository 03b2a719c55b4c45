"""Fourier filters of the simulated imaging: blur, band-limited noise and the missing wedge."""

from __future__ import annotations

import math

import numpy as np
import scipy.fft as sfft


def transfer(shape: tuple[int, int, int], sigma: float, tilt_range: float) -> np.ndarray:
    """rfftn-layout transfer function: Gaussian low-pass (``sigma`` voxels, real space) times
    the missing-wedge mask (tilt axis y; kept where |kz| <= tan(tilt_range) |kx|)."""
    d, h, w = shape
    kz = sfft.fftfreq(d).astype(np.float32)[:, None, None]
    ky = sfft.fftfreq(h).astype(np.float32)[None, :, None]
    kx = sfft.rfftfreq(w).astype(np.float32)[None, None, :]
    k2 = kz**2 + ky**2 + kx**2
    out = np.exp(np.float32(-2 * math.pi**2 * sigma**2) * k2)
    if tilt_range < 90:
        keep = np.abs(kz) <= np.float32(math.tan(math.radians(tilt_range))) * np.abs(kx)
        out = out * keep
    return out.astype(np.float32)


def missing_wedge_mask(shape: tuple[int, int, int], tilt_range: float = 60.0) -> np.ndarray:
    """Boolean rfftn-layout mask of the Fourier components a +-``tilt_range`` tilt series
    about the y axis samples (True = sampled)."""
    d, h, w = shape
    kz = sfft.fftfreq(d)[:, None, None]
    kx = sfft.rfftfreq(w)[None, None, :]
    keep = np.abs(kz) <= math.tan(math.radians(min(tilt_range, 89.999))) * np.abs(kx)
    return np.broadcast_to(keep, (d, h, w // 2 + 1)).copy()


def apply_transfer(vol: np.ndarray, transfer: np.ndarray) -> np.ndarray:
    """Multiply ``vol``'s spectrum by an rfftn-layout ``transfer`` function."""
    spec = sfft.rfftn(vol, workers=-1)
    spec *= transfer
    return sfft.irfftn(spec, s=vol.shape, workers=-1).astype(np.float32)
