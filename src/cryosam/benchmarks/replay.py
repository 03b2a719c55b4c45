"""Replay a recorded workload (:mod:`cryosam.benchmarks.workload`) with real-size models.

DINOv2 encodes every slice the recorded run encoded (the real feature extraction, stacks and
all), matching scores as many cells per level as the recorded run did, and SAM embeds every
slice and decodes every prompt of the recorded ``segment_batch`` calls (the real
:class:`~cryosam.segmenters.sam.SamSegmenter`, previous masks and logits included). Random
weights cost the same as real ones. Then a second query on the same tomogram: features from
the cache file, matching, and the proposals again (the segmenter keeps its slice embeddings
for a volume with the same voxels).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryosam.benchmarks.workload import STAGES, Workload
from cryosam.record import StageTimer


def build_models(models: str, device: torch.device, *, sdpa: bool = True,
                 sam_batch: int | None = None, decoder_batch: int | None = None,
                 compile_models: bool = False) -> tuple[Any, Any]:
    """(DINOv2 encoder, SAM segmenter) with random weights: the paper's (ViT-L/14 with
    registers, ViT-H) or tiny ones (for CI)."""
    from cryosam.config import SegmenterConfig
    from cryosam.encoders.dinov2 import Dinov2Encoder, random_init_model
    from cryosam.errors import InputError
    from cryosam.segmenters.sam import SamSegmenter

    defaults = SegmenterConfig(name="sam")
    cfg = SegmenterConfig(name="sam",
                          encoder_batch_size=sam_batch or defaults.encoder_batch_size,
                          decoder_batch_size=decoder_batch or defaults.decoder_batch_size)
    if models == "paper":
        from segment_anything import sam_model_registry

        dino = random_init_model("vitl14")
        encoder = Dinov2Encoder(dino, device=device, name="dinov2-vitl14-reg:random-init")
        sam = sam_model_registry["vit_h"](checkpoint=None)
        model_id = "vit_h:random-init"
    elif models == "tiny":
        from cryosam.testing import tiny_dinov2, tiny_sam

        encoder = Dinov2Encoder(tiny_dinov2(), patches_long_side=8, device=device,
                                name="tiny-dinov2:random-init")
        sam, model_id = tiny_sam(img_size=128), "tiny-sam:random-init"
    else:
        raise InputError(f"--models {models!r}: a workload is replayed with paper or tiny")
    segmenter = SamSegmenter(sam, device, cfg, model_id=model_id, sdpa=sdpa)
    if compile_models:
        encoder.model = torch.compile(encoder.model)
        segmenter.model.image_encoder = torch.compile(segmenter.model.image_encoder)
    return encoder, segmenter


class _AxisTimes:
    """Wraps an encoder: when each axis's first batch started (extraction goes z, y, x)."""

    def __init__(self, inner: Any, counts: dict[str, int]) -> None:
        self.inner, self.counts = inner, counts
        self.id, self.patch_size, self.channels = inner.id, inner.patch_size, inner.channels
        self.grid_shape, self.device = inner.grid_shape, inner.device
        self.done = 0
        self.starts: dict[str, float] = {}

    def encode(self, slices: np.ndarray) -> torch.Tensor:
        edges = np.cumsum([self.counts[a] for a in "zyx"])
        axis = "zyx"[int(np.searchsorted(edges, self.done, side="right"))]
        self.starts.setdefault(axis, time.perf_counter())
        self.done += len(slices)
        return self.inner.encode(slices)

    def rates(self, end: float) -> dict[str, float]:
        order = [a for a in "zyx" if a in self.starts]
        stops = [self.starts[b] for b in order[1:]] + [end]
        return {a: self.counts[a] / max(stop - self.starts[a], 1e-9)
                for a, stop in zip(order, stops, strict=True)}


def _disks(points: np.ndarray, radius: float, shape: tuple[int, int]) -> np.ndarray:
    """(P, h, w) bool disks of ``radius`` at (row, col) points: a previous slice's mask."""
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    r2 = max(radius, 1.0) ** 2
    return np.stack([(yy - p[0]) ** 2 + (xx - p[1]) ** 2 <= r2 for p in points])


def replay_segmenter(segmenter: Any, volume: np.ndarray, calls: list, radius: float) -> None:
    """Send the recorded ``segment_batch`` calls of one stage to ``segmenter``."""
    from cryosam.segmenters.base import PromptBatch, slice_shape

    segmenter.set_volume(volume)
    lowres = int(getattr(segmenter, "lowres", 0))
    for call in calls:
        batches = []
        for axis, index, points, prev, min_iou in call:
            pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
            masks = logits = None
            if prev:
                masks = _disks(pts, radius, slice_shape(volume.shape, axis))
                logits = np.zeros((len(pts), lowres, lowres), np.float32) if lowres else None
            batches.append(PromptBatch(axis, int(index), pts, masks, logits,
                                       np.full(len(pts), np.inf), min_iou if prev else None))
        segmenter.segment_batch(batches)


