"""CLI command modules. Each defines ``register(app: typer.Typer) -> None``.

A new command is a new module here plus its name in :data:`cryosam.cli.COMMANDS`. Modules
import the heavy parts of cryosam inside their command functions, so ``cryosam --help`` is fast.
"""
