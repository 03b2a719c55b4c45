"""Whole datasets: which tomograms, with which clicks, and where their outputs go.

A dataset is a folder of tomograms, a text file listing them, or a copick project (all runs).
Each becomes a :class:`Task` (plain data, sent to workers); :mod:`cryosam.batch_ray` runs them
and reports each as an :class:`Outcome` (a row of ``batch.csv``). Clicks come from one STAR/CSV
with a tomogram-name column, a folder of per-tomogram files, the copick project, or nowhere
(a saved query); a tomogram without clicks is listed as ``no-clicks`` and not run.
"""

from __future__ import annotations

import csv
import dataclasses
import io as _stringio
import json
import os
import uuid
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryosam import io
from cryosam._atomic import atomic_write_text
from cryosam.errors import CryosamWarning, InputError
from cryosam.io.names import csv_name_column, rows_named, shown, star_tomo_name
from cryosam.utils import tomo_stem

TOMO_SUFFIXES = (".mrc", ".rec", ".map")
CLICK_SUFFIXES = (".csv", ".star", ".txt", ".tsv")
STATUSES = ("done", "skipped", "failed", "no-clicks", "pending")  # pending: not run (yet)
# batch.csv
COLUMNS = ("tomogram", "status", "picks", "seconds", "error", "reason", "warnings")


@dataclass(frozen=True)
class Task:
    """One tomogram of the dataset: where it is, its clicks, where its outputs go."""

    name: str  # output folder name (tomogram stem or copick run)
    out: str  # absolute output folder
    tomogram: str | None = None  # absolute path (None for copick)
    points: str | None = None  # clicks file (None with a query or copick)
    points_name: str | None = None  # this tomogram's name in a combined clicks file
    copick: dict[str, Any] | None = None  # config, object and selectors for a copick run
    missing: str | None = None  # why it has no clicks (then it is not run)


@dataclass(frozen=True)
class Options:
    """What every task is run with besides the configuration (part of the resume rule)."""

    match: bool | None = None
    voxel_size: float | None = None
    points_unit: str = "voxel"
    points_pixel_size: float | None = None
    points_bin: int | None = None
    star: tuple[str, ...] | None = None
    tilt_series_pixel_size: float | None = None
    cache_dir: str | None = None  # not part of the rule: the cache never changes results
    force: bool = False
    # this batch, written to each run.json it completes (an interrupted batch reads it back)
    batch_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def record(self) -> dict[str, Any]:
        """The options that change results, as plain JSON."""
        skip = ("cache_dir", "force", "batch_id")
        return json.loads(json.dumps({k: v for k, v in dataclasses.asdict(self).items()
                                      if k not in skip}))


@dataclass
class Outcome:
    """How one task went (a row of ``batch.csv``)."""

    tomogram: str
    status: str  # one of STATUSES
    picks: int | None = None
    seconds: float = 0.0
    error: str = ""
    reason: str = ""  # why it was run or skipped
    warnings: list[str] = field(default_factory=list)
    detail: str = ""  # the traceback of an unexpected failure (shown with --debug)

    def row(self) -> dict[str, Any]:
        """This outcome as a row of ``batch.csv`` (:data:`COLUMNS`): picks blank when unknown,
        seconds to 0.01 s, the warnings joined by `` | ``; the traceback stays out."""
        return {"tomogram": self.tomogram, "status": self.status,
                "picks": "" if self.picks is None else self.picks,
                "seconds": f"{self.seconds:.2f}", "error": self.error, "reason": self.reason,
                "warnings": " | ".join(self.warnings)}


# --------------------------------------------------------------------------- the dataset


def is_copick_config(path: Path) -> bool:
    """A JSON file: a copick project's config (anything else is a list of tomograms)."""
    return path.is_file() and path.suffix.lower() == ".json"


def _is_tomogram_file(path: Path) -> bool:
    name = path.name.lower()
    for ext in (".gz", ".bz2"):
        name = name.removesuffix(ext)
    return path.is_file() and not path.name.startswith(".") and name.endswith(TOMO_SUFFIXES)


