"""The ``cryosam`` command line: a thin typer layer over the Python API.

Every subcommand lives in ``cryosam.commands.<name>`` and is listed in :data:`COMMANDS`.
Errors of type :class:`cryosam.errors.CryosamError` end as one line on stderr with exit code 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys

import typer

import cryosam
from cryosam.commands import batch, bench, demo, evaluate, info, query, segment, simulate, weights
from cryosam.errors import CryosamError, Stopped, Terminated

# in --help order
COMMANDS = (segment, query, batch, demo, simulate, evaluate, info, weights, bench)

_DEBUG = False


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cryosam {cryosam.__version__}")
        raise typer.Exit()


def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or summaries."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Options shared by every command."""
    global _DEBUG
    _DEBUG = _DEBUG or debug  # main() has seen a --debug after the command already
    from cryosam import progress

    progress.set_quiet(quiet)


def build_app() -> typer.Typer:
    """The ``cryosam`` typer app with every command of :data:`COMMANDS` registered.

    Commands take their option defaults from the configuration when they are registered.
    """
    new = typer.Typer(
        name="cryosam",
        help="Training-free particle picking and segmentation of cryo-ET tomograms "
        "(CryoSAM: DINOv2 features + SAM cross-plane self-prompting).",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    new.callback()(_root)
    for command in COMMANDS:
        command.register(new)
    return new


app = build_app()


def _show_warning(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
    """Warnings as one ``warning: ...`` line on stderr (full location with --debug)."""
    if _DEBUG:
        text = f"warning: {message} ({category.__name__} at {filename}:{lineno})"
    else:
        text = f"warning: {message}"
    print(text, file=file or sys.stderr)


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def install_signal_handlers() -> None:
    """SIGTERM raises :class:`Terminated` (cleanup runs, exit 143); SIGINT stays Python's
    KeyboardInterrupt (exit 130). Only possible in the main thread."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def _debug_in_front(args: list[str]) -> list[str]:
    """``--debug`` after a command that has no option of that name (evaluate, simulate, ...)
    becomes the global ``cryosam --debug``, so it works after any command as README says."""
    if "--debug" not in args:
        return args
    import typer.main

    group = typer.main.get_command(app)
    name = next((a for a in args if not a.startswith("-")), None)
    sub = getattr(group, "commands", {}).get(name)
    if sub is not None and any("--debug" in p.opts for p in sub.params):
        return args
    return ["--debug", *[a for a in args if a != "--debug"]]


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code (2 bad input, 130 SIGINT, 143
    SIGTERM), with one line on stderr for each failure."""
    global _DEBUG
    import logging
    import warnings

    args = list(argv if argv is not None else sys.argv[1:])
    _DEBUG = "--debug" in args
    args = _debug_in_front(args)
    warnings.showwarning = _show_warning
    # the CLI prints what it has to say itself; a library that sends the root logger to the
    # terminal (copick does on import) must not add cryosam's log records to it
    logging.getLogger("cryosam").propagate = False
    install_signal_handlers()
    try:
        code = app(args=args, standalone_mode=False)
    except CryosamError as exc:
        if _DEBUG:  # the traceback, and still the exit code of bad input
            import traceback

            traceback.print_exc()
        typer.echo(f"error: {exc}", err=True)
        return 2
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except typer.Abort:
        typer.echo("interrupted", err=True)
        return 130
    except KeyboardInterrupt:
        typer.echo("interrupted (Ctrl-C); nothing was written", err=True)
        return 130
    except Terminated:
        typer.echo("terminated (SIGTERM); nothing was written", err=True)
        return 143
    except Stopped as exc:  # the command has said what it kept
        typer.echo(exc.message, err=True)
        return exc.code
    except Exception as exc:  # usage errors from click (or typer's own copy of it)
        if callable(getattr(exc, "show", None)) and hasattr(exc, "exit_code"):
            if type(exc).__name__ == "NoArgsIsHelpError" or not callable(
                    getattr(exc, "format_message", None)):
                exc.show()  # a bare command prints its help
            else:  # one line, like every other bad input
                ctx = getattr(exc, "ctx", None)
                see = f" (see {ctx.command_path} --help)" if ctx is not None else ""
                typer.echo(f"error: {exc.format_message()}{see}", err=True)
            return int(exc.exit_code or 2)
        raise
    if isinstance(code, int) and code:  # typer turns Ctrl-C into a returned 130
        if code == 130:
            typer.echo("interrupted (Ctrl-C); nothing was written", err=True)
        return code
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
