"""``cryosam segment TOMO --points P``: the main job."""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path

import typer

from cryosam.errors import InputError


class EncoderChoice(StrEnum):
    dinov2 = "dinov2"
    filterbank = "filterbank"


class SegmenterChoice(StrEnum):
    sam = "sam"
    threshold = "threshold"


class TargetChoice(StrEnum):
    particle = "particle"
    membrane = "membrane"


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


def register(app: typer.Typer) -> None:
    """Add ``segment``."""

    @app.command()
    def segment(
        tomo: Path = typer.Argument(..., help="Tomogram (.mrc/.rec/.map, optionally .gz/.bz2)."),
        points: Path = typer.Option(..., "--points", "-p",
                                    help="Clicks: CSV (x,y,z or napari axis-0..2) or STAR."),
        out: Path | None = typer.Option(None, "--out", "-o",
                                        help="Output folder (default: <stem>_cryosam/ beside "
                                        "the tomogram)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
        target: TargetChoice = typer.Option(TargetChoice.particle, "--target",
                                            help="What the clicks are on."),
        match: bool | None = typer.Option(None, "--match/--no-match",
                                          help="Find every similar particle, or only segment "
                                          "the clicked ones (default: match for particles, "
                                          "not for membranes)."),
        encoder: EncoderChoice = typer.Option(EncoderChoice.dinov2, "--encoder",
                                              help="Feature encoder for matching."),
        dinov2_model: str = typer.Option("facebook/dinov2-with-registers-large",
                                         "--dinov2-model",
                                         help="DINOv2 hub id or local folder."),
        segmenter: SegmenterChoice = typer.Option(SegmenterChoice.sam, "--segmenter",
                                                  help="2-D promptable segmenter."),
        sam_model: str = typer.Option("vit_h", "--sam-model",
                                      help="vit_h, vit_l, vit_b or a .pth path."),
        device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
        top_k: int = typer.Option(512, "--top-k", min=1, help="At most this many matches."),
        sim_threshold: float = typer.Option(0.5, "--sim-threshold", min=-1.0, max=1.0,
                                            help="Cosine similarity a match must reach."),
        iou_threshold: float = typer.Option(0.5, "--iou-threshold", min=0.0, max=1.0,
                                            help="Stop propagating when slice-to-slice IoU "
                                            "drops below this."),
        ratios: str = typer.Option("16,8,4", "--ratios", help="Coarse-to-fine grid ratios."),
        nms_radius: float | None = typer.Option(None, "--nms-radius", min=0.0,
                                                help="Voxels (default: from the clicked "
                                                "particles' size)."),
        max_area: int | None = typer.Option(None, "--max-area", min=1,
                                            help="Largest mask area per slice, voxels "
                                            "(default: from the first masks)."),
        patches: int = typer.Option(37, "--patches", min=1,
                                    help="DINOv2 patches along a slice's long side (37 = 518 "
                                    "px); raise it for small particles."),
        slice_stride: int = typer.Option(1, "--slice-stride", min=1,
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
        seed: int = typer.Option(0, "--seed"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or summary."),
        debug: bool = typer.Option(False, "--debug", help="Full tracebacks on errors."),
    ) -> None:
        """Segment the clicked particles in 3-D and find every similar one in the tomogram."""
        from cryosam import progress
        from cryosam.config import (
            CryosamConfig,
            EncoderConfig,
            MatchingConfig,
            PropagationConfig,
            SegmenterConfig,
        )
        from cryosam.export import check_out_dir, default_out_dir, write_outputs
        from cryosam.pipeline import CryoSAM

        if quiet:
            progress.set_quiet(True)
        out_dir = out or default_out_dir(tomo)
        check_out_dir(out_dir, overwrite, inputs=(tomo, points))
        if cache_dir is not None:
            check_cache_dir(cache_dir)
        cfg = CryosamConfig(
            encoder=EncoderConfig(name=encoder.value, model=dinov2_model,
                                  patches_long_side=patches, slice_stride=slice_stride),
            segmenter=SegmenterConfig(name=segmenter.value, model=sam_model),
            propagation=PropagationConfig(iou_threshold=iou_threshold, max_area=max_area,
                                          target=target.value),
            matching=MatchingConfig(ratios=parse_ratios(ratios), sim_threshold=sim_threshold,
                                    top_k=top_k, nms_radius=nms_radius),
            device=device,
            seed=seed,
        )
        runner = CryoSAM(cfg)
        result = runner.segment(tomo, points, match=match, cache_dir=cache_dir,
                                voxel_size=voxel_size, points_unit=points_unit.value,
                                tomo_name=tomo_name)
        written = write_outputs(result, out_dir, overwrite=overwrite, tomo_name=tomo_name)
        if not quiet:
            print_summary(result, written, out_dir)


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
    console.print(f"outputs in [bold]{escape(str(out_dir))}[/bold]: " + ", ".join(sorted(written)))
