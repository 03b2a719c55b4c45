"""The backend registry: the one place that maps a backend name to its class, its options
block and its model weights.

A backend is a slice encoder (features for matching) or a 2-D promptable segmenter (masks).
Each entry names its implementation as ``"module:Class"`` (imported only when the backend is
built, so choosing the weight-free path never imports transformers), its options dataclass
(the knobs only it reads; they sit under ``encoder.backends[name]`` /
``segmenter.backends[name]`` in :class:`cryosam.config.CryosamConfig`) and how to find the
weights it needs. Adding a backend is its module plus one :class:`Backend` entry here.

The implementation class provides ``from_config(block, device, target)`` (a classmethod that
builds it from the whole :class:`~cryosam.config.EncoderConfig` or
:class:`~cryosam.config.SegmenterConfig`); encoders also provide
``geometry_from_options(options)`` → ``(grid_shape, channels)`` so that memory can be
estimated without loading weights.
"""

from __future__ import annotations

import dataclasses
import importlib
import numbers
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from cryosam.errors import InputError, MissingWeightsError

Kind = Literal["encoder", "segmenter"]
Target = Literal["particle", "membrane"]
Polarity = Literal["dark", "bright"]

DEFAULT_DINOV2 = "facebook/dinov2-with-registers-large"  # the paper's reference code
DEFAULT_SAM = "vit_h"  # the paper's SAM
SAM_KINDS = ("vit_h", "vit_l", "vit_b")


# --------------------------------------------------------------------------- options blocks


@dataclass(frozen=True)
class Dinov2Options:
    """DINOv2 (transformers): which model and how finely it sees a slice."""

    model: str = DEFAULT_DINOV2  # hub id or local directory
    patches_long_side: int = 37  # long side of a slice spans this many patches (37*14 = 518 px)

    def __post_init__(self) -> None:
        _at_least("encoder.backends.dinov2.patches_long_side", self.patches_long_side, 1)


@dataclass(frozen=True)
class FilterBankOptions:
    """The weight-free filter bank: patch size and the scales it looks at."""

    patch: int = 2  # voxels per patch
    sigmas: tuple[float, ...] = (1.0, 1.41, 2.0, 2.83, 4.0, 5.66, 8.0, 11.3)  # voxels

    def __post_init__(self) -> None:
        _at_least("encoder.backends.filterbank.patch", self.patch, 1)
        if not self.sigmas or min(self.sigmas) <= 0:
            raise InputError(f"encoder.backends.filterbank.sigmas {self.sigmas}: give one or "
                             "more scales > 0 (voxels)")


@dataclass(frozen=True)
class SamOptions:
    """SAM (segment-anything): which checkpoint and how many candidate masks per prompt."""

    model: str = DEFAULT_SAM  # "vit_h" | "vit_l" | "vit_b" or a path to a .pth checkpoint
    multimask: bool = True  # 3 candidate masks per prompt, keep the best acceptable one


@dataclass(frozen=True)
class ThresholdOptions:
    """The weight-free threshold segmenter: local contrast around the prompt."""

    polarity: Polarity = "dark"  # particles darker ("dark") or brighter than background
    smooth_sigma: float = 1.5  # Gaussian denoising of each slice, in pixels
    slab: int = 1  # average this many neighbouring slices each side before smoothing
    level: float = 0.5  # cut between local background (0) and particle core (1)
    membrane_cut: float = 2.5  # --target membrane: bilayer ridge cut, in ridge-noise units
    min_contrast: float = 2.0  # no mask when core-background contrast < this * noise

    def __post_init__(self) -> None:
        check_choice("segmenter.backends.threshold.polarity", self.polarity, ("dark", "bright"))
        _at_least("segmenter.backends.threshold.slab", self.slab, 0)


# --------------------------------------------------------------------------- weights lookups


def _sam_weights(options: SamOptions) -> None:
    from pathlib import Path

    from cryosam.weights import locate_sam

    model = options.model
    known = model in SAM_KINDS
    try:
        locate_sam(model) if known else locate_sam(sam_kind_of(model), Path(model))
    except MissingWeightsError as exc:
        raise MissingWeightsError(str(exc), name=f"sam_{model}" if known else None) from None


def _dinov2_weights(options: Dinov2Options) -> None:
    from cryosam.errors import CryosamError
    from cryosam.weights import get_spec, locate_dinov2

    try:
        locate_dinov2(options.model)
    except MissingWeightsError as exc:
        try:
            name: str | None = get_spec(options.model).name
        except CryosamError:
            name = None  # a local folder or a hub id cryosam does not list
        raise MissingWeightsError(str(exc), name=name) from None


