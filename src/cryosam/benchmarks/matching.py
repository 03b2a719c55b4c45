"""``cryosam bench matching``: hierarchical vs naive matching on one synthetic FeatureVolume.

The FeatureVolume is built directly (no encoder): DINOv2-S-sized stacks (3 x 384 channels at
37 patches on the long side) holding noise plus a shared background component, with target and
distractor particles planted as Gaussian blobs of their own feature vectors. The query is pooled
from one target's spherical mask, as the pipeline would from a prompt's instance mask.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import typer

from cryosam.config import MatchingConfig
from cryosam.device import peak_memory_bytes, reset_peak_memory, resolve_device
from cryosam.errors import InputError


def register(app: typer.Typer) -> None:
    """Add ``matching`` to the ``cryosam bench`` group."""

    @app.command("matching")
    def bench_matching(
        shape: str = typer.Option("128,512,512", help="Tomogram shape D,H,W (voxels)."),
        dim: int = typer.Option(1152, help="Feature channels, 3 x per-axis (DINOv2-S: 3x384)."),
        patches: int = typer.Option(37, help="Patches on a slice's long side (37 = 518 px)."),
        targets: int = typer.Option(40, help="Planted target particles."),
        distractors: int = typer.Option(40, help="Planted particles of another kind."),
        radius: float = typer.Option(10.0, help="Particle radius in voxels."),
        dilation: int = typer.Option(MatchingConfig.dilation, help="Rings of fine cells added "
                                     "around the children of survivors."),
        coarse_margin: float = typer.Option(MatchingConfig.coarse_margin, help="Similarity "
                                            "margin below the threshold at coarse levels."),
        grow: bool = typer.Option(MatchingConfig.grow, help="Follow surviving regions to "
                                  "their border at each level."),
        sweep: bool = typer.Option(False, help="Also run other grow/dilation/margin settings."),
        repeats: int = typer.Option(3, min=1, help="Runs per setting; the fastest is shown."),
        chunk_size: int = typer.Option(16384, min=1, help="Feature vectors per chunk, both "
                                       "runs (65536 measured ~3x slower on CPU)."),
        backend: str = typer.Option("auto", help="Scoring backend: auto|torch|faiss."),
        device: str = typer.Option("auto", help="auto|cpu|cuda."),
        seed: int = typer.Option(0, help="Seed of the synthetic content."),
    ) -> None:
        """Time hierarchical and naive matching; print times, peak memory and naive recall.

        Times are the fastest of ``--repeats`` runs (wall and process CPU seconds, each the
        minimum): on a shared machine the slowest runs measure the neighbours.
        """
        from cryosam.matching import match, nms_radius_from_masks, pool_query

        dims = _parse_shape(shape)
        if dim % 3 or dim <= 0:
            raise InputError(f"--dim {dim} must be a positive multiple of 3 (three axes)")
        dev = resolve_device(device)
        t0 = time.perf_counter()
        fv, centres, _ = synthetic_feature_volume(
            dims, dim // 3, patches=patches, n_targets=targets, n_distractors=distractors,
            radius=radius, seed=seed,
        )
        fv = fv.to(dev)
        typer.echo(f"FeatureVolume {dims} dim {fv.dim}: built in {time.perf_counter() - t0:.1f} s"
                   f" ({_stack_bytes(fv) / 2**20:.0f} MiB fp16), {targets} targets, "
                   f"{distractors} distractors, radius {radius:g}; {torch.get_num_threads()} "
                   f"torch threads, {dev}")
        mask = sphere_coords(centres[0], radius, dims)
        queries = pool_query(fv, [mask])
        nms_radius = nms_radius_from_masks([mask])
        config = MatchingConfig(dilation=dilation, coarse_margin=coarse_margin, grow=grow,
                                backend=backend, chunk_size=chunk_size)
        variants = [("hierarchical", config), ("naive", dataclasses.replace(config, naive=True))]
        if sweep:
            variants += [(f"g{int(g)}-d{d}-m{m:g}-p{int(p)}", dataclasses.replace(
                config, grow=g, dilation=d, coarse_margin=m, coarse_pooling=p))
                for g, d, m, p in ((False, 0, 0.0, False), (False, 0, 0.0, True),
                                   (False, 0, 0.1, True), (False, 1, 0.1, True),
                                   (True, 0, 0.0, True), (True, 0, 0.1, True),
                                   (True, 1, 0.1, True))]
        first = match(fv, queries, config, nms_radius=nms_radius, device=dev)
        typer.echo(f"first query (also averages the stacks for the coarse levels, once per "
                   f"tomogram): {first.stats.total_seconds:.2f} s")
        runs = {}
        for name, cfg in variants:
            best = None
            for _ in range(repeats):
                (props, cpu), peak = _measure(dev, lambda c=cfg: _timed(
                    lambda: match(fv, queries, c, nms_radius=nms_radius, device=dev)))
                if best is None or props.stats.total_seconds < best[0].stats.total_seconds:
                    best = (props, min(cpu, best[1]) if best else cpu, max(peak, best[2])
                            if best else peak)
                else:
                    best = (best[0], min(cpu, best[1]), max(peak, best[2]))
            props, cpu, peak = best
            runs[name] = (props, cpu)
            levels = ", ".join(f"r{lv.ratio}: {lv.cells_scored}->{lv.survivors} "
                               f"{lv.seconds:.2f}s" for lv in props.stats.levels)
            recall = recall_within(runs["naive"][0].zyx, props.zyx, nms_radius) \
                if "naive" in runs else float("nan")
            typer.echo(f"{name:>16}: wall {props.stats.total_seconds:7.2f} s  cpu {cpu:7.2f} s  "
                       f"peak {peak / 2**20:6.0f} MiB  {len(props):4d} proposals  recall of "
                       f"naive {100 * recall:5.1f} %  [{levels}; NMS "
                       f"{props.stats.nms_candidates} cand. {props.stats.nms_seconds:.2f}s]")
        (hier, hier_cpu), (naive, naive_cpu) = runs["hierarchical"], runs["naive"]
        recall = recall_within(naive.zyx, hier.zyx, nms_radius)
        truth = recall_within(centres, hier.zyx[: max(targets, 1)], radius)
        speedup = naive.stats.total_seconds / max(hier.stats.total_seconds, 1e-9)
        cells = naive.stats.cells_scored / max(hier.stats.cells_scored, 1)
        typer.echo(f"speed-up {speedup:.1f}x wall, {naive_cpu / max(hier_cpu, 1e-9):.1f}x cpu, "
                   f"{cells:.1f}x fewer feature vectors scored; "
                   f"recall of the {len(naive)} naive proposals {100 * recall:.1f} % (within "
                   f"NMS radius {nms_radius:.1f}); planted targets with a proposal within "
                   f"{radius:g} among the top {targets}: {100 * truth:.1f} %  "
                   f"(backend {hier.stats.backend} on {hier.stats.device})")


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and the process CPU seconds it took (robust to other load on the machine)."""
    t0 = time.process_time()
    out = fn()
    return out, time.process_time() - t0


