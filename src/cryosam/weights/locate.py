"""Where cryosam looks for weights, and the one-line message when they are not there.

Lookup never touches the network. Order, for every model (first hit wins): an explicit path;
the folders in ``$CRYOSAM_CHECKPOINTS``; the repository's ``checkpoints/`` then
``./checkpoints``; for DINOv2 only, the Hugging Face cache (pinned revision, then ``main``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryosam.errors import CryosamError, MissingWeightsError
from cryosam.weights.specs import (
    CHECKPOINTS_ENV,
    MANIFEST_NAME,
    REGISTRY,
    WeightSpec,
    canonical_name,
    get_spec,
)

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _repo_checkpoints() -> Path | None:
    """The repository's ``checkpoints/`` when cryosam runs from a source checkout."""
    root = Path(__file__).resolve().parents[3]  # src/cryosam/weights/locate.py -> repo root
    if (root / "pyproject.toml").is_file() and (root / "src" / "cryosam").is_dir():
        return root / "checkpoints"
    return None


def env_dirs() -> list[Path]:
    """The folders named in ``$CRYOSAM_CHECKPOINTS`` (``os.pathsep``-separated)."""
    env = os.environ.get(CHECKPOINTS_ENV, "")
    return [Path(p).expanduser() for p in env.split(os.pathsep) if p.strip()]


def builtin_dirs() -> list[Path]:
    """The repository's ``checkpoints/`` (source checkout) and ``./checkpoints``."""
    repo = _repo_checkpoints()
    cwd = Path.cwd() / "checkpoints"
    if repo is not None and repo.resolve() != cwd.resolve():
        return [repo, cwd]
    return [cwd]


def search_dirs() -> list[Path]:
    """Checkpoint folders in lookup order: ``$CRYOSAM_CHECKPOINTS``, repo's, ``./checkpoints``."""
    unique: list[Path] = []
    seen: set[Path] = set()
    for d in env_dirs() + builtin_dirs():
        key = d.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(d)
    return unique


def default_download_dir() -> Path:
    """Where downloads go without ``--dir``: the first folder that lookup searches."""
    return search_dirs()[0]


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, from the environment at call time."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def hf_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` asks for no network access."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _looked_in(dinov2: bool) -> str:
    where = ", ".join(str(d) for d in search_dirs())
    if not os.environ.get(CHECKPOINTS_ENV):
        where = f"{where} ({CHECKPOINTS_ENV} not set)"
    if dinov2:
        where += f" and the Hugging Face cache {hf_cache_dir()}"
    return where


def missing_message(name: str | WeightSpec) -> str:
    """One line: what is missing, where cryosam looked, the command to get it, where to copy."""
    spec = name if isinstance(name, WeightSpec) else get_spec(name)
    what = f"checkpoints/{spec.target}" + ("/" if spec.kind == "dinov2" else "")
    looked = _looked_in(spec.kind == "dinov2")
    return (
        f"{spec.description} weights '{spec.name}' not found (looked in {looked}); "
        f"on a machine with internet run `{spec.download_command}`, then copy {what} into "
        f"{default_download_dir()} on this machine (or into a folder named by "
        f"{CHECKPOINTS_ENV}); see checkpoints/README.md"
    )


@dataclass(frozen=True)
class Found:
    """Where a model was found, and by which rule of the lookup order."""

    path: Path
    source: str  # "explicit" | "CRYOSAM_CHECKPOINTS" | "checkpoints" | "hf-cache"


def is_model_dir(path: Path) -> bool:
    """True for a folder ``from_pretrained`` can load: a config and a weights file."""
    return (path / "config.json").is_file() and any((path / f).is_file() for f in _WEIGHT_FILES)


def _dir_source(d: Path) -> str:
    env = {p.resolve() for p in env_dirs()}
    return CHECKPOINTS_ENV if d.resolve() in env else "checkpoints"


def _hf_cache_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """A complete local snapshot of ``repo_id`` in the HF cache (pinned revision, then main)."""
    from huggingface_hub import try_to_load_from_cache

    for rev in dict.fromkeys((revision, None)):
        try:
            hit = try_to_load_from_cache(repo_id, "config.json", cache_dir=hf_cache_dir(),
                                         revision=rev)
        except Exception:  # noqa: BLE001 - a malformed cache is a miss, never a crash
            continue
        if isinstance(hit, str) and is_model_dir(Path(hit).parent):
            return Path(hit).parent
    return None


