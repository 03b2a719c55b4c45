"""Fetching weights: SAM files through pooch (sha256, resume), DINOv2 through huggingface_hub.

SAM: :func:`pooch.retrieve` downloads, checks the file against its known sha256 and moves it
into place, or deletes it on a mismatch. The one thing pooch does not do is resume a cut
download, so pooch is handed :class:`ResumingDownloader`: it keeps what arrived in
``<file>.part`` across attempts and runs, continues it with an HTTP Range request, and gives
pooch the complete file to check. DINOv2: ``snapshot_download`` at the pinned revision into
``.<name>.part/`` (huggingface_hub resumes its own files), then every file is checked against
the hub's checksums and the folder is renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import IO

from cryosam import progress
from cryosam._atomic import atomic_write_text
from cryosam.errors import CryosamError, MissingWeightsError
from cryosam.utils import hash_file
from cryosam.weights.locate import check_manifest_sizes, hf_offline, is_model_dir, read_manifest
from cryosam.weights.specs import (
    DINOV2_PATTERNS,
    MANIFEST_NAME,
    SAM_BASE_URL,
    SAM_BASE_URL_ENV,
    WeightSpec,
)
from cryosam.weights.verify import byte_bar, sha256_with_bar, sidecar_hash, write_sidecar

_CHUNK = 1 << 16  # small reads: a cut connection loses at most this much of what arrived


class _Transient(Exception):
    """A failure worth retrying (network cut, timeout, 5xx)."""


def _reason(exc: BaseException) -> str:
    """The innermost cause of a network error, as one short line."""
    for _ in range(8):  # requests wraps urllib3, which wraps the socket error
        inner = getattr(exc, "reason", None)  # urllib3's MaxRetryError
        if not isinstance(inner, BaseException):
            inner = exc.__cause__ or (exc.args[0] if exc.args else None)
        if not isinstance(inner, BaseException) or inner is exc:
            break
        exc = inner
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _user_agent() -> str:
    try:
        return f"cryosam/{metadata.version('cryosam')}"
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare source tree
        return "cryosam"


@contextlib.contextmanager
def _exclusive(fh: IO[bytes]) -> Iterator[None]:
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


class ResumingDownloader:
    """A pooch downloader that continues a kept ``.part`` file instead of starting over.

    pooch calls it as ``downloader(url, output_file, pooch)``. Bytes go to ``part``, which
    outlives a failed call; a cut connection is retried ``retries`` times with a Range request
    from the bytes already there. Once ``part`` has ``size`` bytes it is moved onto pooch's
    ``output_file`` for pooch to check. ``offline_hint`` ends the error when nothing arrived.
    """

    def __init__(self, part: Path, size: int | None, *, retries: int = 3,
                 backoff_s: float = 2.0, timeout_s: float = 60.0,
                 offline_hint: str = "") -> None:
        self.part = part
        self.size = size
        self.retries = retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.offline_hint = offline_hint

    def _have(self) -> int:
        return self.part.stat().st_size if self.part.exists() else 0

    def _reset(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.part.unlink()

    def __call__(self, url: str, output_file: str, pooch_obj: object = None) -> None:
        """Bring ``part`` to its full size (resuming, retrying), then hand it to pooch."""
        if self.size is not None and self._have() > self.size:
            self._reset()
        attempt = 0
        while self.size is None or self._have() != self.size:  # complete from before: skip
            try:
                self._fetch(url)
                break
            except _Transient as exc:
                attempt += 1
                if attempt <= self.retries:
                    time.sleep(self.backoff_s * 2 ** (attempt - 1))
                    continue
                if self._have():
                    raise CryosamError(
                        f"download of {url} interrupted ({exc}); {self._have()} bytes kept in "
                        f"{self.part}: run the same command again to resume"
                    ) from exc
                hint = f"; {self.offline_hint}" if self.offline_hint else ""
                raise CryosamError(
                    f"cannot download {url} ({exc}); check the network or proxy, or set "
                    f"{SAM_BASE_URL_ENV} to a mirror{hint}"
                ) from exc
        os.replace(self.part, output_file)

    def _fetch(self, url: str) -> None:
        """Append the rest of ``url`` to ``part`` (a Range request from its current size)."""
        import requests  # pooch's own HTTP library, imported with it

        start = self._have()
        headers = {"User-Agent": _user_agent(), "Accept-Encoding": "identity"}
        if start:
            headers["Range"] = f"bytes={start}-"
        try:
            response = requests.get(url, headers=headers, stream=True, timeout=self.timeout_s)
        except OSError as exc:  # requests' errors are OSErrors
            raise _Transient(_reason(exc)) from exc
        with response:
            code = response.status_code
            if code == 416 and start:  # our .part is not a prefix the server recognises
                self._reset()
                raise _Transient(f"server refused to resume (HTTP {code})")
            if code >= 500 or code == 429:
                raise _Transient(f"HTTP {code} {response.reason}")
            if code not in (200, 206):
                raise CryosamError(f"cannot download {url}: HTTP {code} {response.reason}")
            if code == 206:
                m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
                if not m or int(m.group(1)) != start:
                    self._reset()
                    raise _Transient("server resumed at the wrong offset")
                server_total = int(m.group(2)) if m.group(2) != "*" else None
            else:  # 200: the whole file again, from the start
                start = 0
                length = response.headers.get("Content-Length", "")
                server_total = int(length) if length.isdigit() else None
            if None not in (self.size, server_total) and server_total != self.size:
                self._reset()
                raise CryosamError(
                    f"{url} is {server_total} bytes on the server, expected {self.size}; "
                    f"refusing it (wrong file or mirror: check {SAM_BASE_URL_ENV})"
                )
            total = self.size if self.size is not None else server_total
            received = start
            with self.part.open("ab") as fh, _exclusive(fh), \
                    byte_bar(self.part.name.removesuffix(".part"), total, start) as advance:
                fh.truncate(start)
                try:
                    for chunk in response.iter_content(_CHUNK):
                        fh.write(chunk)
                        received += len(chunk)
                        advance(len(chunk))
                except OSError as exc:
                    raise _Transient(f"{_reason(exc)} after {received} bytes") from exc
        if total is not None and received < total:
            raise _Transient(f"connection closed after {received} of {total} bytes")


def download_file(url: str, dest: str | Path, *, sha256: str, size: int | None = None,
                  retries: int = 3, backoff_s: float = 2.0, timeout_s: float = 60.0,
                  command: str | None = None) -> Path:
    """Download ``url`` to ``dest`` with pooch, resuming through ``dest.part``; check sha256.

    A cut transfer is retried ``retries`` times; the ``.part`` stays for a later run to
    resume. On a checksum or size mismatch nothing is left under ``dest``. ``command`` is
    what to run on a machine with internet, named in the error when nothing can be fetched.
    An existing ``dest`` is only replaced by a download that checks out.
    """
    try:
        import pooch
    except ImportError as exc:
        raise CryosamError(
            f"downloading {url} needs pooch (`pip install 'pooch>=1.8'`); or fetch the file "
            f"by hand and check it with `cryosam weights verify` (see checkpoints/README.md)"
        ) from exc
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    how = f"run `{command}` on a machine with internet" if command else \
        "download it on a machine with internet"
    downloader = ResumingDownloader(
        dest.with_name(dest.name + ".part"), size, retries=retries, backoff_s=backoff_s,
        timeout_s=timeout_s, offline_hint=f"without internet, {how} and copy it to {dest} "
        f"(see checkpoints/README.md)")
    # pooch would accept an existing file whose hash matches; a fresh name forces a download
    fname = f".{dest.name}.new" if dest.exists() else dest.name
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel("WARNING")  # pooch logs every download to stderr at INFO
    try:
        pooch.retrieve(url, known_hash=f"sha256:{sha256}", fname=fname, path=dest.parent,
                       downloader=downloader, progressbar=False)
    except ValueError as exc:  # pooch's known_hash check; it has deleted the file
        got = re.search(r"got ([0-9a-fA-F]{64})", str(exc))
        raise CryosamError(
            f"checksum mismatch for {url}: sha256 {got.group(1) if got else '(other)'}, "
            f"expected {sha256}; the download was deleted, nothing was installed; try again "
            f"or check {SAM_BASE_URL_ENV}"
        ) from exc
    finally:
        logger.setLevel(level)
    if fname != dest.name:
        os.replace(dest.parent / fname, dest)
    write_sidecar(dest, sha256.lower())
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
    if dest.is_file() and not force and dest.stat().st_size == spec.size_bytes:
        if sidecar_hash(dest) == spec.sha256:
            return dest, "already present, verified"
        if sha256_with_bar(dest) == spec.sha256:
            write_sidecar(dest, spec.sha256)
            return dest, "already present, verified now"
    download_file(sam_url(spec, base_url), dest, sha256=spec.sha256, size=spec.size_bytes,
                  retries=retries, backoff_s=backoff_s, timeout_s=timeout_s,
                  command=spec.download_command)
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
    manifest = read_manifest(final) if is_model_dir(final) else None
    if not force and manifest is not None and manifest.get("revision") == spec.revision:
        with contextlib.suppress(MissingWeightsError):
            check_manifest_sizes(final, spec.name)
            return final, "already present (sizes match the manifest)"
    if hf_offline():
        raise CryosamError(
            f"HF_HUB_OFFLINE is set, so {spec.repo_id} cannot be downloaded here; run "
            f"`HF_HUB_OFFLINE=0 {spec.download_command}` on a machine with internet"
        )
    from huggingface_hub import snapshot_download

    _check_reachable(endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co",
                     spec)
    part = Path(dest_dir) / f".{spec.name}.part"
    existed = part.exists()
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
        kept = part.is_dir() and any(p.is_file() for p in part.rglob("*"))
        if not kept and not existed:
            shutil.rmtree(part, ignore_errors=True)  # nothing came: leave no empty folder
        raise CryosamError(
            f"cannot download {spec.repo_id}@{(spec.revision or '?')[:12]} from the Hugging "
            f"Face hub ({type(exc).__name__}: {_reason(exc)}); check the network or proxy "
            "(HF_ENDPOINT for a mirror)"
            + (f"; partial files kept in {part} for the next attempt" if kept else "")
            + f"; without internet, run `{spec.download_command}` on a machine with internet "
            f"and copy checkpoints/{spec.name}/ into {dest_dir} here"
        ) from exc
    return install_snapshot(spec, part, final, expected)


def _check_reachable(endpoint: str, spec: WeightSpec) -> None:
    """Fail at once, in one line, when the hub's host name does not resolve and no proxy is
    set (a machine without internet), instead of after the hub client's own retries."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY",
                                         "all_proxy")):
        return  # the proxy resolves names
    host = urlparse(endpoint).hostname
    if not host:
        return
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        raise CryosamError(
            f"cannot reach {host} (its name does not resolve: no internet here?), so "
            f"{spec.repo_id} cannot be downloaded; run `{spec.download_command}` on a machine "
            f"with internet and copy checkpoints/{spec.name}/ here (or set HF_ENDPOINT to a "
            "mirror, HTTPS_PROXY to a proxy)") from None


