"""napari reader: MRC tomograms (.mrc/.rec/.map, also .gz/.bz2) and cryosam output folders.

Every layer carries the voxel size (Å, z, y, x) as its ``scale``, so a tomogram, its labels and
its picks overlay in Å. Voxel ``(z, y, x)`` sits at world ``(z, y, x) * voxel size``; the
header origin is kept in the layer metadata, not applied (cryosam's Å convention).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

LayerData = tuple[Any, dict[str, Any], str]
ReaderFunction = Callable[[str | Sequence[str]], list[LayerData]]

MRC_SUFFIXES = (".mrc", ".rec", ".map")
COMPRESSED = ("", ".gz", ".bz2")


def is_tomogram_file(path: str | os.PathLike[str]) -> bool:
    """True for a file name cryosam reads as a tomogram (.mrc/.rec/.map, optionally .gz/.bz2)."""
    name = Path(path).name.lower()
    return any(name.endswith(s + c) for s in MRC_SUFFIXES for c in COMPRESSED)


def is_output_folder(path: str | os.PathLike[str]) -> bool:
    """True for a folder written by ``cryosam segment`` (it holds ``run.json``)."""
    p = Path(path)
    return p.is_dir() and (p / "run.json").is_file()


def get_reader(path: str | Sequence[str]) -> ReaderFunction | None:
    """napari's reader hook: a reader for tomograms and cryosam folders, else None."""
    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    if not paths or not all(is_tomogram_file(p) or is_output_folder(p) for p in paths):
        return None
    return read


def read(path: str | Sequence[str]) -> list[LayerData]:
    """Layers for each path: one image for a tomogram; image, labels and points for a folder."""
    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    layers: list[LayerData] = []
    for p in paths:
        layers += read_output_folder(p) if is_output_folder(p) else read_tomogram_layer(p)
    return layers


def _scale(voxel_size: Sequence[float] | None) -> tuple[float, float, float]:
    return tuple(float(v) for v in voxel_size) if voxel_size else (1.0, 1.0, 1.0)  # type: ignore[return-value]


def contrast_limits(data: np.ndarray) -> tuple[float, float]:
    """0.5–99.5 % of a subsample: a readable grey range for noisy tomograms."""
    step = max(1, data.shape[0] // 24)
    lo, hi = np.percentile(np.asarray(data[::step], dtype=np.float32), (0.5, 99.5))
    if not hi > lo:
        lo, hi = float(np.min(data)), float(np.max(data))
        hi = hi if hi > lo else lo + 1.0
    return float(lo), float(hi)


def read_tomogram_layer(path: str | os.PathLike[str], name: str | None = None
                        ) -> list[LayerData]:
    """An image layer of an MRC tomogram, scaled by its voxel size."""
    from cryosam import io
    from cryosam.utils import tomo_stem

    tomo = io.read_tomogram(path)
    meta = {"cryosam": {"path": str(Path(path).resolve()),
                        "voxel_size": list(tomo.voxel_size) if tomo.voxel_size else None,
                        "origin": list(tomo.origin)}}
    kwargs = {"name": name or tomo_stem(path), "scale": _scale(tomo.voxel_size),
              "contrast_limits": contrast_limits(tomo.data), "metadata": meta,
              "units": "angstrom" if tomo.voxel_size else "pixel"}
    return [(tomo.data, kwargs, "image")]


def pick_features(columns: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """The numeric per-pick columns of a picks file (napari point features)."""
    out: dict[str, np.ndarray] = {}
    for key, values in columns.items():
        arr = np.asarray(values)
        if len(arr) == n and np.issubdtype(arr.dtype, np.number):
            out[key] = arr
    return out


def pick_size(n_voxels: np.ndarray | None) -> float:
    """A point size (voxels) for picks: the median equivalent-sphere diameter of the masks."""
    n = np.asarray(n_voxels if n_voxels is not None else [], dtype=float)
    n = n[n > 0]
    if not len(n):
        return 10.0
    return float(max(4.0, 2.0 * (3.0 * np.median(n) / (4.0 * np.pi)) ** (1.0 / 3.0)))


def points_kwargs(name: str, scale: Sequence[float], features: dict[str, np.ndarray],
                  size: float) -> dict[str, Any]:
    """How cryosam shows picks: cyan rings the size of the particles."""
    return {"name": name, "scale": tuple(scale), "features": features, "size": size,
            "face_color": "transparent", "border_color": "cyan", "border_width": 0.12}


def read_output_folder(path: str | os.PathLike[str]) -> list[LayerData]:
    """The tomogram (when its file is still where run.json says), the instance labels and the
    picks of a cryosam output folder, all scaled by the voxel size."""
    from cryosam import io
    from cryosam.errors import InputError

    folder = Path(path)
    try:
        record = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{folder / 'run.json'}: unreadable ({exc}); is this a cryosam "
                         "output folder?") from None
    inputs = record.get("inputs") or {}
    name = str(inputs.get("tomo_name") or folder.name)
    layers: list[LayerData] = []
    tomo_info = inputs.get("tomogram") or {}
    tomo_path = Path(tomo_info["path"]) if tomo_info.get("path") else None
    if tomo_path is not None and tomo_path.is_file():
        layers += read_tomogram_layer(tomo_path, name=name)

    voxel_size = inputs.get("voxel_size_zyx")
    if (folder / "instances.mrc").is_file():
        labels = io.read_tomogram(folder / "instances.mrc")
        voxel_size = labels.voxel_size or voxel_size
        scale = _scale(voxel_size)
        data = np.asarray(labels.data).astype(np.int32)
        layers.append((data, {"name": f"{name} instances", "scale": scale, "opacity": 0.5,
                              "metadata": {"cryosam": {"path": str(folder.resolve())}}},
                       "labels"))
    scale = _scale(voxel_size)
    if (folder / "picks.csv").is_file():
        picks = io.read_points(folder / "picks.csv", empty_ok=True)  # a run may pick none
        features = pick_features(picks.columns, len(picks))
        size = pick_size(features.get("n_voxels"))
        layers.append((picks.zyx, points_kwargs(f"{name} picks", scale, features, size),
                       "points"))
    if not layers:
        raise InputError(f"{folder}: no instances.mrc or picks.csv and the tomogram "
                         f"{tomo_path} is gone; nothing to show")
    return layers
