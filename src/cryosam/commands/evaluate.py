"""``cryosam evaluate`` (picks vs truth) and ``cryosam evaluate-mask`` (mask vs mask)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import typer

from cryosam.errors import CryosamWarning, InputError
from cryosam.utils import parse_shape


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become None, numpy scalars become Python numbers."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _print_table(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(name, value)
    Console(soft_wrap=True).print(table)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.4f}"
    return str(value)


def evaluate(
    picks: Path = typer.Argument(..., help="Picks: CSV (x,y,z[,score]) or STAR."),
    truth: Path = typer.Argument(..., help="True positions: CSV (x,y,z[,kind]) or STAR."),
    radius: float = typer.Option(..., "--radius", "-r",
                                 help="Match distance in voxels (e.g. the particle radius)."),
    kind: str | None = typer.Option(
        None, "--kind", help="Keep only truth rows whose 'kind' column is this (and picks "
        "rows too, when the picks have a 'kind' column)."),
    score_column: str = typer.Option("score", "--score-column",
                                     help="Picks column ranking the picks (best F1, AP)."),
    voxel_size: float | None = typer.Option(
        None, "--voxel-size", help="Å per voxel (needed for RELION-5 STAR coordinates)."),
    shape: str | None = typer.Option(
        None, "--shape", help="Tomogram size z,y,x (needed for RELION-5 STAR coordinates)."),
    tomo_name: str | None = typer.Option(None, "--tomo-name",
                                         help="Tomogram to use from a multi-tomogram STAR."),
    points_unit: str = typer.Option(
        "voxel", "--points-unit", help="Unit of the PICKS CSV's coordinates: voxel or "
        "angstrom (with --voxel-size; TARDIS and CryoET Data Portal files are in Å)."),
    truth_unit: str = typer.Option(
        "voxel", "--truth-unit", help="Unit of the TRUTH CSV's coordinates: voxel or angstrom."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Precision, recall and F1 of picks against the truth, one-to-one within --radius.

    With a score column: also the best F1 over score thresholds and average precision.
    """
    import numpy as np

    from cryosam.io import read_points
    from cryosam.metrics import evaluate_picks

    size = parse_shape(shape) if shape is not None else None
    opts = {"shape": size, "voxel_size": voxel_size, "tomo_name": tomo_name,
            "check_bounds": False}
    pk = read_points(picks, **opts, unit=points_unit, empty_ok=True)  # none picked scores 0
    tr = read_points(truth, **opts, unit=truth_unit, unit_option="--truth-unit")
    t_zyx, p_zyx = tr.zyx, pk.zyx
    p_keep = np.ones(len(p_zyx), dtype=bool)
    present = sorted({str(k) for k in tr.columns.get("kind", [])})
    if kind is None and len(present) > 1:
        warnings.warn(f"{truth}: holds {len(present)} kinds ({', '.join(present)}); every "
                      "row counts as truth: pass --kind to score one", CryosamWarning,
                      stacklevel=2)
    if kind is not None:
        kinds = tr.columns.get("kind")
        if kinds is None:
            raise InputError(f"{truth}: has no 'kind' column to filter by --kind {kind}")
        keep = np.asarray([str(k) == kind for k in kinds], dtype=bool)
        if not keep.any():
            found = ", ".join(sorted({str(k) for k in kinds}))
            raise InputError(f"{truth}: no rows of kind {kind!r}; kinds present: {found}")
        t_zyx = t_zyx[keep]
        if "kind" in pk.columns:
            p_keep = np.asarray([str(k) == kind for k in pk.columns["kind"]], dtype=bool)
            p_zyx = p_zyx[p_keep]
    scores = pk.columns.get(score_column.lower())
    if scores is None and score_column.lower() != "score":  # the default may be absent
        have = ", ".join(pk.columns) or "none besides x, y, z"
        raise InputError(f"{picks}: no column {score_column!r} for --score-column; "
                         f"columns: {have}")
    values = None
    if scores is not None:
        try:
            values = np.asarray(scores, dtype=np.float64)[p_keep]
        except (TypeError, ValueError):
            raise InputError(f"{picks}: column '{score_column}' is not numeric") from None
    result = evaluate_picks(p_zyx, t_zyx, radius, scores=values)
    report: dict[str, Any] = {"picks": str(picks), "truth": str(truth), "kind": kind}
    report.update(result.summary())
    report = {k: _clean(v) for k, v in report.items()}
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    names = ["n_picks", "n_truth", "tp", "fp", "fn", "precision", "recall", "f1",
             "mean_distance", "best_f1", "best_threshold", "best_precision", "best_recall",
             "average_precision"]
    rows = [(n, _fmt(report[n] if report[n] is not None else float("nan")))
            for n in names if n in report]
    title = f"picks vs truth{f' ({kind})' if kind else ''}, radius {radius:g} voxels"
    _print_table(title, rows)


def _label_fix(data: Any) -> str:
    """What to pass instead, for an error line: a few of the volume's integer labels, or why
    it has none."""
    import numpy as np

    values = np.unique(data[data != 0])
    if not len(values):
        return "it holds only zeros: is it the right file?"
    if not np.all(values == np.round(values)):
        return "its values are not integer labels: score it with --threshold"
    shown = ", ".join(str(int(v)) for v in values[:10])
    more = f", ... ({len(values)} labels)" if len(values) > 10 else ""
    return f"pass one of its labels: {shown}{more}"


def _inside(data: Any, path: Path, label: int | None, threshold: float, option: str) -> Any:
    """Which voxels count as inside: those equal to ``label``, else those above
    ``threshold``; a label that no voxel holds is an error naming the file."""
    if label is None:
        return data > threshold
    inside = data == label
    if not inside.any():
        raise InputError(f"{path}: no voxel holds label {label} ({option} {label}); "
                         f"{_label_fix(data)}")
    return inside


