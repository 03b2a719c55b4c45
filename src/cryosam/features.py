"""Slice features along z, y and x, kept compact: the :class:`FeatureVolume`.

Every slice of each axis is encoded into a patch-grid map; the three stacks are kept at patch
resolution in fp16 and never upsampled (a D x H x W x 3C volume would need terabytes). The
feature at a voxel is the concatenation (z | y | x) of the three maps sampled there: bilinear
in-plane, linear across slices. A map of ``a`` cells over a slice side of ``A`` voxels has
cell ``i`` centred at voxel ``(i + 0.5) * A / a - 0.5``.

Features are cached on disk, keyed by the tomogram's content and every parameter that changes
them, so that a second query on the same tomogram costs seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryosam import progress
from cryosam._atomic import atomic_path
from cryosam.config import EncoderConfig
from cryosam.encoders.base import SliceEncoder, grid_for_long_side
from cryosam.errors import CryosamError, InputError

log = logging.getLogger(__name__)

AXES = ("z", "y", "x")
SLICE_DIM = {"z": 0, "y": 1, "x": 2}  # the volume dimension each stack is sliced along
PLANE_DIMS = {"z": (1, 2), "y": (0, 2), "x": (0, 1)}  # the volume dimensions of its maps
FORMAT = "cryosam-features"
FORMAT_VERSION = 1
PCA_MAX_TOKENS = 50_000  # tokens used to fit the channel reduction


# --------------------------------------------------------------------------- normalisation


def robust_range(volume: np.ndarray, clip_percentiles: Sequence[float]) -> tuple[float, float]:
    """The intensity percentiles used to clip ``volume`` (from a fixed subsample if large)."""
    flat = np.asarray(volume).reshape(-1)
    step = max(1, flat.size // 4_000_000)
    lo, hi = np.percentile(flat[::step], [float(clip_percentiles[0]), float(clip_percentiles[1])])
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
    out -= vmin
    out *= 1.0 / (vmax - vmin)
    return out


# --------------------------------------------------------------------------- geometry helpers


def slice_positions(extent: int, stride: int) -> np.ndarray:
    """Slices encoded along an axis of ``extent`` voxels: every ``stride``-th, plus the last."""
    if stride < 1:
        raise CryosamError(f"--slice-stride {stride}: must be at least 1")
    pos = list(range(0, extent, stride))
    if pos[-1] != extent - 1:
        pos.append(extent - 1)
    return np.asarray(pos, dtype=np.float64)


def _interval(
    pos: torch.Tensor, c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Neighbouring slice indices and the linear weight of the second, clamped at the ends."""
    n = pos.numel()
    if n == 1:
        zero = torch.zeros_like(c, dtype=torch.long)
        return zero, zero, torch.zeros_like(c)
    c = c.clamp(float(pos[0]), float(pos[-1]))
    i0 = (torch.searchsorted(pos, c, right=True) - 1).clamp(0, n - 2)
    i1 = i0 + 1
    t = (c - pos[i0]) / (pos[i1] - pos[i0])
    return i0, i1, t


def _cells(coord: torch.Tensor, extent: int, cells: int) -> tuple[torch.Tensor, ...]:
    """Bilinear neighbours (i0, i1) and weight of i1 along one side of a patch-grid map."""
    u = ((coord + 0.5) * (cells / extent) - 0.5).clamp(0.0, cells - 1.0)
    i0 = torch.floor(u).long().clamp(0, max(cells - 2, 0))
    i1 = (i0 + 1).clamp(max=cells - 1)
    return i0, i1, u - i0


# --------------------------------------------------------------------------- FeatureVolume


