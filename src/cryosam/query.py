"""A saved query: what matching needs from the clicks, reusable on other tomograms.

``cryosam query TOMO --points P --out ribosome.cryosam-query`` segments the clicks, pools their
features and saves one file (a NumPy ``.npz`` archive, whatever its name) holding:

- ``vectors``: the query feature(s), (Q, dim) float32, L2-normalised (one per click plus their
  mean when there are several), exactly what :func:`cryosam.matching.match` scores with;
- ``mask_shapes`` / ``mask_bits``: the clicked particles' masks on the work grid (bool crops,
  bit-packed), which the plausibility filter compares matches with (size and elongation);
- ``meta``: JSON with the format version, the encoder id, every parameter of the run (the
  defaults of a later ``segment --query``), the polarity, the particle radius and binning,
  the NMS and particle radii, the masks' voxel counts and elongations, and the source
  tomogram's SHA-256, shape, voxel size and name.

A query only makes sense on features made the same way: :meth:`SavedQuery.check_config`
and :meth:`SavedQuery.check_encoder` refuse a run whose encoder, its options or the binning
differ; :meth:`SavedQuery.warn_data` warns when the voxel size or the polarity differ (the
query assumes the same kind of data).
"""

from __future__ import annotations

import json
import os
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cryosam._atomic import atomic_path
from cryosam.config import CryosamConfig
from cryosam.errors import CryosamWarning, InputError
from cryosam.merge import elongation
from cryosam.propagation import InstanceMask

FORMAT = "cryosam-query"
FORMAT_VERSION = 1
SUFFIX = ".cryosam-query"
MACHINE_PARAMETERS = ("device", "threads")  # where a run happens, not what it computes
VOXEL_SIZE_TOLERANCE = 0.05  # relative difference that earns a warning