def dataset_tomograms(dataset: str | Path) -> list[Path]:
    """The tomogram files of a folder (sorted) or of a text list (one path a line, relative
    to the list's folder; blank lines and ``#`` comments ignored), as absolute paths. A
    symbolic link keeps its own name (``TS_01.mrc -> ../TS_01/tomogram.mrc`` is TS_01)."""
    path = Path(dataset)
    if path.is_dir():
        found = sorted(_absolute(p) for p in path.iterdir() if _is_tomogram_file(p))
        if not found:
            raise InputError(f"{path}: no tomograms (.mrc/.rec/.map, optionally .gz/.bz2) in "
                             "this folder; give a folder of tomograms, a text file listing "
                             "them or a copick config")
        return found
    if not path.is_file():
        raise InputError(f"{path}: not found; give a folder of tomograms, a text file listing "
                         "them or a copick config JSON")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read it as a list of tomograms ({exc}); give one "
                         "path per line") from None
    entries = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not entries:
        raise InputError(f"{path}: lists no tomograms; give one path per line")
    return [_absolute(path.parent / e) if not Path(e).is_absolute() else Path(e)
            for e in entries]


def _absolute(path: Path) -> Path:
    """``path`` made absolute and normalised without following symbolic links."""
    return Path(os.path.normpath(path.absolute()))


def tasks_from_files(dataset: str | Path, out: Path, points: Path | None) -> list[Task]:
    """One task per tomogram file, with its clicks from ``points`` (a combined STAR/CSV with
    a tomogram-name column, or a folder of per-tomogram files) or none (a saved query)."""
    tomos = dataset_tomograms(dataset)
    names: dict[str, Path] = {}
    for t in tomos:
        name = tomo_stem(t)
        if name in names:
            raise InputError(f"{dataset}: two tomograms are named {name} ({names[name]} and "
                             f"{t}); their outputs would share {out / name}; rename one")
        names[name] = t
    _warn_star_clashes(dataset, names)
    clicks = assign_clicks(points, list(names)) if points is not None else {}
    tasks = []
    for name, t in names.items():
        file, row_name, missing = clicks.get(name, (None, None, None))
        tasks.append(Task(name, str((out / name).resolve()), str(t),
                          None if file is None else str(Path(file).resolve()), row_name,
                          missing=missing))
    return tasks


def star_clashes(names: Iterable[str]) -> dict[str, list[str]]:
    """Tomograms whose STAR name is the same (``rec_TS_01`` and ``TS_01``, or Warp's
    ``TS_01_10.00Apx`` and ``TS_01_5.00Apx``): {STAR name: their names}. RELION-5 and Warp
    would take them for one tomogram."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(star_tomo_name(name), []).append(name)
    return {key: group for key, group in groups.items() if len(group) > 1}


def _warn_star_clashes(dataset: str | Path, names: dict[str, Path]) -> None:
    """Said before any work: clicks named for a clashing STAR name go to every tomogram
    that has it, and the dataset's STAR files leave them out."""
    for key, group in star_clashes(names).items():
        both = "both" if len(group) == 2 else "all"
        warnings.warn(f"{dataset}: {' and '.join(names[n].name for n in group)} are {both} "
                      f"{key} in STAR files (RELION-5's rlnTomoName, Warp's .tomostar): the "
                      f"dataset's STAR files leave them out, and clicks named {key} go to "
                      f"{both}; rename one or run them in separate batches", CryosamWarning,
                      stacklevel=3)


