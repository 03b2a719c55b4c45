"""The run record (``run.json``): inputs with checksums, every parameter, models, device,
versions, and each stage's own report with its time and peak memory.

``parameters`` is :meth:`cryosam.config.CryosamConfig.to_dict`, so ``--config run.json``
re-runs the job.
"""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from cryosam.device import peak_memory_bytes, reset_peak_memory
from cryosam.utils import sha256_file


class StageTimer:
    """Times each pipeline stage and records its peak memory (GPU, or the process's RSS).

    On a GPU the device is synchronised at both ends of a stage, so that a stage's seconds
    are its own work and not the tail of the one before (a few waits per run)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self.peak_bytes: dict[str, int] = {}
        self.started = time.time()

    def sync(self) -> None:
        """Wait for the GPU's queued work (nothing on the CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        """Time the ``with`` block as stage ``name`` (seconds add up over repeats; peak memory in
        bytes, the largest seen), synchronising the GPU at both ends (not after an error)."""
        self.sync()
        reset_peak_memory(self.device)
        start = time.perf_counter()
        done = False
        try:
            yield
            done = True
        finally:
            if done:  # a failed stage's error is what matters, not waiting for the GPU
                self.sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.peak_bytes[name] = max(self.peak_bytes.get(name, 0),
                                        peak_memory_bytes(self.device))

    def report(self) -> dict[str, Any]:
        """``seconds``, ``peak_memory_bytes`` and ``total_seconds`` for the run record."""
        return {
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
            "peak_memory_bytes": dict(self.peak_bytes),
            "total_seconds": round(time.time() - self.started, 4),
        }


def file_info(path: str | Path | None) -> dict[str, Any] | None:
    """Path, size and SHA-256 of an input file (None for in-memory inputs)."""
    if path is None:
        return None
    p = Path(path)
    return {"path": str(p.resolve()), "bytes": p.stat().st_size, "sha256": sha256_file(p)}


def device_record(device: torch.device) -> dict[str, Any]:
    """Where the run ran: device type (and GPU name), host, CPU threads."""
    rec: dict[str, Any] = {"type": device.type, "host": platform.node(),
                           "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        rec["name"] = torch.cuda.get_device_name(device)
    return rec


def versions() -> dict[str, str]:
    """Python and the versions of every package that changes results."""
    from importlib import metadata

    import cryosam

    # cryosam's own from the code that runs (an editable install's metadata can be stale)
    out = {"python": platform.python_version(), "cryosam": cryosam.__version__}
    for pkg in ("numpy", "scipy", "torch", "torchvision", "transformers",
                "segment-anything", "faiss-gpu", "faiss-cpu", "mrcfile", "starfile"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def started_stamp(started: float) -> str:
    """Local ISO time of the run's start."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started))
