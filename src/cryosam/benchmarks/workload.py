"""The work one ``cryosam segment`` run asks of its models, recorded to replay it elsewhere.

A weight-free run on a simulated tomogram (minutes on a CPU) records what the models were
asked to do: the slices encoded along each axis for the features, the matching levels (cells
scored, survivors) and, for the segmenter, every ``segment_batch`` call of the click and
proposal stages (slice, prompts, previous masks). :mod:`cryosam.benchmarks.replay` then asks
DINOv2 and SAM for exactly that work on a GPU, where random weights cannot produce it
themselves (they match everything or nothing and never stop a chain).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "cryosam-workload"
VERSION = 1
STAGES = ("segment_prompts", "segment_proposals")  # one propagate() each, in this order


@dataclass
class Workload:
    """What one run asked of its encoder, its matcher and its segmenter.

    ``calls[stage]`` lists the segmenter's ``segment_batch`` calls of that stage; a call is a
    list of batches ``[axis, index, points [[row, col], ...], has_previous_mask, min_iou]``
    (one slice each)."""

    shape: tuple[int, int, int]
    stride: int
    encoder_batch: int
    clicks: list[list[float]]
    particle_radius: float
    matching: dict[str, Any]
    calls: dict[str, list[list[list[Any]]]]
    decoder_batch: int = 64
    recorded: dict[str, Any] = field(default_factory=dict)  # the recording run: times, counts

    # ---- what the replay will do

    def slices(self, stage: str | None = None) -> dict[str, list[int]]:
        """The distinct slices the segmenter visits (``stage`` or all), per axis, sorted."""
        seen: dict[str, set[int]] = {a: set() for a in "zyx"}
        for name in (STAGES if stage is None else (stage,)):
            for call in self.calls.get(name, []):
                for axis, index, *_ in call:
                    seen[axis].add(int(index))
        return {a: sorted(v) for a, v in seen.items()}

    def prompts(self, stage: str | None = None) -> int:
        """Prompts sent to the segmenter (``stage`` or all)."""
        return sum(len(batch[2]) for name in (STAGES if stage is None else (stage,))
                   for call in self.calls.get(name, []) for batch in call)

    def summary(self) -> dict[str, Any]:
        """Counts for the benchmark's report."""
        from cryosam.features.volume import slice_positions  # what extraction encodes

        seen = self.slices()
        return {
            "shape_zyx": list(self.shape),
            "encoder_slices": {a: len(slice_positions(n, self.stride))
                               for a, n in zip("zyx", self.shape, strict=True)},
            "segmenter_slices": {a: len(v) for a, v in seen.items()},
            "segmenter_distinct_slices": sum(len(v) for v in seen.values()),
            "prompts": {s: self.prompts(s) for s in STAGES},
            "segment_calls": {s: len(self.calls.get(s, [])) for s in STAGES},
            "decoder_batch": self.decoder_batch,
            "proposals": self.matching.get("proposals"),
            "matching_levels": self.matching.get("levels"),
        }

    # ---- files

    def to_json(self) -> dict[str, Any]:
        """The workload as plain JSON, headed by :data:`FORMAT` and :data:`VERSION` (what
        :meth:`load` checks)."""
        out = asdict(self)
        out["shape"] = list(self.shape)
        return {"format": FORMAT, "version": VERSION, **out}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_json` to ``path`` as compact JSON, atomically."""
        from cryosam._atomic import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_json(), separators=(",", ":")))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Workload:
        """Read a workload written by :meth:`save`; a one-line :class:`InputError` when the file
        cannot be read, is not a workload or is of another :data:`VERSION`."""
        from cryosam.errors import InputError

        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"--workload {path}: cannot read it ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise InputError(f"--workload {path}: not a cryosam workload file (record one with "
                             "`cryosam bench pipeline --record-workload FILE`)")
        if data.get("version") != VERSION:
            raise InputError(f"--workload {path}: workload version {data.get('version')}, this "
                             f"cryosam reads version {VERSION}; record it again")
        data.pop("format"), data.pop("version")
        data["shape"] = tuple(int(s) for s in data["shape"])
        return cls(**data)


class WorkloadRecorder:
    """A segmenter that records every ``segment_batch`` call and passes it on.

    Each ``set_volume`` (one per ``propagate`` call) opens the next stage of :data:`STAGES`.
    Everything else is the wrapped segmenter's."""

    def __init__(self, inner: Any) -> None:
        from cryosam import backends

        self.inner = inner
        entry = backends.entry_of(inner)
        self.wants_dark = bool(entry.wants_dark) if entry else False
        self.stages: list[list[list[list[Any]]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def set_volume(self, volume: np.ndarray) -> None:
        """Open the list of calls of the next stage of :data:`STAGES`, then pass the volume on."""
        self.stages.append([])
        self.inner.set_volume(volume)

    def segment_batch(self, batches: list[Any]) -> list[Any]:
        """Record the call (per batch: axis, index, points rounded to 0.1 px, whether previous
        masks came, ``min_iou``), then let the wrapped segmenter answer it."""
        self.stages[-1].append([
            [b.axis, int(b.index), np.round(np.asarray(b.points, float).reshape(-1, 2), 1).tolist(),
             b.prev_masks is not None, b.min_iou] for b in batches])
        return self.inner.segment_batch(batches)


def record(shape: tuple[int, int, int], seed: int = 0, *, clicks: int = 1,
           echo: Any = print) -> tuple[Workload, dict[str, Any]]:
    """Run the weight-free pipeline on a simulated tomogram of ``shape`` and record its work.
    Returns the workload and the run record."""
    from cryosam.config import CryosamConfig, EncoderConfig, SegmenterConfig
    from cryosam.pipeline import CryoSAM
    from cryosam.segmenters import build_segmenter
    from cryosam.simulate import SimulationConfig, simulate

    start = time.perf_counter()
    sim = simulate(SimulationConfig(shape=shape, seed=seed))
    echo(f"simulated {sim.volume.shape} in {time.perf_counter() - start:.1f} s")
    cfg = CryosamConfig(encoder=EncoderConfig(name="filterbank"),
                        segmenter=SegmenterConfig(name="threshold"), device="cpu")
    recorder = WorkloadRecorder(build_segmenter(cfg.segmenter, "cpu"))
    prompts = sim.prompt_points[:clicks]
    result = CryoSAM(cfg, segmenter=recorder).segment(sim.volume, prompts,
                                                      voxel_size=sim.voxel_size)
    rec = result.record
    stats = rec.get("matching", {}).get("stats", {})
    matching = {
        "ratios": list(cfg.matching.ratios),
        "coarse_pooling": bool(cfg.matching.coarse_pooling),
        "levels": [{k: level[k] for k in ("ratio", "cells_scored", "survivors")}
                   for level in stats.get("levels", [])],
        "nms_candidates": int(stats.get("nms_candidates", 0)),
        "proposals": int(rec["counts"]["proposals"]),
        "top_k": int(cfg.matching.top_k),
    }
    calls = {name: recorder.stages[i] if i < len(recorder.stages) else []
             for i, name in enumerate(STAGES)}
    radius = rec.get("work", {}).get("radius_voxels") or sim.target_radius
    workload = Workload(
        shape=tuple(int(s) for s in sim.volume.shape), stride=cfg.encoder.slice_stride,
        encoder_batch=cfg.encoder.batch_size, clicks=np.asarray(prompts).tolist(),
        particle_radius=float(radius), matching=matching, calls=calls,
        decoder_batch=cfg.segmenter.decoder_batch_size,
        recorded={"models": "filterbank + threshold (weight-free), cpu",
                  "seconds": rec["seconds"], "counts": rec["counts"], "seed": seed,
                  "cryosam_version": rec.get("cryosam_version")})
    return workload, rec
