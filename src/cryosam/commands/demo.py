"""``cryosam demo [DIR]``: simulate a tomogram, segment it from one click, score the picks."""

from __future__ import annotations

from pathlib import Path

import typer


def pick_backends() -> tuple[str, str, str]:
    """(encoder, segmenter, why): the default models when their weights are here, else the
    registry's weight-free backends (the one place that falls back by itself, and says so)."""
    from cryosam import backends
    from cryosam.config import default_config

    cfg = default_config()
    selected: list[tuple[backends.Kind, str, object]] = [
        ("encoder", cfg.encoder.name, cfg.encoder.options),
        ("segmenter", cfg.segmenter.name, cfg.segmenter.options)]
    if backends.missing_weights(selected):
        enc, seg = backends.weight_free("encoder"), backends.weight_free("segmenter")
        return (enc, seg,
                f"weight-free backends ({enc} + {seg}): the {cfg.encoder.name}/"
                f"{cfg.segmenter.name} weights are not on this machine; `cryosam weights list` "
                "says how to get them")
    return (cfg.encoder.name, cfg.segmenter.name,
            f"{cfg.encoder.name} + {cfg.segmenter.name}, weights found locally")


def register(app: typer.Typer) -> None:
    """Add ``demo``."""

    @app.command()
    def demo(
        out_dir: Path = typer.Argument(Path("cryosam_demo"), help="Folder for everything."),
        seed: int = typer.Option(0, "--seed", help="Simulation seed."),
        shape: str = typer.Option("64,160,160", "--shape", help="Tomogram size z,y,x."),
        weight_free: bool = typer.Option(False, "--weight-free",
                                         help="Use the weight-free backends even when the "
                                         "DINOv2/SAM weights are present."),
        device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
        overwrite: bool = typer.Option(True, "--overwrite/--no-overwrite",
                                       help="Replace an earlier demo in DIR."),
        quiet: bool = typer.Option(False, "--quiet", "-q"),
    ) -> None:
        """Run the whole pipeline on a synthetic tomogram and score it against the truth."""
        from cryosam import backends, io, progress
        from cryosam.commands.segment import print_summary
        from cryosam.config import CryosamConfig, EncoderConfig, SegmenterConfig
        from cryosam.export import write_outputs
        from cryosam.metrics import evaluate_picks, fraction_picked
        from cryosam.pipeline import CryoSAM
        from cryosam.simulate import SimulationConfig, simulate, write_simulation
        from cryosam.utils import parse_shape

        quiet = progress.settle_quiet(quiet)
        if weight_free:
            encoder, segmenter, why = (backends.weight_free("encoder"),
                                       backends.weight_free("segmenter"),
                                       "weight-free backends (asked)")
        else:
            encoder, segmenter, why = pick_backends()
        echo = (lambda *a, **k: None) if quiet else typer.echo
        echo(f"backends: {why}")

        sim = simulate(SimulationConfig(shape=parse_shape(shape), seed=seed))
        files = write_simulation(sim, out_dir / "data", overwrite=True)
        echo(f"simulated {sim.volume.shape} tomogram with {len(sim.particles)} particles "
             f"({sim.target_kind} is the target) → {files['tomo.mrc']}")

        cfg = CryosamConfig(encoder=EncoderConfig(name=encoder),
                            segmenter=SegmenterConfig(name=segmenter), device=device,
                            seed=seed)
        tomo = io.read_tomogram(files["tomo.mrc"])
        result = CryoSAM(cfg).segment(tomo, files["prompt.csv"])
        result_dir = out_dir / "tomo_cryosam"
        written = write_outputs(result, result_dir, overwrite=overwrite)
        if not quiet:
            print_summary(result, written, result_dir)

        targets = [p for p in sim.particles if p.kind == sim.target_kind]
        others = [p for p in sim.particles if p.kind != sim.target_kind]
        radius = float(sim.target_radius)
        import numpy as np

        truth = np.array([p.zyx for p in targets], dtype=float)
        ev = evaluate_picks(result.picks_zyx, truth, radius, scores=result.pick_scores)
        others_zyx = np.array([p.zyx for p in others], dtype=float).reshape(-1, 3)
        hit_others = round(fraction_picked(others_zyx, result.picks_zyx, radius) * len(others))
        typer.echo(
            f"{sim.target_kind}: precision {ev.precision:.3f}  recall {ev.recall:.3f}  "
            f"F1 {ev.f1:.3f}  ({ev.tp} TP, {ev.fp} FP, {ev.fn} FN, radius {radius:g} voxels)"
        )
        if others:
            typer.echo(f"distractors picked: {hit_others} of {len(others)} "
                       f"({100.0 * hit_others / len(others):.0f} %)")
        typer.echo(f"look at {result_dir / 'preview.png'}")
