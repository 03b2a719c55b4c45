"""Model weights: where cryosam finds them, how it downloads them, how it checks them.

Supported models (:data:`REGISTRY`): SAM ``vit_b``/``vit_l``/``vit_h`` checkpoints (one
``.pth`` file each, from Meta's official URLs, full sha256 recorded here) and DINOv2
small/base/large/giant with and without registers (Hugging Face hub snapshots at a pinned
commit).

Lookup order, for every model (first hit wins; lookup never touches the network):

1. an explicit path (the ``path`` argument, or a ``model`` argument that is itself a path);
2. every folder named in ``$CRYOSAM_CHECKPOINTS`` (several may be joined with ``:``);
3. ``checkpoints/``: the repository's folder (editable install), then ``./checkpoints`` in
   the working directory;
4. DINOv2 only: the Hugging Face cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or
   ``~/.cache/huggingface/hub``), the pinned revision first, then whatever ``main`` points to.
   ``HF_HUB_OFFLINE=1`` is honoured: downloads refuse to start, lookup is local anyway.

Layout of a checkpoints folder::

    checkpoints/sam_vit_h_4b8939.pth              SAM, official file name
    checkpoints/sam_vit_h_4b8939.pth.sha256       written once the file is verified
    checkpoints/dinov2-with-registers-large/      DINOv2, one folder per model:
        config.json, preprocessor_config.json, model.safetensors,
        cryosam-weights.json                      manifest: repo, revision, file sha256s

A missing model raises :class:`~cryosam.errors.MissingWeightsError` whose one-line message
(:func:`missing_message`) names the command to run on a machine with internet and where to
copy the result. Downloads go to ``<name>.part`` (a file for SAM, a folder for DINOv2), resume
with HTTP Range requests, are verified against the recorded checksums, and are renamed to
their final name only when they check out, so a failed download never looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryosam import __version__, progress
from cryosam._atomic import atomic_write_text
from cryosam.errors import CryosamError, MissingWeightsError

SAM_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
SAM_BASE_URL_ENV = "CRYOSAM_SAM_BASE_URL"
CHECKPOINTS_ENV = "CRYOSAM_CHECKPOINTS"
MANIFEST_NAME = "cryosam-weights.json"
DINOV2_PATTERNS = ("*.json", "*.safetensors")  # config, preprocessor config, weights
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_MIB = 1 << 20
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class WeightSpec:
    """One supported model: what it is, where it comes from, how to check it."""

    name: str  # the name `cryosam weights download` takes
    kind: str  # "sam" | "dinov2"
    description: str
    size_bytes: int  # exact for SAM files, approximate (weights file) for DINOv2
    license: str
    filename: str | None = None  # SAM: official file name
    sha256: str | None = None  # SAM: full sha256 of the file
    md5: str | None = None  # SAM: the file name carries the leading hex of this md5
    repo_id: str | None = None  # DINOv2: hub id
    revision: str | None = None  # DINOv2: pinned hub commit
    aliases: tuple[str, ...] = ()

    @property
    def target(self) -> str:
        """File or folder name inside a checkpoints folder."""
        return self.filename if self.kind == "sam" else self.name

    @property
    def download_command(self) -> str:
        """The command that fetches this model on a machine with internet."""
        return f"cryosam weights download {self.name} --dir checkpoints/"


def _sam(variant: str, filename: str, size: int, sha256: str, md5: str, params: str) -> WeightSpec:
    return WeightSpec(
        name=f"sam_{variant}", kind="sam", description=f"SAM ViT-{variant[-1].upper()} ({params})",
        size_bytes=size, license="Apache-2.0", filename=filename, sha256=sha256, md5=md5,
        aliases=(variant, filename, filename.removesuffix(".pth")),
    )


_VIT_LETTER = {"small": "S", "base": "B", "large": "L", "giant": "g"}


def _dino(size: str, registers: bool, approx_bytes: int, revision: str, params: str) -> WeightSpec:
    name = f"dinov2-with-registers-{size}" if registers else f"dinov2-{size}"
    what = "with registers" if registers else "no registers"
    vit = f"ViT-{_VIT_LETTER[size]}/14"
    return WeightSpec(
        name=name, kind="dinov2", description=f"DINOv2 {vit} {what} ({params})",
        size_bytes=approx_bytes, license="Apache-2.0", repo_id=f"facebook/{name}",
        revision=revision, aliases=(f"facebook/{name}",),
    )


# Sizes and sha256 of the SAM files as published by Meta (the md5 is what their names carry);
# DINOv2 revisions are the hub commits of the facebook/dinov2-* repositories.
_SPECS = (
    _sam("vit_b", "sam_vit_b_01ec64.pth", 375_042_383,
         "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
         "01ec64d29a2fca3f0661936605ae66f8", "91M params"),
    _sam("vit_l", "sam_vit_l_0b3195.pth", 1_249_524_607,
         "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
         "0b3195507c641ddb6910d2bb5adee89c", "308M params"),
    _sam("vit_h", "sam_vit_h_4b8939.pth", 2_564_550_879,
         "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
         "4b8939a88964f0f4ff5f5b2642c598a6", "636M params"),
    _dino("small", False, 88_000_000, "ed25f3a31f01632728cabb09d1542f84ab7b0056", "22M params"),
    _dino("base", False, 346_000_000, "f9e44c814b77203eaa57a6bdbbd535f21ede1415", "87M params"),
    _dino("large", False, 1_217_522_888, "47b73eefe95e8d44ec3623f8890bd894b6ea2d6c",
          "304M params"),
    _dino("giant", False, 4_546_005_432, "611a9d42f2335e0f921f1e313ad3c1b7178d206d",
          "1.1B params"),
    _dino("small", True, 88_000_000, "0d9846e56b43a21fa46d7f3f5070f0506a5795a9", "22M params"),
    _dino("base", True, 346_000_000, "a1d738ccfa7ae170945f210395d99dde8adb1805", "87M params"),
    _dino("large", True, 1_218_000_000, "e4c89a4e05589de9b3e188688a303d0f3c04d0f3",
          "304M params"),
    _dino("giant", True, 4_546_000_000, "8d0d49f77fb8b5dd78842496ff14afe7dd4d85cb",
          "1.1B params"),
)
REGISTRY: dict[str, WeightSpec] = {s.name: s for s in _SPECS}
DEFAULT_NAMES = ("dinov2-with-registers-large", "sam_vit_h")  # the paper's models

_ALIASES: dict[str, str] = {}
for _s in _SPECS:
    for _a in (_s.name, *_s.aliases):
        _ALIASES[_a.lower()] = _s.name


def get_spec(name: str) -> WeightSpec:
    """The registry entry for ``name`` (``sam_vit_h``, ``vit_h``, ``facebook/dinov2-large``...)."""
    key = _ALIASES.get(name.strip().lower())
    if key is None:
        raise CryosamError(
            f"unknown model '{name}'; known: {', '.join(REGISTRY)} (see `cryosam weights list`)"
        )
    return REGISTRY[key]


# --------------------------------------------------------------------------------------------
# where to look


def _repo_checkpoints() -> Path | None:
    """The repository's ``checkpoints/`` when cryosam runs from a source checkout."""
    root = Path(__file__).resolve().parents[2]
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


