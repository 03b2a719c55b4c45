"""``cryosam bench matching``: hierarchical vs naive matching on one synthetic FeatureVolume.

The FeatureVolume is built directly (no encoder): DINOv2-S-sized stacks (3 x 384 channels at
37 patches on the long side) holding noise plus a shared background component, with target and
distractor particles planted as Gaussian blobs of their own feature vectors. The query is pooled
from one target's spherical mask, as the pipeline would from a prompt's instance mask.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch
import typer

from cryosam.config import MatchingConfig
from cryosam.device import peak_memory_bytes, reset_peak_memory, resolve_device
from cryosam.errors import InputError
from cryosam.testing import recall_within, sphere_coords, synthetic_feature_volume
from cryosam.utils import RssSampler, parse_shape


def register(app: typer.Typer) -> None:
    """Add ``matching`` to the ``cryosam bench`` group."""

    @app.command("matching")
    def bench_matching(
        shape: str = typer.Option("128,512,512", help="Tomogram shape D,H,W (voxels)."),
        dim: int = typer.Option(1152, help="Feature channels, 3 x per-axis (DINOv2-S: 3x384)."),
        patches: int = typer.Option(37, help="Patches on a slice's long side (37 = 518 px)."),
        targets: int = typer.Option(40, help="Planted target particles."),
        distractors: int = typer.Option(40, help="Planted particles of another kind."),
        radius: float = typer.Option(10.0, help="Particle radius in voxels."),
        dilation: int = typer.Option(MatchingConfig.dilation, help="Rings of fine cells added "
                                     "around the children of survivors."),
        coarse_margin: float = typer.Option(MatchingConfig.coarse_margin, help="Similarity "
                                            "margin below the threshold at coarse levels."),
        grow: bool = typer.Option(MatchingConfig.grow, help="Follow surviving regions to "
                                  "their border at each level."),
        turns: bool = typer.Option(MatchingConfig.turns, help="Also score the query turned "
                                   "about the beam axis, as `cryosam segment` does."),
        sweep: bool = typer.Option(False, help="Also run other grow/dilation/margin settings."),
        repeats: int = typer.Option(3, min=1, help="Runs per setting; the fastest is shown."),
        chunk_size: int = typer.Option(16384, min=1, help="Feature vectors per chunk, both "
                                       "runs (65536 measured ~3x slower on CPU)."),
        backend: str = typer.Option("auto", help="Scoring backend: auto|torch|faiss."),
        device: str = typer.Option("auto", help="auto|cpu|cuda."),
        seed: int = typer.Option(0, help="Seed of the synthetic content."),
    ) -> None:
        """Time hierarchical and naive matching; print times, peak memory and naive recall.

        Times are the fastest of ``--repeats`` runs (wall and process CPU seconds, each the
        minimum): on a shared machine the slowest runs measure the neighbours.
        """
        from cryosam.features import turned
        from cryosam.matching import match, nms_radius_from_masks, pool_query

        dims = parse_shape(shape)
        if dim % 3 or dim <= 0:
            raise InputError(f"--dim {dim} must be a positive multiple of 3 (three axes)")
        dev = resolve_device(device)
        t0 = time.perf_counter()
        fv, centres, _ = synthetic_feature_volume(
            dims, dim // 3, patches=patches, n_targets=targets, n_distractors=distractors,
            radius=radius, seed=seed,
        )
        fv = fv.to(dev)
        mask = sphere_coords(centres[0], radius, dims)
        queries = pool_query(fv, [mask])
        if turns:
            queries = turned(queries)
        typer.echo(f"FeatureVolume {dims} dim {fv.dim}: built in {time.perf_counter() - t0:.1f} s"
                   f" ({_stack_bytes(fv) / 2**20:.0f} MiB fp16), {targets} targets, "
                   f"{distractors} distractors, radius {radius:g}; {len(queries)} query "
                   f"vector(s); {torch.get_num_threads()} torch threads, {dev}")
        nms_radius = nms_radius_from_masks([mask])
        config = MatchingConfig(dilation=dilation, coarse_margin=coarse_margin, grow=grow,
                                backend=backend, chunk_size=chunk_size)
        # naive first: every other line gives its recall of the naive proposals
        variants = [("naive", dataclasses.replace(config, naive=True)), ("hierarchical", config)]
        if sweep:
            variants += [(f"g{int(g)}-d{d}-m{m:g}-p{int(p)}", dataclasses.replace(
                config, grow=g, dilation=d, coarse_margin=m, coarse_pooling=p))
                for g, d, m, p in ((False, 0, 0.0, False), (False, 0, 0.0, True),
                                   (False, 0, 0.1, True), (False, 1, 0.1, True),
                                   (True, 0, 0.0, True), (True, 0, 0.1, True),
                                   (True, 1, 0.1, True))]
        first = match(fv, queries, config, nms_radius=nms_radius, device=dev)
        match(fv, queries, variants[0][1], nms_radius=nms_radius, device=dev)  # warms naive up
        typer.echo(f"first query (also averages the stacks for the coarse levels, once per "
                   f"tomogram): {first.stats.total_seconds:.2f} s")
        runs = {}
        for name, cfg in variants:
            best = None
            for _ in range(repeats):
                (props, cpu), peak = _measure(dev, lambda c=cfg: _timed(
                    lambda: match(fv, queries, c, nms_radius=nms_radius, device=dev)))
                if best is None or props.stats.total_seconds < best[0].stats.total_seconds:
                    best = (props, min(cpu, best[1]) if best else cpu, max(peak, best[2])
                            if best else peak)
                else:
                    best = (best[0], min(cpu, best[1]), max(peak, best[2]))
            props, cpu, peak = best
            runs[name] = (props, cpu)
            levels = ", ".join(f"r{lv.ratio}: {lv.cells_scored}->{lv.survivors} "
                               f"{lv.seconds:.2f}s" for lv in props.stats.levels)
            recall = recall_within(runs["naive"][0].zyx, props.zyx, nms_radius)
            typer.echo(f"{name:>16}: wall {props.stats.total_seconds:7.2f} s  cpu {cpu:7.2f} s  "
                       f"peak {peak / 2**20:6.0f} MiB  {len(props):4d} proposals  recall of "
                       f"naive {100 * recall:5.1f} %  [{levels}; NMS "
                       f"{props.stats.nms_candidates} cand. {props.stats.nms_seconds:.2f}s]")
        (hier, hier_cpu), (naive, naive_cpu) = runs["hierarchical"], runs["naive"]
        recall = recall_within(naive.zyx, hier.zyx, nms_radius)
        truth = recall_within(centres, hier.zyx[: max(targets, 1)], radius)
        speedup = naive.stats.total_seconds / max(hier.stats.total_seconds, 1e-9)
        cells = naive.stats.cells_scored / max(hier.stats.cells_scored, 1)
        typer.echo(f"speed-up {speedup:.1f}x wall, {naive_cpu / max(hier_cpu, 1e-9):.1f}x cpu, "
                   f"{cells:.1f}x fewer feature vectors scored; "
                   f"recall of the {len(naive)} naive proposals {100 * recall:.1f} % (within "
                   f"NMS radius {nms_radius:.1f}); planted targets with a proposal within "
                   f"{radius:g} among the top {targets}: {100 * truth:.1f} %  "
                   f"(backend {hier.stats.backend} on {hier.stats.device})")


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and the process CPU seconds it took (robust to other load on the machine)."""
    t0 = time.process_time()
    out = fn()
    return out, time.process_time() - t0


def _stack_bytes(fv: Any) -> int:
    stacks = getattr(fv, "stacks", {})
    return sum(t.numel() * t.element_size() for t in stacks.values())


def _measure(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn``; return its result and the peak memory it added (GPU, or process RSS)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        reset_peak_memory(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, peak_memory_bytes(device) - base
    with RssSampler() as sampler:
        out = fn()
    return out, sampler.added