def find(spec: WeightSpec, dirs: Sequence[Path] | None = None, hf_cache: bool = True
         ) -> Found | None:
    """Search ``dirs`` (default :func:`search_dirs`) and, for DINOv2, the HF cache."""
    for d in dirs if dirs is not None else search_dirs():
        candidate = d / spec.target
        ok = candidate.is_file() if spec.kind == "sam" else is_model_dir(candidate)
        if ok:
            return Found(candidate, _dir_source(d) if dirs is None else "checkpoints")
    if spec.kind == "dinov2" and hf_cache and spec.repo_id:
        snap = _hf_cache_snapshot(spec.repo_id, spec.revision)
        if snap is not None:
            return Found(snap, "hf-cache")
    return None


def read_manifest(folder: Path) -> dict | None:
    """The ``cryosam-weights.json`` manifest of a DINOv2 folder, or None."""
    try:
        return json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def check_manifest_sizes(folder: Path, name: str) -> None:
    """Raise when a file the manifest lists is missing or has another size (a cut copy)."""
    manifest = read_manifest(folder)
    if manifest is None:
        return
    for rel, entry in manifest.get("files", {}).items():
        f = folder / rel
        if not f.is_file() or f.stat().st_size != entry.get("size"):
            raise MissingWeightsError(
                f"{f} is missing or has the wrong size (an incomplete copy?); copy {folder} again "
                f"or fetch it with `cryosam weights download {name} --dir checkpoints/`"
            )


def _check_sam_size(path: Path, spec: WeightSpec) -> None:
    size = path.stat().st_size
    if size != spec.size_bytes:
        raise MissingWeightsError(
            f"{path} has {size} bytes, expected {spec.size_bytes} (an incomplete copy?); copy it "
            f"again or fetch it with `{spec.download_command}`, and check it with "
            f"`cryosam weights verify`"
        )


def locate_sam(model: str = "vit_h", path: str | Path | None = None) -> Path:
    """The SAM checkpoint file for ``model`` (``vit_b``/``vit_l``/``vit_h`` or a ``.pth`` path).

    Known files are checked for their exact size (cheap); ``cryosam weights verify`` re-hashes.
    """
    explicit = Path(path).expanduser() if path is not None else None
    if explicit is None and (Path(model).expanduser().is_file() or model.endswith((".pth", ".pt"))
                             and canonical_name(model) is None):
        explicit = Path(model).expanduser()
    if explicit is not None:
        if not explicit.is_file():
            raise MissingWeightsError(
                f"SAM checkpoint {explicit} does not exist; pass the path of a .pth file, or a "
                f"model name (vit_b, vit_l, vit_h) to use checkpoints/ (see `cryosam weights list`)"
            )
        known = canonical_name(explicit.name)
        if known is not None:
            _check_sam_size(explicit, REGISTRY[known])
        return explicit
    spec = get_spec(model)
    if spec.kind != "sam":
        raise CryosamError(f"'{model}' is not a SAM model; use vit_b, vit_l or vit_h")
    found = find(spec)
    if found is None:
        raise MissingWeightsError(missing_message(spec))
    _check_sam_size(found.path, spec)
    return found.path


def locate_dinov2(model: str = "facebook/dinov2-with-registers-large",
                  path: str | Path | None = None) -> str:
    """A local folder for ``model`` that ``from_pretrained`` loads without network access.

    ``model`` is a hub id (or registry name) or a folder; ``path`` an explicit folder. A hit in
    the Hugging Face cache is returned as its snapshot folder, so loading stays offline.
    """
    explicit = Path(path).expanduser() if path is not None else None
    as_path = Path(model).expanduser()
    known = canonical_name(model) is not None
    if explicit is None and (as_path.is_dir() or not _HUB_ID.match(model) and not known):
        explicit = as_path
    if explicit is not None:
        if not is_model_dir(explicit):
            raise MissingWeightsError(
                f"{explicit} is not a DINOv2 model folder (it needs config.json and "
                f"model.safetensors); pass a folder made by `cryosam weights download`, or a hub "
                f"id such as facebook/dinov2-with-registers-large"
            )
        check_manifest_sizes(explicit, explicit.name)
        return str(explicit)
    if known:
        spec = get_spec(model)
        if spec.kind != "dinov2":
            raise CryosamError(f"'{model}' is not a DINOv2 model; see `cryosam weights list`")
    else:  # a hub id cryosam does not know: same lookup, no pinned revision
        folder = model.split("/")[-1]
        spec = WeightSpec(name=folder, kind="dinov2", description=f"hub model {model}",
                          size_bytes=0, license="?", repo_id=model)
    found = find(spec)
    if found is None:
        if spec.name not in REGISTRY:
            raise MissingWeightsError(
                f"model {model} not found (looked in {_looked_in(True)}); on a machine with "
                f"internet run `hf download {model} --local-dir checkpoints/{spec.name}`, then "
                f"copy that folder into {default_download_dir()} on this machine"
            )
        raise MissingWeightsError(missing_message(spec))
    if found.source != "hf-cache":
        check_manifest_sizes(found.path, spec.name)
    return str(found.path)