def _file_digests(path: Path, kind: str, label: str) -> tuple[str, str]:
    """(sha256, the hub's checksum of ``kind``) of one file, in a single read."""
    sha = hashlib.sha256()
    digests = [sha]
    if kind == "sha1":  # a git blob id: sha1 of a "blob <size>" header and the content
        digests.append(hashlib.sha1(f"blob {path.stat().st_size}\0".encode()))
    with byte_bar(f"checking {label}", path.stat().st_size) as advance:
        hash_file(path, *digests, advance=advance)
    return sha.hexdigest(), digests[-1].hexdigest() if kind else ""


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
        kind, want = expected.get(rel, ("", ""))
        sha, got = _file_digests(f, kind, rel)
        if not kind or got != want:
            shutil.rmtree(part, ignore_errors=True)
            raise CryosamError(
                f"{spec.repo_id}: {rel} does not match the hub's checksum for revision "
                f"{(spec.revision or '?')[:12]}; the download was deleted, try again"
            )
        files[rel] = {"size": f.stat().st_size, "sha256": sha}
    if not is_model_dir(part):
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
    """Download one model into ``dest_dir`` (SAM over HTTP via pooch, DINOv2 from the hub)."""
    if spec.kind == "sam":
        return download_sam(spec, dest_dir, base_url=base_url, force=force, retries=retries,
                            backoff_s=backoff_s, timeout_s=timeout_s)
    return download_dinov2(spec, dest_dir, endpoint=endpoint, force=force)