def _is_model_dir(path: Path) -> bool:
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
        if isinstance(hit, str) and _is_model_dir(Path(hit).parent):
            return Path(hit).parent
    return None


def find(spec: WeightSpec, dirs: Sequence[Path] | None = None, hf_cache: bool = True
         ) -> Found | None:
    """Search ``dirs`` (default :func:`search_dirs`) and, for DINOv2, the HF cache."""
    for d in dirs if dirs is not None else search_dirs():
        candidate = d / spec.target
        ok = candidate.is_file() if spec.kind == "sam" else _is_model_dir(candidate)
        if ok:
            return Found(candidate, _dir_source(d) if dirs is None else "checkpoints")
    if spec.kind == "dinov2" and hf_cache and spec.repo_id:
        snap = _hf_cache_snapshot(spec.repo_id, spec.revision)
        if snap is not None:
            return Found(snap, "hf-cache")
    return None


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
                             and model.lower() not in _ALIASES):
        explicit = Path(model).expanduser()
    if explicit is not None:
        if not explicit.is_file():
            raise MissingWeightsError(
                f"SAM checkpoint {explicit} does not exist; pass the path of a .pth file, or a "
                f"model name (vit_b, vit_l, vit_h) to use checkpoints/ (see `cryosam weights list`)"
            )
        known = _ALIASES.get(explicit.name.lower())
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


