"""Every knob of the pipeline, as frozen dataclasses with the paper's defaults.

Each pipeline stage reads its own block; the run record stores all of them, and
:meth:`CryosamConfig.from_dict` reads them back, so ``cryosam segment --config run.json``
re-runs a job. Backend-specific knobs live in the backend's own options block (see
:mod:`cryosam.backends`) under ``encoder.backends[name]`` / ``segmenter.backends[name]``.
Values are checked when a block is built; errors name the parameter.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from cryosam import backends
from cryosam.backends import Target, build_dataclass, check_choice
from cryosam.errors import InputError

Direction = Literal["+z", "-z", "+y", "-y", "+x", "-x"]
MatchBackend = Literal["auto", "torch", "faiss"]
QueryMode = Literal["mean", "max"]
QUERY_MODES: tuple[str, ...] = get_args(QueryMode)  # how several clicks make one query
PolarityChoice = Literal["auto", "dark", "bright"]
DIRECTIONS: tuple[str, ...] = ("+z", "-z", "+y", "-y", "+x", "-x")
TARGETS: tuple[str, ...] = ("particle", "membrane")
MATCH_BACKENDS: tuple[str, ...] = ("auto", "torch", "faiss")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _check_percentiles(parameter: str, value: tuple[float, float]) -> None:
    lo, hi = (float(v) for v in value)
    if not 0.0 <= lo < hi <= 100.0:
        raise InputError(f"{parameter} {tuple(value)}: need 0 <= low < high <= 100")


@dataclass(frozen=True)
class EncoderConfig:
    """Slice feature encoder (DINOv2 or the weight-free filter bank)."""

    name: str = "dinov2"  # a registered encoder: dinov2 | filterbank
    batch_size: int = 16  # slices per forward pass
    clip_percentiles: tuple[float, float] = (0.5, 99.5)  # robust intensity normalisation
    slice_stride: int = 1  # encode every k-th slice along each axis, interpolate between
    reduce_to: int | None = None  # PCA: keep this many channels per axis (None = all)
    backends: dict[str, Any] = field(default_factory=lambda: backends.default_options("encoder"))

    def __post_init__(self) -> None:
        backends.get(self.name, "encoder")
        object.__setattr__(self, "backends", backends.options_from("encoder", self.backends))
        _check_percentiles("encoder.clip_percentiles", self.clip_percentiles)
        if self.batch_size < 1 or self.slice_stride < 1:
            raise InputError("encoder.batch_size and encoder.slice_stride must be at least 1")
        if self.reduce_to is not None and self.reduce_to < 1:
            raise InputError(f"encoder.reduce_to {self.reduce_to}: must be at least 1 or None")

    @property
    def options(self) -> Any:
        """The options block of the selected encoder."""
        return self.backends[self.name]


@dataclass(frozen=True)
class SegmenterConfig:
    """2-D promptable segmenter (SAM or the weight-free threshold segmenter)."""

    name: str = "sam"  # a registered segmenter: sam | threshold
    # budget for cached per-slice work (SAM image embeddings); None = automatic: a third of the
    # GPU's free memory at the first encoding (1-16 GiB), 4096 MiB on the CPU
    embedding_cache_mb: int | None = None
    encoder_batch_size: int = 8  # slices per image-encoder forward pass
    decoder_batch_size: int = 64  # prompts per mask-decoder call (all slices mixed)
    backends: dict[str, Any] = field(
        default_factory=lambda: backends.default_options("segmenter"))

    def __post_init__(self) -> None:
        backends.get(self.name, "segmenter")
        object.__setattr__(self, "backends", backends.options_from("segmenter", self.backends))
        if self.encoder_batch_size < 1 or self.decoder_batch_size < 1:
            raise InputError("segmenter batch sizes must be at least 1")
        mb = self.embedding_cache_mb
        if mb is not None and (not isinstance(mb, int) or isinstance(mb, bool) or mb < 0):
            raise InputError(f"segmenter.embedding_cache_mb {mb!r}: give MiB (an integer >= 0) "
                             "or null (automatic)")

    @property
    def options(self) -> Any:
        """The options block of the selected segmenter."""
        return self.backends[self.name]


@dataclass(frozen=True)
class PropagationConfig:
    """Cross-plane self-prompting along +-z, +-y, +-x."""

    iou_threshold: float = 0.5  # stop a direction when IoU(previous, new) < this (paper: 0.5)
    max_area: int | None = None  # area cap per slice in voxels; None = from the prompt's masks
    area_factor: float = 2.0  # default cap = area_factor * largest area of the first masks
    directions: tuple[Direction, ...] = DIRECTIONS  # type: ignore[assignment]
    target: Target = "particle"  # "membrane": no area cap, sheet-like propagation
    max_steps: int | None = None  # at most this many slices per direction; None = until a stop
    membrane_tolerance: int = 2  # membrane: IoU of masks dilated by this many pixels (thin)
    batched: bool = True  # advance all particles together (False: one at a time, baseline)
    normalise: bool = True  # rescale the raw volume by robust percentiles to [0, 1] first
    clip_percentiles: tuple[float, float] = (0.5, 99.5)  # percentiles mapped to 0 and 1

    def __post_init__(self) -> None:
        check_choice("propagation.target", self.target, TARGETS)
        for d in self.directions:
            check_choice("propagation.directions", d, DIRECTIONS)
        if self.iou_threshold < 0.0:  # above 1 is allowed: no step is ever accepted
            raise InputError(f"propagation.iou_threshold {self.iou_threshold}: must be >= 0")
        if self.max_area is not None and self.max_area < 1:
            raise InputError(f"propagation.max_area {self.max_area}: must be at least 1")
        _check_percentiles("propagation.clip_percentiles", self.clip_percentiles)


@dataclass(frozen=True)
class MatchingConfig:
    """Hierarchical coarse-to-fine cosine matching."""

    ratios: tuple[int, ...] = (16, 8, 4)  # coarse-to-fine grid ratios (paper)
    sim_threshold: float = 0.5  # keep cells with cosine similarity >= this (paper: 0.5)
    top_k: int = 512  # keep at most this many proposals (paper: K = 512; 0 = no cap)
    nms_radius: float | None = None  # the input's voxels; None = from the clicked particles' size
    chunk_size: int = 16384  # feature vectors scored per chunk (bounded memory)
    naive: bool = False  # score every finest-grid cell in one pass (baseline)
    dilation: int = 0  # also score this many rings of fine cells around survivors' children
    grow: bool = True  # last level: follow surviving regions past their parents to their rim
    coarse_margin: float = 0.1  # levels before the last keep cells >= sim_threshold - this
    coarse_pooling: bool = True  # score coarse levels on cell-averaged features (not a point)
    adapt_ratios: bool = True  # skip ratios coarser than the prompted particle's diameter
    backend: MatchBackend = "auto"  # "auto" (= torch matmul) | "torch" | "faiss" (GPU index)
    query: QueryMode = "mean"  # "mean": one voxel-weighted mean over all clicks (paper Eq. 4);
    # "max": also each click's own query, a match scores its best (0.1/0.2 behaviour)
    turns: bool = True  # also match every query turned by 90 degrees about z (its y and x
    # plane blocks swapped); a match scores its best

    def __post_init__(self) -> None:
        check_choice("matching.backend", self.backend, MATCH_BACKENDS)
        check_choice("matching.query", self.query, QUERY_MODES)
        ratios = tuple(int(r) for r in self.ratios)
        if not ratios or min(ratios) < 1 or list(ratios) != sorted(ratios, reverse=True):
            raise InputError(f"matching.ratios {tuple(self.ratios)}: give decreasing positive "
                             "integers, e.g. 16,8,4")
        object.__setattr__(self, "ratios", ratios)
        if not -1.0 <= self.sim_threshold <= 1.0:
            raise InputError(f"matching.sim_threshold {self.sim_threshold}: must be in [-1, 1]")
        if self.top_k < 0:
            raise InputError(f"matching.top_k {self.top_k}: must be >= 0 (0 = no cap)")
        if self.nms_radius is not None and self.nms_radius < 0:
            raise InputError(f"matching.nms_radius {self.nms_radius}: must be >= 0")


@dataclass(frozen=True)
class ScoreConfig:
    """The pick score and the cut that decides what is written (see :mod:`cryosam.score`).

    The score is similarity x segmenter confidence x agreement with the clicked particles
    (size, shape, density). ``min_score`` None: the cut is chosen from the tomogram's own
    score distribution (:mod:`cryosam.cut`); a number overrides it (0 keeps every pick)."""

    size_tolerance: float = 0.35  # std of log(size / clicked size) accepted (~1.4x either way)
    shape_tolerance: float = 0.35  # std of the log principal-axis ratios' difference
    density_weight: float = 1.0  # exponent of the density agreement (0 = size and shape only)
    density_tolerance: float = 0.03  # 1 - correlation of the density that costs a factor e
    # with 3+ clicks: a match whose density strays more than this many times the most
    # different click's (leave-one-out) is outside the clicked kind (0 = no limit)
    density_range: float = 1.5
    min_score: float | None = None  # write picks scoring >= this; None = automatic cut
    # the automatic cut writes no match when the query matches more than this share of the
    # tomogram (MatchStats.share, the finest grid): such a query describes the background
    # (1 = never)
    background_share: float = 0.5

    def __post_init__(self) -> None:
        if not self.size_tolerance > 0 or not self.shape_tolerance > 0:
            raise InputError("score.size_tolerance and score.shape_tolerance must be > 0")
        if not 0.0 < self.background_share <= 1.0:
            raise InputError(f"score.background_share {self.background_share}: give a share "
                             "in (0, 1]; 1 never holds matches back")
        if not self.density_tolerance > 0:
            raise InputError(f"score.density_tolerance {self.density_tolerance}: must be > 0")
        if self.density_range < 0:
            raise InputError(f"score.density_range {self.density_range}: must be >= 0 "
                             "(0 = no limit)")
        if self.density_weight < 0:
            raise InputError(f"score.density_weight {self.density_weight}: must be >= 0")
        if self.min_score is not None and not 0.0 <= self.min_score <= 1.0:
            raise InputError(f"score.min_score {self.min_score}: must be in [0, 1] (scores "
                             "are), or leave it unset for the automatic cut")


_BLOCKS: dict[str, type] = {"encoder": EncoderConfig, "segmenter": SegmenterConfig,
                            "propagation": PropagationConfig, "matching": MatchingConfig,
                            "score": ScoreConfig}


@dataclass(frozen=True)
class CryosamConfig:
    """The whole pipeline's configuration."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    propagation: PropagationConfig = field(default_factory=PropagationConfig)
    matching: MatchingConfig = field(default_factory=MatchingConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    seed: int = 0
    threads: int | None = None  # CPU threads for torch; None = SLURM/OMP setting or affinity
    polarity: PolarityChoice = "auto"  # particles "dark" or "bright"; auto = from the clicks
    diameter: float | None = None  # particle diameter in Å; None = estimated from the clicks
    binning: int | None = None  # work on a binned copy; None = from the particle's size
    merge_iou: float = 0.5  # merge an instance into one that already holds this share of it

    def __post_init__(self) -> None:
        if not _DEVICE.match(str(self.device).strip().lower()):
            raise InputError(f"device {self.device!r} is not one of auto, cpu, cuda, cuda:N")
        check_choice("polarity", self.polarity, ("auto", "dark", "bright"))
        if self.threads is not None and self.threads < 1:
            raise InputError(f"threads {self.threads}: must be at least 1")
        if self.diameter is not None and not 0 < self.diameter < math.inf:
            raise InputError(f"diameter {self.diameter}: give the particle diameter in Å (> 0)")
        if self.binning is not None and not 1 <= self.binning <= 16:
            raise InputError(f"binning {self.binning}: must be between 1 and 16")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form for the run record."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CryosamConfig:
        """The inverse of :meth:`to_dict` (a run record's ``parameters``); unknown keys are
        errors naming them, missing ones take today's defaults."""
        if not isinstance(data, dict):
            raise InputError("configuration: expected a mapping of parameters")
        top = {k: v for k, v in backends.drop_retired("", data).items() if k not in _BLOCKS}
        blocks = {}
        for name, block_cls in _BLOCKS.items():
            given = data.get(name) or {}
            if not isinstance(given, dict):
                raise InputError(f"{name} {given!r}: give a block of its parameters, e.g. "
                                 f'"{name}": {{...}}')
            blocks[name] = build_dataclass(block_cls, dict(given), name)
        return build_dataclass(cls, {**top, **blocks}, "configuration")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str],
                  base: CryosamConfig | None = None) -> CryosamConfig:
        """Read a run record (``run.json``, its ``parameters``) or a bare parameters JSON;
        what a partial file leaves out keeps ``base``'s values (a saved query's, say), else
        the defaults."""
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except OSError as exc:
            raise InputError(f"--config {p}: cannot read it ({exc.strerror})") from None
        except ValueError as exc:
            raise InputError(f"--config {p}: not valid JSON ({exc})") from None
        params = data.get("parameters", data) if isinstance(data, dict) else data
        if base is not None and isinstance(params, dict):
            params = _layered(base.to_dict(), params)
        try:
            return cls.from_dict(params)
        except InputError as exc:
            raise InputError(f"--config {p}: {exc}") from None

    def replace_path(self, path: str, value: Any) -> CryosamConfig:
        """A copy with one dotted parameter changed, e.g. ``matching.top_k`` or
        ``encoder.backends.dinov2.model``."""
        try:
            current = get_path(self, path)
        except (KeyError, AttributeError, TypeError):
            raise InputError(f"{path}: no such parameter; CryosamConfig().to_dict() lists "
                             "them (e.g. matching.top_k)") from None
        parent, _, name = path.rpartition(".")
        owner = get_path(self, parent) if parent else self
        if (dataclasses.is_dataclass(current) or isinstance(current, dict)) and not (
                dataclasses.is_dataclass(value) or isinstance(value, dict)):
            raise InputError(f"{path} is a block of parameters; set one of them, e.g. "
                             f"{path}.{next(iter(_fields(current)))}")
        kind = _annotation(owner, name)  # the field's declared kind, as from_dict checks it
        if kind is not None:
            fits, as_kind = backends.check_kind(value, kind)
            if fits is False:
                raise InputError(f"{path} = {value!r}: not a valid value; give "
                                 f"{backends.describe_kind(kind)}")
            value = as_kind
        head, _, rest = path.partition(".")
        try:
            return _replace(self, head, rest, value)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{path} = {value!r}: not a valid value ({exc})") from None


