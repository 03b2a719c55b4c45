"""``cryosam segment TOMO --points P``: the main job.

Every option that sets a parameter takes its default from
:func:`cryosam.config.default_config`
(:data:`OPTION_PATHS` maps each to its place in the configuration), so the CLI cannot drift from
the Python API. ``--config run.json`` starts from an earlier run's parameters; options given on
the command line override them.
"""

from __future__ import annotations

import warnings
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from cryosam import backends
from cryosam import config as configuration
from cryosam._atomic import check_writable
from cryosam.config import TARGETS, CryosamConfig, get_path
from cryosam.errors import CryosamWarning, InputError, collect_warnings, keep_warnings
from cryosam.utils import committed

if TYPE_CHECKING:
    from cryosam.io.copick import CopickSource
    from cryosam.result import SegmentationResult

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
    "query_mode": "matching.query",
    "turns": "matching.turns",
    "min_score": "score.min_score",
    "size_tolerance": "score.size_tolerance",
    "shape_tolerance": "score.shape_tolerance",
    "density_weight": "score.density_weight",
    "density_tolerance": "score.density_tolerance",
    "density_range": "score.density_range",
    "background_share": "score.background_share",
}

EncoderChoice = StrEnum("EncoderChoice", {n: n for n in backends.names("encoder")})  # type: ignore[misc]
SegmenterChoice = StrEnum("SegmenterChoice",  # type: ignore[misc]
                          {n: n for n in backends.names("segmenter")})
TargetChoice = StrEnum("TargetChoice", {n: n for n in TARGETS})  # type: ignore[misc]
PolarityChoice = StrEnum("PolarityChoice",  # type: ignore[misc]
                         {n: n for n in ("auto", "dark", "bright")})
# io.STAR_FLAVOURS, spelled out so that `cryosam --help` does not import cryosam.io
StarChoice = StrEnum("StarChoice",  # type: ignore[misc]
                     {n: n for n in ("relion5", "warp", "relion4")})


QueryModeChoice = StrEnum("QueryModeChoice",  # type: ignore[misc]
                          {n: n for n in configuration.QUERY_MODES})


