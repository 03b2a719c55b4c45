"""The :class:`FeatureVolume`: three stacks of slice feature maps of one tomogram.

Every slice of each axis is encoded into a patch-grid map; the three stacks are kept at patch
resolution in fp16 and never upsampled (a D x H x W x 3C volume would need terabytes). The
feature at a voxel is the concatenation (z | y | x) of the three maps sampled there: bilinear
in-plane, linear across slices. A map of ``a`` cells over a slice side of ``A`` voxels has
cell ``i`` centred at voxel ``(i + 0.5) * A / a - 0.5``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from cryosam._atomic import atomic_path
from cryosam.errors import CryosamError
from cryosam.features.sparse import SparseStack, dense_slices, stack_nbytes, take_rows
from cryosam.utils import AXES

Stack = torch.Tensor | SparseStack

SLICE_DIM = {"z": 0, "y": 1, "x": 2}  # the volume dimension each stack is sliced along
PLANE_DIMS = {"z": (1, 2), "y": (0, 2), "x": (0, 1)}  # the volume dimensions of its maps
FORMAT = "cryosam-features"
FORMAT_VERSION = 1
POOLED_KEEP_BYTES = 64 << 20  # cell-averaged copies up to this size are kept for reuse


def turned(queries: torch.Tensor) -> torch.Tensor:
    """(2Q, dim): the queries, then each turned by 90 degrees about the beam (z) axis: its y
    and x plane blocks (of z | y | x) swapped.

    Such a particle shows the clicked one's XZ view in its YZ plane and the other way round
    (mirrored, which the weight-free encoder ignores and DINOv2 only partly), and its XY view
    turned in-plane. Both side views contain the beam axis, along which the missing wedge
    stretches a particle; the XY view does not, so turns that bring z into the slice plane
    would compare a stretched view with an unstretched one (measured: they found more
    look-alikes on the simple scenes). The blocks share their channels' meaning: every axis
    is encoded by the same encoder (and projected by the same PCA)."""
    q = torch.as_tensor(queries)
    if q.ndim != 2 or q.shape[1] % 3:
        raise CryosamError(f"queries of shape {tuple(q.shape)}: need three equal plane blocks")
    blocks = q.reshape(q.shape[0], 3, -1)
    return torch.cat([q, blocks[:, [0, 2, 1]].reshape(q.shape[0], -1)])


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


def _odd(width: float) -> int:
    """The odd integer nearest to ``width`` (at least 1)."""
    return max(1, 2 * int(round((width - 1) / 2)) + 1)


def _group_sums(stack: Stack, starts: np.ndarray, ends: np.ndarray) -> torch.Tensor:
    """(G, h, w, C) fp32 sums of the slices ``starts[g]:ends[g]`` of a stack, each added in
    slice order (a sparse stack gives the dense stack's sums bit for bit)."""
    if isinstance(stack, SparseStack):
        return stack.group_sums(starts, ends)
    _, gh, gw, ch = stack.shape
    block = dense_slices(stack, int(starts[0]), int(ends[-1])).float()
    sizes = torch.as_tensor(ends - starts, device=block.device)
    ids = torch.repeat_interleave(torch.arange(len(starts), device=block.device), sizes)
    out = torch.zeros((len(starts), gh, gw, ch), dtype=torch.float32, device=block.device)
    return out.index_add_(0, ids, block)


class FeatureVolume:
    """Three stacks of patch-grid maps of one tomogram of shape (D, H, W).

    ``stacks``: ``z`` (D', h, w, C), ``y`` (H', d, w', C), ``x`` (W', d', h', C) tensors (fp16
    normally, on any device), or :class:`~cryosam.features.sparse.SparseStack` (the filter
    bank's: one background vector per slice plus the cells that differ); ``positions``: the
    voxel position of each stacked slice along its axis (all slices ``0..n-1`` when omitted;
    fewer with a slice stride). Each stack has its own patch grid. ``meta`` records how the
    features were made (encoder id, normalisation, ...).
    """

    def __init__(
        self,
        stacks: Mapping[str, Stack],
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
        self._pooled: dict[int, FeatureVolume] = {}

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
        return sum(stack_nbytes(s) for s in self.stacks.values())

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
        out = torch.zeros((pts.shape[0], channels), dtype=torch.float32, device=stack.device)
        for ii, wi in ((i0, 1.0 - t), (i1, t)):
            for uu, wu in ((u0, 1.0 - fu), (u1, fu)):
                for vv, wv in ((v0, 1.0 - fv), (v1, fv)):
                    weight = (wi * wu * wv).to(torch.float32)[:, None]
                    rows = take_rows(stack, (ii * gh + uu) * gw + vv)
                    out.addcmul_(rows.to(torch.float32), weight)
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

    # ---- cell-averaged copies (coarse matching levels)

    def pooled(self, ratio: int, *, max_bytes: int = 64 << 20) -> FeatureVolume:
        """A FeatureVolume whose stacks are averaged over ``ratio``-voxel windows.

        Sampling it at the centre of a cell of the ratio-``ratio`` grid gives (about) the mean
        feature of the cell, rather than the feature at one point: a coarse grid would otherwise
        skip particles smaller than a cell when the features are finer than the grid (the filter
        bank's 2-voxel patches). Slices are averaged in groups of one cell (their mean position
        becomes the new slice position), maps with a box of about ``ratio`` voxels (an odd number
        of map cells, stride 1, so the map geometry is unchanged; maps already coarser than a
        cell are left as they are). Works in fp32 on groups of slices of at most ``max_bytes``.
        Kept on this FeatureVolume when it holds at most ``POOLED_KEEP_BYTES``, so further
        queries on the same tomogram reuse it; a bigger one (the filter bank's fine grids:
        hundreds of MB) is computed again, in well under a second from sparse stacks, rather
        than held through the rest of the run.
        """
        r = int(ratio)
        cache = self._pooled
        if r in cache:
            return cache[r]
        stacks, positions = {}, {}
        for axis in AXES:
            stack = self.stacks[axis]
            pos = np.asarray(self.positions[axis], dtype=np.float64)
            n, gh, gw, ch = stack.shape
            kernel = [_odd(r * cells / self.shape[d]) for cells, d in
                      zip((gh, gw), PLANE_DIMS[axis], strict=True)]
            group = np.minimum(np.floor(pos / r), math.ceil(self.shape[SLICE_DIM[axis]] / r) - 1)
            bounds = np.flatnonzero(np.diff(group)) + 1
            starts = np.concatenate([[0], bounds]).astype(int)
            ends = np.concatenate([bounds, [n]]).astype(int)
            per_group = max(1, int(max_bytes // max(1, 4 * r * gh * gw * ch)))
            out = []
            for g0 in range(0, len(starts), per_group):
                g1 = min(g0 + per_group, len(starts))
                mean = _group_sums(stack, starts[g0:g1], ends[g0:g1])
                sizes = torch.as_tensor(ends[g0:g1] - starts[g0:g1], device=mean.device)
                mean /= sizes.to(torch.float32)[:, None, None, None]
                if max(kernel) > 1:  # separable box: rows, then columns (same valid-area mean)
                    x = mean.permute(0, 3, 1, 2)
                    for k in ((kernel[0], 1), (1, kernel[1])):
                        if max(k) > 1:
                            x = torch.nn.functional.avg_pool2d(
                                x, k, stride=1, padding=(k[0] // 2, k[1] // 2),
                                count_include_pad=False)
                    mean = x.permute(0, 2, 3, 1)
                out.append(mean.to(stack.dtype))
            stacks[axis] = torch.cat(out).contiguous()
            positions[axis] = np.asarray([pos[a:b].mean()
                                          for a, b in zip(starts, ends, strict=True)])
        pooled = FeatureVolume(stacks, self.shape, positions)
        if pooled.nbytes <= POOLED_KEEP_BYTES:
            cache[r] = pooled
        return pooled

    # ---- persistence

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write to ``path`` atomically (torch format; stacks stay fp16)."""
        payload = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "shape": list(self.shape),
            "stacks": {a: s.to_payload() if isinstance(s, SparseStack)
                       else s.detach().to("cpu").contiguous() for a, s in self.stacks.items()},
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
            positions = {a: p.cpu().numpy() for a, p in payload["positions"].items()}
            stacks = {a: SparseStack.from_payload(s) if isinstance(s, dict) else s
                      for a, s in payload["stacks"].items()}
            return cls(stacks, payload["shape"], positions, json.loads(payload["meta"]))
        except Exception as exc:  # any unreadable file: torch, pickle, zip or format errors
            raise CryosamError(f"{path}: unreadable feature file ({exc}); delete it and "
                               "re-run to recompute the features") from exc