def _check_manifest_sizes(folder: Path, name: str) -> None:
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


def locate_dinov2(model: str = "facebook/dinov2-with-registers-large",
                  path: str | Path | None = None) -> str:
    """A local folder for ``model`` that ``from_pretrained`` loads without network access.

    ``model`` is a hub id (or registry name) or a folder; ``path`` an explicit folder. A hit in
    the Hugging Face cache is returned as its snapshot folder, so loading stays offline.
    """
    explicit = Path(path).expanduser() if path is not None else None
    as_path = Path(model).expanduser()
    if explicit is None and (as_path.is_dir() or not _HUB_ID.match(model)
                             and model.lower() not in _ALIASES):
        explicit = as_path
    if explicit is not None:
        if not _is_model_dir(explicit):
            raise MissingWeightsError(
                f"{explicit} is not a DINOv2 model folder (it needs config.json and "
                f"model.safetensors); pass a folder made by `cryosam weights download`, or a hub "
                f"id such as facebook/dinov2-with-registers-large"
            )
        _check_manifest_sizes(explicit, explicit.name)
        return str(explicit)
    if model.lower() in _ALIASES:
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
        _check_manifest_sizes(found.path, spec.name)
    return str(found.path)


# --------------------------------------------------------------------------------------------
# hashing


class _Digest(Protocol):
    def update(self, data: bytes, /) -> None: ...


