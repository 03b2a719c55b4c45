"""CLI command modules. Each module defines ``register(app: typer.Typer) -> None``.

``cryosam.cli`` imports every module here and calls its ``register``, so a new command is
one new file, and commands that are not built do not appear.
"""
