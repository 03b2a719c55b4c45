"""What the widget does with a result, without Qt: the score filter, the filtered result that
"Save" writes, and the conversion of napari layers into cryosam's inputs."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from cryosam import io
from cryosam.errors import InputError
from cryosam.result import SegmentationResult
from cryosam.utils import outside_volume


def kept_picks(result: SegmentationResult, min_score: float) -> np.ndarray:
    """Which picks (in ``result.picks_zyx`` order) pass the score filter; clicks always do."""
    return (result.pick_scores >= min_score) | result.pick_is_prompt


def hidden_labels(result: SegmentationResult, min_score: float) -> np.ndarray:
    """The instance ids (labels) that the score filter hides."""
    keep = kept_picks(result, min_score)
    return result.pick_instance_ids[~keep]


def _widget_cut(result: SegmentationResult) -> tuple[Any, float, int]:
    """The cut the CLI would choose for the widget's result (the widget keeps every match),
    the query's share of the tomogram and the number of matches."""
    from cryosam.config import ScoreConfig
    from cryosam.cut import choose_cut

    found = [i for i in result.instances if not i.is_prompt]
    share = float(result.record.get("matching", {}).get("stats", {}).get("share", 0.0))
    return choose_cut(found, share, ScoreConfig()), share, len(found)


def background_note(result: SegmentationResult) -> str | None:
    """What to tell the user when the query matched most of the tomogram (the CLI would
    write none of its matches: :func:`cryosam.cut.background_cut`); None otherwise."""
    from cryosam.cut import BACKGROUND, background_message

    cut, share, matches = _widget_cut(result)
    if cut.method != BACKGROUND:
        return None
    return (f"cryosam: {background_message(share, matches)}; lower the score slider to see "
            "them.")


def starting_score(result: SegmentationResult) -> float:
    """Where the score filter starts: the cut the CLI would choose (the widget's runs keep
    every match, so the slider can go below it); at the top for a background cut."""
    cut, _, matches = _widget_cut(result)
    return min(cut.threshold, 1.0) if matches else 0.0


def filtered_result(result: SegmentationResult, min_score: float) -> SegmentationResult:
    """``result`` without the instances below ``min_score`` (clicks are kept), relabelled
    1..K in the same order; those below go to ``below_cut`` (``picks_below_cut.csv``) and
    the run record notes the filter, the cut and the new counts."""
    from cryosam.cut import Cut
    from cryosam.merge import split_at_cut

    kept, below, labels = split_at_cut(result.instances, result.labels, min_score)
    if not below:
        return result
    record: dict[str, Any] = dict(result.record)
    counts = dict(record.get("counts", {}))
    counts.update(instances=len(kept), picks=len(kept) if result.target == "particle" else 0)
    record["counts"] = counts
    record["napari_filter"] = {"min_score": float(min_score), "kept": len(kept),
                               "of": len(result.instances), "clicks_always_kept": True}
    score = dict(record.get("score") or {})
    score.update(cut=Cut(float(min_score), "napari score filter").report(),
                 above_cut=sum(not inst.is_prompt for inst in kept), below_cut=len(below))
    record["score"] = score
    return dataclasses.replace(result, instances=kept, labels=labels,
                               semantic=(labels > 0).astype(np.int8), record=record,
                               below_cut=below + list(result.below_cut))


def tomogram_from_array(data: Any, scale: Any, metadata: dict[str, Any] | None
                        ) -> io.Tomogram:
    """A :class:`cryosam.io.Tomogram` from an image layer's data, scale and metadata.

    The voxel size is the one the cryosam reader stored, else the layer's scale when it is
    not all ones (a layer opened elsewhere), else unknown.
    """
    arr = np.asarray(data)
    if arr.ndim != 3:
        raise InputError(f"the image layer is {arr.ndim}-D {tuple(arr.shape)}; pick a 3-D "
                         "(z, y, x) tomogram")
    meta = (metadata or {}).get("cryosam", {})
    vs = meta.get("voxel_size")
    if vs is None:
        sc = [float(s) for s in np.asarray(scale, dtype=float)[-3:]]
        vs = sc if any(abs(s - 1.0) > 1e-9 for s in sc) else None
    path = meta.get("path")
    return io.Tomogram(
        data=arr.astype(np.float32, copy=False),
        voxel_size=tuple(float(v) for v in vs) if vs else None,  # type: ignore[arg-type]
        origin=tuple(float(v) for v in meta.get("origin", (0.0, 0.0, 0.0))),  # type: ignore[arg-type]
        path=Path(path) if path and Path(path).is_file() else None,
    )


def check_clicks(zyx: np.ndarray, shape: tuple[int, ...], layer_name: str) -> np.ndarray:
    """Refuse an empty click list or clicks outside the (D, H, W) volume."""
    pts = np.asarray(zyx, dtype=float).reshape(-1, 3)
    if not len(pts):
        raise InputError(f"the points layer {layer_name!r} has no points; click at least one "
                         "particle (points layer in add mode)")
    size = np.asarray(shape[-3:], dtype=float)
    outside = outside_volume(pts, shape)
    if outside.any():
        i = int(np.argmax(outside))
        raise InputError(f"point {i} of {layer_name!r} (z, y, x = "
                         f"{', '.join(f'{v:.1f}' for v in pts[i])} voxels) lies outside the "
                         f"tomogram {tuple(int(s) for s in size)}; delete it or pick the "
                         "matching image layer")
    return pts


def finite(tomo: io.Tomogram) -> io.Tomogram:
    """Refuse NaN/inf voxels (the pipeline needs finite values)."""
    if not np.isfinite(tomo.data).all():
        raise InputError("the image layer holds NaN or inf values; clean the tomogram first")
    return tomo