@contextlib.contextmanager
def _byte_bar(description: str, total: int | None, completed: int = 0
              ) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)`` for a bytes progress bar (a no-op off a terminal or with --quiet)."""
    if not progress.enabled():
        yield lambda n: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task(description, total=total, completed=completed)
        yield lambda n: bar.advance(task, n)


def _hash_into(path: Path, *digests: _Digest, description: str | None = None) -> None:
    size = path.stat().st_size
    with _byte_bar(description or f"hashing {path.name}", size) as advance, path.open("rb") as fh:
        while chunk := fh.read(8 * _MIB):
            for d in digests:
                d.update(chunk)
            advance(len(chunk))


def sha256_file(path: str | Path) -> str:
    """Full sha256 of a file (hex), read in chunks, with a progress bar on a terminal."""
    digest = hashlib.sha256()
    _hash_into(Path(path), digest)
    return digest.hexdigest()


def _quick_digest(digest: _Digest, path: Path) -> None:
    size = path.stat().st_size
    digest.update(size.to_bytes(8, "little"))
    with path.open("rb") as fh:
        digest.update(fh.read(_MIB))
        if size > 2 * _MIB:
            fh.seek(size - _MIB)
            digest.update(fh.read(_MIB))
        elif size > _MIB:
            digest.update(fh.read())


def weights_id(path: str | Path) -> str:
    """A short, cheap content id of a weights file or model folder, for run records and caches.

    sha256 over the size and the first and last MiB of each file (for a folder: its config and
    weight files, by name). It tells checkpoints apart; it is not an integrity check.
    """
    p = Path(path).expanduser()
    digest = hashlib.sha256(b"cryosam-weights-id-v1\0")
    if p.is_file():
        _quick_digest(digest, p)
    elif p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")
                       and f.name != MANIFEST_NAME
                       and f.suffix in {".json", ".safetensors", ".bin", ".pth", ".pt"})
        if not files:
            raise CryosamError(f"{p} holds no model files to identify")
        for f in files:
            digest.update(f.name.encode() + b"\0")
            _quick_digest(digest, f)
    else:
        raise CryosamError(f"cannot identify weights at {p}: no such file or folder")
    return digest.hexdigest()[:16]


def _git_blob_sha1(path: Path) -> str:
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    _hash_into(path, digest)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# verification records


def sidecar_path(path: Path) -> Path:
    """``<file>.sha256`` (``sha256sum -c`` format) written once a SAM file is verified."""
    return path.with_name(path.name + ".sha256")


def _write_sidecar(path: Path, sha256: str) -> None:
    atomic_write_text(sidecar_path(path), f"{sha256}  {path.name}\n")


def _sidecar_hash(path: Path) -> str | None:
    try:
        text = sidecar_path(path).read_text(encoding="utf-8").split()
    except OSError:
        return None
    return text[0].lower() if text and _HEX64.match(text[0].lower()) else None


def read_manifest(folder: Path) -> dict | None:
    """The ``cryosam-weights.json`` manifest of a DINOv2 folder, or None."""
    try:
        return json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Status:
    """What `cryosam weights list` shows for one model."""

    spec: WeightSpec
    state: str  # "verified" | "present" | "bad" | "missing"
    found: Found | None
    detail: str = ""


def status(spec: WeightSpec, rehash: bool = False) -> Status:
    """Whether ``spec`` is present, and verified (from records, or by re-hashing)."""
    found = find(spec)
    if found is None:
        return Status(spec, "missing", None)
    if rehash:
        ok, detail = verify_found(spec, found)
        state = "present" if ok is None else "verified" if ok else "bad"
        return Status(spec, state, found, detail)
    if spec.kind == "sam":
        size = found.path.stat().st_size
        if size != spec.size_bytes:
            return Status(spec, "bad", found, f"{size} bytes, expected {spec.size_bytes}")
        if _sidecar_hash(found.path) == spec.sha256:
            return Status(spec, "verified", found)
        return Status(spec, "present", found, "not verified yet: cryosam weights verify")
    if found.source == "hf-cache":
        return Status(spec, "present", found, "in the Hugging Face cache")
    manifest = read_manifest(found.path)
    if manifest is None:
        return Status(spec, "present", found, "no manifest: not downloaded by cryosam")
    try:
        _check_manifest_sizes(found.path, spec.name)
    except MissingWeightsError:
        return Status(spec, "bad", found, "files missing or of the wrong size")
    if manifest.get("revision") != spec.revision:
        return Status(spec, "present", found, f"revision {manifest.get('revision')}")
    return Status(spec, "verified", found)


def verify_found(spec: WeightSpec, found: Found) -> tuple[bool | None, str]:
    """Re-hash what was found: True if it matches the recorded checksums, False if not,
    None when nothing was recorded to check against (a folder not made by cryosam)."""
    if spec.kind == "sam":
        size = found.path.stat().st_size
        if size != spec.size_bytes:
            return False, f"{size} bytes, expected {spec.size_bytes}"
        got = sha256_file(found.path)
        if got == spec.sha256:
            _write_sidecar(found.path, got)
            return True, "sha256 matches"
        with contextlib.suppress(FileNotFoundError):
            sidecar_path(found.path).unlink()
        return False, f"sha256 {got[:12]}..., expected {spec.sha256[:12]}..."
    if found.source == "hf-cache":
        # LFS blobs in the HF cache are named by their sha256
        checked = 0
        for f in sorted(found.path.iterdir()):
            blob = f.resolve()
            if _HEX64.match(blob.name):
                if sha256_file(blob) != blob.name:
                    return False, f"{f.name}: content does not match its blob name"
                checked += 1
        if not checked:
            return None, "no checksummed files in this cache snapshot"
        return True, f"{checked} LFS file(s) match"
    manifest = read_manifest(found.path)
    if manifest is None:
        return None, f"no {MANIFEST_NAME}: not downloaded by cryosam, nothing to check against"
    for rel, entry in sorted(manifest.get("files", {}).items()):
        f = found.path / rel
        if not f.is_file():
            return False, f"{rel} missing"
        if sha256_file(f) != entry.get("sha256"):
            return False, f"{rel}: sha256 does not match the manifest"
    return True, f"{len(manifest.get('files', {}))} file(s) match"


# --------------------------------------------------------------------------------------------
# downloads


class _Transient(Exception):
    """A failure worth retrying (network cut, timeout, 5xx)."""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


@contextlib.contextmanager
def _exclusive(fh) -> Iterator[None]:
    """Hold an advisory lock on an open file so that two downloads never share a .part."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        raise CryosamError(f"{fh.name} is being downloaded by another process; wait for it "
                           f"to finish") from exc
    try:
        yield
    finally:
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class _Part:
    """A ``.part`` file being downloaded, with the running sha256 of its content."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.digest = hashlib.sha256()

    @property
    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def reset(self) -> None:
        """Forget the content: delete the file and restart the hash."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.digest = hashlib.sha256()