def assign_clicks(points: Path, names: list[str]
                  ) -> dict[str, tuple[Path | None, str | None, str | None]]:
    """{tomogram: (clicks file, its name in that file, why it has none)}."""
    out: dict[str, tuple[Path | None, str | None, str | None]] = {}
    if points.is_dir():
        files: dict[str, Path] = {}
        for f in sorted(points.iterdir()):
            if f.is_file() and f.suffix.lower() in CLICK_SUFFIXES:
                if f.stem in files:
                    raise InputError(f"--points {points}: {files[f.stem].name} and {f.name} both "
                                     f"hold clicks for {f.stem}; keep one")
                files[f.stem] = f
        for n in names:
            out[n] = ((files[n], None, None) if n in files
                      else (None, None, f"no clicks file {n}.csv/.star in {points}"))
        _unmatched(points, [f.name for stem, f in files.items() if stem not in names], names,
                   sum(n in files for n in names))
        return out
    if not points.is_file():
        raise InputError(f"--points {points}: not found; give a STAR/CSV with a tomogram-name "
                         "column or a folder of per-tomogram click files")
    in_file = _names_in(points)
    if in_file is None:  # no name column: only a single tomogram can use it
        if len(names) != 1:
            raise InputError(f"--points {points}: has no tomogram-name column (rlnTomoName, "
                             "rlnMicrographName or tomo_name) and the dataset has "
                             f"{len(names)} tomograms; add one or give a folder of click files")
        return {names[0]: (points, None, None)}
    for n in names:  # the spelling in the file of this tomogram's rows (rec_TS_01, TS_01.tomostar)
        hit = [v for v, h in zip(in_file, rows_named(in_file, n), strict=True) if h]
        value = n if n in in_file else (hit[0] if hit else None)
        out[n] = ((points, value, None) if value is not None
                  else (None, None, f"no clicks for {n} in {points.name}"))
    used = {v[1] for v in out.values()}
    _unmatched(points, [v for v in in_file if v not in used], names, len(used - {None}))
    return out


def _unmatched(points: Path, unused: list[str], names: list[str], matched: int) -> None:
    """Clicks that name no tomogram of the dataset (usually a typo, TS_1 for TS_01): refused
    when no tomogram got any (``matched`` 0), warned of otherwise; both sides named."""
    if not unused:
        return
    if not matched:
        raise InputError(f"--points {points}: its clicks name {shown(unused)}, none of them "
                         f"a tomogram of the dataset ({shown(names)}); check the names")
    warnings.warn(f"--points {points}: clicks for {shown(unused)} match no tomogram of the "
                  f"dataset and are not used (the dataset's: {shown(names)})", CryosamWarning,
                  stacklevel=3)


def _names_in(points: Path) -> list[str] | None:
    """Tomogram names of a combined clicks file (None: it has no name column)."""
    text = points.read_text(encoding="utf-8-sig", errors="replace")
    if points.suffix.lower() == ".star" or "data_" in text[:4096]:
        return io.star_tomo_names(points) or None
    ps = io.read_points(points, check_bounds=False, every_tomogram=True)
    column = csv_name_column(ps.columns)
    return None if column is None else list(dict.fromkeys(str(v) for v in ps.columns[column]))


def tasks_from_copick(config: Path, out: Path, selectors: dict[str, Any],
                      with_clicks: bool) -> list[Task]:
    """One task per run of a copick project; with clicks, runs without a pick set of the
    object (by anyone but cryosam, or ``clicks_user``) are listed as having none."""
    from cryosam.io.copick import COPICK_USER, open_root

    root = open_root(config)
    obj = selectors["object"]
    if root.get_object(obj) is None:
        raise InputError(f"--object {obj!r}: not a pickable object of {config}; it has "
                         f"{', '.join(sorted(o.name for o in root.pickable_objects))}")
    tasks = []
    for run in sorted(root.runs, key=lambda r: r.name):
        missing = None
        if with_clicks:
            user = selectors.get("clicks_user")
            sets = [p for p in run.get_picks(object_name=obj)
                    if (p.user_id == user if user else p.user_id != COPICK_USER)]
            if not any(len(p.points) for p in sets):
                missing = f"no pick set of {obj} with points in run {run.name}"
        tasks.append(Task(run.name, str((out / run.name).resolve()),
                          copick={"config": str(config.resolve()), **selectors},
                          missing=missing))
    if not tasks:
        raise InputError(f"{config}: the project has no runs")
    return tasks


def shard(tasks: list[Task], spec: str | None) -> list[Task]:
    """The tasks of shard ``i/n`` (0 <= i < n, round robin over the sorted dataset)."""
    if spec is None:
        return tasks
    try:
        i, n = (int(v) for v in spec.split("/"))
    except ValueError:
        raise InputError(f"--shard {spec!r}: give i/n, e.g. 0/4 (i from 0 to n-1)") from None
    if n < 1 or not 0 <= i < n:
        raise InputError(f"--shard {spec}: need 0 <= i < n, e.g. $SLURM_ARRAY_TASK_ID/4 with "
                         "--array=0-3")
    return tasks[i::n]