def sam_kind_of(model: str) -> str:
    """The SAM architecture (vit_h/l/b) a model name or checkpoint file name stands for."""
    from pathlib import PurePath

    low = PurePath(model).name.lower()
    return next((kind for kind in SAM_KINDS if kind in low), "vit_h")


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Backend:
    """One registry entry."""

    name: str  # what --encoder / --segmenter take
    kind: Kind
    implementation: str  # "module:Class"
    options: type  # its options dataclass
    summary: str  # one line for --help and the README
    weights: Callable[[Any], None] | None = None  # raises MissingWeightsError when absent
    weight_free: bool = False  # a baseline that needs no download (the offline fallback)
    wants_dark: bool = False  # sees particles dark: cryosam flips a bright tomogram for it

    def load(self) -> type:
        """Import and return the implementation class."""
        module, _, attr = self.implementation.partition(":")
        return getattr(importlib.import_module(module), attr)


REGISTRY: dict[str, Backend] = {b.name: b for b in (
    Backend("dinov2", "encoder", "cryosam.encoders.dinov2:Dinov2Encoder", Dinov2Options,
            "DINOv2 ViT patch features (transformers); the paper's encoder",
            weights=_dinov2_weights),
    Backend("filterbank", "encoder", "cryosam.encoders.filterbank:FilterBankEncoder",
            FilterBankOptions, "weight-free multi-scale blob/line filter bank",
            weight_free=True, wants_dark=True),
    Backend("sam", "segmenter", "cryosam.segmenters.sam:SamSegmenter", SamOptions,
            "Segment Anything (segment-anything); the paper's segmenter",
            weights=_sam_weights),
    Backend("threshold", "segmenter", "cryosam.segmenters.threshold:ThresholdSegmenter",
            ThresholdOptions, "weight-free local-contrast threshold", weight_free=True,
            wants_dark=True),
)}


def names(kind: Kind) -> tuple[str, ...]:
    """Registered backend names of one kind, in registry order."""
    return tuple(n for n, b in REGISTRY.items() if b.kind == kind)


def weight_free(kind: Kind) -> str:
    """The weight-free backend of a kind (``cryosam demo``'s offline fallback)."""
    return next(n for n, b in REGISTRY.items() if b.kind == kind and b.weight_free)


def get(name: str, kind: Kind) -> Backend:
    """The entry ``name`` of ``kind``; a clear error naming the parameter otherwise."""
    backend = REGISTRY.get(name)
    if backend is None or backend.kind != kind:
        raise InputError(f"{kind} {name!r} is not one of {', '.join(names(kind))}")
    return backend


def entry_of(backend: object) -> Backend | None:
    """The registry entry of a built backend (by its class), None for an unregistered one."""
    cls = type(backend)
    target = f"{cls.__module__}:{cls.__qualname__}"
    return next((b for b in REGISTRY.values() if b.implementation == target), None)


def default_options(kind: Kind) -> dict[str, Any]:
    """Every backend's default options block of ``kind``, keyed by name."""
    return {n: REGISTRY[n].options() for n in names(kind)}


def options_from(kind: Kind, given: Any) -> dict[str, Any]:
    """The per-backend options mapping, completed with defaults; dicts (a run record) become
    the backends' dataclasses. Unknown backends or fields are errors naming them."""
    out = default_options(kind)
    for name, value in dict(given or {}).items():
        cls = get(name, kind).options
        if isinstance(value, cls):
            out[name] = value
        elif isinstance(value, dict):
            value = drop_retired(f"{kind}.backends.{name}", value)
            out[name] = build_dataclass(cls, value, f"{kind}.backends.{name}")
        else:
            raise InputError(f"{kind}.backends.{name}: expected a mapping of options, "
                             f"got {type(value).__name__}")
    return out


# options of earlier versions that are gone, by their dotted place in the configuration
# (top-level ones bare) -> what replaced them; an old run.json still loads, with a warning
_LEARNED = "learned from the clicks"  # 0.2's fixed size and shape ratios became the agreement
RETIRED_OPTIONS = {
    "segmenter.backends.threshold.membrane_level": "segmenter.backends.threshold.membrane_cut",
    "min_size_ratio": f"score.size_tolerance, {_LEARNED}",
    "max_size_ratio": f"score.size_tolerance, {_LEARNED}",
    "max_elongation_ratio": f"score.shape_tolerance, {_LEARNED}",
}


