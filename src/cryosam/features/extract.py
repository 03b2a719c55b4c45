"""Encode every slice of a tomogram along z, y and x into a :class:`FeatureVolume`, with a
memory estimate made before any work and an on-disk cache.

Features are cached keyed by the tomogram's content and every parameter that changes them, so
that a second query on the same tomogram costs seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryosam import backends, progress
from cryosam._atomic import sweep_stale
from cryosam.config import EncoderConfig
from cryosam.encoders.base import SliceEncoder
from cryosam.errors import CryosamError, CryosamWarning, InputError
from cryosam.features.sparse import SparseStackBuilder
from cryosam.features.volume import (
    FORMAT_VERSION,
    PLANE_DIMS,
    SLICE_DIM,
    FeatureVolume,
    Stack,
    slice_positions,
)
from cryosam.normalise import normalise_volume, robust_range
from cryosam.utils import AXES, format_bytes, volume_hash

log = logging.getLogger(__name__)

PCA_MAX_TOKENS = 50_000  # tokens used to fit the channel reduction


def _geometry(
    encoder: SliceEncoder | EncoderConfig,
) -> tuple[Callable[[int, int], tuple[int, int]], int]:
    """(grid_shape function, channels) of an encoder, or of a config without loading weights."""
    if isinstance(encoder, EncoderConfig):
        cls = backends.get(encoder.name, "encoder").load()
        return cls.geometry_from_options(encoder.options)
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


# --------------------------------------------------------------------------- cache
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


def _encode_stacks(vol: np.ndarray, encoder: SliceEncoder, positions: dict[str, np.ndarray],
                   shapes: dict[str, tuple[int, int, int, int]], batch_size: int,
                   projection: torch.Tensor | None) -> dict[str, Stack]:
    """Encode the slices at ``positions`` of each axis into fp16 stacks, batch by batch.

    An encoder with ``encode_sparse`` (the filter bank) gives each slice's maps as one
    background vector plus the cells that differ, and the stacks keep them so
    (:class:`SparseStack`: the same values in a fraction of the memory); other encoders' maps
    are stored dense."""
    sparse = getattr(encoder, "encode_sparse", None)
    sparse = sparse if callable(sparse) else None

    def project(x: torch.Tensor) -> torch.Tensor:
        if projection is None:
            return x
        return (x.to(projection.device, torch.float32) @ projection).to(torch.float16)

    # on a GPU, maps go back into pinned memory asynchronously, overlapping the next batch
    pinned = not sparse and getattr(encoder, "device", torch.device("cpu")).type == "cuda"
    dense = {} if sparse else {a: torch.empty(shapes[a], dtype=torch.float16, pin_memory=pinned)
                               for a in AXES}
    builders = {a: SparseStackBuilder(shapes[a]) for a in AXES} if sparse else {}
    tasks = [(a, start) for a in AXES for start in range(0, len(positions[a]), batch_size)]
    for a, start in progress.track(tasks, "encoding slices"):
        index = positions[a][start:start + batch_size].astype(np.int64)
        batch = _slices(vol, a, index)
        if sparse is not None:
            background, coded, rows = sparse(batch)
            background, rows = project(background), project(rows)
            got = (*coded.shape[1:], background.shape[1])
        else:
            maps = project(encoder.encode(batch))
            got = tuple(maps.shape[1:])
        if tuple(got) != shapes[a][1:]:
            raise RuntimeError(f"encoder returned maps of shape {tuple(got)} for axis {a}, "
                               f"expected {shapes[a][1:]}")
        if sparse is not None:
            builders[a].add(start, background, coded, rows)
        else:
            dense[a][start:start + len(index)].copy_(maps.to(torch.float16), non_blocking=pinned)
    if pinned:
        torch.cuda.synchronize()
    return {a: builders[a].build() for a in AXES} if sparse else dense


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
    if path is not None:
        sweep_stale(path.parent)  # partial cache files of killed runs
        cached = _load_cached(path, key)
        if cached is not None:
            return cached

    shapes = stack_shapes(vol.shape, encoder, stride=stride, reduce_to=reduce_to)
    total = sum(2 * math.prod(s) for s in shapes.values())
    bound = "at most " if callable(getattr(encoder, "encode_sparse", None)) else ""
    _announce(f"features: {vol.shape[0]}x{vol.shape[1]}x{vol.shape[2]} tomogram -> "
              f"{bound}{format_bytes(total)} fp16 ({encoder.id}, stride {stride})")

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
    stacks = _encode_stacks(vol, encoder, positions, shapes, batch_size, projection)
    meta["grids"] = {a: list(shapes[a][1:3]) for a in AXES}
    meta["voxels_per_patch"] = {
        a: [vol.shape[PLANE_DIMS[a][0]] / shapes[a][1], vol.shape[PLANE_DIMS[a][1]] / shapes[a][2]]
        for a in AXES}
    features = FeatureVolume(stacks, vol.shape, positions, meta)
    if path is not None:
        _save_cached(features, path)
    return features


# --------------------------------------------------------------------------- the cache is optional


def _cache_warning(message: str) -> None:
    warnings.warn(message, CryosamWarning, stacklevel=3)


def _load_cached(path: Path, key: str) -> FeatureVolume | None:
    """The cached features at ``path``, or None: a missing, unreadable or foreign file is one
    warning at most, never an error (the features are simply computed)."""
    if not path.exists():
        return None
    try:
        with warnings.catch_warnings():  # torch's own multi-line warnings on odd files
            warnings.simplefilter("ignore")
            cached = FeatureVolume.load(path)
    except (CryosamError, OSError) as exc:
        _cache_warning(f"feature cache {path} is unreadable ({_short(exc)}); computing the "
                       "features again")
        return None
    if cached.meta.get("cache_key") != key:
        return None
    cached.from_cache = True
    _announce(f"features: loaded from cache {path}")
    return cached


def _save_cached(features: FeatureVolume, path: Path) -> None:
    """Write the cache; any failure (full disk, permissions, a folder in the way) is one
    warning, and the run goes on to write its results."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        features.save(path)
    except (OSError, RuntimeError) as exc:  # torch reports a full disk as RuntimeError
        _cache_warning(f"could not write the feature cache {path} ({_short(exc)}); the "
                       "results are not affected, only the next run will recompute features")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:160] if text else type(exc).__name__