class UnitChoice(StrEnum):
    """Units of the clicks file's coordinates (--points-unit)."""

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
        tomo: Path | None = typer.Argument(None, help="Tomogram (.mrc/.rec/.map, optionally "
                                           ".gz/.bz2); not with --copick."),
        points: Path | None = typer.Option(None, "--points", "-p",
                                           help="Clicks: CSV (x,y,z or napari axis-0..2) or "
                                           "STAR; not with --copick."),
        negative_points: Path | None = typer.Option(
            None, "--negative-points", help="Clicks on structures NOT to pick (look-alikes, "
            "gold, ice); CSV or STAR. Rows of --points with negative=1 (or label=negative) "
            "count too."),
        query: Path | None = typer.Option(None, "--query", help="A saved query (`cryosam "
                                          "query`) instead of clicks: find its particles here; "
                                          "its parameters are the defaults."),
        out: Path | None = typer.Option(None, "--out", "-o",
                                        help="Output folder (default: <stem>_cryosam/ beside "
                                        "the tomogram; with --copick, <run>_cryosam/ here)."),
        overwrite: bool = typer.Option(False, "--overwrite",
                                       help="Replace an earlier cryosam output in --out (and "
                                       "the copick session named by --copick-session)."),
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
        top_k: int = typer.Option(default["top_k"], "--top-k", min=0,
                                  help="At most this many matches (0: no cap, as in the "
                                  "configuration)."),
        sim_threshold: float = typer.Option(default["sim_threshold"], "--sim-threshold",
                                            min=-1.0, max=1.0,
                                            help="Cosine similarity a match must reach."),
        iou_threshold: float = typer.Option(default["iou_threshold"], "--iou-threshold",
                                            min=0.0, max=1.0,
                                            help="Stop propagating when slice-to-slice IoU "
                                            "drops below this."),
        ratios: str = typer.Option(default["ratios"], "--ratios",
                                   help="Coarse-to-fine grid ratios."),
        query_mode: QueryModeChoice = typer.Option(
            default["query_mode"], "--query-mode",
            help="mean: one query averaged over every clicked voxel (the paper's); max: also "
            "each click's own, a match scores its best."),
        turns: bool = typer.Option(
            default["turns"], "--turns/--no-turns",
            help="Also match the clicked particle turned by 90 degrees about the beam axis "
            "(its two side views swapped), so one click finds particles lying another way."),
        min_score: float | None = typer.Option(
            default["min_score"], "--min-score", min=0.0, max=1.0,
            help="Write picks scoring at least this (default: an automatic cut from this "
            "tomogram's scores); the rest go to picks_below_cut.csv."),
        size_tolerance: float = typer.Option(
            default["size_tolerance"], "--size-tolerance", min=0.01,
            help="How far a match's size may stray from the clicked ones' (std of the log "
            "ratio; several clicks widen it to their own spread)."),
        shape_tolerance: float = typer.Option(
            default["shape_tolerance"], "--shape-tolerance", min=0.01,
            help="How far a match's shape (principal-axis ratios, log) may stray."),
        density_weight: float = typer.Option(
            default["density_weight"], "--density-weight", min=0.0,
            help="Weight of the density agreement in the score (0 = size and shape only)."),
        density_tolerance: float = typer.Option(
            default["density_tolerance"], "--density-tolerance", min=0.001,
            help="How far a match's density correlation with the clicked ones' may fall "
            "below 1 (each tolerance divides the score by e, to the power --density-weight)."),
        density_range: float = typer.Option(
            default["density_range"], "--density-range", min=0.0,
            help="With 3+ clicks: a match whose density strays more than this many times as "
            "far as the most different click's from the others scores x1e-4, below any "
            "automatic cut (0 = no limit; no effect with --density-weight 0)."),
        background_share: float = typer.Option(
            default["background_share"], "--background-share", min=0.01, max=1.0,
            help="Write no match when the query matches more than this share of the "
            "tomogram: such a query describes the background (1 = never)."),
        nms_radius: float | None = typer.Option(default["nms_radius"], "--nms-radius", min=0.0,
                                                help="Voxels of the input tomogram, also "
                                                "when it is binned (default: from the "
                                                "clicked particles' size)."),
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
        points_unit: UnitChoice = typer.Option(
            UnitChoice.voxel, "--points-unit", help="Unit of the clicks' coordinates (CSV): "
            "voxel, or angstrom from the tomogram's first voxel (TARDIS, CryoET Data Portal)."),
        tomo_name: str | None = typer.Option(None, "--tomo-name",
                                             help="Which tomogram's rows of a STAR or combined "
                                             "CSV clicks file (rlnTomoName, rlnMicrographName, "
                                             "tomo_name column); also the name in picks.star "
                                             "(the per-tool STAR files take --star-tomo-name)."),
        cache_dir: Path | None = typer.Option(None, "--cache-dir",
                                              help="Keep features here; a second query on the "
                                              "same tomogram reuses them."),
        seed: int = typer.Option(default["seed"], "--seed", help="Seed of the query's "
                                 "voxel sampling when a mask is very large (reruns agree)."),
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
        copick: Path | None = typer.Option(None, "--copick", help="A copick project's config "
                                           "JSON: read the tomogram and clicks from it and "
                                           "write picks and segmentation back."),
        run: str | None = typer.Option(None, "--run", help="copick run to segment."),
        object_name: str | None = typer.Option(None, "--object", help="copick pickable object: "
                                               "its picks are the clicks, cryosam writes it."),
        voxel_spacing: float | None = typer.Option(None, "--voxel-spacing", min=0.0,
                                                   help="copick voxel spacing (Å) of the "
                                                   "tomogram (default: the run's only one)."),
        tomo_type: str | None = typer.Option(None, "--tomo-type", help="copick tomogram type, "
                                             "e.g. wbp, denoised (default: the only one)."),
        clicks_user: str | None = typer.Option(None, "--clicks-user", help="copick user_id of "
                                               "the clicks (default: anyone but cryosam)."),
        clicks_session: str | None = typer.Option(None, "--clicks-session",
                                                  help="copick session_id of the clicks."),
        copick_session: str | None = typer.Option(None, "--copick-session",
                                                  help="session_id cryosam writes (default: "
                                                  "the first free number; an existing one "
                                                  "needs --overwrite)."),
        star: list[StarChoice] | None = typer.Option(None, "--star", help="STAR flavours "
                                                     "beside picks.star, repeatable (default: "
                                                     "relion5 and warp, plus relion4 with "
                                                     "--tilt-series-pixel-size)."),
        star_tomo_name: str | None = typer.Option(None, "--star-tomo-name",
                                                  help="Tomogram name in those files "
                                                  "(default: the file name without rec_ and "
                                                  "_<px>Apx, or the copick run)."),
        tilt_series_pixel_size: float | None = typer.Option(
            None, "--tilt-series-pixel-size", min=0.0,
            help="Unbinned tilt-series pixel size (Å), for picks_relion4.star."),
    ) -> None:
        """Segment the clicked particles in 3-D and find every similar one in the tomogram."""
        from cryosam import io, progress
        from cryosam._atomic import output_lock
        from cryosam.export import check_out_dir, default_out_dir, write_outputs
        from cryosam.pipeline import CryoSAM

        quiet = progress.settle_quiet(quiet)
        values = locals()
        given = {p: values[p] for p in OPTION_PATHS if _given(ctx, p)}
        saved = None
        if query is not None:
            from cryosam.query import SavedQuery

            saved = SavedQuery.load(query)
        base = saved.config() if saved is not None else configuration.default_config()
        if config is not None:  # on top of the query's own parameters
            base = CryosamConfig.from_file(config, base=base)
        cfg = config_from_cli(base, given)
        check_input_mode(ctx, values)
        if cfg.propagation.target != "particle":
            _warn_particle_only(given, negative_points is not None and not match)
        if saved is not None:
            saved.check_config(cfg)
        star_out = io.StarOutputs(tuple(f.value for f in star) if star else None,
                                  star_tomo_name, tilt_series_pixel_size)
        source = None if copick is None else io.open_copick(
            copick, run, object_name, voxel_spacing=voxel_spacing, tomo_type=tomo_type,
            clicks_user=clicks_user, clicks_session=clicks_session,
            session_id=copick_session, overwrite=overwrite)
        if source is not None:
            out_dir = out or Path(f"{source.run_name}_cryosam")
            check_out_dir(out_dir, overwrite)
        else:
            out_dir = out or default_out_dir(tomo)
            check_out_dir(out_dir, overwrite,
                          inputs=tuple(p for p in (tomo, points, query, negative_points)
                                       if p is not None))
        if cache_dir is not None:
            check_cache_dir(cache_dir, out_dir)
        if points_pixel_size is not None and points_bin is not None:
            raise InputError("--points-pixel-size and --points-bin say the same thing; give one")
        with output_lock(out_dir), collect_warnings() as said:  # one run per --out
            runner = CryoSAM(cfg)
            if source is not None:
                tomo_in, points_in = source.load_tomogram(), source.clicks_zyx
            else:
                tomo_in, points_in = tomo, points
            result = runner.segment(tomo_in, points_in, query=saved, match=match,
                                    cache_dir=cache_dir, negative_points=negative_points,
                                    voxel_size=voxel_size, points_unit=points_unit.value,
                                    tomo_name=source.run_name if source else tomo_name,
                                    points_pixel_size=points_pixel_size,
                                    points_bin=points_bin)
            if source is not None:
                result.record["copick"] = source.report()
            keep_warnings(result.record, said)  # copick's loading included
            written = write_outputs(result, out_dir, overwrite=overwrite, tomo_name=tomo_name,
                                    star=star_out)
            copick_out = (None if source is None
                          else write_copick_result(source, result, out_dir))
            with committed():
                if not quiet:
                    print_summary(result, written, out_dir)
                    if copick_out is not None:
                        typer.echo(f"copick: {copick_out}")


# copick mode and file mode each have options the other cannot use
_COPICK_ONLY = {"run": "--run", "object_name": "--object", "voxel_spacing": "--voxel-spacing",
                "tomo_type": "--tomo-type", "clicks_user": "--clicks-user",
                "clicks_session": "--clicks-session", "copick_session": "--copick-session"}
_FILES_ONLY = {"voxel_size": "--voxel-size", "points_unit": "--points-unit",
               "tomo_name": "--tomo-name", "points_pixel_size": "--points-pixel-size",
               "points_bin": "--points-bin"}


def check_input_mode(ctx: typer.Context, values: dict[str, Any]) -> None:
    """Before any work: files mode needs TOMO and --points; --copick needs --run and --object
    and reads both from the project. Options of the other mode are refused by name."""
    if values.get("query") is not None:
        if values.get("negative_points") is not None:
            raise InputError("--negative-points with --query: a saved query keeps the negative "
                             "clicks it was made with (`cryosam query ... --negative-points`)")
        if values["copick"] is not None or values["points"] is not None:
            raise InputError("--query replaces the clicks: drop --points and --copick (for a "
                             "copick project use `cryosam batch CONFIG.json --query Q`)")
        if values["tomo"] is None:
            raise InputError("give the tomogram: cryosam segment TOMO --query QUERY")
    if values["copick"] is None:
        extra = [flag for p, flag in _COPICK_ONLY.items() if _given(ctx, p)]
        if extra:
            raise InputError(f"{extra[0]} selects inside a copick project; add --copick "
                             "CONFIG.json, or drop it")
        if values["tomo"] is None or (values["points"] is None and values.get("query") is None):
            raise InputError("give the tomogram and its clicks: cryosam segment TOMO --points "
                             "CLICKS (or --copick CONFIG.json --run RUN --object NAME)")
        return
    if values["tomo"] is not None or values["points"] is not None:
        raise InputError("--copick reads the tomogram and the clicks from the project; drop "
                         "the TOMO argument and --points")
    missing = [flag for p, flag in (("run", "--run"), ("object_name", "--object"))
               if not values[p]]
    if missing:
        raise InputError(f"--copick needs {' and '.join(missing)}: the run to segment and the "
                         "pickable object whose picks are the clicks")
    extra = [flag for p, flag in _FILES_ONLY.items() if _given(ctx, p)]
    if extra:
        raise InputError(f"{extra[0]} is for a tomogram file and a clicks file; with --copick "
                         "choose with --voxel-spacing, --tomo-type, --clicks-user and "
                         "--clicks-session")


