"""The CryoSAM pipeline: clicks → 3-D masks → features → matching → masks of every match.

:class:`CryoSAM` holds the loaded models so that several tomograms (or several queries on one
tomogram) reuse them; :func:`segment` is the one-call form.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

import cryosam
from cryosam import io
from cryosam.config import CryosamConfig
from cryosam.device import peak_memory_bytes, reset_peak_memory, resolve_device
from cryosam.errors import InputError
from cryosam.export import tomo_stem


@dataclass
class SegmentationResult:
    """Everything a run produced; :func:`cryosam.export.write_outputs` writes it to disk."""

    tomogram: io.Tomogram
    tomo_name: str
    target: str  # "particle" | "membrane"
    prompt_zyx: np.ndarray  # (P, 3) clicked points, voxels
    instances: list[Any]  # InstanceMask per kept instance; the clicked ones first
    instance_scores: np.ndarray  # (I,) combined score
    instance_similarity: np.ndarray  # (I,) matching similarity (1 for clicks)
    instance_confidence: np.ndarray  # (I,) segmenter confidence
    instance_is_prompt: np.ndarray  # (I,) bool
    instance_seeds: np.ndarray  # (I, 3) the click or proposal each instance grew from
    instance_click_rows: np.ndarray  # (I,) row of the click in the points file, -1 = match
    semantic: np.ndarray  # (D, H, W) int8, 1 = segmented
    labels: np.ndarray  # (D, H, W) int16/int32 instance ids (1..I), 0 = background
    proposals_zyx: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    proposal_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    record: dict[str, Any] = field(default_factory=dict)

    # picks: one per instance at its centroid, sorted by score (particles only)
    @cached_property
    def _pick_order(self) -> np.ndarray:
        if self.target != "particle":
            return np.zeros(0, dtype=int)
        return np.argsort(-self.instance_scores, kind="stable")

    @cached_property
    def picks_zyx(self) -> np.ndarray:
        """(N, 3) instance centroids in voxels (z, y, x), best score first; a click whose
        mask came out empty is reported at the click itself."""
        order = self._pick_order
        if not len(order):
            return np.zeros((0, 3))
        return np.array([self.instances[i].centroid() if self.instances[i].n_voxels
                         else self.instance_seeds[i] for i in order], dtype=float)

    @property
    def pick_scores(self) -> np.ndarray:
        return self.instance_scores[self._pick_order]

    @property
    def pick_similarity(self) -> np.ndarray:
        return self.instance_similarity[self._pick_order]

    @property
    def pick_confidence(self) -> np.ndarray:
        return self.instance_confidence[self._pick_order]

    @property
    def pick_is_prompt(self) -> np.ndarray:
        return self.instance_is_prompt[self._pick_order]

    @property
    def pick_click_row(self) -> np.ndarray:
        """Row of each pick's click in the points file (0-based), -1 for matches."""
        return self.instance_click_rows[self._pick_order]

    @property
    def pick_instance_ids(self) -> np.ndarray:
        """Label of each pick in ``instances.mrc``."""
        return self._pick_order + 1

    @cached_property
    def pick_n_voxels(self) -> np.ndarray:
        return np.array([self.instances[i].n_voxels for i in self._pick_order], dtype=np.int64)


