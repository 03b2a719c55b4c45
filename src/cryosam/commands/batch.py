"""``cryosam batch DATASET --out DIR (--points CLICKS | --query Q)``: a whole dataset.

One output folder per tomogram (``DIR/TS_01/``, the files of ``cryosam segment``), plus
``DIR/batch.csv`` and a summary; a rerun skips what is complete for the same inputs and
parameters (:mod:`cryosam.batch`); Ray runs the workers (:mod:`cryosam.batch_ray`). Every
``cryosam segment`` option that applies to a dataset is accepted (copied from ``segment``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

from cryosam.commands.query import segment_values, with_segment_options
from cryosam.errors import InputError, Stopped, Terminated

# segment options that name one tomogram, or that batch defines itself
BATCH_EXCLUDED = frozenset({"tomo", "points", "query", "out", "overwrite", "copick", "run",
                            "copick_session", "tomo_name", "star_tomo_name", "negative_points"})
COPICK_SELECTORS = {"object_name": "object", "voxel_spacing": "voxel_spacing",
                    "tomo_type": "tomo_type", "clicks_user": "clicks_user",
                    "clicks_session": "clicks_session"}


def register(app: typer.Typer) -> None:
    """Add ``batch``."""

    @app.command(cls=with_segment_options(BATCH_EXCLUDED))
    def batch(
        ctx: typer.Context,
        dataset: Path = typer.Argument(..., help="A folder of tomograms, a text file listing "
                                       "them (one per line), or a copick config JSON (all "
                                       "runs; with --object)."),
        out: Path = typer.Option(..., "--out", "-o", help="Output folder: one folder per "
                                 "tomogram plus batch.csv."),
        points: Path | None = typer.Option(None, "--points", "-p", help="Clicks: one STAR/CSV "
                                           "with a tomogram-name column (rlnTomoName, "
                                           "rlnMicrographName, tomo_name) or a folder of "
                                           "per-tomogram files (TS_01.csv, TS_01.star)."),
        query: Path | None = typer.Option(None, "--query", help="A saved query (`cryosam "
                                          "query`): pick in every tomogram with no clicks."),
        workers: int | None = typer.Option(None, "--workers", min=0, help="Worker processes "
                                           "(default: one per GPU, else one per 8 CPUs); 0 = "
                                           "in this process, one tomogram after another."),
        no_ray: bool = typer.Option(False, "--no-ray", help="Run in this process without "
                                    "Ray (= --workers 0)."),
        ray_address: str | None = typer.Option(None, "--ray-address", help="Run on an "
                                               "existing Ray cluster (e.g. auto, or "
                                               "HEAD_IP:6379)."),
        shard: str | None = typer.Option(None, "--shard", help="Only shard i of n (i from 0), "
                                         "e.g. $SLURM_ARRAY_TASK_ID/4; writes "
                                         "batch-<i>-of-<n>.csv."),
        force: bool = typer.Option(False, "--force", help="Redo every tomogram, even those "
                                   "complete for the same inputs and parameters."),
    ) -> None:
        """Pick in every tomogram of a dataset, resumably, on Ray (or in this process)."""
        from cryosam import batch as batching
        from cryosam import batch_ray, io, progress
        from cryosam._atomic import check_writable, held_lock, output_lock, sweep_stale
        from cryosam.commands.query import build_config
        from cryosam.commands.segment import check_cache_dir

        values, given = segment_values(ctx)
        quiet = progress.settle_quiet(bool(values.get("quiet")))
        copick = batching.is_copick_config(dataset)
        check_modes(dataset, copick, points, query, values, workers, no_ray, ray_address)
        check_writable(out, "--out", into=True)  # a file there, or a folder not writable
        saved = None
        if query is not None:
            from cryosam.query import SavedQuery

            saved = SavedQuery.load(query)
        cfg = build_config(values, given, saved.config() if saved is not None else None)
        if saved is not None:
            saved.check_config(cfg)
        cache_dir = values.get("cache_dir")
        if cache_dir is not None:
            check_cache_dir(Path(cache_dir))
        from cryosam.pipeline import CryoSAM

        match = values.get("match")
        if match is None:
            match = cfg.propagation.target == "particle"
        CryoSAM(cfg).check_weights(saved is not None or match)  # before any work
        if copick:
            selectors = {key: values.get(p) for p, key in COPICK_SELECTORS.items()}
            tasks = batching.tasks_from_copick(dataset, out, selectors, saved is None)
        else:
            tasks = batching.tasks_from_files(dataset, out, points)
        with_clicks = [t for t in tasks if not t.missing]
        if not with_clicks:
            raise InputError(f"--points {points or dataset}: no clicks for any tomogram of "
                             f"{dataset} ({tasks[0].missing}); check the names")
        if len(with_clicks) < len(tasks) and not quiet:
            left = [t.name for t in tasks if t.missing]
            typer.echo(f"warning: {len(left)} tomogram(s) have no clicks and are left out: "
                       f"{', '.join(left[:10])}{', ...' if len(left) > 10 else ''}", err=True)
        tasks = batching.shard(tasks, shard)
        table = out / ("batch.csv" if shard is None else
                       "batch-{}-of-{}.csv".format(*shard.split("/")))
        options = batching.Options(
            match=values.get("match"), voxel_size=values.get("voxel_size"),
            points_unit=_plain(values.get("points_unit")) or "voxel",
            points_pixel_size=values.get("points_pixel_size"),
            points_bin=values.get("points_bin"),
            star=tuple(_plain(s) for s in values["star"]) if values.get("star") else None,
            tilt_series_pixel_size=values.get("tilt_series_pixel_size"),
            cache_dir=None if cache_dir is None else str(Path(cache_dir).resolve()),
            force=force)
        io.StarOutputs(options.star, None, options.tilt_series_pixel_size)  # before any work
        say = None if quiet else typer.echo
        if out.is_dir():
            sweep_stale(out)  # what killed batches left: temporaries, staging folders
        started = time.perf_counter()
        outcomes: list[Any] = []
        combined: dict[str, Any] = {}
        with output_lock(table):  # one batch per table; shards of one dataset run side by side
            # a full run and a shard would do the same tomograms twice; checked holding our
            # own lock, so of two that start together at least one sees the other
            other = held_lock(out, ".batch.csv.lock" if shard else ".batch-*.csv.lock")
            if other is not None:
                raise InputError(f"{out}: {'a full batch' if shard else 'a --shard'} is "
                                 f"writing this --out ({other.name}); wait for it, or run "
                                 f"{'the shards' if shard else 'the full batch'} after it")
            engine: Any = None
            try:
                if no_ray or workers == 0:
                    engine = batch_ray.InProcess(cfg, options, saved)
                else:
                    engine = batch_ray.RayEngine(cfg, options, saved, workers=workers,
                                                 address=ray_address)
                if say:
                    say(f"{len(tasks)} tomogram(s) from {dataset} {engine.description} "
                        f"(ready in {engine.startup_seconds:.1f} s)")
                batching.drop_combined(out, points)  # rewritten at the end, never stale
                outcomes = batch_ray.run_batch(tasks, engine, table, say=say)
                combined = ({} if shard is not None
                            else batching.combine_stars(out, outcomes, points))
            except (KeyboardInterrupt, Terminated) as exc:
                sigterm = isinstance(exc, Terminated)
                raise Stopped(f"{'terminated (SIGTERM)' if sigterm else 'interrupted (Ctrl-C)'}"
                              f": the finished tomograms are complete in {out} (see "
                              f"{table.name}); "
                              + ("run it again without --force to finish (with --force every "
                                 "tomogram is redone; without it, those not redone by this run "
                                 "keep their earlier outputs)" if force else
                                 "run the same command again to resume"),
                              143 if sigterm else 130) from None
            finally:
                if engine is not None:
                    engine.close()
        elapsed = time.perf_counter() - started
        failed = [o for o in outcomes if o.status == "failed"]
        if values.get("debug"):
            for o in failed:
                if o.detail:
                    typer.echo(f"--- {o.tomogram}\n{o.detail}", err=True)
        if not quiet:
            print_summary(outcomes, elapsed, table)
            for path, tomograms, particles in combined.values():
                typer.echo(f"  {path}: {particles} particle(s) of {tomograms} tomogram(s)")
            if shard is not None:
                typer.echo("  a shard writes no dataset STAR files: when every shard is done, "
                           "run the same command without --shard")
        if failed:
            raise typer.Exit(1)


def check_modes(dataset: Path, copick: bool, points: Path | None, query: Path | None,
                values: dict[str, Any], workers: int | None, no_ray: bool,
                ray_address: str | None) -> None:
    """Before any work: clicks or a query (copick: its picks, or a query), and one engine."""
    if points is not None and query is not None:
        raise InputError("--points and --query both say what to look for; give one")
    if copick:
        if points is not None:
            raise InputError(f"{dataset}: a copick project holds its clicks (the picks of "
                             "--object); drop --points, or use --query")
        if not values.get("object_name"):
            raise InputError(f"{dataset}: a copick project needs --object NAME: the pickable "
                             "object whose picks are the clicks and that cryosam writes")
    else:
        extra = [f"--{p.replace('_', '-')}".replace("object-name", "object")
                 for p in COPICK_SELECTORS if values.get(p) is not None]
        if extra:
            raise InputError(f"{extra[0]} selects inside a copick project; DATASET {dataset} "
                             "is not a copick config JSON")
        if points is None and query is None:
            raise InputError("say what to look for: --points CLICKS (a STAR/CSV with tomogram "
                             "names, or a folder of click files) or --query FILE")
    if ray_address and (no_ray or workers == 0):
        raise InputError("--ray-address runs on a Ray cluster; drop --no-ray/--workers 0")
    if no_ray and workers:
        raise InputError("--no-ray runs one worker in this process; drop --workers")
    if ray_address:
        from cryosam.batch_ray import reachable

        reachable(ray_address)  # ray.init retries an unreachable one for minutes


def _plain(value: Any) -> Any:
    return getattr(value, "value", value)


def print_summary(outcomes: list[Any], elapsed: float, table: Path) -> None:
    """Counts per status, the rate, the failures and where the table is."""
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    ran = counts.get("done", 0)
    rate = f", {ran / elapsed * 3600:.0f} tomograms/hour" if ran and elapsed > 0 else ""
    typer.echo("batch: " + ", ".join(f"{n} {s}" for s, n in counts.items())
               + f" in {elapsed:.1f} s{rate}; {table}")
    for o in [o for o in outcomes if o.status == "failed"][:10]:
        typer.echo(f"  failed {o.tomogram}: {o.error}")