def write_copick_result(source: CopickSource, result: SegmentationResult,
                        out_dir: Path) -> str:
    """Write the picks (particles only) and the instance labels back; one summary line."""
    from cryosam import io

    particles = result.target == "particle"
    try:
        done = io.write_copick(source, result.labels,
                               result.picks_zyx if particles else None,
                               result.pick_scores if particles else None,
                               result.pick_instance_ids if particles else None)
    except InputError as exc:
        raise InputError(f"{exc}; the local outputs are in {out_dir}") from None
    picks = f"{done['picks']} picks and " if "picks" in done else ""
    return (f"{picks}an instance segmentation of {source.object_name} in run "
            f"{source.run_name}, user {done['user_id']}, session {done['session_id']}")


def _given(ctx: typer.Context, param: str) -> bool:
    """True when ``param`` came from the command line (not its default)."""
    source = ctx.get_parameter_source(param)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def check_cache_dir(cache_dir: Path, out_dir: Path | None = None) -> None:
    """Refuse, before any work, a ``--cache-dir`` that can never be used: a file, a folder
    inside ``--out`` (replaced at the end of the run), or one that cannot be created. Nothing
    is created here; a cache that fails later (a full disk) only costs a warning."""
    if cache_dir.exists() and not cache_dir.is_dir():
        raise InputError(f"--cache-dir {cache_dir}: exists and is not a folder")
    resolved = cache_dir.resolve()
    if out_dir is not None:
        out = out_dir.resolve()
        if resolved == out or out in resolved.parents:
            raise InputError(f"--cache-dir {cache_dir}: is inside --out {out_dir}, which the run "
                             "replaces; keep the cache outside it")
    check_writable(cache_dir, "--cache-dir", into=True)


def _warn_particle_only(given: dict[str, Any], negatives_unused: bool) -> None:
    """With --target membrane: say which given options have no effect."""
    idle = [f"--{p.replace('_', '-')}" for p in ("min_score", "diameter") if p in given]
    idle += ["--negative-points (without --match)"] if negatives_unused else []
    if idle:
        warnings.warn(f"{', '.join(idle)}: no effect with --target membrane (membranes have "
                      "no picks, score cut or particle size; negative clicks act on --match)",
                      CryosamWarning, stacklevel=2)


def print_summary(result: SegmentationResult, written: dict[str, Path], out_dir: Path) -> None:
    """One screen: counts, times per stage, where the outputs are."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from cryosam.result import negatives_summary

    rec = result.record
    console = Console()
    counts = rec["counts"]
    models = ", ".join(str(m) for m in (rec["models"]["segmenter"], rec["models"].get("encoder"),
                                        rec["device"]["type"]) if m)
    start = (f"{counts['prompts']} click(s)" if counts["prompts"] else "a saved query")
    if result.target == "particle":
        end = (f"{counts['instances']} instance(s), {counts['picks']} pick(s)"
               f"{', clicks included' if counts['prompts'] else ''}")
    else:  # membranes: a mask, no picks files
        end = (f"{counts['instances']} membrane mask(s), "
               f"{int((result.labels > 0).sum())} voxels (semantic.mrc, instances.mrc)")
    console.print(f"[bold]cryosam[/bold]: {start} → {counts['proposals']} proposal(s) → "
                  f"{end}  " + escape(f"[{models}]"))
    cut = (rec.get("score") or {}).get("cut")
    if cut:
        below = rec["score"]["below_cut"]
        where = " (picks_below_cut.csv)" if below else ""
        console.print(f"score cut {cut['threshold']:.4g} ({cut['method']}): "
                      f"{rec['score']['above_cut']} match(es) written, {below} below it"
                      f"{where}{negatives_summary(rec)}")
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
        votes = probe["votes"]
        why = {"clicks": f"{votes['dark']} dark / {votes['bright']} bright click(s)",
               "query": "as the query's clicks"}.get(probe["polarity_source"], "as given")
        what = "particles" if result.target == "particle" else "membranes"
        console.print(
            f"{what} {probe['polarity']} ({why})"
            + (f", radius {size:.1f} voxels ({probe['radius_source']})" if size else "")
            + (f", worked binned {work['binning']}x" if work.get("binning", 1) > 1 else ""))
    console.print(f"outputs in [bold]{escape(str(out_dir))}[/bold]: " + ", ".join(sorted(written)))
