"""What the dock widget runs in napari's worker thread (no Qt here): segmenting, picking with
a saved query, saving a query and writing the outputs. Each returns what the widget shows."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from cryosam.napari._results import finite
from cryosam.result import SegmentationResult


def default_backends() -> tuple[str, str, str]:
    """(encoder, segmenter, why): DINOv2 + SAM when their weights are here, else the
    weight-free backends (the same choice as ``cryosam demo``)."""
    from cryosam.commands.demo import pick_backends

    return pick_backends()


def segment_job(model: Any, tomo: Any, cache_dir: str, tomo_name: str,
                clicks: np.ndarray | None, match: bool = True,
                negatives: np.ndarray | None = None, query: Any = None,
                ) -> tuple[SegmentationResult, float]:
    """Check the volume, segment it from the clicks or with a saved ``query``, and time it."""
    t0 = time.perf_counter()
    result = model.segment(finite(tomo), clicks, query=query, match=match, cache_dir=cache_dir,
                           tomo_name=tomo_name, negative_points=negatives)
    return result, time.perf_counter() - t0


def query_model(path: str, device: str, polarity: str, models: dict[Any, Any],
                binning: int | None = None) -> tuple[Any, Any]:
    """The saved query at ``path`` and a model with its own parameters on ``device`` (and
    ``polarity``, and ``binning`` when given: None puts the tomogram on the query's grid),
    keeping every match (the score slider starts at the automatic cut); models are reused
    from ``models`` by their parameters."""
    import dataclasses
    import json

    from cryosam.pipeline import CryoSAM
    from cryosam.query import SavedQuery

    saved = SavedQuery.load(path, where=str(path), make="Save query…")
    cfg = saved.config()
    cfg = dataclasses.replace(cfg, device=device, polarity=polarity,
                              binning=cfg.binning if binning is None else binning,
                              score=dataclasses.replace(cfg.score, min_score=0.0))
    key = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
    if key not in models:
        models[key] = CryoSAM(cfg)
    return saved, models[key]


def save_query_job(model: Any, tomo: Any, clicks: np.ndarray, cache_dir: str, tomo_name: str,
                   negatives: np.ndarray | None, path: str) -> Path:
    """Make the query from the clicks (as ``cryosam query`` does) and write it. The widget
    keeps every match for its slider (``min_score`` 0); the query does not carry that, so it
    cuts automatically wherever it is used."""
    saved = model.make_query(finite(tomo), clicks, cache_dir=cache_dir, tomo_name=tomo_name,
                             negative_points=negatives)
    saved.parameters = {**saved.parameters,
                        "score": {**saved.parameters["score"], "min_score": None}}
    return saved.save(path)


def save_job(result: SegmentationResult, out_dir: str) -> Path:
    """Write the outputs (replacing an earlier cryosam folder there)."""
    from cryosam.export import write_outputs

    write_outputs(result, out_dir, overwrite=True)
    return Path(out_dir)
