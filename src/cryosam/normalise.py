"""Per-tomogram intensity normalisation shared by every model: robust percentiles to [0, 1].

One normalised copy of a tomogram serves both the encoder and the segmenter of a run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cryosam.errors import InputError


def robust_range(volume: np.ndarray, clip_percentiles: Sequence[float]) -> tuple[float, float]:
    """The intensity percentiles used to clip ``volume`` (from a fixed subsample if large)."""
    flat = np.asarray(volume).reshape(-1)
    step = max(1, flat.size // 4_000_000)
    sample = flat[::step].astype(np.float64)  # float64: values near float32's limit interpolate
    lo, hi = np.percentile(sample, [float(clip_percentiles[0]), float(clip_percentiles[1])])
    return float(lo), float(hi)


def normalise_volume(volume: np.ndarray,
                     clip_percentiles: Sequence[float] = (0.5, 99.5)) -> np.ndarray:
    """Clip to the given intensity percentiles and rescale to [0, 1] (float32), per tomogram.

    Robust to the hot pixels and gold beads of real tomograms; the encoders then apply their
    own normalisation (DINOv2: the model's image mean/std).
    """
    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise InputError(f"expected a 3-D tomogram, got an array of shape {vol.shape}")
    lo, hi = (float(c) for c in clip_percentiles)
    if not 0.0 <= lo < hi <= 100.0:
        raise InputError(f"clip percentiles {clip_percentiles}: need 0 <= low < high <= 100")
    vmin, vmax = robust_range(vol, clip_percentiles)
    out = np.array(vol, dtype=np.float32, copy=True)
    if not vmax > vmin:
        out[...] = 0.0
        return out
    np.clip(out, vmin, vmax, out=out)
    scale = max(abs(vmin), abs(vmax))
    if scale > 1e30:  # keep the float32 arithmetic below float32's limit
        out *= np.float32(1.0 / scale)
        vmin, vmax = vmin / scale, vmax / scale
    out -= np.float32(vmin)
    out *= np.float32(1.0 / (vmax - vmin))
    return out