def _fetch_once(url: str, part: _Part, total: int | None, timeout_s: float,
                description: str) -> None:
    """Append the rest of ``url`` to ``part`` (a Range request from its current size)."""
    start = part.size
    headers = {"User-Agent": f"cryosam/{__version__}"}
    if start:
        headers["Range"] = f"bytes={start}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start:  # our .part is not a prefix the server recognises
            part.reset()
            raise _Transient(f"server refused to resume (HTTP {exc.code})") from exc
        if exc.code >= 500 or exc.code == 429:
            raise _Transient(f"HTTP {exc.code} {exc.reason}") from exc
        raise CryosamError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise _Transient(_reason(exc)) from exc
    with response:
        if response.status == 206:
            m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != start:
                part.reset()
                raise _Transient("server resumed at the wrong offset")
            server_total = int(m.group(2)) if m.group(2) != "*" else None
        else:  # 200: the whole file again, from the start
            start = 0
            part.digest = hashlib.sha256()
            length = response.headers.get("Content-Length", "")
            server_total = int(length) if length.isdigit() else None
        if total is not None and server_total is not None and server_total != total:
            part.reset()
            raise CryosamError(
                f"{url} is {server_total} bytes on the server, expected {total}; refusing it "
                f"(wrong file or mirror: check {SAM_BASE_URL_ENV})"
            )
        total = total if total is not None else server_total
        received = start
        with part.path.open("ab") as fh, _exclusive(fh), \
                _byte_bar(description, total, start) as advance:
            fh.truncate(start)
            try:
                while chunk := response.read(_MIB):
                    fh.write(chunk)
                    part.digest.update(chunk)
                    received += len(chunk)
                    advance(len(chunk))
            except (OSError, http.client.HTTPException) as exc:
                raise _Transient(f"{_reason(exc)} after {received} bytes") from exc
        if total is not None and received < total:
            raise _Transient(f"connection closed after {received} of {total} bytes")