def replay_matching(fv: Any, workload: Workload, device: torch.device) -> int:
    """Score as many cells per level as the recorded run (its first level: every cell; the
    others: that many cells drawn at random), then NMS over as many candidates. Returns the
    cells scored."""
    from cryosam import matching
    from cryosam.features import turned
    from cryosam.testing import sphere_coords

    click = np.asarray(workload.clicks[0], dtype=np.float64)
    mask = sphere_coords(click, max(workload.particle_radius, 1.0), workload.shape)
    query = turned(matching.pool_query(fv, [mask]))  # as many vectors as a default run
    if fv.device != device:
        fv = fv.to(device)
    scorer = matching._Scorer(matching._prepare_queries(query, fv.dim), "torch", device)
    levels = workload.matching.get("levels", [])
    rng = np.random.default_rng(0)
    scored = 0
    for i, level in enumerate(levels):
        ratio = int(level["ratio"])
        last = i == len(levels) - 1
        pooled = workload.matching.get("coarse_pooling", True) and not last
        source = fv.pooled(ratio) if pooled else fv
        grid = fv.grid_shape(ratio)
        total = math.prod(grid)
        n = min(int(level["cells_scored"]), total)
        cells = None
        if i > 0 and n < total:
            pick = np.sort(rng.choice(total, size=n, replace=False))
            cells = np.stack(np.unravel_index(pick, grid), axis=1).astype(np.int64)
        scored += matching._score_level(source, ratio, cells, scorer, 2.0, 16384)[2]
    n_cand = int(workload.matching.get("nms_candidates", 0))
    pts = rng.uniform(0, np.asarray(workload.shape) - 1, size=(n_cand, 3))
    matching.nms(pts, rng.random(n_cand), 1.5 * workload.particle_radius,
                 top_k=int(workload.matching.get("top_k", 0)))
    return scored


def replay(workload: Workload, encoder: Any, segmenter: Any, device: torch.device, *,
           encoder_batch: int | None = None, echo: Callable[[str], None] = print,
           seed: int = 0) -> dict[str, Any]:
    """Run the workload on the models; per stage seconds and peak memory, encoder rates,
    counts, and the second query."""
    from cryosam.features import FeatureVolume, extract_features

    clock = StageTimer(device)
    rng = np.random.default_rng(seed)
    volume = rng.random(workload.shape, dtype=np.float32)  # the models' cost ignores content
    summary = workload.summary()
    counts = summary["encoder_slices"]
    timed = _AxisTimes(encoder, counts)
    batch = int(encoder_batch or workload.encoder_batch)
    with clock("features"):
        fv = extract_features(volume, timed, stride=workload.stride, batch_size=batch,
                              device=device, clip_percentiles=None)
    dino_rates = timed.rates(time.perf_counter())
    with clock("matching"):
        cells = replay_matching(fv, workload, device)
    sam_seconds = [0.0]
    inner_encode = segmenter._encode

    def timed_encode(axis: str, indices: list[int]) -> list:
        start = time.perf_counter()
        out = inner_encode(axis, indices)
        clock.sync()
        sam_seconds[0] += time.perf_counter() - start
        return out

    segmenter._encode = timed_encode
    before = (segmenter.slices_encoded, segmenter.decoder_calls)
    for stage in STAGES:
        with clock(stage):
            replay_segmenter(segmenter, volume, workload.calls.get(stage, []),
                             workload.particle_radius)
    sam_slices = segmenter.slices_encoded - before[0]
    sam_calls = segmenter.decoder_calls - before[1]
    sam_first = sam_seconds[0]  # the second query's encoding is reported on its own
    first = dict(clock.seconds)
    first_total = sum(first.values())
    peaks = dict(clock.peak_bytes)
    echo(f"first query done in {first_total:.1f} s; saving the features for the second")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "features.pt"
        with clock("cache_save"):
            fv.save(path)
        del fv
        second = StageTimer(device)
        with second("features"):
            fv2 = FeatureVolume.load(path)
        with second("matching"):
            replay_matching(fv2, workload, device)
        again = volume.copy()  # a new array with the same voxels, as a new query makes
        before2 = segmenter.slices_encoded
        for stage in STAGES:
            with second(stage):
                replay_segmenter(segmenter, again, workload.calls.get(stage, []),
                                 workload.particle_radius)
    return {
        "stages_seconds": {k: round(v, 3) for k, v in first.items()},
        "stages_peak_memory_bytes": peaks,
        "total_seconds": round(first_total, 3),
        "cache_save_seconds": round(clock.seconds["cache_save"], 3),
        "dinov2_slices_per_s": {a: round(v, 2) for a, v in dino_rates.items()},
        "dinov2_slices_per_s_all": round(sum(counts.values()) / first["features"], 2),
        "sam_encoder_slices": sam_slices,
        "sam_encoder_seconds": round(sam_first, 3),
        "sam_encoder_slices_per_s": round(sam_slices / max(sam_first, 1e-9), 2),
        "sam_decoder_calls": sam_calls,
        "sam_cache_budget_mb": segmenter.cache_budget_mb,
        "sam_cache_evictions": segmenter.cache_evictions,
        "prompts": sum(summary["prompts"].values()),
        "matching_cells_scored": cells,
        "peak_memory_bytes": max(peaks.values()),
        "second_query": {
            "stages_seconds": {k: round(v, 3) for k, v in second.seconds.items()},
            "stages_peak_memory_bytes": dict(second.peak_bytes),
            "total_seconds": round(sum(second.seconds.values()), 3),
            "sam_encoder_slices": segmenter.slices_encoded - before2,
            "sam_encoder_seconds": round(sam_seconds[0] - sam_first, 3),
        },
    }
