"""``cryosam simulate OUT_DIR``: a synthetic tomogram with known particles and its truth."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from cryosam._atomic import check_writable, writing
from cryosam.utils import committed


def simulate_command(
    out_dir: Path = typer.Argument(..., help="Folder to write the tomogram and its truth into."),
    shape: str = typer.Option("64,160,160", "--shape", help="Volume size z,y,x in voxels."),
    voxel_size: float = typer.Option(10.0, "--voxel-size", help="Voxel size in Å (header)."),
    snr: float = typer.Option(0.5, "--snr", help="Var(signal)/Var(noise) over the volume."),
    seed: int = typer.Option(0, "--seed", help="Random seed: same seed, same tomogram."),
    n_targets: int | None = typer.Option(
        None, "--n-targets", help="Target particles ('ribosome'); default scales with volume."),
    n_distractors: int | None = typer.Option(
        None, "--n-distractors",
        help="Particles of EACH distractor kind ('blob', 'filament'); default scales with "
             "volume."),
    tilt_range: float = typer.Option(60.0, "--tilt-range",
                                     help="Tilt range ± degrees; the rest is the missing wedge."),
    blur: float = typer.Option(1.0, "--blur", help="Gaussian blur of the signal, voxels."),
    membrane: bool = typer.Option(True, "--membrane/--no-membrane",
                                  help="Add a vesicle and a membrane sheet."),
    invert: bool = typer.Option(False, "--invert",
                                help="Dense matter bright (as in many processed tomograms)."),
    zoom: float = typer.Option(1.0, "--zoom", help="Sample the same scene this many times "
                               "finer (the shape grows, the voxel size shrinks)."),
    preset: str = typer.Option("default", "--preset",
                               help="default, or crowded: 8 look-alike kinds packed densely "
                               "with a CTF-like band pass (truth.csv names each kind)."),
    per_kind: int | None = typer.Option(None, "--per-kind", min=1,
                                        help="crowded: copies of each kind (default: 12 per "
                                        "64x160x160, scaled)."),
    target_radius: float = typer.Option(6.5, "--target-radius",
                                        help="Outer radius of the target particles, voxels "
                                        "(before --zoom)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing files."),
    quiet: bool = typer.Option(False, "--quiet", "-q",
                               help="No summary (errors still print)."),
) -> None:
    """Simulate a tomogram with known particles and membranes; write it with its truth."""
    from cryosam import progress
    from cryosam.simulate import (
        SimulationConfig,
        simulate,
        write_simulation,
    )
    from cryosam.utils import parse_shape

    quiet = progress.settle_quiet(quiet)  # also `cryosam -q simulate`
    check_writable(out_dir, "OUT_DIR", into=True)
    config = SimulationConfig(
        shape=parse_shape(shape), voxel_size=voxel_size, snr=snr, seed=seed,
        n_targets=n_targets, n_blobs=n_distractors, n_filaments=n_distractors,
        tilt_range=tilt_range, blur_sigma=blur, membrane=membrane, invert=invert, zoom=zoom,
        target_radius=target_radius, preset=preset, per_kind=per_kind)
    sim = simulate(config)
    with writing(out_dir, "OUT_DIR"):
        paths = write_simulation(sim, out_dir, overwrite=overwrite)
    if not quiet:
        with committed():
            _say(sim, paths, seed, tilt_range)


def _say(sim: Any, paths: dict[str, Path], seed: int, tilt_range: float) -> None:
    """What was simulated and where it went."""
    from cryosam.simulate import TARGET_KIND, measured_snr

    d, h, w = sim.shape
    kinds = dict.fromkeys(p.kind for p in sim.particles) or (TARGET_KIND,)
    counts = ", ".join(f"{len(sim.ids(k))} {k}" for k in kinds)
    typer.echo(f"simulated {d}x{h}x{w} voxels (z,y,x) at {sim.voxel_size:g} Å, seed {seed}, "
               f"SNR {measured_snr(sim):.3g}, missing wedge ±{tilt_range:g}°")
    typer.echo(f"particles: {counts}; target kind '{sim.target_kind}', "
               f"radius {sim.target_radius:.2f} voxels")
    typer.echo(f"membrane voxels: {int(sim.membrane.sum())}, "
               f"clicks: {len(sim.membrane_clicks)}")
    typer.echo("wrote:")
    for path in paths.values():
        typer.echo(f"  {path}")


def register(app: typer.Typer) -> None:
    """Add ``cryosam simulate``."""
    app.command("simulate")(simulate_command)