def drop_retired(where: str, value: dict[str, Any]) -> dict[str, Any]:
    """``value`` (the options at ``where``, "" for the top level) without the ones earlier
    versions had, all named in one warning with what replaced each."""
    prefix = f"{where}." if where else ""
    gone = sorted(k for k in value if prefix + k in RETIRED_OPTIONS)
    if not gone:
        return value
    import warnings

    from cryosam.errors import CryosamWarning

    named = "; ".join(f"{k} (now {RETIRED_OPTIONS[prefix + k]})" for k in gone)
    warnings.warn(f"{where or 'configuration'}: {named}: no longer an option, ignored (the "
                  "new one takes its default)", CryosamWarning, stacklevel=3)
    return {k: v for k, v in value.items() if k not in gone}


def missing_weights(
    selected: list[tuple[Kind, str, Any]],
) -> list[tuple[str | None, MissingWeightsError]]:
    """For each (kind, name, options) in use whose weights are not on this machine: the
    model's download name (None for a user-given path) and the error saying so."""
    missing = []
    for kind, name, options in selected:
        backend = get(name, kind)
        if backend.weights is None:
            continue
        try:
            backend.weights(options)
        except MissingWeightsError as exc:
            missing.append((exc.name, exc))
    return missing


# --------------------------------------------------------------------------- validation helpers


def check_choice(parameter: str, value: Any, choices: tuple[Any, ...]) -> None:
    """An :class:`InputError` naming ``parameter`` when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise InputError(f"{parameter} {value!r} is not one of "
                         f"{', '.join(str(c) for c in choices)}")


def _at_least(parameter: str, value: float, low: float) -> None:
    if value < low:
        raise InputError(f"{parameter} {value}: must be at least {low}")


def build_dataclass(cls: type, data: dict[str, Any], where: str) -> Any:
    """``cls(**data)`` with lists turned into tuples where the field is a tuple, unknown
    keys refused by name (a run record from another version says what it cannot carry), and
    anything but true or false refused for a bool."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise InputError(f"{where}: unknown parameter(s) {', '.join(unknown)}; "
                         f"known: {', '.join(fields)}")
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an annotation not resolvable here: no kind checks
        hints = {}
    kwargs = {}
    for key, value in data.items():
        if key not in hints:  # unresolved annotation: lists become the tuples fields hold
            is_tuple = isinstance(value, list) and "tuple" in str(fields[key].type)
            kwargs[key] = tuple(value) if is_tuple else value
            continue
        fits, as_kind = check_kind(value, hints[key])
        if fits is False:  # "false" for a bool, "16,8,4" for a list, 1.5 for a whole number
            raise InputError(f"{where}.{key} {value!r}: give {describe_kind(hints[key])}")
        kwargs[key] = as_kind
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise InputError(f"{where}: {exc}") from None


def check_kind(value: Any, kind: Any) -> tuple[bool | None, Any]:
    """Whether a parameter is of the annotated ``kind`` (numbers, whole numbers, text, lists
    of them, null), and the value as that kind: NumPy scalars and arrays, whole floats for
    whole numbers and paths for text are what a configuration built in Python holds. None
    when the kind is not one checked here."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        found = [check_kind(value, a) for a in args]
        fit = next((f for f in found if f[0]), None)
        if fit is not None:
            return fit
        return (None if any(f[0] is None for f in found) else False), value
    if origin is Literal:  # which words are allowed is checked by the dataclass
        return isinstance(value, str), value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            return False, value
        each = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(each) != len(value):
            return False, value
        found = [check_kind(v, k) for v, k in zip(value, each, strict=True)]
        fits = [f[0] for f in found]
        return (False if False in fits else (None if None in fits else True)), \
            tuple(f[1] for f in found)
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if kind is int:
        whole = number and float(value).is_integer()
        return whole, int(value) if whole else value
    if kind is str and isinstance(value, os.PathLike):
        return True, os.fspath(value)
    simple = {type(None): value is None, bool: isinstance(value, bool), float: number,
              str: isinstance(value, str)}
    return (simple.get(kind) if isinstance(kind, type) else None), value


def describe_kind(kind: Any) -> str:
    """What a parameter of ``kind`` should be, for an error line ("a whole number or null")."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_kind(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is tuple:
        inner = {int: "whole numbers", float: "numbers"}.get(args[0], "words") if args else "values"
        return f"a list of {inner}, e.g. [16, 8, 4]" if args and args[0] is int else \
            f"a list of {inner}"
    return {type(None): "null", int: "a whole number", float: "a number",
            str: "a word", bool: "true or false"}.get(kind, "a word")


__all__ = [
    "REGISTRY", "SAM_KINDS", "Backend", "Dinov2Options", "FilterBankOptions", "SamOptions",
    "ThresholdOptions", "build_dataclass", "check_choice", "check_kind", "default_options",
    "describe_kind", "entry_of", "get",
    "missing_weights", "names", "options_from", "sam_kind_of", "weight_free",
]
