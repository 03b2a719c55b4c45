"""``cryosam bench propagation``: batched vs one-at-a-time cross-plane self-prompting.

Prints, for each segmenter, the encoder/decoder calls, prompts and wall time of a batched run
and of a one-particle-one-slice-at-a-time run on a simulated tomogram, plus the IoU of the
instance masks with the true ones (threshold segmenter; random SAM weights give noise masks).
"""

from __future__ import annotations

import time

import typer

SEGMENTERS = ("threshold", "tiny-sam", "vit_b", "vit_l", "vit_h")
_SEG_HELP = f"one or more of {', '.join(SEGMENTERS)} (SAM ones use random weights)"


def _segmenter(name: str, device: str):
    from cryosam.config import SegmenterConfig

    if name == "threshold":
        from cryosam.segmenters.threshold import ThresholdSegmenter

        return ThresholdSegmenter(SegmenterConfig(name="threshold"))
    from cryosam.segmenters.sam import SamSegmenter
    from cryosam.testing import tiny_sam

    if name == "tiny-sam":
        return SamSegmenter(tiny_sam(img_size=1024), device, SegmenterConfig())
    from segment_anything import sam_model_registry

    return SamSegmenter(sam_model_registry[name](checkpoint=None), device, SegmenterConfig(),
                        model_id=f"{name}:random-init")


def register(app: typer.Typer) -> None:
    """Add ``propagation`` to the ``cryosam bench`` group."""

    @app.command("propagation")
    def bench_propagation(
        segmenter: list[str] = typer.Option(["threshold", "tiny-sam"], "--segmenter",
                                            help=_SEG_HELP),
        n_points: int = typer.Option(60, help="prompted particles (all kinds, >= 50 advised)"),
        shape: str = typer.Option("64,160,160", help="simulated volume z,y,x"),
        max_steps: int = typer.Option(0, help="cap slices per direction (0 = no cap; SAM with "
                                              "random weights rarely stops by itself)"),
        device: str = typer.Option("auto", help="auto | cpu | cuda"),
        seed: int = typer.Option(0),
    ) -> None:
        """Batched vs one-at-a-time propagation: decoder calls and wall time."""
        import numpy as np

        from cryosam.config import PropagationConfig
        from cryosam.device import resolve_device
        from cryosam.errors import InputError
        from cryosam.instance_mask import InstanceMask
        from cryosam.propagation import propagate
        from cryosam.simulate import SimulationConfig, simulate
        from cryosam.utils import parse_shape

        for name in segmenter:
            if name not in SEGMENTERS:
                raise InputError(f"--segmenter {name!r} is not one of {', '.join(SEGMENTERS)}")
        dims = parse_shape(shape)
        sim = simulate(SimulationConfig(shape=dims, seed=seed))
        pts = sim.points()
        ids = [p.id for p in sim.particles]
        if n_points > len(pts):
            typer.echo(f"only {len(pts)} particles in the simulation; prompting all of them")
        pts, ids = pts[:n_points], ids[:n_points]
        dev = resolve_device(device)
        typer.echo(f"tomogram {dims}, {len(pts)} prompts, device {dev}")
        for name in segmenter:
            for batched in (True, False):
                seg = _segmenter(name, str(dev))
                cfg = PropagationConfig(batched=batched, max_steps=max_steps or None)
                t0 = time.perf_counter()
                res = propagate(sim.volume, pts, seg, cfg)
                wall = time.perf_counter() - t0
                st = res.stats
                ious = [inst.iou(InstanceMask.from_dense(sim.labels == pid))
                        for pid, inst in zip(ids, res.instances, strict=True)]
                typer.echo(
                    f"{name:9s} {'batched' if batched else 'one-at-a-time':13s} "
                    f"wall {wall:7.2f} s  decoder calls {st['decoder_calls']:6d}  "
                    f"prompts {st['prompts']:6d}  encoder calls {st['encoder_calls']:5d}  "
                    f"slices encoded {st['slices_encoded']:5d}  distinct slices "
                    f"{st['distinct_slices_visited']:5d}  steps {st['steps']:4d}  "
                    f"mean IoU {float(np.mean(ious)):.3f}")
