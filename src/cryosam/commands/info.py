"""``cryosam info TOMO``: what cryosam reads from a tomogram, before running anything on it."""

from __future__ import annotations

import warnings
from pathlib import Path

import typer


def _fmt_triplet(values: tuple[float, float, float] | None, unit: str = "") -> str:
    if values is None:
        return "unknown"
    z, y, x = values
    return f"x {x:.6g}, y {y:.6g}, z {z:.6g}{unit}"


def info(
    tomo: Path = typer.Argument(..., help="Tomogram (MRC: .mrc, .rec, .map, also .gz/.bz2)."),
    voxel_size: float | None = typer.Option(
        None, "--voxel-size", help="Voxel size in Å, overriding the header."
    ),
) -> None:
    """Print a tomogram's size, voxel size, origin, data type and value range."""
    from cryosam.io import CryosamWarning, read_tomogram

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CryosamWarning)
        tomogram = read_tomogram(tomo, voxel_size=voxel_size)
    for w in caught:
        if issubclass(w.category, CryosamWarning):
            typer.echo(f"warning: {w.message}", err=True)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)

    d, h, w_ = tomogram.shape
    lo, hi = tomogram.value_range if tomogram.value_range is not None else (0.0, 0.0)
    data = tomogram.data
    size_mb = d * h * w_ * 4 / 2**20
    vs_source = "from --voxel-size" if voxel_size is not None else "from the header"
    lines = [
        f"file:        {tomogram.path}",
        f"size:        x {w_}, y {h}, z {d} voxels (array [z, y, x] = {d}×{h}×{w_})",
        f"voxel size:  {_fmt_triplet(tomogram.voxel_size, ' Å')} ({vs_source})",
        f"origin:      {_fmt_triplet(tomogram.origin, ' Å')}",
        f"stored as:   MRC mode {tomogram.mode}, {tomogram.file_dtype}",
        f"read as:     {data.dtype} ({size_mb:.1f} MiB), "
        + ("memory-mapped from the file" if tomogram.memory_mapped else "in memory"),
        f"values:      min {lo:.6g}, max {hi:.6g}",
    ]
    if tomogram.voxel_size is not None:
        z, y, x = (n * s for n, s in zip(tomogram.shape, tomogram.voxel_size, strict=True))
        lines.append(f"extent:      x {x / 10:.6g}, y {y / 10:.6g}, z {z / 10:.6g} nm")
    typer.echo("\n".join(lines))


def register(app: typer.Typer) -> None:
    """Add ``cryosam info``."""
    app.command("info")(info)
