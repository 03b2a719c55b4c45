"""Write a segmentation result as the files users open: picks, masks, preview, run record.

Everything goes into a hidden sibling folder first and is renamed onto ``out_dir`` at the
end, so an interrupted run never leaves a folder that looks complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from cryosam import io
from cryosam._atomic import (
    atomic_path,
    check_writable,
    output_lock,
    replace_dir,
    sweep_stale,
    temp_dir,
)
from cryosam.errors import CryosamWarning, InputError, collect_warnings, keep_warnings
from cryosam.result import Instance, SegmentationResult
from cryosam.utils import tomo_stem

OUTPUT_FILES = (
    "picks.csv",
    "picks_below_cut.csv",  # matches under the score cut, for thresholding by hand
    "picks.star",
    "picks_napari.csv",
    "picks_relion5.star",  # io.STAR_FLAVOURS: one STAR file per tool
    "picks_warp.star",
    "picks_relion4.star",  # only with a tilt-series pixel size
    "membranes.csv",  # membrane runs: each label's clicks
    "semantic.mrc",
    "instances.mrc",
    "preview.png",
    "run.json",
)


def default_out_dir(tomo_path: str | os.PathLike[str]) -> Path:
    """``<stem>_cryosam/`` beside the input tomogram."""
    return Path(tomo_path).parent / f"{tomo_stem(tomo_path)}_cryosam"


def check_out_dir(
    out_dir: str | os.PathLike[str],
    overwrite: bool,
    inputs: tuple[str | os.PathLike[str], ...] = (),
) -> Path:
    """Check, before any work, that ``out_dir`` can be written; return it as a Path.

    An existing non-empty folder is replaced only with ``overwrite``, and only when it is an
    earlier cryosam output (it holds ``run.json`` and nothing but cryosam's files) that holds
    none of ``inputs``: ``--overwrite`` never deletes a user's own files.
    """
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise InputError(f"{out}: output folder exists; pass --overwrite or choose another "
                             "--out")
        names = {p.name for p in out.iterdir()}
        if "run.json" not in names or not names <= set(OUTPUT_FILES):
            raise InputError(f"{out}: holds files cryosam did not write; --overwrite only "
                             "replaces an earlier cryosam output folder, choose another --out")
        resolved = out.resolve()
        for item in inputs:
            if resolved in Path(item).resolve().parents:
                raise InputError(f"{out}: holds the input {item}; choose another --out")
    resolved = out.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise InputError(f"--out {out_dir}: is the current folder (or holds it); cryosam "
                         "replaces --out as a whole, so name a new folder, e.g. --out picks/")
    if out.is_dir() and os.path.ismount(out):
        raise InputError(f"--out {out_dir}: is a mount point; cryosam replaces --out as a "
                         "whole, so name a folder inside it")
    check_writable(out, "--out")  # nothing is created here
    sweep_stale(resolved.parent, out.name)  # what killed runs left beside it
    return out


def write_outputs(
    result: SegmentationResult,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    tomo_name: str | None = None,
    preview: bool = True,
    star: io.StarOutputs | None = None,
) -> dict[str, Path]:
    """Write every output of ``result`` into ``out_dir``; return {name: final path}.

    ``star`` chooses the STAR flavours written beside ``picks.star`` and their tomogram name
    (default: RELION-5 and Warp, named after the tomogram's file)."""
    out = check_out_dir(out_dir, overwrite)
    with output_lock(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = temp_dir(out, "partial")
        try:
            with collect_warnings() as said:  # the outputs' own (a STAR not written)
                written = _write_all(result, staging, tomo_name=tomo_name, preview=preview,
                                     star=star or io.StarOutputs(), said=said)
            replace_dir(staging, out)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise InputError(f"{out}: writing the outputs failed ({exc}); check the disk and "
                             "--out") from exc
        except BaseException:  # a signal included: leave the old output, nothing hidden
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return {name: out / path.name for name, path in written.items()}


def _pick_columns(instances: list[Instance], instance_ids: np.ndarray) -> dict[str, np.ndarray]:
    """The per-pick columns of ``picks.csv`` and ``picks_below_cut.csv`` (one definition, so
    the two files keep the same header); ``instance_ids``: labels in ``instances.mrc``
    (0 for picks not in it)."""
    return {
        "score": np.array([i.score for i in instances], dtype=float),
        "instance_id": np.asarray(instance_ids, dtype=np.int64),
        "n_voxels": np.array([i.n_voxels for i in instances], dtype=np.int64),
        "similarity": np.array([i.similarity for i in instances], dtype=float),
        "confidence": np.array([i.confidence for i in instances], dtype=float),
        "agreement": np.array([i.agreement for i in instances], dtype=float),
        "prompt": np.array([i.is_prompt for i in instances], dtype=np.int8),
        "click_row": np.array([i.click_row for i in instances], dtype=np.int64),
    }


def _write_all(
    result: SegmentationResult, folder: Path, *, tomo_name: str | None, preview: bool,
    star: io.StarOutputs, said: list[str],
) -> dict[str, Path]:
    tomo = result.tomogram
    name = tomo_name or result.tomo_name
    written: dict[str, Path] = {}
    star_name: str | None = None  # the tomogram's name in the STAR flavours, when written
    if result.picks_zyx.shape[0] or result.target == "particle":
        picked = [result.instances[i] for i in result.pick_instance_ids - 1]
        columns = _pick_columns(picked, result.pick_instance_ids)
        written["picks.csv"] = folder / "picks.csv"
        io.write_picks_csv(written["picks.csv"], result.picks_zyx, columns)
        written["picks.star"] = folder / "picks.star"
        io.write_picks_star(
            written["picks.star"],
            result.picks_zyx,
            tomo_name=name,
            voxel_size=tomo.voxel_size,
            shape=tomo.shape,
            scores=result.pick_scores,
        )
        star_name = _star_name(result, star)
        written.update(_write_star_flavours(result, folder, star, star_name))
        written["picks_napari.csv"] = folder / "picks_napari.csv"
        io.write_napari_csv(written["picks_napari.csv"], result.picks_zyx,
                            {"score": result.pick_scores, "instance_id": result.pick_instance_ids})
        if result.target == "particle":  # header only when none is below: scripts can rely on it
            below = result.below_cut
            written["picks_below_cut.csv"] = folder / "picks_below_cut.csv"
            io.write_picks_csv(written["picks_below_cut.csv"], result.below_cut_zyx,
                               _pick_columns(below, np.zeros(len(below), dtype=np.int64)))
    if result.target == "membrane":
        written["membranes.csv"] = folder / "membranes.csv"
        _write_membranes(written["membranes.csv"], result)
    written["semantic.mrc"] = folder / "semantic.mrc"
    io.write_mrc(written["semantic.mrc"], result.semantic, tomo.voxel_size, tomo.origin,
                 tomo.start)
    written["instances.mrc"] = folder / "instances.mrc"
    io.write_mrc(written["instances.mrc"], result.labels, tomo.voxel_size, tomo.origin,
                 tomo.start)
    if preview:
        written["preview.png"] = folder / "preview.png"
        write_preview(written["preview.png"], result)
    written["run.json"] = folder / "run.json"
    record = dict(result.record)
    record["outputs"] = sorted(written)
    if star_name is not None:  # what the STAR files were written with
        record["star"] = {**star.report(), "tomo_name": star_name}
    keep_warnings(record, said)
    # a resumed batch compares them: a file cut short (a full disk, an rsync) is redone
    record["output_bytes"] = {name: path.stat().st_size for name, path in written.items()
                              if name != "run.json"}
    with atomic_path(written["run.json"]) as tmp:
        tmp.write_text(json.dumps(_jsonable(record), indent=2) + "\n", encoding="utf-8")
    return written


def _write_membranes(path: Path, result: SegmentationResult) -> None:
    """``membranes.csv``: one row per membrane in ``instances.mrc``, at the click it grew from
    (``x,y,z`` voxels), with its ``instance_id``, ``n_voxels``, volume in nm³ (empty without a
    voxel size) and ``clicks``: the data rows of every click that made it (clicks on one
    membrane are merged), so a label can be traced back to the clicks."""
    tomo = result.tomogram
    insts = result.instances
    voxel_nm3 = float(np.prod(tomo.voxel_size)) / 1000.0 if tomo.voxel_size else None
    volume = [round(i.n_voxels * voxel_nm3, 3) if voxel_nm3 else "" for i in insts]
    io.write_picks_csv(path, np.array([i.seed for i in insts], float).reshape(-1, 3), {
        "instance_id": np.arange(1, len(insts) + 1, dtype=np.int64),
        "n_voxels": np.array([i.n_voxels for i in insts], dtype=np.int64),
        "volume_nm3": np.array(volume, dtype=object),
        "clicks": np.array([" ".join(str(r) for r in sorted(i.click_rows)) for i in insts],
                           dtype=object),
    })


def _star_name(result: SegmentationResult, star: io.StarOutputs) -> str:
    """The tomogram's name in the STAR flavours: ``star.tomo_name``, else from its file (not
    ``--tomo-name``, which selects input rows)."""
    tomo = result.tomogram
    return star.tomo_name or io.star_tomo_name(
        str(tomo.path) if tomo.path is not None else result.tomo_name)


def _write_star_flavours(
    result: SegmentationResult, folder: Path, star: io.StarOutputs, name: str
) -> dict[str, Path]:
    """The STAR flavours ``star`` selects (RELION-5, Warp, RELION-4), the tomogram called
    ``name`` in them (:func:`_star_name`)."""
    tomo = result.tomogram
    written: dict[str, Path] = {}
    for flavour in star.selected():
        file = io.STAR_FLAVOURS[flavour]
        if tomo.voxel_size is None and flavour != "warp":
            warnings.warn(f"{file} not written: {flavour} coordinates need the tomogram's voxel "
                          "size and its header has none; pass --voxel-size", CryosamWarning,
                          stacklevel=2)
            continue
        written[file] = folder / file
        io.write_flavour_star(written[file], flavour, result.picks_zyx, tomo_name=name,
                              voxel_size=tomo.voxel_size, shape=tomo.shape,
                              scores=result.pick_scores,
                              tilt_series_pixel_size=star.tilt_series_pixel_size)
    return written


def write_preview(path: str | os.PathLike[str], result: SegmentationResult) -> None:
    """Three orthogonal slices through the first click: tomogram, mask overlay, picks, clicks."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    data = result.tomogram.data
    D, H, W = data.shape
    centre = result.prompt_zyx[0] if len(result.prompt_zyx) else np.array([D, H, W]) / 2
    cz, cy, cx = (int(round(float(c))) for c in centre)
    cz, cy, cx = min(max(cz, 0), D - 1), min(max(cy, 0), H - 1), min(max(cx, 0), W - 1)
    planes = [
        (f"YX at z={cz}", data[cz], result.semantic[cz], (1, 2), 0, cz),
        (f"ZX at y={cy}", data[:, cy, :], result.semantic[:, cy, :], (0, 2), 1, cy),
        (f"ZY at x={cx}", data[:, :, cx], result.semantic[:, :, cx], (0, 1), 2, cx),
    ]
    widths = [W, W, H]
    fig, axes = plt.subplots(
        1, 3, figsize=(15, 5.5), gridspec_kw={"width_ratios": widths}, constrained_layout=True
    )
    # a pick is drawn on a plane when its centre lies within this many voxels of it
    near = max(2.0, float(result.record.get("matching", {}).get("nms_radius") or 3.0) * 0.75)
    for ax, (title, img, mask, (ra, ca), normal, pos) in zip(axes, planes, strict=True):
        lo, hi = np.percentile(img, [1, 99])
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        overlay = np.zeros((*mask.shape, 4), dtype=np.float32)
        overlay[mask > 0] = (1.0, 0.55, 0.0, 0.35)
        ax.imshow(overlay, interpolation="nearest")
        picks = result.picks_zyx
        if len(picks):
            sel = np.abs(picks[:, normal] - pos) <= near
            ax.scatter(picks[sel, ca], picks[sel, ra], s=40, facecolors="none",
                       edgecolors="cyan", linewidths=1.2, label="picks")
        clicks = result.prompt_zyx
        if len(clicks):
            sel = np.abs(clicks[:, normal] - pos) <= near
            ax.scatter(clicks[sel, ca], clicks[sel, ra], s=90, marker="+", c="red",
                       linewidths=2, label="clicks")
        ax.set_title(title)
        ax.set_axis_off()
    n = len(result.picks_zyx)
    fig.suptitle(f"cryosam: {n} picks, orange = semantic mask, cyan = picks, red + = clicks"
                 if result.target == "particle" else
                 "cryosam: membranes, orange = semantic mask, red + = clicks")
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def _jsonable(obj: Any) -> Any:
    """Turn numpy/Path values into plain JSON types, recursively."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj
