"""``cryosam segment TOMO --points P``: the main job.

Every option that sets a parameter takes its default from
:func:`cryosam.config.default_config`
(:data:`OPTION_PATHS` maps each to its place in the configuration), so the CLI cannot drift from
the Python API. ``--config run.json`` starts from an earlier run's parameters; options given on
the command line override them.
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer

from cryosam import backends
from cryosam import config as configuration
from cryosam.config import TARGETS, CryosamConfig, get_path
from cryosam.errors import InputError

# CLI parameter -> dotted path in CryosamConfig
OPTION_PATHS: dict[str, str] = {
    "target": "propagation.target",
    "encoder": "encoder.name",
    "dinov2_model": "encoder.backends.dinov2.model",
    "segmenter": "segmenter.name",
    "sam_model": "segmenter.backends.sam.model",
    "device": "device",
    "top_k": "matching.top_k",
    "sim_threshold": "matching.sim_threshold",
    "iou_threshold": "propagation.iou_threshold",
    "ratios": "matching.ratios",
    "nms_radius": "matching.nms_radius",
    "max_area": "propagation.max_area",
    "patches": "encoder.backends.dinov2.patches_long_side",
    "slice_stride": "encoder.slice_stride",
    "seed": "seed",
    "threads": "threads",
    "polarity": "polarity",
    "diameter": "diameter",
    "binning": "binning",
}

EncoderChoice = StrEnum("EncoderChoice", {n: n for n in backends.names("encoder")})  # type: ignore[misc]
SegmenterChoice = StrEnum("SegmenterChoice",  # type: ignore[misc]
                          {n: n for n in backends.names("segmenter")})
TargetChoice = StrEnum("TargetChoice", {n: n for n in TARGETS})  # type: ignore[misc]
PolarityChoice = StrEnum("PolarityChoice",  # type: ignore[misc]
                         {n: n for n in ("auto", "dark", "bright")})


class UnitChoice(StrEnum):
    voxel = "voxel"
    angstrom = "angstrom"


def parse_ratios(text: str) -> tuple[int, ...]:
    """``"16,8,4"`` → (16, 8, 4), coarse to fine."""
    try:
        ratios = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise InputError(
            f"--ratios {text!r}: give integers separated by commas, e.g. 16,8,4"
        ) from None
    if not ratios or any(r < 1 for r in ratios) or list(ratios) != sorted(ratios, reverse=True):
        raise InputError(f"--ratios {text!r}: give decreasing positive integers, e.g. 16,8,4")
    return ratios


def _cli_value(param: str, value: Any) -> Any:
    """A command-line value in the configuration's type."""
    if param == "ratios":
        return parse_ratios(value)
    return value.value if isinstance(value, StrEnum) else value


def config_from_cli(base: CryosamConfig, given: dict[str, Any]) -> CryosamConfig:
    """``base`` with the parameters the user gave on the command line (by CLI name)."""
    cfg = base
    for param, value in given.items():
        path = OPTION_PATHS[param]
        try:
            cfg = cfg.replace_path(path, _cli_value(param, value))
        except InputError as exc:
            flag = "--" + param.replace("_", "-")
            raise InputError(f"{flag}: {exc}") from None
    return cfg


