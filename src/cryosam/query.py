"""A saved query: what matching needs from the clicks, reusable on other tomograms.

``cryosam query TOMO --points P --out ribosome.cryosam-query`` segments the clicks, pools their
features and saves one file (a NumPy ``.npz`` archive, whatever its name) holding:

- ``vectors``: the query feature(s), (Q, dim) float32, L2-normalised (one per click plus their
  mean when there are several), what :func:`cryosam.matching.match` scores with (with
  ``matching.turns``, together with their turned copies, :func:`cryosam.features.turned`);
- ``mask_shapes`` / ``mask_bits``: the clicked particles' masks on the work grid (bool crops,
  bit-packed), which matches' size and shape are compared with (:mod:`cryosam.score`);
- ``densities``: the clicks' density descriptions, made on the query's tomogram;
- ``negatives``, ``neg_mask_shapes`` / ``neg_mask_bits``, ``negative_densities``: the same
  for negative clicks, when there were any (format version 2; version 1 files still load);
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

import hashlib
import json
import math
import os
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cryosam._atomic import atomic_path
from cryosam.config import CryosamConfig, ScoreConfig, result_parameters
from cryosam.errors import CryosamWarning, InputError
from cryosam.instance_mask import InstanceMask
from cryosam.merge import elongation
from cryosam.score import References, learn_references

FORMAT = "cryosam-query"
FORMAT_VERSION = 2  # 2: negative clicks and the clicks' density descriptions
SUFFIX = ".cryosam-query"
VOXEL_SIZE_TOLERANCE = 0.05  # relative difference that earns a warning


@dataclass
class SavedQuery:
    """Query vectors plus what the score, NMS and negatives need, and provenance."""

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
    negatives: np.ndarray | None = None  # (M, dim) one vector per negative click
    negative_crops: list[np.ndarray] = field(default_factory=list)  # their masks (bool crops)
    densities: np.ndarray | None = None  # (R, n) the clicks' density descriptions
    negative_densities: np.ndarray | None = None  # (M', n) the negatives'
    reach: float | None = None  # work voxels: the descriptions' outer shell
    negative_reach: float | None = None

    # ------------------------------------------------------------------ build, save, load

    @classmethod
    def build(cls, *, vectors: Any, masks: list[InstanceMask], encoder_id: str,
              config: CryosamConfig, polarity: str, radius: float | None, binning: int,
              nms_radius: float, particle_radius: float,
              source: dict[str, Any], negatives: Any = None,
              negative_masks: list[InstanceMask] | None = None,
              references: References | None = None,
              negative_references: References | None = None) -> SavedQuery:
        """A query from one run's stage outputs (``vectors`` as a tensor or an array)."""
        check_query_config(config)
        arr = _array(vectors)
        crops = [np.asarray(m.mask, dtype=bool) for m in masks if m.n_voxels > 0]
        if not crops:
            raise InputError("no click gave a mask; a query needs at least one segmented click")
        neg = None if negatives is None else _array(negatives)
        neg_crops = [np.asarray(m.mask, dtype=bool) for m in negative_masks or []
                     if m.n_voxels > 0]
        return cls(arr.reshape(len(arr), -1), crops, encoder_id, config.to_dict(), polarity,
                   radius, int(binning), float(nms_radius), float(particle_radius), source,
                   negatives=neg, negative_crops=neg_crops,
                   densities=_densities(references), reach=_reach(references),
                   negative_densities=_densities(negative_references),
                   negative_reach=_reach(negative_references))

    def reference_masks(self) -> list[InstanceMask]:
        """The clicked particles' masks (at the origin)."""
        return [InstanceMask((0, 0, 0), m) for m in self.masks]

    def negative_masks(self) -> list[InstanceMask]:
        """The negative clicks' masks (at the origin)."""
        return [InstanceMask((0, 0, 0), m) for m in self.negative_crops]

    def references(self, cfg: ScoreConfig) -> References | None:
        """What matches are compared with: the clicks' masks and their density descriptions
        made on the query's own tomogram (a version-1 query has none: size and shape only)."""
        return learn_references(self.reference_masks(), None, cfg, densities=self.densities,
                                reach=self.reach)

    def negative_references(self, cfg: ScoreConfig) -> References | None:
        """The same for the negative clicks (None without any)."""
        if not self.negative_crops:
            return None
        return learn_references(self.negative_masks(), None, cfg,
                                densities=self.negative_densities, reach=self.negative_reach)

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
            "negatives": 0 if self.negatives is None else int(len(self.negatives)),
            "reach": self.reach, "negative_reach": self.negative_reach,
            "source": self.source, "parameters": self.parameters,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the query atomically (``.npz`` content under any name); return the path."""
        out = Path(path)
        meta = self.summary()
        meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        shapes, bits = _pack(self.masks)
        extra: dict[str, np.ndarray] = {}
        if self.negatives is not None and len(self.negatives):
            extra["negatives"] = self.negatives
        if self.negative_crops:
            extra["neg_mask_shapes"], extra["neg_mask_bits"] = _pack(self.negative_crops)
        if self.densities is not None:
            extra["densities"] = self.densities
        if self.negative_densities is not None:
            extra["negative_densities"] = self.negative_densities
        with atomic_path(out, suffix=".npz") as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, vectors=self.vectors, mask_shapes=shapes, mask_bits=bits,
                                meta=np.asarray(json.dumps(meta)), **extra)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str], where: str | None = None,
             make: str = "`cryosam query TOMO --points CLICKS --out NAME.cryosam-query`"
             ) -> SavedQuery:
        """Read a file written by :meth:`save`; one :class:`InputError` line if it is not one,
        starting with ``where`` (default ``--query PATH``) and saying how to ``make`` one
        (napari says its button)."""
        from cryosam.utils import sha256_file

        p = Path(path)
        where = where or f"--query {p}"
        if not p.is_file():
            raise InputError(f"{where}: file not found; save one with {make}")
        try:
            with np.load(p, allow_pickle=False) as data:
                arrays = {k: data[k] for k in ("vectors", "mask_shapes", "mask_bits", "meta")}
                arrays.update({k: data[k] for k in _OPTIONAL if k in data.files})
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
            raise InputError(f"{where}: not a cryosam query file ({type(exc).__name__}); save "
                             f"one with {make}") from None
        try:
            meta = json.loads(str(arrays["meta"]))
        except ValueError:
            raise InputError(f"{where}: its description is damaged; save the query again") \
                from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise InputError(f"{where}: not a cryosam query file; save one with {make}")
        version = meta.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise InputError(f"{where}: format version {version} is newer than this cryosam "
                             f"reads ({FORMAT_VERSION}); upgrade cryosam")
        masks = _unpack(arrays["mask_shapes"], arrays["mask_bits"], where)
        neg_crops = (_unpack(arrays["neg_mask_shapes"], arrays["neg_mask_bits"], where)
                     if "neg_mask_shapes" in arrays else [])
        vectors = np.asarray(arrays["vectors"], dtype=np.float32)
        if vectors.ndim != 2 or not len(vectors) or not np.isfinite(vectors).all():
            raise InputError(f"{where}: its query vectors are damaged; save the query again")
        info = {k: meta.get(k) for k in ("version", "created", "cryosam_version")}
        info.update(path=str(p.resolve()), sha256=sha256_file(p),
                    content_sha256=_content_digest(arrays, meta))
        def optional(key: str) -> np.ndarray | None:
            return np.asarray(arrays[key], dtype=np.float32) if key in arrays else None

        return cls(vectors, masks, str(meta["encoder_id"]), dict(meta["parameters"]),
                   str(meta["polarity"]), meta.get("radius_voxels"), int(meta["binning"]),
                   float(meta["nms_radius"]), float(meta["particle_radius"]),
                   dict(meta.get("source") or {}), info, negatives=optional("negatives"),
                   negative_crops=neg_crops, densities=optional("densities"),
                   negative_densities=optional("negative_densities"),
                   reach=meta.get("reach"), negative_reach=meta.get("negative_reach"))

    # ------------------------------------------------------------------ compatibility

    def config(self) -> CryosamConfig:
        """The parameters of the run that made the query, with what only its machine decided
        (device, threads, batch sizes, cache budget: :func:`config.result_parameters`) left at
        this machine's defaults: the starting point of ``segment --query``."""
        params = result_parameters(self.parameters)
        try:
            return CryosamConfig.from_dict(params)
        except InputError as exc:
            raise InputError(f"--query {self.meta.get('path', '')}: {exc}") from None

    def _where(self) -> str:
        return f"--query {Path(str(self.meta.get('path', 'query'))).name}"

    def check_config(self, cfg: CryosamConfig) -> None:
        """Refuse (before any work) a configuration whose features cannot be compared with
        the query's: another encoder, other encoder options, clip or stride. (A binning is
        this tomogram's choice: :meth:`binning_for`, :meth:`warn_data`.)"""
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

    @property
    def grid(self) -> float | None:
        """Å per voxel of the grid the query was made on (its tomogram's voxel size times its
        binning); None when that tomogram's voxel size was unknown."""
        theirs = self.source.get("voxel_size")
        return float(theirs) * self.binning if theirs else None

    def binning_for(self, voxel_size: float | None, given: int | None = None) -> int:
        """The binning of a tomogram of ``voxel_size`` Å that comes closest to this query's
        grid: a query made on 10 Å voxels picks in a 5 Å tomogram binned 2x. ``given`` (the
        user's ``--binning``) wins; the query's own binning when a voxel size is unknown.
        :meth:`grid_gap` says how far from the grid the choice is."""
        if given is not None:
            return int(given)
        if self.grid is None or not voxel_size:
            return self.binning
        ratio = self.grid / float(voxel_size)
        below = max(1, math.floor(ratio))
        return min((below, below + 1), key=lambda b: abs(math.log(b / ratio)))

    def grid_gap(self, voxel_size: float | None, binning: int) -> float:
        """How far ``voxel_size`` binned ``binning`` times lies from the query's grid, as a
        share of it (0 when either voxel size is unknown)."""
        if self.grid is None or not voxel_size:
            return 0.0
        return abs(binning * float(voxel_size) - self.grid) / self.grid

    def off_grid(self, voxel_size: float | None, binning: int) -> bool:
        """Whether ``voxel_size`` binned ``binning`` times is more than 5 % off the grid."""
        return self.grid_gap(voxel_size, binning) > VOXEL_SIZE_TOLERANCE

    def _grid_fix(self, voxel_size: float, given: bool) -> str:
        """What to do about a tomogram off the query's grid (for :meth:`warn_data`)."""
        if given and not self.off_grid(voxel_size, self.binning_for(voxel_size)):
            return "drop --binning"
        theirs = float(self.source["voxel_size"])
        k = max(1, round(voxel_size / theirs))  # a query binned k x would have this grid
        if voxel_size > self.grid and abs(k * theirs - voxel_size) <= \
                VOXEL_SIZE_TOLERANCE * voxel_size:
            return f"make the query again with --binning {k}"
        return f"resample the tomogram to {self.grid:g} Å, or a whole fraction of it"

    def warn_data(self, voxel_size: float | None, polarity: str, flips: bool = False,
                  binning: int | None = None, given: bool = False) -> list[str]:
        """Warn (and return the lines) when this tomogram, binned ``binning`` times (``given``:
        by the user), lies off the query's grid by more than 5 % (:meth:`grid_gap`), or the
        polarity in use differs from the query's source: the query assumes the same kind of
        data. ``flips``: the encoder sees particles dark whatever the tomogram's contrast
        (the weight-free one), so another polarity is made up for and not warned of."""
        lines = []
        theirs, grid = self.source.get("voxel_size"), self.grid
        b = self.binning_for(voxel_size) if binning is None else int(binning)
        if grid is not None and voxel_size and self.off_grid(voxel_size, b):
            lines.append(f"{self._where()}: made on a {grid:g} Å grid ({theirs:g} Å voxels "
                         f"binned {self.binning}x); this tomogram's {voxel_size:g} Å voxels "
                         f"binned {b}x give {b * voxel_size:g} Å, "
                         f"{self.grid_gap(voxel_size, b):.0%} off: particles look another "
                         f"size here, so expect fewer matches "
                         f"({self._grid_fix(voxel_size, given)})")
        elif theirs and not voxel_size:
            lines.append(f"{self._where()}: made on {theirs:g} Å voxels, this tomogram's "
                         "voxel size is unknown; the query assumes the same voxel size")
        elif not theirs and voxel_size:
            lines.append(f"{self._where()}: made on a tomogram of unknown voxel size, so it "
                         f"assumes this one's {voxel_size:g} Å; make it again with "
                         "--voxel-size to use it on other voxel sizes")
        if polarity in ("dark", "bright") and polarity != self.polarity and not flips:
            lines.append(f"{self._where()}: made on {self.polarity} particles, this run says "
                         f"--polarity {polarity}; the query assumes the same contrast")
        for line in lines:
            warnings.warn(line, CryosamWarning, stacklevel=3)
        return lines

    def nothing_matched(self, picks: int, polarity_given: bool, flips: bool,
                        looks: str | None = None, off_grid: bool = False) -> str:
        """Why a tomogram may show (almost) no match of this query, and what to try: most
        often its contrast is the other way round (particles bright where the query's were
        dark). ``looks``: the tomogram's own contrast where it is clear
        (:func:`cryosam.probe.looks_polarity`)."""
        other = "bright" if self.polarity == "dark" else "dark"
        what = "no pick" if picks == 0 else f"only {picks} pick(s)"
        head = (f"{self._where()}: {what} in this tomogram (the query was made on "
                f"{self.polarity} particles)")
        if off_grid:
            return (f"{head}; this tomogram is off the query's grid (see the voxel-size "
                    "warning above), the likeliest reason")
        if polarity_given:
            return f"{head}; check --polarity and that the particles are here"
        if looks == self.polarity:
            return (f"{head}; this tomogram's dense matter looks {looks} too, so check that "
                    "the particles are here, or make the query from more clicks")
        if looks == other:
            return (f"{head}; this tomogram's dense matter looks {other}: "
                    + (f"pass --polarity {other}" if flips else "make the query on a tomogram "
                       "of this contrast (this encoder sees the contrast as it is)"))
        if flips:
            return (f"{head}; if this tomogram's particles are {other} (its contrast the "
                    f"other way round), pass --polarity {other}")
        return (f"{head}; if this tomogram's contrast is the other way round, make the query "
                "on a tomogram of this contrast (this encoder sees the contrast as it is)")

    def report(self) -> dict[str, Any]:
        """What the run record keeps about the query (``query`` in run.json)."""
        return {"path": self.meta.get("path"), "sha256": self.meta.get("sha256"),
                "version": self.meta.get("version"), "encoder_id": self.encoder_id,
                "queries": int(self.vectors.shape[0]), "polarity": self.polarity,
                "binning": self.binning, "nms_radius": self.nms_radius,
                "source": self.source}