def download_file(url: str, dest: str | Path, *, sha256: str, size: int | None = None,
                  retries: int = 3, backoff_s: float = 2.0, timeout_s: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming, and check its sha256.

    An interrupted transfer is retried ``retries`` times (HTTP Range from the bytes already
    in ``.part``; the ``.part`` stays for a later run to resume). On a checksum or size
    mismatch the ``.part`` is deleted and nothing is left under ``dest``.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _Part(dest.with_name(dest.name + ".part"))
    if part.size and size is not None and part.size > size:
        part.reset()
    elif part.size:
        _hash_into(part.path, part.digest, description=f"checking {part.path.name}")
    attempt = 0
    while size is None or part.size != size:  # a complete .part from before: just verify
        try:
            _fetch_once(url, part, size, timeout_s, dest.name)
            break
        except _Transient as exc:
            attempt += 1
            if attempt <= retries:
                time.sleep(backoff_s * 2 ** (attempt - 1))
                continue
            if part.size:
                raise CryosamError(
                    f"download of {url} interrupted ({exc}); {part.size} bytes kept in "
                    f"{part.path}: run the same command again to resume"
                ) from exc
            raise CryosamError(
                f"cannot download {url} ({exc}); check the network or proxy, or set "
                f"{SAM_BASE_URL_ENV} to a mirror; without internet, download on another "
                f"machine and copy the file (see checkpoints/README.md)"
            ) from exc
    got, actual_size = part.digest.hexdigest(), part.size
    if got != sha256.lower() or (size is not None and actual_size != size):
        part.reset()
        raise CryosamError(
            f"checksum mismatch for {url}: sha256 {got}, expected {sha256} ({actual_size} "
            f"bytes); the download was deleted, nothing was installed; try again or check "
            f"{SAM_BASE_URL_ENV}"
        )
    os.replace(part.path, dest)
    _write_sidecar(dest, got)
    return dest


def sam_url(spec: WeightSpec, base_url: str | None = None) -> str:
    """Official URL of a SAM file, or under ``base_url`` / ``$CRYOSAM_SAM_BASE_URL``."""
    base = base_url or os.environ.get(SAM_BASE_URL_ENV) or SAM_BASE_URL
    return base.rstrip("/") + "/" + spec.filename


def download_sam(spec: WeightSpec, dest_dir: str | Path, *, base_url: str | None = None,
                 force: bool = False, retries: int = 3, backoff_s: float = 2.0,
                 timeout_s: float = 60.0) -> tuple[Path, str]:
    """Fetch one SAM checkpoint into ``dest_dir``; return (path, what happened)."""
    dest = Path(dest_dir) / spec.filename
    if dest.is_file() and not force:
        if dest.stat().st_size == spec.size_bytes and _sidecar_hash(dest) == spec.sha256:
            return dest, "already present, verified"
        if dest.stat().st_size == spec.size_bytes and sha256_file(dest) == spec.sha256:
            _write_sidecar(dest, spec.sha256)
            return dest, "already present, verified now"
    download_file(sam_url(spec, base_url), dest, sha256=spec.sha256, size=spec.size_bytes,
                  retries=retries, backoff_s=backoff_s, timeout_s=timeout_s)
    return dest, "downloaded, sha256 verified"


def _hub_expected(spec: WeightSpec, endpoint: str | None) -> dict[str, tuple[str, str]]:
    """File name -> ("sha256" | "sha1", hex) from the hub's metadata for the pinned revision."""
    from huggingface_hub import HfApi

    info = HfApi(endpoint=endpoint).model_info(spec.repo_id, revision=spec.revision,
                                               files_metadata=True)
    expected: dict[str, tuple[str, str]] = {}
    for sib in info.siblings or []:
        if sib.lfs is not None and sib.lfs.sha256:
            expected[sib.rfilename] = ("sha256", sib.lfs.sha256)
        elif sib.blob_id:
            expected[sib.rfilename] = ("sha1", sib.blob_id)
    return expected


def download_dinov2(spec: WeightSpec, dest_dir: str | Path, *, endpoint: str | None = None,
                    force: bool = False) -> tuple[Path, str]:
    """Fetch a DINOv2 snapshot at its pinned revision into ``dest_dir/<name>/``.

    It lands in ``.<name>.part/`` first (resumable); every file is checked against the hub's
    sha256 (LFS) or git blob id, a manifest is written, and the folder is renamed into place.
    """
    final = Path(dest_dir) / spec.name
    manifest = read_manifest(final) if _is_model_dir(final) else None
    if not force and manifest is not None and manifest.get("revision") == spec.revision:
        with contextlib.suppress(MissingWeightsError):
            _check_manifest_sizes(final, spec.name)
            return final, "already present (sizes match the manifest)"
    if hf_offline():
        raise CryosamError(
            f"HF_HUB_OFFLINE is set, so {spec.repo_id} cannot be downloaded here; run "
            f"`HF_HUB_OFFLINE=0 {spec.download_command}` on a machine with internet"
        )
    from huggingface_hub import snapshot_download

    part = Path(dest_dir) / f".{spec.name}.part"
    part.parent.mkdir(parents=True, exist_ok=True)
    try:
        if not progress.enabled():
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        snapshot_download(spec.repo_id, revision=spec.revision, local_dir=part,
                          allow_patterns=list(DINOV2_PATTERNS), endpoint=endpoint)
        expected = _hub_expected(spec, endpoint)
    except CryosamError:
        raise
    except Exception as exc:  # noqa: BLE001 - network/hub failures become one line
        raise CryosamError(
            f"cannot download {spec.repo_id}@{spec.revision[:12]} from the Hugging Face hub "
            f"({type(exc).__name__}: {_reason(exc)}); check the network or proxy (HF_ENDPOINT "
            f"for a mirror); partial files kept in {part} for the next attempt"
        ) from exc
    return install_snapshot(spec, part, final, expected)


def install_snapshot(spec: WeightSpec, part: Path, final: Path,
                     expected: dict[str, tuple[str, str]]) -> tuple[Path, str]:
    """Check a downloaded snapshot folder ``part`` file by file and move it to ``final``.

    ``expected`` maps each file to ``("sha256", hex)`` (LFS files) or ``("sha1", git blob
    id)``, as the hub reports them. Any mismatch, unexpected file or missing weights deletes
    ``part``; on success a manifest is written and ``part`` replaces ``final`` by renames.
    """
    files: dict[str, dict] = {}
    for f in sorted(p for p in part.rglob("*") if p.is_file() and ".cache" not in p.parts):
        rel = f.relative_to(part).as_posix()
        if rel == MANIFEST_NAME:
            continue
        sha = sha256_file(f)
        kind, want = expected.get(rel, ("", ""))
        got = sha if kind == "sha256" else _git_blob_sha1(f) if kind == "sha1" else ""
        if not kind or got != want:
            shutil.rmtree(part, ignore_errors=True)
            raise CryosamError(
                f"{spec.repo_id}: {rel} does not match the hub's checksum for revision "
                f"{(spec.revision or '?')[:12]}; the download was deleted, try again"
            )
        files[rel] = {"size": f.stat().st_size, "sha256": sha}
    if not _is_model_dir(part):
        shutil.rmtree(part, ignore_errors=True)
        raise CryosamError(f"{spec.repo_id}@{(spec.revision or '?')[:12]} has no config.json "
                           f"and model weights; nothing was installed")
    manifest = {"name": spec.name, "repo_id": spec.repo_id, "revision": spec.revision,
                "files": files}
    atomic_write_text(part / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(part / ".cache", ignore_errors=True)
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(part, final)
    shutil.rmtree(old, ignore_errors=True)
    return final, f"downloaded {len(files)} file(s) at {(spec.revision or '?')[:12]}, " \
        "checksums verified"


def download(spec: WeightSpec, dest_dir: str | Path, *, base_url: str | None = None,
             endpoint: str | None = None, force: bool = False, retries: int = 3,
             backoff_s: float = 2.0, timeout_s: float = 60.0) -> tuple[Path, str]:
    """Download one model into ``dest_dir`` (SAM over HTTP, DINOv2 from the hub)."""
    if spec.kind == "sam":
        return download_sam(spec, dest_dir, base_url=base_url, force=force, retries=retries,
                            backoff_s=backoff_s, timeout_s=timeout_s)
    return download_dinov2(spec, dest_dir, endpoint=endpoint, force=force)


def human_size(n: int) -> str:
    """Bytes as a short string (358 MiB, 2.4 GiB)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit in ("B", "KiB", "MiB") else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover
