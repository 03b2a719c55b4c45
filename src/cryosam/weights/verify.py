"""Checking weights that are present: records of past checks, re-hashing, content ids.

A SAM file that checked out gets a ``<file>.sha256`` sidecar (``sha256sum -c`` format); a
DINOv2 folder made by cryosam carries a manifest with every file's size and sha256. ``status``
reads those records (cheap); ``verify_found`` re-hashes against them (reads everything).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryosam import progress
from cryosam._atomic import atomic_write_text
from cryosam.errors import CryosamError, MissingWeightsError
from cryosam.utils import Digest, sha256_file
from cryosam.weights.locate import Found, check_manifest_sizes, find, read_manifest
from cryosam.weights.specs import MANIFEST_NAME, WeightSpec

_MIB = 1 << 20
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@contextlib.contextmanager
def byte_bar(description: str, total: int | None, completed: int = 0
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


def sha256_with_bar(path: Path) -> str:
    """:func:`cryosam.utils.sha256_file`, with a progress bar on a terminal (big files)."""
    with byte_bar(f"hashing {path.name}", path.stat().st_size) as advance:
        return sha256_file(path, advance=advance)


# --------------------------------------------------------------------------------------------
# content ids


def _quick_digest(digest: Digest, path: Path) -> None:
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


# --------------------------------------------------------------------------------------------
# verification records


def sidecar_path(path: Path) -> Path:
    """``<file>.sha256`` (``sha256sum -c`` format) written once a SAM file is verified."""
    return path.with_name(path.name + ".sha256")


def write_sidecar(path: Path, sha256: str) -> None:
    """Record that ``path`` was checked and has this sha256."""
    atomic_write_text(sidecar_path(path), f"{sha256}  {path.name}\n")


def sidecar_hash(path: Path) -> str | None:
    """The sha256 recorded beside ``path``, or None when there is no (valid) record."""
    try:
        text = sidecar_path(path).read_text(encoding="utf-8").split()
    except OSError:
        return None
    return text[0].lower() if text and _HEX64.match(text[0].lower()) else None


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
        if sidecar_hash(found.path) == spec.sha256:
            return Status(spec, "verified", found)
        return Status(spec, "present", found, "not verified yet: cryosam weights verify")
    if found.source == "hf-cache":
        return Status(spec, "present", found, "in the Hugging Face cache")
    manifest = read_manifest(found.path)
    if manifest is None:
        return Status(spec, "present", found, "no manifest: not downloaded by cryosam")
    try:
        check_manifest_sizes(found.path, spec.name)
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
        got = sha256_with_bar(found.path)
        if got == spec.sha256:
            write_sidecar(found.path, got)
            return True, "sha256 matches"
        with contextlib.suppress(FileNotFoundError):
            sidecar_path(found.path).unlink()
        return False, f"sha256 {got[:12]}..., expected {(spec.sha256 or '?')[:12]}..."
    if found.source == "hf-cache":
        # LFS blobs in the HF cache are named by their sha256
        checked = 0
        for f in sorted(found.path.iterdir()):
            blob = f.resolve()
            if _HEX64.match(blob.name):
                if sha256_with_bar(blob) != blob.name:
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
        if sha256_with_bar(f) != entry.get("sha256"):
            return False, f"{rel}: sha256 does not match the manifest"
    return True, f"{len(manifest.get('files', {}))} file(s) match"
