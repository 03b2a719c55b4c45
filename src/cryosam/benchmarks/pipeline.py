"""``cryosam bench pipeline``: the whole segment pipeline on a simulated tomogram, per stage.

With ``--models paper`` it builds DINOv2-L/14 (registers) and SAM ViT-H with random weights —
they cost the same as real ones — so the paper's configuration can be timed on a GPU without
downloading anything. Random weights segment nothing meaningful, so the similarity threshold
is opened and chains are capped at ``--max-steps`` to keep the work bounded.
"""

from __future__ import annotations

import dataclasses
import time

import typer


def register(app: typer.Typer) -> None:
    """Add ``pipeline`` to the ``cryosam bench`` group."""

    @app.command("pipeline")
    def bench_pipeline(
        models: str = typer.Option("weight-free", "--models",
                                   help="weight-free | paper (DINOv2-L + SAM-H, random init)"),
        shape: str = typer.Option("64,160,160", "--shape", help="simulated volume z,y,x"),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
        top_k: int = typer.Option(64, "--top-k", help="proposals (paper models only)"),
        max_steps: int = typer.Option(8, "--max-steps",
                                      help="slices per direction (paper models only)"),
        seed: int = typer.Option(0, "--seed"),
    ) -> None:
        """Time and peak memory of every stage of ``cryosam segment``."""
        from cryosam.config import (
            CryosamConfig,
            EncoderConfig,
            MatchingConfig,
            PropagationConfig,
            SegmenterConfig,
        )
        from cryosam.device import resolve_device
        from cryosam.errors import InputError
        from cryosam.pipeline import CryoSAM
        from cryosam.simulate import SimulationConfig, simulate
        from cryosam.utils import parse_shape

        dev = resolve_device(device)
        start = time.perf_counter()
        sim = simulate(SimulationConfig(shape=parse_shape(shape), seed=seed))
        typer.echo(f"simulated {sim.volume.shape} in {time.perf_counter() - start:.1f} s; "
                   f"device {dev}")
        if models == "weight-free":
            cfg = CryosamConfig(encoder=EncoderConfig(name="filterbank"),
                                segmenter=SegmenterConfig(name="threshold"), device=str(dev))
            runner = CryoSAM(cfg)
        elif models == "paper":
            from segment_anything import sam_model_registry

            from cryosam.encoders.dinov2 import Dinov2Encoder, random_init_model
            from cryosam.segmenters.sam import SamSegmenter

            cfg = CryosamConfig(
                device=str(dev),
                matching=MatchingConfig(sim_threshold=-1.0, top_k=top_k),
                propagation=PropagationConfig(max_steps=max_steps),
                min_size_ratio=0.0, max_size_ratio=1e9, max_elongation_ratio=1e9,
                diameter=1e5, binning=1,  # random masks have any size: no size cap or binning
            )
            encoder = Dinov2Encoder(random_init_model("vitl14").to(dev), device=dev,
                                    name="dinov2-vitl14-reg:random-init")
            segmenter = SamSegmenter(sam_model_registry["vit_h"](checkpoint=None), dev,
                                     dataclasses.replace(cfg.segmenter),
                                     model_id="vit_h:random-init")
            runner = CryoSAM(cfg, encoder=encoder, segmenter=segmenter)
        else:
            raise InputError(f"--models {models!r}: use weight-free or paper")
        result = runner.segment(sim.volume, sim.prompt_points[:1], voxel_size=sim.voxel_size)
        rec = result.record
        for stage, secs in rec["seconds"].items():
            peak = rec["peak_memory_bytes"].get(stage, 0) / 2**20
            typer.echo(f"{stage:18s} {secs:8.2f} s   peak {peak:8.0f} MiB")
        typer.echo(f"{'total':18s} {rec['total_seconds']:8.2f} s   "
                   f"proposals {rec['counts']['proposals']}  "
                   f"SAM encoder calls {rec['counts']['encoder_calls']}  "
                   f"decoder calls {rec['counts']['decoder_calls']}")