def _kind_ids(truth: Path, kind: str) -> tuple[list[int], int]:
    """Ids of the particles of ``kind`` in the ``truth.csv`` beside ``truth`` (the id,kind
    table that ``cryosam simulate`` writes beside ``labels.mrc``), and how many particles
    the table lists."""
    import numpy as np

    from cryosam.io import read_points

    table = truth.parent / "truth.csv"
    if not table.is_file():
        raise InputError(f"{truth}: --kind {kind} reads the id,kind table beside it, as "
                         f"cryosam simulate writes it, and there is no {table}; score one "
                         "label with --truth-label instead")
    columns = read_points(table, check_bounds=False).columns
    if not {"id", "kind"} <= set(columns):
        raise InputError(f"{table}: --kind needs rows with 'id' and 'kind' columns, as "
                         "cryosam simulate writes them")
    kinds, ids = np.asarray(columns["kind"]).astype(str), np.asarray(columns["id"])
    if not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"{table}: column 'id' holds a value that is not an integer label")
    if kind not in kinds:
        found = ", ".join(sorted(set(kinds)))
        raise InputError(f"{table}: no particle of kind {kind!r}; kinds present: {found}")
    return [int(i) for i in ids[kinds == kind]], len(ids)


def _warn_if_unlike(pred: Path, a: Any, truth: Path, b: Any) -> None:
    """Warn when the two volumes' headers give different voxel sizes: masks of one shape from
    tomograms sampled differently are not of the same tomogram."""
    va, vb = a.mean_voxel_size, b.mean_voxel_size
    if va and vb and abs(va - vb) > 0.01 * max(va, vb):
        warnings.warn(f"{pred} has {va:g} Å voxels and {truth} {vb:g} Å: are they masks of "
                      "the same tomogram?", CryosamWarning, stacklevel=3)


def evaluate_mask(
    pred: Path = typer.Argument(..., help="Predicted mask or label volume (MRC)."),
    truth: Path = typer.Argument(..., help="True mask or label volume (MRC)."),
    threshold: float = typer.Option(
        0.5, "--threshold", help="Voxels above this count as inside (each volume scored "
        "without a label option)."),
    pred_label: int | None = typer.Option(
        None, "--pred-label", help="Only PRED's voxels equal to this label count as inside "
        "(e.g. an instance_id of instances.mrc)."),
    truth_label: int | None = typer.Option(
        None, "--truth-label", help="Only TRUTH's voxels equal to this label count as inside "
        "(e.g. a particle id of cryosam simulate's labels.mrc, listed in its truth.csv)."),
    kind: str | None = typer.Option(
        None, "--kind", help="Only TRUTH's particles of this kind count as inside: their ids "
        "from the truth.csv beside TRUTH (cryosam simulate's labels.mrc and truth.csv)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Dice and IoU of a predicted mask against the true one (same shape).

    Inside is above --threshold, or one label of a label volume (--pred-label,
    --truth-label), or one kind of cryosam simulate's labels.mrc (--kind).
    """
    import numpy as np

    from cryosam.io import read_tomogram
    from cryosam.metrics import mask_metrics

    if kind is not None and truth_label is not None:
        raise InputError(f"--kind {kind} and --truth-label {truth_label} both choose TRUTH's "
                         "voxels: give one of them")
    if not np.isfinite(threshold):  # NaN counts no voxel as inside: Dice 0 without a word
        raise InputError(f"--threshold {threshold}: give a number (voxels above it are inside)")
    ids, listed = _kind_ids(truth, kind) if kind is not None else (None, 0)
    a = read_tomogram(pred)
    b = read_tomogram(truth)
    if a.shape != b.shape:
        raise InputError(f"{pred}: shape {a.shape} differs from {truth}: {b.shape} (z,y,x); "
                         "compare masks of the same tomogram")
    inside_pred = _inside(a.data, pred, pred_label, threshold, "--pred-label")
    if ids is None:
        inside_truth = _inside(b.data, truth, truth_label, threshold, "--truth-label")
    else:
        if listed > 1 and set(np.unique(b.data).tolist()) == {0, 1}:
            raise InputError(f"{truth}: holds only 0 and 1, a mask rather than the particle "
                             f"ids of the {listed} particles in {truth.parent / 'truth.csv'}; "
                             "--kind needs the labels.mrc written with it")
        inside_truth = np.isin(b.data, ids)
        if not inside_truth.any():
            raise InputError(f"{truth}: no voxel holds the id of a particle of kind {kind!r} "
                             f"({', '.join(map(str, ids[:10]))}{', ...' if len(ids) > 10 else ''}"
                             f" in {truth.parent / 'truth.csv'}); give the labels.mrc "
                             "written with that truth.csv")
    _warn_if_unlike(pred, a, truth, b)
    result = mask_metrics(inside_pred, inside_truth)
    if not result.n_pred and not result.n_truth:
        warnings.warn(f"{pred} and {truth}: no voxel is inside either mask (Dice and IoU "
                      "count that as 1); check --threshold or the labels", CryosamWarning,
                      stacklevel=2)
    chosen = {"pred_label": pred_label, "truth_label": truth_label, "kind": kind}
    report = {"pred": str(pred), "truth": str(truth), **chosen,
              "threshold": threshold,
              **result.summary()}
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    which = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in chosen.items() if v is not None)
    _print_table(f"mask vs truth{f' ({which})' if which else ''}",
                 [(k, _fmt(v)) for k, v in result.summary().items()])


def register(app: typer.Typer) -> None:
    """Add ``cryosam evaluate`` and ``cryosam evaluate-mask``."""
    app.command("evaluate")(evaluate)
    app.command("evaluate-mask")(evaluate_mask)