class _Stages:
    """Times each pipeline stage and records its peak memory."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self.peak_bytes: dict[str, int] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        reset_peak_memory(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.peak_bytes[name] = max(self.peak_bytes.get(name, 0),
                                        peak_memory_bytes(self.device))


class CryoSAM:
    """Loaded models plus configuration; call :meth:`segment` once per tomogram.

    ``encoder``/``segmenter`` may be passed ready-built (e.g. tiny models in tests);
    otherwise they are built from ``config`` on first use and kept.
    """

    def __init__(
        self,
        config: CryosamConfig | None = None,
        *,
        encoder: Any | None = None,
        segmenter: Any | None = None,
    ) -> None:
        self.config = config or CryosamConfig()
        self.device = resolve_device(self.config.device)
        self._encoder = encoder
        self._segmenter = segmenter

    @property
    def encoder(self) -> Any:
        """The slice feature encoder (built on first use)."""
        if self._encoder is None:
            from cryosam.encoders import build_encoder

            self._encoder = build_encoder(self.config.encoder, self.device)
        return self._encoder

    @property
    def segmenter(self) -> Any:
        """The 2-D promptable segmenter (built on first use)."""
        if self._segmenter is None:
            from cryosam.segmenters import build_segmenter

            self._segmenter = build_segmenter(self.config.segmenter, self.device,
                                              target=self.config.propagation.target)
        return self._segmenter

    def segment(
        self,
        tomogram: io.Tomogram | str | os.PathLike[str] | np.ndarray,
        points: np.ndarray | str | os.PathLike[str] | Sequence[Sequence[float]],
        *,
        match: bool | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        voxel_size: float | None = None,
        points_unit: str = "voxel",
        tomo_name: str | None = None,
    ) -> SegmentationResult:
        """Segment the clicked particles (or membranes) and, with ``match``, all similar ones.

        ``points`` are (z, y, x) voxels when given as an array, or a CSV/STAR file path.
        ``match`` defaults to True for particles and False for membranes (where the clicks
        usually name the membranes wanted; matching finds other sheet-like structures too).
        """
        cfg = self.config
        if match is None:
            match = cfg.propagation.target == "particle"
        stages = _Stages(self.device)
        started = time.time()
        with stages("models"):
            # load (and so check) the models before any work on the data
            segmenter = self.segmenter
            if match:
                _ = self.encoder
        with stages("load"):
            tomo = _as_tomogram(tomogram, voxel_size)
            prompts, points_source = _as_points(points, tomo, points_unit, tomo_name)
        name = tomo_name or (tomo_stem(tomo.path) if tomo.path else "tomo")
        target = cfg.propagation.target
        with stages("normalise"):
            # one normalised copy serves both models (the raw data may be memory-mapped)
            from cryosam.features import normalise_volume

            volume = normalise_volume(tomo.data, cfg.propagation.clip_percentiles)
        prop_cfg = dataclasses.replace(cfg.propagation, normalise=False)
        shared_norm = tuple(cfg.encoder.clip_percentiles) == tuple(
            cfg.propagation.clip_percentiles)

        from cryosam.propagation import propagate

        with stages("segment_prompts"):
            prompt_res = propagate(volume, prompts, segmenter, prop_cfg)
        instances = list(prompt_res.instances)
        similarity = [1.0] * len(instances)
        confidence = [float(c) for c in prompt_res.confidence]
        is_prompt = [True] * len(instances)
        seeds = [p for p in prompts]
        click_rows = list(range(len(instances)))
        prop_stats: dict[str, Any] = {"prompts": dict(prompt_res.stats)}
        empty_prompts = [i for i, inst in enumerate(instances) if inst.n_voxels == 0]
        if empty_prompts:
            import warnings

            warnings.warn(
                f"{len(empty_prompts)} click(s) gave an empty mask (rows {empty_prompts}); "
                "they are kept as picks at the click, with score 0, but do not shape the query",
                stacklevel=2,
            )

        proposals_zyx = np.zeros((0, 3))
        proposal_scores = np.zeros(0)
        matching_record: dict[str, Any] = {"enabled": bool(match)}
        feature_record: dict[str, Any] = {}
        if match and any(inst.n_voxels > 0 for inst in instances):
            from cryosam.features import extract_features
            from cryosam.matching import match as run_matching
            from cryosam.matching import (
                nms_radius_from_masks,
                particle_radius_from_masks,
                pool_query,
            )

            with stages("features"):
                fv = extract_features(
                    volume if shared_norm else tomo.data,
                    self.encoder,
                    stride=cfg.encoder.slice_stride,
                    batch_size=cfg.encoder.batch_size,
                    device=self.device,
                    cache_dir=cache_dir,
                    clip_percentiles=None if shared_norm else cfg.encoder.clip_percentiles,
                    reduce_to=cfg.encoder.reduce_to,
                )
            feature_record = {
                "encoder": getattr(self.encoder, "id", type(self.encoder).__name__),
                "dim": int(fv.dim),
                "nbytes": int(fv.nbytes),
                "cache_hit": bool(getattr(fv, "from_cache", False)),
                "voxels_per_patch": (fv.meta or {}).get("voxels_per_patch"),
                "grids": (fv.meta or {}).get("grids"),
            }
            with stages("matching"):
                masks = [inst.coords() for inst in instances if inst.n_voxels > 0]
                queries = pool_query(fv, masks, seed=cfg.seed)
                radius = (cfg.matching.nms_radius if cfg.matching.nms_radius is not None
                          else nms_radius_from_masks(masks))
                proposals = run_matching(fv, queries, cfg.matching, nms_radius=radius,
                                         particle_radius=particle_radius_from_masks(masks),
                                         device=self.device)
            proposals_zyx = np.asarray(proposals.zyx, dtype=float).reshape(-1, 3)
            proposal_scores = np.asarray(proposals.scores, dtype=float).reshape(-1)
            matching_record = {
                "enabled": True,
                "nms_radius": float(radius),
                "queries": int(queries.shape[0]),
                "proposals": int(len(proposals_zyx)),
                "stats": proposals.stats.to_dict(),
            }
            keep = _outside_instances(proposals_zyx, instances, volume.shape)
            cand_zyx, cand_sim = proposals_zyx[keep], proposal_scores[keep]
            matching_record["proposals_inside_clicked"] = int((~keep).sum())
            if len(cand_zyx):
                with stages("segment_proposals"):
                    cand_res = propagate(volume, cand_zyx, segmenter, prop_cfg)
                prop_stats["proposals"] = dict(cand_res.stats)
                kept, rejected = _plausible(cand_res.instances, cand_zyx, instances, target,
                                            cfg)
                matching_record["rejected"] = rejected
                for i in kept:
                    instances.append(cand_res.instances[i])
                    similarity.append(float(cand_sim[i]))
                    confidence.append(float(cand_res.confidence[i]))
                    is_prompt.append(False)
                    seeds.append(cand_zyx[i])
                    click_rows.append(-1)

        with stages("merge"):
            sim_arr = np.asarray(similarity, dtype=float)
            conf_arr = np.clip(np.asarray(confidence, dtype=float), 0.0, 1.0)
            scores = sim_arr * conf_arr
            order, labels, merged = _merge(instances, scores, np.asarray(is_prompt),
                                           volume.shape, cfg.merge_iou)
            instances = [merged[i] for i in order]
            result = SegmentationResult(
                tomogram=tomo,
                tomo_name=name,
                target=target,
                prompt_zyx=prompts,
                instances=instances,
                instance_scores=scores[order],
                instance_similarity=sim_arr[order],
                instance_confidence=conf_arr[order],
                instance_is_prompt=np.asarray(is_prompt, dtype=bool)[order],
                instance_seeds=np.asarray(seeds, dtype=float).reshape(-1, 3)[order],
                instance_click_rows=np.asarray(click_rows, dtype=np.int64)[order],
                semantic=(labels > 0).astype(np.int8),
                labels=labels,
                proposals_zyx=proposals_zyx,
                proposal_scores=proposal_scores,
            )
        counters = {
            "encoder_calls": int(getattr(segmenter, "encoder_calls", 0)),
            "decoder_calls": int(getattr(segmenter, "decoder_calls", 0)),
        }
        result.record = {
            "cryosam_version": cryosam.__version__,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "inputs": {
                "tomogram": _file_info(tomo.path),
                "shape_zyx": list(tomo.shape),
                "voxel_size_zyx": list(tomo.voxel_size) if tomo.voxel_size else None,
                "origin_zyx": list(tomo.origin),
                "points": _file_info(points_source) if points_source else "array",
                "points_unit": points_unit,
                "tomo_name": name,
                "prompts_zyx": prompts.tolist(),
            },
            "parameters": cfg.to_dict(),
            "models": {
                "encoder": getattr(self._encoder, "id", None) if match else None,
                "segmenter": getattr(segmenter, "id", type(segmenter).__name__),
            },
            "scale": _scale_record(feature_record, segmenter, tomo.shape),
            "device": _device_record(self.device),
            "versions": _versions(),
            "counts": {
                "prompts": int(len(prompts)),
                "proposals": int(len(proposals_zyx)),
                "instances": int(len(instances)),
                "picks": int(len(result.picks_zyx)),
                **counters,
            },
            "features": feature_record,
            "matching": matching_record,
            "propagation": prop_stats,
            "score": "similarity x segmenter confidence (clicks: similarity 1)",
            "seconds": {k: round(v, 4) for k, v in stages.seconds.items()},
            "peak_memory_bytes": stages.peak_bytes,
            "total_seconds": round(time.time() - started, 4),
        }
        return result


def segment(
    tomogram: io.Tomogram | str | os.PathLike[str] | np.ndarray,
    points: np.ndarray | str | os.PathLike[str] | Sequence[Sequence[float]],
    config: CryosamConfig | None = None,
    **kwargs: Any,
) -> SegmentationResult:
    """One-call form of :meth:`CryoSAM.segment` (models are loaded for this call only)."""
    return CryoSAM(config).segment(tomogram, points, **kwargs)


# --- helpers -----------------------------------------------------------------------------


def _as_tomogram(tomogram: Any, voxel_size: float | None) -> io.Tomogram:
    if isinstance(tomogram, io.Tomogram):
        if voxel_size is not None:
            return dataclasses.replace(tomogram, voxel_size=(float(voxel_size),) * 3)
        return tomogram
    if isinstance(tomogram, np.ndarray):
        if tomogram.ndim != 3:
            raise InputError(f"tomogram array has shape {tomogram.shape}; need a 3-D (z, y, x) "
                             "volume")
        data = np.asarray(tomogram, dtype=np.float32)
        if not np.isfinite(data).all():
            raise InputError("tomogram array holds NaN or inf values; clean it first")
        vs = (float(voxel_size),) * 3 if voxel_size else None
        return io.Tomogram(data=data, voxel_size=vs, origin=(0.0, 0.0, 0.0), path=None)
    return io.read_tomogram(tomogram, voxel_size=voxel_size)


def _as_points(
    points: Any, tomo: io.Tomogram, unit: str, tomo_name: str | None
) -> tuple[np.ndarray, Path | None]:
    if isinstance(points, str | os.PathLike):
        ps = io.read_points(points, shape=tomo.shape, voxel_size=tomo.voxel_size, unit=unit,
                            tomo_name=tomo_name)
        return np.asarray(ps.zyx, dtype=float).reshape(-1, 3), Path(points)
    arr = np.asarray(points, dtype=float).reshape(-1, 3)
    if not len(arr):
        raise InputError("no points given; click at least one particle")
    return arr, None  # propagation checks that they are finite and inside the volume


def _outside_instances(zyx: np.ndarray, instances: Sequence[Any], shape: tuple[int, ...]
                       ) -> np.ndarray:
    """True for proposals whose voxel lies outside every instance mask so far."""
    keep = np.ones(len(zyx), dtype=bool)
    if not len(zyx):
        return keep
    vox = np.clip(np.rint(zyx).astype(np.int64), 0, np.asarray(shape) - 1)
    for inst in instances:
        if inst.n_voxels == 0:
            continue
        rel = vox - np.asarray(inst.offset)
        inside = ((rel >= 0) & (rel < np.asarray(inst.mask.shape))).all(axis=1)
        idx = np.nonzero(inside & keep)[0]
        if len(idx):
            r = rel[idx]
            hit = inst.mask[r[:, 0], r[:, 1], r[:, 2]]
            keep[idx[hit]] = False
    return keep


def elongation(inst: Any) -> float:
    """Ratio of the longest to the shortest principal axis of a mask (1 = round)."""
    coords = inst.coords().astype(float)
    if len(coords) < 4:
        return 1.0
    ev = np.linalg.eigvalsh(np.cov(coords.T) + 1e-3 * np.eye(3))
    return float(np.sqrt(ev[-1] / max(ev[0], 1e-6)))


def _plausible(
    instances: Sequence[Any],
    zyx: np.ndarray,
    references: Sequence[Any],
    target: str,
    cfg: CryosamConfig,
) -> tuple[list[int], dict[str, int]]:
    """Indices of proposal instances worth keeping, and counts of why others were dropped.

    A particle proposal must give a non-empty mask centred near its point, whose volume is
    within [min_size_ratio, max_size_ratio] × the clicked particles' median volume and whose
    elongation is at most ``max_elongation_ratio`` × theirs: the clicks say what the particle
    looks like, and matches of another size or shape are other things. Membrane proposals
    need only reach the minimum size.
    """
    kept: list[int] = []
    rejected = {"empty": 0, "size": 0, "shape": 0, "off_point": 0}
    refs = [r for r in references if r.n_voxels > 0]
    ref_size = float(np.median([r.n_voxels for r in refs])) if refs else 0.0
    ref_elong = max((elongation(r) for r in refs), default=0.0)
    for i, inst in enumerate(instances):
        if inst.n_voxels == 0:
            rejected["empty"] += 1
            continue
        if not refs:
            kept.append(i)
            continue
        if target != "particle":
            # membranes: any sheet the size of the clicked ones, however shaped or large
            if inst.n_voxels >= cfg.min_size_ratio * ref_size:
                kept.append(i)
            else:
                rejected["size"] += 1
            continue
        if not cfg.min_size_ratio * ref_size <= inst.n_voxels <= cfg.max_size_ratio * ref_size:
            rejected["size"] += 1
            continue
        if elongation(inst) > cfg.max_elongation_ratio * ref_elong:
            rejected["shape"] += 1
            continue
        c = np.asarray(inst.centroid(), dtype=float)
        extent = max(2.0, 0.5 * float(np.max(inst.mask.shape)))
        if np.linalg.norm(c - zyx[i]) > extent:
            rejected["off_point"] += 1
            continue
        kept.append(i)
    return kept, rejected


def _merge(
    instances: Sequence[Any],
    scores: np.ndarray,
    is_prompt: np.ndarray,
    shape: tuple[int, ...],
    merge_iou: float,
) -> tuple[list[int], np.ndarray, list[Any]]:
    """Paint instances into a label volume, best first (clicks before matches).

    An instance that overlaps an already painted one by ≥ ``merge_iou`` of its own voxels is
    merged into it (union); otherwise it only takes the voxels still free. Returns the order
    of the surviving instances, the label volume (ids 1..N in that order) and the instances
    (merged ones updated).
    """
    n = len(instances)
    dtype = np.int16 if n < 32000 else np.int32
    labels = np.zeros(shape, dtype=dtype)
    rank = np.lexsort((-scores, ~is_prompt.astype(bool))) if n else np.zeros(0, dtype=int)
    kept: list[int] = []
    merged: list[Any] = list(instances)
    label_of: dict[int, int] = {}
    for i in rank:
        inst = instances[i]
        if inst.n_voxels == 0 and not is_prompt[i]:
            continue
        if inst.n_voxels == 0:
            kept.append(int(i))
            continue
        z0, y0, x0 = (int(v) for v in inst.offset)
        dz, dy, dx = inst.mask.shape
        region = labels[z0:z0 + dz, y0:y0 + dy, x0:x0 + dx]
        under = region[inst.mask]
        taken = under[under > 0]
        if len(taken) and not is_prompt[i]:
            ids, counts = np.unique(taken, return_counts=True)
            best = int(np.argmax(counts))
            if counts[best] >= merge_iou * inst.n_voxels:
                owner = int(ids[best])
                region[inst.mask & (region == 0)] = owner
                j = label_of[owner]
                merged[j] = merged[j].union(inst)
                continue
        kept.append(int(i))
        label = len(kept)
        label_of[label] = int(i)
        region[inst.mask & (region == 0)] = label
    # relabel in the final order (kept order is already clicks first, then by score)
    return kept, labels, merged


def _file_info(path: Path | str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    p = Path(path)
    return {"path": str(p.resolve()), "bytes": p.stat().st_size, "sha256": io.file_sha256(p)}


def _scale_record(features: dict[str, Any], segmenter: Any, shape: tuple[int, ...]
                  ) -> dict[str, Any]:
    """Voxels per model patch (DESIGN "Scale"): the encoder's per axis from the feature
    volume, SAM's (16-px patches of its 1024-px input) for the largest slice."""
    out: dict[str, Any] = {}
    if features.get("voxels_per_patch"):
        out["encoder_voxels_per_patch"] = features["voxels_per_patch"]
    geometry = getattr(segmenter, "geometry", None)
    if callable(geometry):
        long_side = max(shape[1:]) if len(shape) == 3 else max(shape)
        out["sam_voxels_per_patch"] = round(16.0 * long_side / float(geometry(1, 1).img_size), 3)
    return out


def _device_record(device: Any) -> dict[str, Any]:
    import torch

    rec: dict[str, Any] = {"type": device.type, "host": platform.node(),
                           "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        rec["name"] = torch.cuda.get_device_name(device)
    return rec


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("cryosam", "numpy", "scipy", "torch", "torchvision", "transformers",
                "segment-anything", "faiss-gpu", "faiss-cpu", "mrcfile", "starfile"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out