class FeatureVolume:
    """Three stacks of patch-grid maps of one tomogram of shape (D, H, W).

    ``stacks``: ``z`` (D', h, w, C), ``y`` (H', d, w', C), ``x`` (W', d', h', C) tensors (fp16
    normally, on any device); ``positions``: the voxel position of each stacked slice along its
    axis (all slices ``0..n-1`` when omitted; fewer with a slice stride). Each stack has its own
    patch grid. ``meta`` records how the features were made (encoder id, normalisation, ...).
    """

    def __init__(
        self,
        stacks: Mapping[str, torch.Tensor],
        shape: Sequence[int],
        positions: Mapping[str, np.ndarray] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        if set(stacks) != set(AXES):
            raise ValueError(f"stacks must have keys z, y, x; got {sorted(stacks)}")
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be three positive sizes, got {shape}")
        self.stacks = {a: stacks[a] for a in AXES}
        channels = {int(s.shape[-1]) for s in self.stacks.values()}
        if len(channels) != 1 or any(s.ndim != 4 for s in self.stacks.values()):
            raise ValueError("stacks must be 4-D (n, h, w, C) with the same C")
        self.channels = channels.pop()
        self.positions: dict[str, np.ndarray] = {}
        for a in AXES:
            extent = self.shape[SLICE_DIM[a]]
            n = self.stacks[a].shape[0]
            if positions is None or positions.get(a) is None:
                if n != extent:
                    raise ValueError(f"stack {a} has {n} slices for an extent of {extent}; "
                                     "give its positions")
                pos = np.arange(n, dtype=np.float64)
            else:
                pos = np.asarray(positions[a], dtype=np.float64).reshape(-1)
            if pos.size != n or (n > 1 and np.any(np.diff(pos) <= 0)):
                raise ValueError(f"positions of stack {a} must be {n} increasing values")
            self.positions[a] = pos
        self.meta: dict[str, Any] = dict(meta or {})
        self.from_cache = False  # set by extract_features when loaded from its cache
        self._pos_t: dict[str, torch.Tensor] = {}

    # ---- sizes

    @property
    def dim(self) -> int:
        """Length of a voxel's feature vector: 3 x channels (z | y | x)."""
        return 3 * self.channels

    @property
    def device(self) -> torch.device:
        """Device the stacks live on (sampling happens there)."""
        return self.stacks["z"].device

    @property
    def nbytes(self) -> int:
        """Bytes held by the three stacks."""
        return sum(s.element_size() * s.nelement() for s in self.stacks.values())

    def to(self, device: torch.device | str) -> FeatureVolume:
        """A FeatureVolume with the stacks on ``device`` (e.g. the GPU for matching)."""
        stacks = {a: s.to(device) for a, s in self.stacks.items()}
        return FeatureVolume(stacks, self.shape, self.positions, self.meta)

    # ---- sampling

    def _positions_tensor(self, axis: str) -> torch.Tensor:
        cached = self._pos_t.get(axis)
        if cached is None or cached.device != self.device:
            cached = torch.as_tensor(self.positions[axis], dtype=torch.float64, device=self.device)
            self._pos_t[axis] = cached
        return cached

    def _sample_axis(self, axis: str, pts: torch.Tensor) -> torch.Tensor:
        stack = self.stacks[axis]
        _, gh, gw, channels = stack.shape
        p, q = PLANE_DIMS[axis]
        i0, i1, t = _interval(self._positions_tensor(axis), pts[:, SLICE_DIM[axis]])
        u0, u1, fu = _cells(pts[:, p], self.shape[p], gh)
        v0, v1, fv = _cells(pts[:, q], self.shape[q], gw)
        flat = stack.reshape(-1, channels)
        out = torch.zeros((pts.shape[0], channels), dtype=torch.float32, device=stack.device)
        for ii, wi in ((i0, 1.0 - t), (i1, t)):
            for uu, wu in ((u0, 1.0 - fu), (u1, fu)):
                for vv, wv in ((v0, 1.0 - fv), (v1, fv)):
                    weight = (wi * wu * wv).to(torch.float32)[:, None]
                    out.addcmul_(flat[(ii * gh + uu) * gw + vv].to(torch.float32), weight)
        return out

    def sample(self, zyx: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Features (N, dim) float32 at (N, 3) voxel coordinates (z, y, x); un-normalised.

        Bilinear in-plane, linear across slices, clamped at the borders.
        """
        pts = torch.as_tensor(np.asarray(zyx, dtype=np.float64), device=self.device)
        pts = pts.reshape(-1, 3)
        return torch.cat([self._sample_axis(a, pts) for a in AXES], dim=1)

    # ---- coarse grids

    def grid_shape(self, ratio: int) -> tuple[int, int, int]:
        """Shape of the ``ratio``-times coarser voxel grid: ceil(D/r), ceil(H/r), ceil(W/r)."""
        r = int(ratio)
        if r < 1:
            raise ValueError(f"ratio must be at least 1, got {ratio}")
        return tuple(math.ceil(s / r) for s in self.shape)  # type: ignore[return-value]

    def cell_centres(self, ratio: int, cells: np.ndarray) -> np.ndarray:
        """Voxel centres (n, 3) of coarse cells (n, 3): ``min(i*r + (r-1)/2, D-1)``, etc."""
        r = int(ratio)
        centres = np.asarray(cells, dtype=np.float64).reshape(-1, 3) * r + (r - 1) / 2.0
        return np.minimum(centres, np.asarray(self.shape, dtype=np.float64) - 1.0)

    def iter_grid(
        self, ratio: int, cells: np.ndarray | None = None, chunk_size: int = 65536
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield (cells (n, 3) int64, features (n, dim) float32) of the coarse grid in chunks.

        All cells in C order when ``cells`` is None, else the given cells in their order. The
        features equal ``sample(cell_centres(ratio, cells))``.
        """
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        grid = self.grid_shape(ratio)
        if cells is None:
            total = int(np.prod(grid))
            for start in range(0, total, chunk_size):
                lin = np.arange(start, min(start + chunk_size, total), dtype=np.int64)
                chunk = np.stack(np.unravel_index(lin, grid), axis=1).astype(np.int64)
                yield chunk, self.sample(self.cell_centres(ratio, chunk))
            return
        cells = np.asarray(cells, dtype=np.int64).reshape(-1, 3)
        for start in range(0, len(cells), chunk_size):
            chunk = cells[start:start + chunk_size]
            yield chunk, self.sample(self.cell_centres(ratio, chunk))

    # ---- persistence

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write to ``path`` atomically (torch format; stacks stay fp16)."""
        payload = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "shape": list(self.shape),
            "stacks": {a: s.detach().to("cpu").contiguous() for a, s in self.stacks.items()},
            "positions": {a: torch.from_numpy(p.copy()) for a, p in self.positions.items()},
            "meta": json.dumps(self.meta, sort_keys=True, default=str),
        }
        with atomic_path(path, suffix=".pt") as tmp:
            torch.save(payload, tmp)

    @classmethod
    def load(cls, path: str | os.PathLike[str],
             device: torch.device | str = "cpu") -> FeatureVolume:
        """Read a FeatureVolume written by :meth:`save`."""
        try:
            payload = torch.load(path, map_location=device, weights_only=True)
            if payload.get("format") != FORMAT or payload.get("version") != FORMAT_VERSION:
                raise ValueError("not a cryosam feature file of this version")
            positions = {a: p.numpy() for a, p in payload["positions"].items()}
            return cls(payload["stacks"], payload["shape"], positions, json.loads(payload["meta"]))
        except Exception as exc:  # any unreadable file: torch, pickle, zip or format errors
            raise CryosamError(f"{path}: unreadable feature file ({exc}); delete it and "
                               "re-run to recompute the features") from exc


# --------------------------------------------------------------------------- memory estimate


def _geometry(encoder: SliceEncoder | EncoderConfig):
    """(grid_shape function, channels) of an encoder, or of a config without loading weights."""
    if isinstance(encoder, EncoderConfig):
        if encoder.name == "filterbank":
            from cryosam.encoders.filterbank import FilterBankEncoder

            fb = FilterBankEncoder(patch_size=encoder.filterbank_patch,
                                   sigmas=encoder.filterbank_sigmas)
            return fb.grid_shape, fb.channels
        from cryosam.encoders.dinov2 import channels_for_model

        n = encoder.patches_long_side
        return (lambda h, w: grid_for_long_side(h, w, n)), channels_for_model(encoder.model)
    return encoder.grid_shape, encoder.channels


def stack_shapes(
    shape: Sequence[int], encoder: SliceEncoder | EncoderConfig, *, stride: int | None = None,
    reduce_to: int | None = None,
) -> dict[str, tuple[int, int, int, int]]:
    """The (n, h, w, C) shape of each stack for a tomogram of ``shape``."""
    if isinstance(encoder, EncoderConfig):
        stride = encoder.slice_stride if stride is None else stride
        reduce_to = encoder.reduce_to if reduce_to is None else reduce_to
    grid, channels = _geometry(encoder)
    if reduce_to:
        channels = min(channels, int(reduce_to))
    out = {}
    for a in AXES:
        p, q = PLANE_DIMS[a]
        n = len(slice_positions(int(shape[SLICE_DIM[a]]), stride or 1))
        gh, gw = grid(int(shape[p]), int(shape[q]))
        out[a] = (n, gh, gw, channels)
    return out


def estimate_nbytes(
    shape: Sequence[int], encoder: SliceEncoder | EncoderConfig, *, stride: int | None = None,
    reduce_to: int | None = None,
) -> int:
    """Bytes the FeatureVolume of a tomogram of ``shape`` will hold (fp16 stacks)."""
    shapes = stack_shapes(shape, encoder, stride=stride, reduce_to=reduce_to)
    return sum(2 * math.prod(s) for s in shapes.values())


def format_bytes(n: int) -> str:
    """Human-readable size (binary units)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"  # pragma: no cover


# --------------------------------------------------------------------------- cache


def volume_hash(volume: np.ndarray) -> str:
    """Content hash of a tomogram (shape, dtype and every voxel)."""
    vol = np.ascontiguousarray(volume)
    digest = hashlib.blake2b(digest_size=32)
    digest.update(f"{vol.shape}:{vol.dtype.str};".encode())
    digest.update(memoryview(vol).cast("B"))
    return digest.hexdigest()


def cache_key(
    volume: np.ndarray, encoder: SliceEncoder, *, stride: int = 1,
    clip_percentiles: Sequence[float] | None = (0.5, 99.5), reduce_to: int | None = None,
    volume_digest: str | None = None,
) -> str:
    """Key of a tomogram's features: its content and every parameter that changes them."""
    params = {
        "format": FORMAT_VERSION,
        "volume": volume_digest or volume_hash(volume),
        "encoder": encoder.id,
        "stride": int(stride),
        "clip": None if clip_percentiles is None else [float(c) for c in clip_percentiles],
        "reduce_to": None if not reduce_to else int(reduce_to),
        "pca_max_tokens": PCA_MAX_TOKENS if reduce_to else None,
    }
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def cache_path(cache_dir: str | os.PathLike[str], key: str) -> Path:
    """Where the features with ``key`` live in ``cache_dir``."""
    return Path(cache_dir) / f"features-{key[:32]}.pt"


# --------------------------------------------------------------------------- extraction


def _slices(volume: np.ndarray, axis: str, index: np.ndarray) -> np.ndarray:
    """Slices ``index`` of ``volume`` along ``axis`` as a contiguous (B, a, b) batch."""
    if axis == "z":
        batch = volume[index]
    elif axis == "y":
        batch = volume[:, index, :].transpose(1, 0, 2)
    else:
        batch = volume[:, :, index].transpose(2, 0, 1)
    return np.ascontiguousarray(batch, dtype=np.float32)


def fit_projection(volume: np.ndarray, encoder: SliceEncoder, channels: int, *,
                   slices_per_axis: int = 4, batch_size: int = 16) -> torch.Tensor:
    """Uncentred PCA (C, k) fitted on tokens of a few evenly spaced slices of each axis.

    Uncentred, so that inner products (hence cosine similarities) of projected features
    approximate those of the originals.
    """
    tokens = []
    for a in AXES:
        extent = volume.shape[SLICE_DIM[a]]
        idx = np.unique(np.linspace(0, extent - 1, min(slices_per_axis, extent)).round()
                        .astype(np.int64))
        for start in range(0, len(idx), batch_size):
            maps = encoder.encode(_slices(volume, a, idx[start:start + batch_size]))
            tokens.append(maps.reshape(-1, maps.shape[-1]).float())
    x = torch.cat(tokens)
    if x.shape[0] > PCA_MAX_TOKENS:
        gen = torch.Generator().manual_seed(0)
        x = x[torch.randperm(x.shape[0], generator=gen)[:PCA_MAX_TOKENS].to(x.device)]
    gram = (x.T.double() @ x.double()) / x.shape[0]
    _, vecs = torch.linalg.eigh(gram)
    vecs = vecs[:, torch.arange(vecs.shape[1] - 1, vecs.shape[1] - 1 - channels, -1)]
    signs = torch.sign(vecs[vecs.abs().argmax(dim=0), torch.arange(channels)])
    return (vecs * signs).to(torch.float32)


def _announce(message: str) -> None:
    log.info(message)
    if progress.enabled():
        print(message, file=sys.stderr)


def extract_features(
    volume: np.ndarray,
    encoder: SliceEncoder,
    *,
    stride: int = 1,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    reduce_to: int | None = None,
    clip_percentiles: Sequence[float] | None = (0.5, 99.5),
) -> FeatureVolume:
    """Encode every (``stride``-th) slice along z, y and x of a raw tomogram.

    The volume is normalised per tomogram (``clip_percentiles``; None = already in [0, 1]).
    ``reduce_to`` keeps that many channels per axis (PCA on a token sample). With
    ``cache_dir``, features are loaded from there when present and saved there otherwise.
    ``device`` is where the channel reduction runs (default: the encoder's device).
    """
    vol = np.asarray(volume)
    if vol.ndim != 3 or min(vol.shape) < 1:
        raise InputError(f"expected a non-empty 3-D tomogram, got an array of shape {vol.shape}")
    if batch_size < 1:
        raise CryosamError(f"--batch-size {batch_size}: must be at least 1")
    if not reduce_to or reduce_to >= encoder.channels:
        reduce_to = None
    digest = volume_hash(vol)
    key = cache_key(vol, encoder, stride=stride, clip_percentiles=clip_percentiles,
                    reduce_to=reduce_to, volume_digest=digest)
    path = cache_path(cache_dir, key) if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            cached = FeatureVolume.load(path)
            if cached.meta.get("cache_key") == key:
                cached.from_cache = True
                _announce(f"features: loaded from cache {path}")
                return cached
        except CryosamError as exc:
            log.warning("ignoring feature cache %s: %s", path, exc)

    shapes = stack_shapes(vol.shape, encoder, stride=stride, reduce_to=reduce_to)
    total = sum(2 * math.prod(s) for s in shapes.values())
    _announce(f"features: {vol.shape[0]}x{vol.shape[1]}x{vol.shape[2]} tomogram -> "
              f"{format_bytes(total)} fp16 ({encoder.id}, stride {stride})")

    meta: dict[str, Any] = {"encoder": encoder.id, "stride": int(stride),
                            "clip_percentiles": None, "intensity_range": None,
                            "reduce_to": reduce_to, "cache_key": key, "volume_hash": digest}
    if clip_percentiles is not None:
        meta["clip_percentiles"] = [float(c) for c in clip_percentiles]
        meta["intensity_range"] = list(robust_range(vol, clip_percentiles))
        vol = normalise_volume(vol, clip_percentiles)

    run_device = torch.device(device) if device is not None else getattr(
        encoder, "device", torch.device("cpu"))
    projection = None
    if reduce_to:
        projection = fit_projection(vol, encoder, reduce_to, batch_size=batch_size)
        projection = projection.to(run_device)
        meta["projection"] = projection.cpu().tolist()

    positions = {a: slice_positions(vol.shape[SLICE_DIM[a]], stride) for a in AXES}
    stacks = {a: torch.empty(shapes[a], dtype=torch.float16) for a in AXES}
    tasks = [(a, start) for a in AXES for start in range(0, len(positions[a]), batch_size)]
    for a, start in progress.track(tasks, "encoding slices"):
        index = positions[a][start:start + batch_size].astype(np.int64)
        maps = encoder.encode(_slices(vol, a, index))
        if projection is not None:
            maps = (maps.to(projection.device, torch.float32) @ projection).to(torch.float16)
        if tuple(maps.shape[1:]) != shapes[a][1:]:
            raise RuntimeError(f"encoder returned maps of shape {tuple(maps.shape[1:])} for "
                               f"axis {a}, expected {shapes[a][1:]}")
        stacks[a][start:start + len(index)] = maps.to("cpu", torch.float16)
    meta["grids"] = {a: list(shapes[a][1:3]) for a in AXES}
    meta["voxels_per_patch"] = {
        a: [vol.shape[PLANE_DIMS[a][0]] / shapes[a][1], vol.shape[PLANE_DIMS[a][1]] / shapes[a][2]]
        for a in AXES}
    features = FeatureVolume(stacks, vol.shape, positions, meta)
    if path is not None:
        features.save(path)
    return features