def register(app: typer.Typer) -> None:
    """Add ``segment`` with defaults from today's configuration."""
    d = configuration.default_config()
    default = {p: get_path(d, path) for p, path in OPTION_PATHS.items()}
    default["ratios"] = ",".join(str(r) for r in default["ratios"])

    @app.command()
    def segment(
        ctx: typer.Context,
        tomo: Path = typer.Argument(..., help="Tomogram (.mrc/.rec/.map, optionally .gz/.bz2)."),
        points: Path = typer.Option(..., "--points", "-p",
                                    help="Clicks: CSV (x,y,z or napari axis-0..2) or STAR."),
        out: Path | None = typer.Option(None, "--out", "-o",
                                        help="Output folder (default: <stem>_cryosam/ beside "
                                        "the tomogram)."),
        overwrite: bool = typer.Option(False, "--overwrite",
                                       help="Replace an earlier cryosam output in --out."),
        config: Path | None = typer.Option(None, "--config",
                                           help="Start from an earlier run's parameters "
                                           "(its run.json); options given here override."),
        target: TargetChoice = typer.Option(default["target"], "--target",
                                            help="What the clicks are on."),
        match: bool | None = typer.Option(None, "--match/--no-match",
                                          help="Find every similar particle, or only segment "
                                          "the clicked ones (default: match for particles, "
                                          "not for membranes)."),
        encoder: EncoderChoice = typer.Option(default["encoder"], "--encoder",
                                              help="Feature encoder for matching."),
        dinov2_model: str = typer.Option(default["dinov2_model"], "--dinov2-model",
                                         help="DINOv2 hub id or local folder."),
        segmenter: SegmenterChoice = typer.Option(default["segmenter"], "--segmenter",
                                                  help="2-D promptable segmenter."),
        sam_model: str = typer.Option(default["sam_model"], "--sam-model",
                                      help="vit_h, vit_l, vit_b or a .pth path."),
        device: str = typer.Option(default["device"], "--device", help="auto, cpu or cuda."),
        top_k: int = typer.Option(default["top_k"], "--top-k", min=1,
                                  help="At most this many matches."),
        sim_threshold: float = typer.Option(default["sim_threshold"], "--sim-threshold",
                                            min=-1.0, max=1.0,
                                            help="Cosine similarity a match must reach."),
        iou_threshold: float = typer.Option(default["iou_threshold"], "--iou-threshold",
                                            min=0.0, max=1.0,
                                            help="Stop propagating when slice-to-slice IoU "
                                            "drops below this."),
        ratios: str = typer.Option(default["ratios"], "--ratios",
                                   help="Coarse-to-fine grid ratios."),
        nms_radius: float | None = typer.Option(default["nms_radius"], "--nms-radius", min=0.0,
                                                help="Voxels (default: from the clicked "
                                                "particles' size)."),
        max_area: int | None = typer.Option(default["max_area"], "--max-area", min=1,
                                            help="Largest mask area per slice, voxels "
                                            "(default: from the first masks)."),
        patches: int = typer.Option(default["patches"], "--patches", min=1,
                                    help="DINOv2 patches along a slice's long side (37 = 518 "
                                    "px); raise it for small particles."),
        slice_stride: int = typer.Option(default["slice_stride"], "--slice-stride", min=1,
                                         help="Encode every k-th slice per axis."),
        voxel_size: float | None = typer.Option(None, "--voxel-size",
                                                help="Å per voxel, overriding the header."),
        points_unit: UnitChoice = typer.Option(UnitChoice.voxel, "--points-unit"),
        tomo_name: str | None = typer.Option(None, "--tomo-name",
                                             help="Which tomogram's rows of a STAR file; also "
                                             "the name written into picks.star."),
        cache_dir: Path | None = typer.Option(None, "--cache-dir",
                                              help="Keep features here; a second query on the "
                                              "same tomogram reuses them."),
        seed: int = typer.Option(default["seed"], "--seed"),
        polarity: PolarityChoice = typer.Option(default["polarity"], "--polarity",
                                                help="Particles darker or brighter than the "
                                                "background; auto decides from the clicks."),
        diameter: float | None = typer.Option(default["diameter"], "--diameter", min=0.0,
                                              help="Particle diameter in Å (default: "
                                              "estimated from the clicks)."),
        binning: int | None = typer.Option(default["binning"], "--binning", min=1, max=16,
                                           help="Work on a copy binned this many times "
                                           "(default: from the particle's size; 1 = never)."),
        threads: int | None = typer.Option(default["threads"], "--threads", min=1,
                                           help="CPU threads (default: SLURM_CPUS_PER_TASK, "
                                           "OMP_NUM_THREADS or the CPUs this job may use)."),
        points_pixel_size: float | None = typer.Option(
            None, "--points-pixel-size", min=0.0,
            help="The clicks are pixels of this size (Å), e.g. picked on another binning."),
        points_bin: int | None = typer.Option(
            None, "--points-bin", min=1,
            help="The clicks were picked on a copy binned N times relative to this tomogram."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or summary."),
        debug: bool = typer.Option(False, "--debug", help="Full tracebacks on errors."),
    ) -> None:
        """Segment the clicked particles in 3-D and find every similar one in the tomogram."""
        from cryosam import progress
        from cryosam.export import check_out_dir, default_out_dir, write_outputs
        from cryosam.pipeline import CryoSAM

        if quiet:
            progress.set_quiet(True)
        values = locals()
        given = {p: values[p] for p in OPTION_PATHS if _given(ctx, p)}
        base = (CryosamConfig.from_file(config) if config is not None
                else configuration.default_config())
        cfg = config_from_cli(base, given)
        out_dir = out or default_out_dir(tomo)
        check_out_dir(out_dir, overwrite, inputs=(tomo, points))
        if cache_dir is not None:
            check_cache_dir(cache_dir)
        if points_pixel_size is not None and points_bin is not None:
            raise InputError("--points-pixel-size and --points-bin say the same thing; give one")
        runner = CryoSAM(cfg)
        result = runner.segment(tomo, points, match=match, cache_dir=cache_dir,
                                voxel_size=voxel_size, points_unit=points_unit.value,
                                tomo_name=tomo_name, points_pixel_size=points_pixel_size,
                                points_bin=points_bin)
        written = write_outputs(result, out_dir, overwrite=overwrite, tomo_name=tomo_name)
        if not quiet:
            print_summary(result, written, out_dir)


def _given(ctx: typer.Context, param: str) -> bool:
    """True when ``param`` came from the command line (not its default)."""
    source = ctx.get_parameter_source(param)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def check_cache_dir(cache_dir: Path) -> None:
    """Make sure ``--cache-dir`` is (or can become) a writable folder, before any work."""
    if cache_dir.exists() and not cache_dir.is_dir():
        raise InputError(f"--cache-dir {cache_dir}: exists and is not a folder")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--cache-dir {cache_dir}: cannot create it ({exc.strerror})") from None
    if not os.access(cache_dir, os.W_OK):
        raise InputError(f"--cache-dir {cache_dir}: not writable; choose another folder")


def print_summary(result, written: dict[str, Path], out_dir: Path) -> None:  # noqa: ANN001
    """One screen: counts, times per stage, where the outputs are."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    rec = result.record
    console = Console()
    counts = rec["counts"]
    models = ", ".join(str(m) for m in (rec["models"]["segmenter"], rec["models"].get("encoder"),
                                        rec["device"]["type"]) if m)
    console.print(
        f"[bold]cryosam[/bold]: {counts['prompts']} click(s) → "
        f"{counts['proposals']} proposal(s) → {counts['instances']} instance(s), "
        f"{counts['picks']} pick(s)  " + escape(f"[{models}]")
    )
    table = Table(show_header=True, header_style="bold", box=None)
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("peak MB", justify="right")
    for stage, secs in rec["seconds"].items():
        peak = rec["peak_memory_bytes"].get(stage, 0) / 2**20
        table.add_row(stage, f"{secs:.2f}", f"{peak:.0f}")
    table.add_row("total", f"{rec['total_seconds']:.2f}", "")
    console.print(table)
    probe, work = rec.get("probe") or {}, rec.get("work") or {}
    if probe:
        size = probe.get("radius_voxels")
        console.print(
            f"particles {probe['polarity']} ({probe['polarity_source']}: "
            f"{probe['votes']['dark']} dark / {probe['votes']['bright']} bright click(s))"
            + (f", radius {size:.1f} voxels ({probe['radius_source']})" if size else "")
            + (f", worked binned {work['binning']}x" if work.get("binning", 1) > 1 else ""))
    console.print(f"outputs in [bold]{escape(str(out_dir))}[/bold]: " + ", ".join(sorted(written)))
