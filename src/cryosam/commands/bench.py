"""``cryosam bench``: speed and memory figures for each pipeline stage."""

from __future__ import annotations

import importlib
import pkgutil

import typer

from cryosam import benchmarks


def register(app: typer.Typer) -> None:
    """Add the ``bench`` group with one subcommand per module in :mod:`cryosam.benchmarks`."""
    bench = typer.Typer(help="Measure speed and memory of pipeline stages (prints figures).",
                        no_args_is_help=True)
    found = False
    for info in sorted(pkgutil.iter_modules(benchmarks.__path__), key=lambda m: m.name):
        importlib.import_module(f"cryosam.benchmarks.{info.name}").register(bench)
        found = True
    if found:
        app.add_typer(bench, name="bench")