def _parse_shape(text: str) -> tuple[int, int, int]:
    try:
        dims = tuple(int(v) for v in text.split(","))
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise InputError(f"--shape {text!r} must be three positive integers D,H,W")
    return dims  # type: ignore[return-value]


def _stack_bytes(fv: Any) -> int:
    stacks = getattr(fv, "stacks", {})
    return sum(t.numel() * t.element_size() for t in stacks.values())


def _measure(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn``; return its result and the peak memory it added (GPU, or process RSS)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        reset_peak_memory(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, peak_memory_bytes(device) - base
    sampler = _RssSampler()
    with sampler:
        out = fn()
    return out, sampler.peak - sampler.base


class _RssSampler:
    """Polls this process's resident memory while a block runs (CPU peak per run)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> _RssSampler:
        self.base = self.peak = _rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


# ------------------------------------------------------------------------- synthetic content


def recall_within(reference: np.ndarray, found: np.ndarray, radius: float) -> float:
    """Fraction of ``reference`` points with a ``found`` point within ``radius`` (1.0 if none)."""
    reference = np.asarray(reference, dtype=np.float64).reshape(-1, 3)
    found = np.asarray(found, dtype=np.float64).reshape(-1, 3)
    if len(reference) == 0:
        return 1.0
    if len(found) == 0:
        return 0.0
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(found).query(reference, k=1)
    return float(np.mean(dist <= radius))


def sphere_coords(centre: np.ndarray, radius: float, shape: tuple[int, int, int]) -> np.ndarray:
    """(n, 3) integer voxel coordinates of a ball, clipped to the volume."""
    c = np.asarray(centre, dtype=np.float64)
    lo = np.maximum(np.floor(c - radius), 0).astype(int)
    hi = np.minimum(np.ceil(c + radius), np.asarray(shape) - 1).astype(int)
    axes = [np.arange(a, b + 1) for a, b in zip(lo, hi, strict=True)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    return grid[((grid - c) ** 2).sum(1) <= radius**2]


def synthetic_feature_volume(
    shape: tuple[int, int, int],
    channels: int,
    *,
    patches: int = 37,
    n_targets: int = 40,
    n_distractors: int = 40,
    radius: float = 10.0,
    seed: int = 0,
) -> tuple[Any, np.ndarray, np.ndarray]:
    """A FeatureVolume with planted particles; returns (fv, target centres, distractor centres).

    Each stack cell holds unit-variance noise plus a shared background vector; a particle adds
    its kind's vector (amplitude varying per particle, plus a small per-particle deviation)
    weighted by the share of a Gaussian (sigma = radius / 2) that falls in each patch, as a
    patch token sees the part of a particle inside its footprint: the similarity map then has
    one blob per particle about a patch wide, as with real patch features.
    """
    from cryosam.features import FeatureVolume

    rng = np.random.default_rng(seed)
    D, H, W = shape
    centres = _separated_points(rng, shape, n_targets + n_distractors, 3 * radius, radius)
    kinds = [_unit(rng, 3 * channels) * 3 * math.sqrt(channels) for _ in range(2)]
    background = _unit(rng, 3 * channels) * 0.3 * math.sqrt(channels)
    long_side = max(shape)
    sigma = radius / 2

    def cells(extent: int) -> int:
        return max(1, math.ceil(extent * patches / long_side))

    layout = {"z": (0, 1, 2), "y": (1, 0, 2), "x": (2, 0, 1)}  # slice axis, map rows, map cols
    stacks = {}
    for a, (name, (s_ax, r_ax, c_ax)) in enumerate(layout.items()):
        n_s, n_r, n_c = shape[s_ax], cells(shape[r_ax]), cells(shape[c_ax])
        stack = rng.standard_normal((n_s, n_r, n_c, channels), dtype=np.float32)
        stack += background[a * channels : (a + 1) * channels]
        rows = (np.arange(n_r) + 0.5) * shape[r_ax] / n_r - 0.5
        cols = (np.arange(n_c) + 0.5) * shape[c_ax] / n_c - 0.5
        half_r, half_c = shape[r_ax] / n_r / 2, shape[c_ax] / n_c / 2
        for p, centre in enumerate(centres):
            kind = kinds[0] if p < n_targets else kinds[1]
            vec = kind[a * channels : (a + 1) * channels] * rng.uniform(0.8, 1.2)
            vec = vec + rng.standard_normal(channels).astype(np.float32) * 0.5  # ~30 % of it
            lo = max(0, int(centre[s_ax] - 2 * radius))
            hi = min(n_s, int(centre[s_ax] + 2 * radius) + 1)
            ws = np.exp(-((np.arange(lo, hi) - centre[s_ax]) ** 2) / (2 * sigma**2))
            wr = _box_gauss(rows, half_r, centre[r_ax], sigma)
            wc = _box_gauss(cols, half_c, centre[c_ax], sigma)
            weight = (ws[:, None, None] * wr[None, :, None] * wc[None, None, :]).astype(np.float32)
            stack[lo:hi] += weight[..., None] * vec
        stacks[name] = torch.from_numpy(stack).to(torch.float16)
    fv = FeatureVolume(stacks, (D, H, W))
    return fv, centres[:n_targets], centres[n_targets:]


def _box_gauss(centres: np.ndarray, half: float, mu: float, sigma: float) -> np.ndarray:
    """Share of a 1-D Gaussian (mu, sigma) inside each patch [c - half, c + half], max 1."""
    from scipy.special import ndtr

    full = ndtr(half / sigma) - ndtr(-half / sigma)  # a particle centred in the patch: 1
    return (ndtr((centres + half - mu) / sigma) - ndtr((centres - half - mu) / sigma)) / full


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal(n).astype(np.float32)
    return v / np.linalg.norm(v)


def _separated_points(
    rng: np.random.Generator, shape: tuple[int, int, int], n: int, min_dist: float, margin: float
) -> np.ndarray:
    """``n`` random points at least ``min_dist`` apart, ``margin`` inside the volume."""
    lo = np.full(3, margin)
    hi = np.maximum(np.asarray(shape, dtype=np.float64) - 1 - margin, lo)
    points: list[np.ndarray] = []
    for _ in range(200 * max(n, 1)):
        if len(points) == n:
            break
        p = rng.uniform(lo, hi)
        if all(np.linalg.norm(p - q) >= min_dist for q in points):
            points.append(p)
    if len(points) < n:
        raise InputError(f"cannot place {n} particles {min_dist:g} voxels apart in {shape}; "
                         "use fewer --targets/--distractors or a bigger --shape")
    return np.asarray(points)
