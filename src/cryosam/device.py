"""Device selection and mixed precision shared by every model-running stage."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from cryosam.errors import CryosamError
from cryosam.utils import peak_rss_bytes

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda[:N]`` into a torch device; ``auto`` picks CUDA when present."""
    if isinstance(spec, torch.device):
        return spec
    spec = str(spec).strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CryosamError(
                f"--device {spec}: no CUDA GPU is visible to torch on this machine; "
                "use --device cpu or --device auto"
            )
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CryosamError(f"--device {spec}: this machine has "
                               f"{torch.cuda.device_count()} CUDA device(s); use cuda:0 or auto")
        return device
    if spec == "cpu":
        return torch.device("cpu")
    raise CryosamError(f"--device {spec!r} is not one of auto, cpu, cuda")


def compute_dtype(device: torch.device) -> torch.dtype:
    """The models' working precision: bf16 on CUDA (fast, memory-light), fp32 on CPU (bf16 is
    slow there)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@contextlib.contextmanager
def autocast(device: torch.device) -> Iterator[None]:
    """Autocast to :func:`compute_dtype` on CUDA; plain fp32 on CPU."""
    if device.type == "cuda":
        with torch.autocast(device_type="cuda", dtype=compute_dtype(device)):
            yield
    else:
        yield


CPU_CACHE_MB = 4096  # the automatic cache budget in host memory
GPU_CACHE_SHARE = 1 / 3  # the automatic cache budget: this share of the GPU's free memory,
GPU_CACHE_RANGE_MB = (1024, 16384)  # kept within these bounds (every slice of a 200x1000x1000
# tomogram's SAM-H embeddings takes 4.3 GiB in bf16)


_gpu_held = 1.0  # the share of its GPU this process holds (see :func:`hold_gpu_share`)


def hold_gpu_share(share: float) -> None:
    """Say that this process holds only ``share`` of its GPU: Ray gives each batch worker a
    fraction of one when workers outnumber GPUs. The automatic cache budget is scaled by it,
    so that the workers on one GPU keep, together, to what one process alone would."""
    global _gpu_held
    if not 0.0 < share <= 1.0:
        raise ValueError(f"a GPU share is in (0, 1], not {share}")
    _gpu_held = float(share)


def cache_budget_mb(device: torch.device, mb: int | None) -> int:
    """The memory budget, in MiB, of a cache of per-slice model outputs kept on ``device``.

    ``mb`` None is automatic: on a GPU, a third of the memory free now (what no process holds,
    plus what this one's allocator holds unused), from 1 to 16 GiB, so a large GPU keeps every
    slice of a tomogram and a small one leaves room for the image encoder's working memory;
    a worker holding part of a GPU takes that part of it (:func:`hold_gpu_share`); 4096 MiB
    of host memory on a CPU."""
    if mb is not None:
        return int(mb)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        low, high = GPU_CACHE_RANGE_MB
        return int(min(high, max(low, free * GPU_CACHE_SHARE // 2**20)) * _gpu_held)
    return CPU_CACHE_MB


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak-memory measurement on ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory since the last reset on CUDA; the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()


def resolve_threads(threads: int | None = None) -> int:
    """CPU threads to use: ``threads`` if given, else what the job was granted
    (``SLURM_CPUS_PER_TASK``, then ``OMP_NUM_THREADS``), else the CPUs this process may run on
    (its affinity, not the whole node: cluster nodes are shared)."""
    if threads:
        return int(threads)
    for var in ("SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads from :func:`resolve_threads`; return the number."""
    n = resolve_threads(threads)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