def write_table(path: Path, rows: dict[str, Outcome]) -> None:
    """``batch.csv``: one row per tomogram (tomogram, status, picks, seconds, error, reason,
    warnings)."""
    buffer = _stringio.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for outcome in rows.values():
        writer.writerow(outcome.row())
    atomic_write_text(path, buffer.getvalue())


def failed_before(path: Path) -> set[str]:
    """The tomograms an earlier ``batch.csv`` at ``path`` lists as failed (none when there
    is no such table or it cannot be read), so that a rerun can say why it retries them."""
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            return {row["tomogram"] for row in csv.DictReader(fh)
                    if row.get("status") == "failed" and row.get("tomogram")}
    except (OSError, ValueError, KeyError, csv.Error):
        return set()


def combine_stars(out: Path, outcomes: list[Outcome], keep: Path | None = None
                  ) -> dict[str, tuple[Path, int, int]]:
    """One STAR per tool for the whole dataset in ``out``: the particles of every tomogram
    done or skipped here, in the dataset's order (RELION-5 tells them apart by
    ``rlnTomoName``, Warp by ``rlnMicrographName``), so they go to RELION-5's extraction or
    to Warp in one file. A dataset file this run has no picks for is removed (it would hold
    an earlier run's). ``keep`` (this batch's clicks file) is not rewritten, with a warning.
    Returns {file name: (path, tomograms with picks, particles)}."""
    import pandas as pd
    import starfile

    from cryosam._atomic import atomic_path
    from cryosam.io._common import third_party_quiet

    finished = [o.tomogram for o in outcomes if o.status in ("done", "skipped")]
    clashes = star_clashes(finished)  # RELION-5 and Warp would merge their particles
    clashing = {t for group in clashes.values() for t in group}
    written: dict[str, tuple[Path, int, int]] = {}
    for name in io.STAR_FLAVOURS.values():
        if _is(out / name, keep):
            warnings.warn(f"{out / name}: not rewritten, it holds this batch's clicks "
                          "(--points); the tomograms' own files hold the new picks",
                          CryosamWarning, stacklevel=2)
            continue
        if clashes:
            warnings.warn(f"{out / name}: leaves out {', '.join(sorted(clashes))}, the STAR "
                          "name of more than one tomogram (rename one of them)",
                          CryosamWarning, stacklevel=2)
        parts, optics = [], None
        for f in (out / t / name for t in finished if t not in clashing):
            if not f.is_file():
                continue
            try:
                table, its_optics = io.read_particles(f)
            except InputError as exc:  # re-saved badly by hand: left out, said
                warnings.warn(f"{f}: left out of {out / name} ({exc})", CryosamWarning,
                              stacklevel=2)
                continue
            if len(table):
                parts.append(table)
                optics = optics if optics is not None else its_optics
        if not parts:
            (out / name).unlink(missing_ok=True)
            continue
        combined = {"particles": pd.concat(parts, ignore_index=True)}
        if isinstance(optics, pd.DataFrame):
            combined = {"optics": optics, **combined}
        with atomic_path(out / name, suffix=".star") as tmp, third_party_quiet():
            starfile.write(combined, tmp, float_format="%.6f")
        written[name] = (out / name, len(parts), len(combined["particles"]))
    return written


def drop_combined(out: Path, keep: Path | None = None) -> None:
    """Remove the dataset's STAR files before a batch runs: :func:`combine_stars` writes them
    again when the run ends over the whole dataset, and a shard or an interrupted run leaves
    none rather than files that no longer match the folders. ``keep`` (this batch's clicks
    file, which may be an earlier batch's dataset file) is never touched."""
    for name in io.STAR_FLAVOURS.values():
        if not _is(out / name, keep):
            (out / name).unlink(missing_ok=True)


def _is(path: Path, other: Path | None) -> bool:
    """Whether ``path`` is the file ``other`` names (this batch's clicks, say)."""
    return other is not None and path.resolve() == other.resolve()
