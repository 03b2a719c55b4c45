"""``cryosam bench pipeline``: the whole segment pipeline on a simulated tomogram, per stage.

With ``--models paper`` it builds DINOv2-L/14 (registers) and SAM ViT-H with random weights —
they cost the same as real ones — so the paper's configuration can be timed on a GPU without
downloading anything. Random weights segment nothing meaningful, so on their own they are run
with the similarity threshold opened and chains capped at ``--max-steps``.

A realistic workload instead comes from a weight-free run: ``--record-workload FILE`` runs
the weight-free pipeline on a simulated tomogram (on a CPU) and records what its models were
asked to do; ``--workload FILE --models paper`` replays exactly that with the paper's models
(``--models tiny``: tiny ones, for CI), then a second query on the cached tomogram, and
writes the figures as JSON (``--json``, or ``$OUT/bench_pipeline.json`` when ``$OUT`` is set).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from cryosam.config import CryosamConfig

DEFAULT_SHAPE = "64,160,160"


def register(app: typer.Typer) -> None:
    """Add ``pipeline`` to the ``cryosam bench`` group."""

    @app.command("pipeline")
    def bench_pipeline(
        models: str = typer.Option("weight-free", "--models",
                                   help="weight-free | paper (DINOv2-L + SAM-H, random init) "
                                        "| tiny (tiny random models; with --workload)"),
        shape: str = typer.Option(None, "--shape",
                                  help=f"simulated volume z,y,x (default {DEFAULT_SHAPE}; with "
                                       "--workload: the workload's)"),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
        top_k: int = typer.Option(64, "--top-k", help="proposals (paper models only)"),
        max_steps: int = typer.Option(8, "--max-steps",
                                      help="slices per direction (paper models only)"),
        seed: int = typer.Option(0, "--seed"),
        workload: Path = typer.Option(None, "--workload",
                                      help="replay this recorded workload (--models paper|tiny)"),
        record_workload: Path = typer.Option(None, "--record-workload",
                                             help="record the weight-free run's workload here"),
        json_out: Path = typer.Option(None, "--json",
                                      help="write the figures here (default with a workload: "
                                           "$OUT/bench_pipeline.json when $OUT is set)"),
        encoder_batch: int = typer.Option(None, "--encoder-batch",
                                          help="DINOv2 slices per pass (replay)"),
        sam_batch: int = typer.Option(None, "--sam-batch",
                                      help="SAM image-encoder slices per pass (replay)"),
        decoder_batch: int = typer.Option(None, "--decoder-batch",
                                          help="SAM prompts per decoder pass (replay)"),
        sdpa: bool = typer.Option(True, "--sdpa/--no-sdpa",
                                  help="SAM attention through scaled_dot_product_attention"),
        compile_models: bool = typer.Option(False, "--compile",
                                            help="torch.compile both image encoders"),
    ) -> None:
        """Time and peak memory of every stage of ``cryosam segment``."""
        from cryosam.device import resolve_device
        from cryosam.errors import InputError
        from cryosam.utils import parse_shape

        dev = resolve_device(device)
        if record_workload is not None and workload is not None:
            raise InputError("--record-workload and --workload: give one (record on a CPU, "
                             "replay on the GPU)")
        if record_workload is not None:
            if models != "weight-free":
                raise InputError("--record-workload records a weight-free run; drop --models")
            _record(parse_shape(shape or DEFAULT_SHAPE), seed, record_workload, json_out)
            return
        if workload is not None:
            _replay(workload, models, dev, shape, json_out, seed=seed,
                    encoder_batch=encoder_batch, sam_batch=sam_batch,
                    decoder_batch=decoder_batch, sdpa=sdpa, compile_models=compile_models)
            return
        _run(models, parse_shape(shape or DEFAULT_SHAPE), dev, top_k, max_steps, seed,
             sdpa=sdpa, compile_models=compile_models)


def paper_config(device: str, top_k: int, max_steps: int, shape: tuple[int, ...],
                 voxel_size: float, target: str = "particle") -> CryosamConfig:
    """The configuration the paper models run under with random weights: any similarity
    passes, every pick is kept, and the particle is as wide as the tomogram, so random masks
    of any size meet no size cap and nothing is binned."""
    from cryosam.config import CryosamConfig, MatchingConfig, PropagationConfig, ScoreConfig

    return CryosamConfig(
        device=device, matching=MatchingConfig(sim_threshold=-1.0, top_k=top_k),
        propagation=PropagationConfig(target=target, max_steps=max_steps),  # type: ignore[arg-type]
        score=ScoreConfig(min_score=0.0), diameter=float(max(shape)) * float(voxel_size),
        binning=1)


def _run(models: str, shape: tuple[int, int, int], dev: Any, top_k: int, max_steps: int,
         seed: int, *, sdpa: bool = True, compile_models: bool = False) -> None:
    """The pipeline itself on a simulated tomogram (no workload)."""
    from cryosam.config import (
        CryosamConfig,
        EncoderConfig,
        SegmenterConfig,
    )
    from cryosam.errors import InputError
    from cryosam.pipeline import CryoSAM
    from cryosam.simulate import SimulationConfig, simulate

    start = time.perf_counter()
    sim = simulate(SimulationConfig(shape=shape, seed=seed))
    typer.echo(f"simulated {sim.volume.shape} in {time.perf_counter() - start:.1f} s; "
               f"device {dev}")
    if models == "weight-free":
        cfg = CryosamConfig(encoder=EncoderConfig(name="filterbank"),
                            segmenter=SegmenterConfig(name="threshold"), device=str(dev))
        runner = CryoSAM(cfg)
    elif models == "paper":
        from cryosam.benchmarks.replay import build_models

        cfg = paper_config(str(dev), top_k, max_steps, sim.volume.shape, sim.voxel_size)
        encoder, segmenter = build_models("paper", dev, sdpa=sdpa,
                                          compile_models=compile_models)
        runner = CryoSAM(cfg, encoder=encoder, segmenter=segmenter)
    else:
        raise InputError(f"--models {models!r}: use weight-free or paper (tiny needs "
                         "--workload)")
    result = runner.segment(sim.volume, sim.prompt_points[:1], voxel_size=sim.voxel_size)
    rec = result.record
    _stage_table(rec["seconds"], rec["peak_memory_bytes"])
    typer.echo(f"{'total':18s} {rec['total_seconds']:8.2f} s   "
               f"proposals {rec['counts']['proposals']}  "
               f"SAM encoder calls {rec['counts']['encoder_calls']}  "
               f"decoder calls {rec['counts']['decoder_calls']}")


def _stage_table(seconds: dict[str, float], peaks: dict[str, int]) -> None:
    for stage, secs in seconds.items():
        typer.echo(f"{stage:18s} {secs:8.2f} s   peak {peaks.get(stage, 0) / 2**20:8.0f} MiB")


def _record(shape: tuple[int, int, int], seed: int, path: Path, json_out: Path | None) -> None:
    """Run the weight-free pipeline on a simulated tomogram and save its workload."""
    from cryosam.benchmarks.workload import record

    load, rec = record(shape, seed, echo=typer.echo)
    load.save(path)
    _stage_table(rec["seconds"], rec["peak_memory_bytes"])
    summary = load.summary()
    typer.echo(f"workload -> {path}: encoder slices {summary['encoder_slices']}, segmenter "
               f"slices {summary['segmenter_slices']} ({summary['segmenter_distinct_slices']} "
               f"distinct), prompts {summary['prompts']}, proposals {summary['proposals']}")
    if json_out is not None:
        _write_json(json_out, {"recorded": load.recorded, "workload": summary})


def _replay(path: Path, models: str, dev: Any, shape: str | None, json_out: Path | None,
            **options: Any) -> None:
    """Replay a recorded workload with the paper's (or tiny) models; print and write JSON."""
    import torch

    from cryosam import __version__
    from cryosam.benchmarks.replay import build_models, replay
    from cryosam.benchmarks.workload import Workload
    from cryosam.errors import InputError
    from cryosam.record import device_record
    from cryosam.utils import parse_shape

    load = Workload.load(path)
    if shape is not None and parse_shape(shape) != tuple(load.shape):
        raise InputError(f"--shape {shape}: the workload {path} was recorded on "
                         f"{','.join(map(str, load.shape))}; record one of that shape")
    start = time.perf_counter()
    encoder, segmenter = build_models(models, dev, sdpa=options["sdpa"],
                                      sam_batch=options["sam_batch"],
                                      decoder_batch=options["decoder_batch"],
                                      compile_models=options["compile_models"])
    build = time.perf_counter() - start
    typer.echo(f"replaying {path} ({'x'.join(map(str, load.shape))}) with {models} models "
               f"on {dev}; models built in {build:.1f} s")
    figures = replay(load, encoder, segmenter, dev, encoder_batch=options["encoder_batch"],
                     echo=typer.echo, seed=options["seed"])
    _stage_table(figures["stages_seconds"], figures["stages_peak_memory_bytes"])
    typer.echo(f"{'total':18s} {figures['total_seconds']:8.2f} s   peak "
               f"{figures['peak_memory_bytes'] / 2**20:.0f} MiB")
    rates = ", ".join(f"{a} {v:.1f}" for a, v in figures["dinov2_slices_per_s"].items())
    typer.echo(f"DINOv2 slices/s: {rates} (all {figures['dinov2_slices_per_s_all']:.1f}); "
               f"SAM image encoder: {figures['sam_encoder_slices']} slices, "
               f"{figures['sam_encoder_slices_per_s']:.1f} slices/s; decoder calls "
               f"{figures['sam_decoder_calls']} for {figures['prompts']} prompts")
    typer.echo(f"SAM embedding cache: budget {figures['sam_cache_budget_mb']} MiB, "
               f"{figures['sam_cache_evictions']} evictions")
    second = figures["second_query"]
    typer.echo("second query on the cached tomogram: " + ", ".join(
        f"{k} {v:.2f} s" for k, v in second["stages_seconds"].items())
        + f"; total {second['total_seconds']:.2f} s; SAM slices encoded again "
        f"{second['sam_encoder_slices']}")
    record = {
        "benchmark": "cryosam bench pipeline --workload",
        "cryosam_version": __version__,
        "models": models,
        "device": device_record(dev),
        "torch": torch.__version__,
        "options": {k: v for k, v in options.items() if k != "seed"},
        "models_build_seconds": round(build, 3),
        "workload": {"file": str(path), **load.summary(), "recorded": load.recorded},
        **figures,
    }
    target = json_out
    if target is None and os.environ.get("OUT"):
        target = Path(os.environ["OUT"]) / "bench_pipeline.json"
    if target is not None:
        _write_json(target, record)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from cryosam._atomic import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1, default=str))
    typer.echo(f"figures -> {path}")
