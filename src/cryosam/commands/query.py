"""``cryosam query TOMO --points P --out NAME.cryosam-query``: save a query for other tomograms.

The command takes every ``cryosam segment`` option that shapes the query (encoder, segmenter,
polarity, size, ...): they are copied from ``segment``'s own definition
(:func:`with_segment_options`), so the two cannot drift; ``cryosam batch`` uses the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand, TyperOption

from cryosam import config as configuration
from cryosam._atomic import check_writable, writing
from cryosam.commands import segment as segment_command
from cryosam.config import CryosamConfig
from cryosam.errors import InputError
from cryosam.utils import committed

META_KEY = "cryosam.segment_options"

# segment options that make no sense when saving a query
QUERY_EXCLUDED = frozenset({
    "tomo", "out", "overwrite", "match", "query", "copick", "run", "object_name",
    "voxel_spacing", "tomo_type", "clicks_user", "clicks_session", "copick_session", "star",
    "star_tomo_name", "tilt_series_pixel_size"})


def segment_parameters() -> list[Any]:
    """``cryosam segment``'s click parameters, as registered (defaults from the config)."""
    app = typer.Typer(add_completion=False)
    segment_command.register(app)
    command = typer.main.get_command(app)  # one command: the command itself
    if hasattr(command, "commands"):  # a group (typer vendors its own click)
        command = command.commands["segment"]
    return list(command.params)


def with_segment_options(excluded: frozenset[str]) -> type[TyperCommand]:
    """A command class that adds ``segment``'s options (but ``excluded`` and the command's
    own) to a command; their values land in ``ctx.meta[META_KEY]``, read with
    :func:`segment_values`."""

    class WithSegmentOptions(TyperCommand):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            own = {p.name for p in self.params}
            self.shared = [p for p in segment_parameters()
                           if isinstance(p, TyperOption) and p.name not in own
                           and p.name not in excluded]
            help_option = [p for p in self.params if p.name == "help"]
            self.params = ([p for p in self.params if p.name != "help"] + self.shared
                           + help_option)

        def invoke(self, ctx: typer.Context) -> Any:
            ctx.meta[META_KEY] = {p.name: ctx.params.pop(p.name) for p in self.shared
                                  if p.name in ctx.params}
            return super().invoke(ctx)

    return WithSegmentOptions


def segment_values(ctx: typer.Context) -> tuple[dict[str, Any], dict[str, Any]]:
    """(every shared segment option's value, the configuration options given on the command
    line) for a command made with :func:`with_segment_options`."""
    values = dict(ctx.meta.get(META_KEY, {}))
    given = {p: values[p] for p in segment_command.OPTION_PATHS
             if p in values and segment_command._given(ctx, p)}
    return values, given


def build_config(values: dict[str, Any], given: dict[str, Any],
                 base: CryosamConfig | None = None) -> CryosamConfig:
    """``base`` (a saved query's parameters, else the defaults), then ``--config`` on top of
    it, then the options given."""
    start = base or configuration.default_config()
    if values.get("config") is not None:
        start = CryosamConfig.from_file(Path(values["config"]), base=start)
    return segment_command.config_from_cli(start, given)


def register(app: typer.Typer) -> None:
    """Add ``query``."""

    @app.command(cls=with_segment_options(QUERY_EXCLUDED))
    def query(
        ctx: typer.Context,
        tomo: Path = typer.Argument(..., help="Tomogram with the clicks (.mrc/.rec/.map)."),
        out: Path = typer.Option(..., "--out", "-o", help="Query file to write, e.g. "
                                 "ribosome.cryosam-query."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing query "
                                       "file."),
    ) -> None:
        """Save what matching needs from the clicks, to pick in other tomograms with
        `cryosam segment OTHER --query FILE` or `cryosam batch DATASET --query FILE`."""
        from cryosam import progress
        from cryosam.pipeline import CryoSAM
        from cryosam.query import is_query_file

        values, given = segment_values(ctx)
        quiet = progress.settle_quiet(bool(values.get("quiet")))
        if values.get("points") is None:
            raise InputError("cryosam query needs the clicks: --points CLICKS")
        if out.exists() and (out.is_dir() or not overwrite or not is_query_file(out)):
            why = ("is a folder" if out.is_dir() else "exists; pass --overwrite" if not
                   overwrite else "is not a query file, so --overwrite leaves it")
            raise InputError(f"--out {out}: {why}; choose another name")
        check_writable(out, "--out", folder=False)
        if values.get("points_pixel_size") is not None and values.get("points_bin") is not None:
            raise InputError("--points-pixel-size and --points-bin say the same thing; give one")
        cfg = build_config(values, given)
        cache_dir = values.get("cache_dir")
        if cache_dir is not None:
            segment_command.check_cache_dir(Path(cache_dir))
        unit = values.get("points_unit") or "voxel"
        saved = CryoSAM(cfg).make_query(
            tomo, Path(values["points"]), cache_dir=cache_dir,
            voxel_size=values.get("voxel_size"), points_unit=getattr(unit, "value", unit),
            tomo_name=values.get("tomo_name"), points_pixel_size=values.get("points_pixel_size"),
            points_bin=values.get("points_bin"),
            negative_points=values.get("negative_points"))
        with writing(out, "--out"):
            saved.save(out)
        with committed():
            if quiet:
                return
            s = saved.summary()
            typer.echo(f"query saved to {out}: {s['queries']} vector(s) of {s['dim']} from "
                       f"{saved.source.get('clicks')} click(s) on {saved.source.get('name')}, "
                       f"encoder {saved.encoder_id}, {saved.polarity} particles, mask "
                       f"{s['mask_voxels']} voxels, binning {saved.binning}")