def _content_digest(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> str:
    """SHA-256 of what a query matches with: its arrays and description, without when and by
    which cryosam it was saved or its machine's settings. The same clicks saved twice give one
    digest (the files differ: the time is in them), so a batch does not redo its tomograms."""
    digest = hashlib.sha256()
    for key in sorted(k for k in arrays if k != "meta"):
        a = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}:{a.dtype.str}:{a.shape}".encode())
        digest.update(a.tobytes())
    described = {k: v for k, v in meta.items() if k not in ("created", "cryosam_version")}
    if isinstance(described.get("parameters"), dict):
        described["parameters"] = result_parameters(described["parameters"])
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    return digest.hexdigest()


_OPTIONAL = ("negatives", "neg_mask_shapes", "neg_mask_bits", "densities",
             "negative_densities")


def _array(values: Any) -> np.ndarray:
    """A tensor or array as a float32 array."""
    return np.asarray(values.detach().cpu().numpy() if hasattr(values, "detach") else values,
                      dtype=np.float32)


def _densities(refs: References | None) -> np.ndarray | None:
    """The references' density descriptions as (R, n), or None."""
    if refs is None or any(d.density is None for d in refs.items):
        return None
    return np.stack([np.asarray(d.density, np.float32) for d in refs.items])


def _reach(refs: References | None) -> float | None:
    return None if refs is None else float(refs.reach)


def _pack(crops: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Bool crops as (shapes, packed bits)."""
    shapes = np.asarray([m.shape for m in crops], dtype=np.int64).reshape(-1, 3)
    flat = np.concatenate([m.ravel() for m in crops]) if crops else np.zeros(0, bool)
    return shapes, np.packbits(flat)


def _unpack(shapes: np.ndarray, bits: np.ndarray, where: str) -> list[np.ndarray]:
    """The inverse of :func:`_pack`; a damaged file is one clear line."""
    shapes = np.asarray(shapes, dtype=np.int64).reshape(-1, 3)
    total = int(shapes.prod(axis=1).sum())
    flat = np.unpackbits(bits)[:total].astype(bool)
    if flat.size != total:
        raise InputError(f"{where}: its masks are damaged; save the query again")
    out, start = [], 0
    for shape in shapes:
        n = int(np.prod(shape))
        out.append(flat[start:start + n].reshape(tuple(int(s) for s in shape)))
        start += n
    return out


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
