"""``cryosam bench features``: DINOv2 slice throughput and FeatureVolume memory.

Random-init weights cost the same as real ones, so the published ViT/14 architectures are
timed without downloading anything. Memory is estimated before extraction and measured on a
FeatureVolume built by the real extraction code with the real architecture's patch grids.
"""

from __future__ import annotations

import gc
import time

import numpy as np
import torch
import typer

from cryosam.device import peak_memory_bytes, reset_peak_memory, resolve_device
from cryosam.encoders.base import SliceEncoder
from cryosam.errors import CryosamError
from cryosam.features import (
    PLANE_DIMS,
    SLICE_DIM,
    estimate_nbytes,
    extract_features,
    slice_positions,
)
from cryosam.utils import AXES, format_bytes, parse_shape, rss_bytes

MEMORY_SHAPES = ((200, 512, 512), (200, 1000, 1000))


class _GridOnly:
    """The real encoder's geometry; checks one real slice per slice size, then returns zeros.

    Lets the real extraction code build a full-size FeatureVolume in seconds on a CPU, so its
    memory can be measured (the values are not the point; the allocation is).
    """

    def __init__(self, encoder: SliceEncoder) -> None:
        self.inner = encoder
        self.id, self.patch_size, self.channels = encoder.id, encoder.patch_size, encoder.channels
        self.grid_shape = encoder.grid_shape
        self.checked: set[tuple[int, int]] = set()

    def encode(self, slices: np.ndarray) -> torch.Tensor:
        size = (int(slices.shape[1]), int(slices.shape[2]))
        gh, gw = self.grid_shape(*size)
        if size not in self.checked:
            real = self.inner.encode(slices[:1])
            if tuple(real.shape[1:]) != (gh, gw, self.channels):
                raise RuntimeError(f"encoder maps {tuple(real.shape)} != grid {(gh, gw)}")
            self.checked.add(size)
        return torch.zeros((len(slices), gh, gw, self.channels), dtype=torch.float16)


def _throughput(encoder: SliceEncoder, shape: tuple[int, int, int], n_slices: int, batch_size: int,
                device: torch.device) -> dict[str, float]:
    """Slices per second along each axis, after warm-up batches of the timed sizes (a GPU
    picks its kernels per shape: warming up with one slice left the first timed axis slow)."""
    rng = np.random.default_rng(0)
    rates = {}
    for a in AXES:
        p, q = PLANE_DIMS[a]
        size = (shape[p], shape[q])
        batch = rng.random((batch_size, *size), dtype=np.float32)
        for size_ in {min(batch_size, n_slices), n_slices % batch_size} - {0}:
            encoder.encode(batch[:size_])  # and the short last batch's shape
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        done, start = 0, time.perf_counter()
        while done < n_slices:
            take = min(batch_size, n_slices - done)
            encoder.encode(batch[:take])
            done += take
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        rates[a] = done / elapsed
        gh, gw = encoder.grid_shape(*size)
        typer.echo(f"  {a}: slices {size[0]}x{size[1]} -> {gh}x{gw} patches "
                   f"({gh * encoder.patch_size}x{gw * encoder.patch_size} px): "
                   f"{rates[a]:.2f} slices/s ({done} slices in {elapsed:.1f} s)")
    return rates


def _memory(encoder: SliceEncoder, shape: tuple[int, int, int]) -> None:
    """Estimated vs measured FeatureVolume memory for a tomogram of ``shape``."""
    est = estimate_nbytes(shape, encoder)
    volume = np.zeros(shape, dtype=np.float32)
    gc.collect()
    before = rss_bytes()
    features = extract_features(volume, _GridOnly(encoder), batch_size=64,
                                clip_percentiles=None)
    gc.collect()
    grown = rss_bytes() - before
    stacks = ", ".join(f"{a} {tuple(features.stacks[a].shape)}" for a in AXES)
    typer.echo(f"  {shape[0]}x{shape[1]}x{shape[2]}: estimated {format_bytes(est)}, "
               f"measured {format_bytes(features.nbytes)} in stacks, process grew "
               f"{format_bytes(max(grown, 0))}  [{stacks}]")
    del features


def register(app: typer.Typer) -> None:
    """Add ``cryosam bench features``."""

    @app.command("features")
    def features(
        arch: str = typer.Option("vitl14", help="vits14 | vitb14 | vitl14 | vitg14"),
        shape: str = typer.Option("200,1000,1000", help="Tomogram size D,H,W (voxels)."),
        device: str = typer.Option("auto", help="auto | cpu | cuda"),
        slices: int = typer.Option(4, help="Slices timed per axis."),
        batch_size: int = typer.Option(4, help="Slices per forward pass."),
        patches: int = typer.Option(37, help="Patches along a slice's long side."),
        registers: bool = typer.Option(True, help="The with-registers variant (as the paper)."),
        memory: bool = typer.Option(True, help="Also print ViT-L FeatureVolume memory for "
                                    "200x512x512 and 200x1000x1000."),
    ) -> None:
        """Slices/s and peak memory of DINOv2 (random-init) and FeatureVolume memory."""
        from cryosam.encoders.dinov2 import Dinov2Encoder, random_init_model

        dev = resolve_device(device)
        dims = parse_shape(shape)
        if slices < 1 or batch_size < 1:
            raise CryosamError("--slices and --batch-size must be at least 1")
        model = random_init_model(arch, registers=registers)
        encoder = Dinov2Encoder(model, patches_long_side=patches, device=dev,
                                name=f"random-{arch}", weights_hash="random-init")
        precision = "bf16 autocast" if dev.type == "cuda" else "fp32"
        n_params = sum(p.numel() for p in model.parameters())
        typer.echo(f"DINOv2 {arch}{'+reg' if registers else ''} ({n_params / 1e6:.0f} M params, "
                   f"random init) on {dev} ({precision}, {torch.get_num_threads()} threads), "
                   f"batch {batch_size}, tomogram {dims[0]}x{dims[1]}x{dims[2]}")
        reset_peak_memory(dev)
        rates = _throughput(encoder, dims, slices, batch_size, dev)
        peak = peak_memory_bytes(dev)
        total = {a: len(slice_positions(dims[SLICE_DIM[a]], 1)) for a in AXES}
        seconds = sum(total[a] / rates[a] for a in AXES)
        typer.echo(f"  peak memory ({'GPU' if dev.type == 'cuda' else 'process RSS'}): "
                   f"{format_bytes(peak)}")
        typer.echo(f"  whole tomogram: {sum(total.values())} slices, ~{seconds:.0f} s; "
                   f"FeatureVolume {format_bytes(estimate_nbytes(dims, encoder))} fp16")
        if memory:
            if arch != "vitl14":
                del encoder, model
                gc.collect()
                model = random_init_model("vitl14", registers=registers)
                encoder = Dinov2Encoder(model, patches_long_side=patches, device=dev,
                                        name="random-vitl14", weights_hash="random-init")
            typer.echo(f"FeatureVolume memory, ViT-L/14 ({encoder.channels} channels, "
                       f"{patches} patches on the long side, fp16, no PCA):")
            for mem_shape in MEMORY_SHAPES:
                _memory(encoder, mem_shape)
