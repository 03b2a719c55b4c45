"""Weights: lookup order, real downloads from a local HTTP server (resume, checksums), CLI."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from cryosam import weights as w
from cryosam.errors import CryosamError, MissingWeightsError
from cryosam.utils import sha256_file
from cryosam.weights import locate

# --------------------------------------------------------------------------------------------
# a small HTTP file server on 127.0.0.1 (Range support, optional cut connections)


class _Server:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.cut_next: dict[str, int] = {}  # file -> number of responses to cut half way
        self.ranges = True  # honour Range requests
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                rng = self.headers.get("Range")
                owner.requests.append((self.path, rng))
                data = owner.files.get(self.path.lstrip("/"))
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if rng and owner.ranges:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                name = self.path.lstrip("/")
                if owner.cut_next.get(name, 0) > 0:
                    owner.cut_next[name] -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server(monkeypatch: pytest.MonkeyPatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    srv = _Server()
    yield srv
    srv.close()


def _payload(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No CRYOSAM_CHECKPOINTS, an empty working directory, a private HF cache and repo folder."""
    monkeypatch.delenv(w.CHECKPOINTS_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hfcache"))
    monkeypatch.setattr(locate, "_repo_checkpoints", lambda: tmp_path / "repo" / "checkpoints")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return tmp_path


# --------------------------------------------------------------------------------------------
# downloads


def test_download_success_verifies_and_installs(server: _Server, tmp_path: Path) -> None:
    data = _payload(3 * 2**20 + 123)
    server.files["m.pth"] = data
    dest = tmp_path / "ckpt" / "m.pth"
    out = w.download_file(f"{server.url}/m.pth", dest, sha256=_sha(data), size=len(data))
    assert out == dest and dest.read_bytes() == data
    assert not (tmp_path / "ckpt" / "m.pth.part").exists()
    assert w.sidecar_path(dest).read_text().split() == [_sha(data), "m.pth"]
    assert server.requests == [("/m.pth", None)]


def test_checksum_mismatch_leaves_nothing(server: _Server, tmp_path: Path) -> None:
    data = _payload(100_000)
    server.files["m.pth"] = data
    folder = tmp_path / "ckpt"
    with pytest.raises(CryosamError, match="checksum mismatch") as info:
        w.download_file(f"{server.url}/m.pth", folder / "m.pth", sha256=_sha(b"other"),
                        size=len(data))
    assert "\n" not in str(info.value)
    assert list(folder.iterdir()) == []


def test_wrong_size_on_server_is_refused(server: _Server, tmp_path: Path) -> None:
    data = _payload(50_000)
    server.files["m.pth"] = data
    with pytest.raises(CryosamError, match="expected 49999"):
        w.download_file(f"{server.url}/m.pth", tmp_path / "m.pth", sha256=_sha(data),
                        size=len(data) - 1)
    assert list(tmp_path.iterdir()) == []


def test_resume_after_cut_connection_within_one_call(server: _Server, tmp_path: Path) -> None:
    data = _payload(3 * 2**20 + 7, seed=1)
    server.files["m.pth"] = data
    server.cut_next["m.pth"] = 1
    dest = w.download_file(f"{server.url}/m.pth", tmp_path / "m.pth", sha256=_sha(data),
                           size=len(data), retries=2, backoff_s=0)
    assert dest.read_bytes() == data
    assert len(server.requests) == 2
    assert server.requests[0][1] is None
    resumed_at = int(server.requests[1][1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at < len(data)


def test_resume_in_a_later_run_keeps_part_file(server: _Server, tmp_path: Path) -> None:
    data = _payload(2 * 2**20 + 11, seed=2)
    server.files["m.pth"] = data
    server.cut_next["m.pth"] = 1
    url, dest = f"{server.url}/m.pth", tmp_path / "m.pth"
    with pytest.raises(CryosamError, match="run the same command again to resume"):
        w.download_file(url, dest, sha256=_sha(data), size=len(data), retries=0)
    part = tmp_path / "m.pth.part"
    assert not dest.exists() and 0 < part.stat().st_size < len(data)
    kept = part.stat().st_size
    w.download_file(url, dest, sha256=_sha(data), size=len(data), retries=0)
    assert dest.read_bytes() == data and not part.exists()
    assert server.requests[-1][1] == f"bytes={kept}-"


def test_stale_part_with_wrong_bytes_cannot_slip_through(server: _Server, tmp_path: Path) -> None:
    data = _payload(300_000, seed=3)
    server.files["m.pth"] = data
    (tmp_path / "m.pth.part").write_bytes(b"\0" * 1000)  # not a prefix of the real file
    url, dest = f"{server.url}/m.pth", tmp_path / "m.pth"
    with pytest.raises(CryosamError, match="checksum mismatch"):
        w.download_file(url, dest, sha256=_sha(data), size=len(data))
    assert list(tmp_path.iterdir()) == []
    w.download_file(url, dest, sha256=_sha(data), size=len(data))
    assert dest.read_bytes() == data


def test_server_without_range_support_restarts_cleanly(server: _Server, tmp_path: Path) -> None:
    data = _payload(200_000, seed=4)
    server.files["m.pth"] = data
    server.ranges = False
    (tmp_path / "m.pth.part").write_bytes(b"junk" * 100)
    dest = w.download_file(f"{server.url}/m.pth", tmp_path / "m.pth", sha256=_sha(data),
                           size=len(data))
    assert dest.read_bytes() == data
    assert server.requests[0][1] == "bytes=400-"  # asked to resume, got the whole file


def test_unreachable_server_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    url = f"http://127.0.0.1:{_closed_port()}/m.pth"
    with pytest.raises(CryosamError, match="cannot download") as info:
        w.download_file(url, tmp_path / "m.pth", sha256="0" * 64, retries=1, backoff_s=0)
    assert "\n" not in str(info.value) and w.SAM_BASE_URL_ENV in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_http_404_fails_without_retrying(server: _Server, tmp_path: Path) -> None:
    with pytest.raises(CryosamError, match="HTTP 404"):
        w.download_file(f"{server.url}/nope.pth", tmp_path / "n.pth", sha256="0" * 64,
                        retries=3, backoff_s=0)
    assert len(server.requests) == 1
    assert list(tmp_path.iterdir()) == []


def test_downloads_go_through_pooch(server: _Server, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import pooch

    data = _payload(120_000, seed=10)
    server.files["m.pth"] = data
    calls: list[dict] = []
    real = pooch.retrieve

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(pooch, "retrieve", spy)
    w.download_file(f"{server.url}/m.pth", tmp_path / "m.pth", sha256=_sha(data), size=len(data))
    assert len(calls) == 1 and calls[0]["known_hash"] == f"sha256:{_sha(data)}"
    assert isinstance(calls[0]["downloader"], w.ResumingDownloader)
    # the resuming downloader is an ordinary pooch downloader: pooch's own hash check applies
    folder = tmp_path / "plain"
    downloader = w.ResumingDownloader(folder / "m.pth.part", len(data), retries=0)
    with pytest.raises(ValueError, match="does not match the known hash"):
        real(f"{server.url}/m.pth", known_hash=f"sha256:{_sha(b'other')}", fname="m.pth",
             path=folder, downloader=downloader)
    assert list(folder.iterdir()) == []
    got = real(f"{server.url}/m.pth", known_hash=f"sha256:{_sha(data)}", fname="m.pth",
               path=folder, downloader=downloader)
    assert Path(got).read_bytes() == data and sorted(folder.iterdir()) == [folder / "m.pth"]


def test_existing_file_replaced_only_by_a_good_download(server: _Server, tmp_path: Path) -> None:
    data = _payload(80_000, seed=11)
    server.files["m.pth"] = data
    dest = tmp_path / "m.pth"
    dest.write_bytes(data)  # pooch would keep a matching file; --force still downloads
    w.download_file(f"{server.url}/m.pth", dest, sha256=_sha(data), size=len(data))
    assert len(server.requests) == 1 and dest.read_bytes() == data
    server.files["m.pth"] = data[::-1]
    with pytest.raises(CryosamError, match="checksum mismatch"):
        w.download_file(f"{server.url}/m.pth", dest, sha256=_sha(data), size=len(data))
    assert dest.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pth", "m.pth.sha256"]


def test_pooch_is_imported_only_to_download(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    code = "import sys, cryosam.weights; assert 'pooch' not in sys.modules, 'pooch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    monkeypatch.setitem(sys.modules, "pooch", None)  # as if it were not installed
    with pytest.raises(CryosamError, match="needs pooch") as info:
        w.download_file("http://127.0.0.1:9/m.pth", tmp_path / "m.pth", sha256="0" * 64)
    assert "\n" not in str(info.value) and list(tmp_path.iterdir()) == []


def test_weights_modules_import_in_one_direction() -> None:
    """specs <- locate <- verify <- download; nothing from the pipeline's heavy modules."""
    order = ["specs", "locate", "verify", "download"]
    allowed = {"cryosam.errors", "cryosam.utils", "cryosam.progress", "cryosam._atomic"}
    folder = Path(w.__file__).parent
    assert sorted(p.stem for p in folder.glob("*.py")) == sorted(["__init__", *order])
    for i, name in enumerate(order):
        targets: list[str] = []
        for node in ast.walk(ast.parse((folder / f"{name}.py").read_text())):  # any depth
            if isinstance(node, ast.Import):
                targets += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = "cryosam.weights." * bool(node.level) + (node.module or "")
                targets += [f"{base}.{a.name}" for a in node.names] if base == "cryosam" \
                    else [base]
        for mod in (t for t in targets if t.split(".")[0] == "cryosam"):
            if mod.startswith("cryosam.weights"):
                assert mod.split(".")[2:3] and mod.split(".")[2] in order[:i], \
                    f"{name} imports {mod}"
            else:
                assert mod in allowed, f"{name} imports {mod}"


# --------------------------------------------------------------------------------------------
# hashing


def test_sha256_and_weights_id(tmp_path: Path) -> None:
    data = _payload(3 * 2**20 + 5, seed=5)
    a = tmp_path / "a.pth"
    a.write_bytes(data)
    assert sha256_file(a) == _sha(data)
    b = tmp_path / "sub" / "b.pth"
    b.parent.mkdir()
    b.write_bytes(data)
    assert w.weights_id(a) == w.weights_id(b)  # content, not path
    assert len(w.weights_id(a)) == 16
    b.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert w.weights_id(a) != w.weights_id(b)
    b.write_bytes(data + b"x")
    assert w.weights_id(a) != w.weights_id(b)
    folder = _fake_dinov2(tmp_path / "d")
    fid = w.weights_id(folder)
    (folder / "model.safetensors").write_bytes(b"other")
    assert w.weights_id(folder) != fid
    with pytest.raises(CryosamError):
        w.weights_id(tmp_path / "missing")


# --------------------------------------------------------------------------------------------
# lookup


def _sparse(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        fh.truncate(size)
    return path


def _fake_dinov2(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "dinov2"}')
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


def test_sam_lookup_order(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = w.get_spec("vit_b")
    cwd_file = _sparse(isolated / "work" / "checkpoints" / spec.filename, spec.size_bytes)
    assert w.locate_sam("vit_b") == cwd_file
    repo_file = _sparse(isolated / "repo" / "checkpoints" / spec.filename, spec.size_bytes)
    assert w.locate_sam("vit_b").resolve() == repo_file.resolve()
    env_file = _sparse(isolated / "env" / spec.filename, spec.size_bytes)
    monkeypatch.setenv(w.CHECKPOINTS_ENV, os.pathsep.join([str(isolated / "none"),
                                                           str(isolated / "env")]))
    assert w.locate_sam("vit_b") == env_file
    assert w.locate_sam("sam_vit_b") == env_file
    explicit = isolated / "elsewhere" / "finetuned.pth"
    explicit.parent.mkdir()
    explicit.write_bytes(b"custom")
    assert w.locate_sam("vit_b", path=explicit) == explicit
    assert w.locate_sam(str(explicit)) == explicit
    with pytest.raises(MissingWeightsError, match="does not exist"):
        w.locate_sam("vit_b", path=isolated / "nope.pth")


def test_sam_missing_message_and_incomplete_copy(isolated: Path) -> None:
    with pytest.raises(MissingWeightsError) as info:
        w.locate_sam()
    msg = str(info.value)
    assert msg == w.missing_message("sam_vit_h")
    assert "\n" not in msg
    assert "`cryosam weights download sam_vit_h --dir checkpoints/`" in msg
    assert "sam_vit_h_4b8939.pth" in msg and str(isolated / "repo" / "checkpoints") in msg
    spec = w.get_spec("vit_l")
    _sparse(isolated / "work" / "checkpoints" / spec.filename, spec.size_bytes - 10)
    with pytest.raises(MissingWeightsError, match="incomplete copy"):
        w.locate_sam("vit_l")
    with pytest.raises(CryosamError, match="unknown model"):
        w.locate_sam("vit_q")


def test_dinov2_lookup_order(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = w.get_spec("facebook/dinov2-with-registers-large")
    with pytest.raises(MissingWeightsError) as info:
        w.locate_dinov2()
    assert str(info.value) == w.missing_message(spec)
    assert "Hugging Face cache" in str(info.value)
    # the HF cache, at the pinned revision (no refs/main needed)
    snap = isolated / "hfcache" / "models--facebook--dinov2-with-registers-large" / \
        "snapshots" / spec.revision
    _fake_dinov2(snap)
    assert Path(w.locate_dinov2()) == snap
    # checkpoints/ beats the cache, $CRYOSAM_CHECKPOINTS beats checkpoints/
    local = _fake_dinov2(isolated / "work" / "checkpoints" / spec.name)
    assert Path(w.locate_dinov2()).resolve() == local.resolve()
    env = _fake_dinov2(isolated / "env" / spec.name)
    monkeypatch.setenv(w.CHECKPOINTS_ENV, str(isolated / "env"))
    assert Path(w.locate_dinov2("dinov2-with-registers-large")) == env
    # explicit folder, either way
    other = _fake_dinov2(isolated / "mine")
    assert w.locate_dinov2(path=other) == str(other)
    assert w.locate_dinov2(str(other)) == str(other)
    with pytest.raises(MissingWeightsError, match="not a DINOv2 model folder"):
        w.locate_dinov2(path=isolated / "work")


def test_dinov2_cache_main_ref_and_unknown_hub_id(isolated: Path) -> None:
    repo = isolated / "hfcache" / "models--someone--my-dino"
    _fake_dinov2(repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    assert Path(w.locate_dinov2("someone/my-dino")) == repo / "snapshots" / ("a" * 40)
    with pytest.raises(MissingWeightsError, match="hf download someone/other"):
        w.locate_dinov2("someone/other")


def test_dinov2_manifest_size_check(isolated: Path) -> None:
    folder = _fake_dinov2(isolated / "work" / "checkpoints" / "dinov2-small")
    files = {f: {"size": (folder / f).stat().st_size, "sha256": sha256_file(folder / f)}
             for f in ("config.json", "model.safetensors")}
    (folder / w.MANIFEST_NAME).write_text(json.dumps(
        {"repo_id": "facebook/dinov2-small", "revision": w.get_spec("dinov2-small").revision,
         "files": files}))
    assert w.locate_dinov2("facebook/dinov2-small") == str(folder)
    assert w.status(w.get_spec("dinov2-small")).state == "verified"
    (folder / "model.safetensors").write_bytes(b"trunc")
    with pytest.raises(MissingWeightsError, match="wrong size"):
        w.locate_dinov2("facebook/dinov2-small")
    assert w.status(w.get_spec("dinov2-small")).state == "bad"


def test_located_folder_loads_with_transformers(isolated: Path) -> None:
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    config = Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=64,
                                       image_size=28, patch_size=14)
    folder = isolated / "work" / "checkpoints" / "dinov2-with-registers-large"
    Dinov2WithRegistersModel(config).save_pretrained(folder)
    model = Dinov2WithRegistersModel.from_pretrained(w.locate_dinov2())
    assert model.config.hidden_size == 32


# --------------------------------------------------------------------------------------------
# CLI


def _small_sam(monkeypatch: pytest.MonkeyPatch, server: _Server, data: bytes) -> w.WeightSpec:
    """Point the registry's sam_vit_b at a small file served locally (same code path)."""
    spec = dataclasses.replace(w.REGISTRY["sam_vit_b"], size_bytes=len(data), sha256=_sha(data))
    monkeypatch.setitem(w.REGISTRY, "sam_vit_b", spec)
    server.files[spec.filename] = data
    monkeypatch.setenv(w.SAM_BASE_URL_ENV, server.url)
    return spec


def test_cli_list_names_missing_models(isolated: Path, run_cli) -> None:
    code, out, err = run_cli("weights", "list")
    assert code == 0, err
    for name in w.REGISTRY:
        assert name in out
    assert "missing" in out
    assert "cryosam weights download sam_vit_h --dir checkpoints/" in out
    assert "cryosam weights download dinov2-with-registers-giant --dir checkpoints/" in out
    assert w.missing_message("sam_vit_h") in out  # the same line the segment command shows


def test_cli_download_list_verify(isolated: Path, server: _Server, run_cli,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    data = _payload(1_500_000, seed=6)
    spec = _small_sam(monkeypatch, server, data)
    dest_dir = isolated / "work" / "checkpoints"
    code, out, err = run_cli("weights", "download", "vit_b", "--dir", dest_dir)
    assert code == 0, err
    assert (dest_dir / spec.filename).read_bytes() == data
    assert "sha256 verified" in out
    code, out, _ = run_cli("weights", "download", "sam_vit_b", "--dir", dest_dir)
    assert code == 0 and "already present" in out and len(server.requests) == 1
    code, out, _ = run_cli("weights", "list")
    line = next(x for x in out.splitlines() if x.startswith("sam_vit_b"))
    assert "verified" in line and str(dest_dir) in line
    code, out, _ = run_cli("weights", "verify")
    assert code == 0 and "OK   sam_vit_b" in out
    # corrupt it: verify says BAD and exits 2 with one line naming the fix
    raw = bytearray(data)
    raw[1000] ^= 0xFF
    (dest_dir / spec.filename).write_bytes(bytes(raw))
    code, out, err = run_cli("weights", "verify", "--dir", dest_dir)
    assert code == 2 and "BAD" in out
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "cryosam weights download sam_vit_b --dir checkpoints/" in err
    assert not w.sidecar_path(dest_dir / spec.filename).exists()


def test_cli_errors_are_one_line_exit_2(isolated: Path, run_cli, server: _Server,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run_cli("weights", "download", "sam_vit_q")
    assert code == 2 and err.startswith("error: unknown model") and err.count("\n") == 1
    monkeypatch.setenv(w.SAM_BASE_URL_ENV, f"http://127.0.0.1:{_closed_port()}")
    code, _, err = run_cli("weights", "download", "sam_vit_b", "--retries", "0",
                           "--dir", isolated / "dl")
    assert code == 2 and "cannot download" in err and err.count("\n") == 1
    assert not any((isolated / "dl").glob("*.pth"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli("weights", "download", "dinov2-small", "--dir", isolated / "dl")
    assert code == 2 and "HF_HUB_OFFLINE" in err and err.count("\n") == 1
    # a bad checksum through the CLI: nothing installed
    data = _payload(10_000, seed=7)
    spec = _small_sam(monkeypatch, server, data)
    server.files[spec.filename] = data[::-1]
    code, _, err = run_cli("weights", "download", "sam_vit_b", "--dir", isolated / "dl")
    assert code == 2 and ("checksum mismatch" in err) and err.count("\n") == 1
    assert not any((isolated / "dl").glob("sam_vit_b*"))


# --------------------------------------------------------------------------------------------
# DINOv2 snapshots: checking what the hub sent, installing it, verifying it later


def _git_blob(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _snapshot_part(folder: Path) -> dict[str, tuple[str, str]]:
    """A downloaded-but-unchecked snapshot, and the checksums the hub reports for it."""
    files = {"config.json": b'{"model_type": "dinov2"}', "preprocessor_config.json": b"{}",
             "model.safetensors": _payload(70_000, seed=8)}
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    (folder / ".cache" / "huggingface").mkdir(parents=True)
    (folder / ".cache" / "huggingface" / "junk.lock").write_text("")
    return {"config.json": ("sha1", _git_blob(files["config.json"])),
            "preprocessor_config.json": ("sha1", _git_blob(files["preprocessor_config.json"])),
            "model.safetensors": ("sha256", _sha(files["model.safetensors"]))}


def test_install_snapshot_checks_and_renames(isolated: Path) -> None:
    spec = w.get_spec("dinov2-with-registers-small")
    dest = isolated / "work" / "checkpoints"
    part, final = dest / f".{spec.name}.part", dest / spec.name
    expected = _snapshot_part(part)
    path, what = w.install_snapshot(spec, part, final, expected)
    assert path == final and not part.exists() and "verified" in what
    assert not (final / ".cache").exists()
    manifest = w.read_manifest(final)
    assert manifest["revision"] == spec.revision and set(manifest["files"]) == set(expected)
    assert Path(w.locate_dinov2(spec.repo_id)).resolve() == final.resolve()
    assert w.status(spec).state == "verified"
    assert w.verify_found(spec, w.find(spec))[0] is True
    # a second download whose weights do not match: deleted, the installed one untouched
    expected = _snapshot_part(part)
    (part / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(CryosamError, match="does not match the hub's checksum"):
        w.install_snapshot(spec, part, final, expected)
    assert not part.exists() and w.status(spec).state == "verified"
    # silent corruption after install: verify finds it
    (final / "model.safetensors").write_bytes(b"x" * 70_000)
    ok, detail = w.verify_found(spec, w.find(spec))
    assert not ok and "model.safetensors" in detail


def test_install_snapshot_refuses_unlisted_files(isolated: Path) -> None:
    spec = w.get_spec("dinov2-small")
    part = isolated / "p"
    expected = _snapshot_part(part)
    (part / "extra.json").write_text("{}")
    with pytest.raises(CryosamError, match="extra.json"):
        w.install_snapshot(spec, part, isolated / "final", expected)
    assert not part.exists() and not (isolated / "final").exists()


def test_verify_hf_cache_blobs(isolated: Path) -> None:
    spec = w.get_spec("dinov2-large")
    repo = isolated / "hfcache" / "models--facebook--dinov2-large"
    data = _payload(5000, seed=9)
    blob = repo / "blobs" / _sha(data)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    snap = repo / "snapshots" / spec.revision
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (snap / "model.safetensors").symlink_to(blob)
    found = w.find(spec)
    assert found is not None and found.source == "hf-cache"
    assert w.verify_found(spec, found) == (True, "1 LFS file(s) match")
    blob.write_bytes(data[::-1])
    assert w.verify_found(spec, found)[0] is False


def test_cli_verify_skips_folders_without_manifest(isolated: Path, run_cli) -> None:
    folder = _fake_dinov2(isolated / "work" / "checkpoints" / "dinov2-base")
    code, out, err = run_cli("weights", "verify", "--dir", folder.parent)
    assert code == 0, err
    assert "SKIP dinov2-base" in out
    code, out, _ = run_cli("weights", "list")
    line = next(x for x in out.splitlines() if x.startswith("dinov2-base"))
    assert "present" in line and "no manifest" in line


def test_dinov2_download_without_internet_fails_at_once(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub host that does not resolve (no internet, no proxy) is one line at once, not
    after the hub client's retries, and leaves no folder behind."""
    import time

    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    spec = w.get_spec("dinov2-small")
    started = time.monotonic()
    with pytest.raises(CryosamError, match=r"cannot reach nothing\.invalid .*no internet"):
        w.download_dinov2(spec, tmp_path / "ck", endpoint="https://nothing.invalid")
    assert time.monotonic() - started < 10 and not (tmp_path / "ck").exists()


@pytest.mark.parametrize("partial", [False, True])
def test_a_failed_dinov2_download_mentions_partial_files_only_when_there_are(
        partial: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def failing(repo_id, *, local_dir, **kwargs):  # noqa: ANN001, ANN003 - the hub's call
        if partial:  # the hub made its folder and fetched one file before the cut
            Path(local_dir).mkdir(parents=True, exist_ok=True)
            Path(local_dir, "config.json").write_text("{}")
        raise OSError("connection reset")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the hub is replaced: no network
    spec = w.get_spec("dinov2-small")
    with pytest.raises(CryosamError, match="cannot download") as info:
        w.download_dinov2(spec, tmp_path, endpoint="http://127.0.0.1:9")
    part = tmp_path / f".{spec.name}.part"
    assert ("partial files kept" in str(info.value)) is partial
    assert part.exists() is partial