@dataclass
class SavedQuery:
    """Query vectors plus what the score, NMS and plausibility filter need, and provenance."""

    vectors: np.ndarray  # (Q, dim) float32, L2-normalised
    masks: list[np.ndarray]  # the clicked particles' masks on the work grid (bool crops)
    encoder_id: str
    parameters: dict[str, Any]  # CryosamConfig.to_dict() of the run that made it
    polarity: str  # "dark" | "bright"
    radius: float | None  # particle radius, source voxels
    binning: int  # the work grid's binning
    nms_radius: float  # work voxels
    particle_radius: float  # work voxels (equivalent sphere of the median click mask)
    source: dict[str, Any] = field(default_factory=dict)  # tomogram, clicks, voxel size
    meta: dict[str, Any] = field(default_factory=dict)  # version, created, path, sha256

    # ------------------------------------------------------------------ build, save, load

    @classmethod
    def build(cls, *, vectors: Any, masks: list[InstanceMask], encoder_id: str,
              config: CryosamConfig, polarity: str, radius: float | None, binning: int,
              nms_radius: float, particle_radius: float,
              source: dict[str, Any]) -> SavedQuery:
        """A query from one run's stage outputs (``vectors`` as a tensor or an array)."""
        check_query_config(config)
        arr = np.asarray(vectors.detach().cpu().numpy() if hasattr(vectors, "detach")
                         else vectors, dtype=np.float32)
        crops = [np.asarray(m.mask, dtype=bool) for m in masks if m.n_voxels > 0]
        if not crops:
            raise InputError("no click gave a mask; a query needs at least one segmented click")
        return cls(arr.reshape(len(arr), -1), crops, encoder_id, config.to_dict(), polarity,
                   radius, int(binning), float(nms_radius), float(particle_radius), source)

    def reference_masks(self) -> list[InstanceMask]:
        """The clicked particles' masks (at the origin) for :func:`cryosam.merge.plausible`."""
        return [InstanceMask((0, 0, 0), m) for m in self.masks]

    def summary(self) -> dict[str, Any]:
        """Everything but the arrays, as plain JSON (the ``meta`` entry of the file)."""
        refs = self.reference_masks()
        return {
            "format": FORMAT, "version": FORMAT_VERSION, **self.meta,
            "encoder_id": self.encoder_id, "queries": int(self.vectors.shape[0]),
            "dim": int(self.vectors.shape[1]), "polarity": self.polarity,
            "radius_voxels": self.radius, "binning": self.binning,
            "nms_radius": self.nms_radius, "particle_radius": self.particle_radius,
            "mask_voxels": [int(m.n_voxels) for m in refs],
            "mask_elongation": [round(elongation(m), 4) for m in refs],
            "source": self.source, "parameters": self.parameters,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the query atomically (``.npz`` content under any name); return the path."""
        out = Path(path)
        meta = self.summary()
        meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        shapes = np.asarray([m.shape for m in self.masks], dtype=np.int64).reshape(-1, 3)
        bits = np.packbits(np.concatenate([m.ravel() for m in self.masks]))
        with atomic_path(out, suffix=".npz") as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, vectors=self.vectors, mask_shapes=shapes, mask_bits=bits,
                                meta=np.asarray(json.dumps(meta)))
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SavedQuery:
        """Read a file written by :meth:`save`; one :class:`InputError` line if it is not one."""
        from cryosam.utils import sha256_file

        p = Path(path)
        where = f"--query {p}"
        if not p.is_file():
            raise InputError(f"{where}: file not found; save one with `cryosam query TOMO "
                             "--points CLICKS --out NAME.cryosam-query`")
        try:
            with np.load(p, allow_pickle=False) as data:
                arrays = {k: data[k] for k in ("vectors", "mask_shapes", "mask_bits", "meta")}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
            raise InputError(f"{where}: not a cryosam query file ({type(exc).__name__}); save "
                             "one with `cryosam query`") from None
        try:
            meta = json.loads(str(arrays["meta"]))
        except ValueError:
            raise InputError(f"{where}: its description is damaged; save the query again") \
                from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise InputError(f"{where}: not a cryosam query file; save one with `cryosam "
                             "query`")
        version = meta.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise InputError(f"{where}: format version {version} is newer than this cryosam "
                             f"reads ({FORMAT_VERSION}); upgrade cryosam")
        shapes = np.asarray(arrays["mask_shapes"], dtype=np.int64).reshape(-1, 3)
        flat = np.unpackbits(arrays["mask_bits"])[: int(shapes.prod(axis=1).sum())].astype(bool)
        if flat.size != int(shapes.prod(axis=1).sum()):
            raise InputError(f"{where}: its masks are damaged; save the query again")
        masks, start = [], 0
        for shape in shapes:
            n = int(np.prod(shape))
            masks.append(flat[start:start + n].reshape(tuple(int(s) for s in shape)))
            start += n
        vectors = np.asarray(arrays["vectors"], dtype=np.float32)
        if vectors.ndim != 2 or not len(vectors) or not np.isfinite(vectors).all():
            raise InputError(f"{where}: its query vectors are damaged; save the query again")
        info = {k: meta.get(k) for k in ("version", "created", "cryosam_version")}
        info.update(path=str(p.resolve()), sha256=sha256_file(p))
        return cls(vectors, masks, str(meta["encoder_id"]), dict(meta["parameters"]),
                   str(meta["polarity"]), meta.get("radius_voxels"), int(meta["binning"]),
                   float(meta["nms_radius"]), float(meta["particle_radius"]),
                   dict(meta.get("source") or {}), info)

    # ------------------------------------------------------------------ compatibility

    def config(self) -> CryosamConfig:
        """The parameters of the run that made the query, with this machine's device and
        threads left at their defaults: the starting point of ``segment --query``."""
        params = {k: v for k, v in self.parameters.items() if k not in MACHINE_PARAMETERS}
        try:
            return CryosamConfig.from_dict(params)
        except InputError as exc:
            raise InputError(f"--query {self.meta.get('path', '')}: {exc}") from None

    def _where(self) -> str:
        return f"--query {Path(str(self.meta.get('path', 'query'))).name}"

    def check_config(self, cfg: CryosamConfig) -> None:
        """Refuse (before any work) a configuration whose features cannot be compared with
        the query's: another encoder, other encoder options, clip, stride or binning."""
        mine = CryosamConfig.from_dict(self.parameters).encoder
        enc = cfg.encoder
        fix = ("drop that option (a query's own parameters are the defaults) or save a new "
               "query with `cryosam query`")
        pairs = [("--encoder", mine.name, enc.name),
                 (f"encoder.backends.{enc.name}", _plain(mine.backends.get(enc.name)),
                  _plain(enc.options)),
                 ("encoder.clip_percentiles", list(mine.clip_percentiles),
                  list(enc.clip_percentiles)),
                 ("--slice-stride", mine.slice_stride, enc.slice_stride)]
        for name, theirs, ours in pairs:
            if theirs != ours:
                raise InputError(f"{self._where()}: made with {name} {theirs}, this run has "
                                 f"{ours}; {fix}")
        if enc.reduce_to:
            raise InputError(f"{self._where()}: encoder.reduce_to fits a PCA per tomogram; "
                             "run without it")
        if cfg.binning is not None and cfg.binning != self.binning:
            raise InputError(f"{self._where()}: made on a grid binned {self.binning}x, this run "
                             f"has --binning {cfg.binning}; {fix}")
        if cfg.propagation.target != "particle":
            raise InputError(f"{self._where()}: saved queries find particles; drop --target")

    def check_encoder(self, encoder_id: str) -> None:
        """Refuse when the loaded encoder's id (its weights included) is not the query's."""
        if encoder_id != self.encoder_id:
            raise InputError(f"{self._where()}: made with encoder {self.encoder_id}, the "
                             f"encoder loaded here is {encoder_id} (other weights or version); "
                             "save the query again with this encoder")

    def check_dim(self, dim: int) -> None:
        """Refuse features of another width than the query vectors."""
        if dim != self.vectors.shape[1]:
            raise InputError(f"{self._where()}: query vectors have {self.vectors.shape[1]} "
                             f"channels, this tomogram's features {dim}; save the query again")

    def warn_data(self, voxel_size: float | None, polarity: str) -> list[str]:
        """Warn (and return the lines) when this tomogram's voxel size or the polarity in
        use differ from the query's source: the query assumes the same kind of data."""
        lines = []
        theirs = self.source.get("voxel_size")
        if theirs and voxel_size and abs(voxel_size - theirs) > VOXEL_SIZE_TOLERANCE * theirs:
            lines.append(f"{self._where()}: made on {theirs:g} Å voxels, this tomogram has "
                         f"{voxel_size:g} Å; particles look another size here, so expect "
                         "fewer matches (use tomograms of the same voxel size)")
        elif theirs and not voxel_size:
            lines.append(f"{self._where()}: made on {theirs:g} Å voxels, this tomogram's "
                         "voxel size is unknown; the query assumes the same voxel size")
        if polarity in ("dark", "bright") and polarity != self.polarity:
            lines.append(f"{self._where()}: made on {self.polarity} particles, this run says "
                         f"--polarity {polarity}; the query assumes the same contrast")
        for line in lines:
            warnings.warn(line, CryosamWarning, stacklevel=3)
        return lines

    def report(self) -> dict[str, Any]:
        """What the run record keeps about the query (``query`` in run.json)."""
        return {"path": self.meta.get("path"), "sha256": self.meta.get("sha256"),
                "version": self.meta.get("version"), "encoder_id": self.encoder_id,
                "queries": int(self.vectors.shape[0]), "polarity": self.polarity,
                "binning": self.binning, "nms_radius": self.nms_radius,
                "source": self.source}


def _plain(obj: Any) -> Any:
    """A dataclass (or dict) of options as plain JSON-comparable values."""
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    return json.loads(json.dumps(obj, default=list))


def check_query_config(cfg: CryosamConfig) -> None:
    """Refuse, before any work, a configuration whose query could not be reused."""
    if cfg.encoder.reduce_to:
        raise InputError("encoder.reduce_to is set: its PCA is fitted per tomogram, so a saved "
                         "query could not be compared with another tomogram's features; save "
                         "the query without reduce_to")
    if cfg.propagation.target != "particle":
        raise InputError("--target membrane: saved queries are for particles")


def is_query_file(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` looks like a saved query (a zip archive holding ``meta.npy``)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return "meta.npy" in zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