def _annotation(owner: Any, name: str) -> Any:
    """The annotated kind of field ``name`` of the dataclass ``owner`` (None for a dict entry
    or an annotation that cannot be resolved)."""
    if not dataclasses.is_dataclass(owner):
        return None
    try:
        return typing.get_type_hints(type(owner)).get(name)
    except Exception:  # noqa: BLE001 - unresolvable: the dataclass's own checks remain
        return None


def _fields(block: Any) -> list[str]:
    """The keys of a parameter block (a dataclass or a dict)."""
    return ([f.name for f in dataclasses.fields(block)] if dataclasses.is_dataclass(block)
            else list(block))


def _layered(under: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``under`` with ``over``'s keys put on top, nested blocks merged key by key."""
    out = dict(under)
    for key, value in over.items():
        below = out.get(key)
        out[key] = (_layered(below, value) if isinstance(below, dict) and isinstance(value, dict)
                    else value)
    return out


def _replace(obj: Any, head: str, rest: str, value: Any) -> Any:
    if isinstance(obj, dict):
        inner = obj[head]
        new = _replace(inner, *rest.partition(".")[::2], value) if rest else value
        return {**obj, head: new}
    if not rest:
        return dataclasses.replace(obj, **{head: value})
    inner = getattr(obj, head)
    return dataclasses.replace(obj, **{head: _replace(inner, *rest.partition(".")[::2], value)})


def get_path(config: Any, path: str) -> Any:
    """The value of a dotted parameter path in a config (``matching.top_k``)."""
    obj = config
    for part in path.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def default_config() -> CryosamConfig:
    """Today's defaults; the CLI takes every option's default from here."""
    return CryosamConfig()


MACHINE_PARAMETERS = ("device", "threads")  # where a run happens, not what it computes
# how fast a run goes and in how much memory, not what it finds (up to rounding)
TUNING_PARAMETERS = (("encoder", "batch_size"), ("segmenter", "embedding_cache_mb"),
                     ("segmenter", "encoder_batch_size"), ("segmenter", "decoder_batch_size"),
                     ("matching", "chunk_size"), ("matching", "backend"))


def result_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` (a :meth:`CryosamConfig.to_dict`) without what only the machine decides:
    the device, threads, batch sizes, cache budget and matching backend. A batch resumes and
    a saved query travels on that, so another GPU or smaller batches change neither."""
    out = {k: v for k, v in params.items() if k not in MACHINE_PARAMETERS}
    for section, key in TUNING_PARAMETERS:
        if isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items() if k != key}
    return out

