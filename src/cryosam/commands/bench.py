"""``cryosam bench``: speed and memory figures for each pipeline stage (printed, never asserted).

A thin layer: each benchmark lives in :mod:`cryosam.benchmarks` and registers its subcommand.
"""

from __future__ import annotations

import typer

from cryosam.benchmarks import accuracy, features, matching, pipeline, propagation

BENCHMARKS = (pipeline, accuracy, features, matching, propagation)


def register(app: typer.Typer) -> None:
    """Add the ``bench`` group with one subcommand per module of :data:`BENCHMARKS`."""
    bench = typer.Typer(help="Measure speed and memory of pipeline stages (prints figures).",
                        no_args_is_help=True)
    for module in BENCHMARKS:
        module.register(bench)
    app.add_typer(bench, name="bench")
