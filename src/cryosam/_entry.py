"""The ``cryosam`` console script: signals are handled from the first instruction, so Ctrl-C
or SIGTERM while Python is still importing torch ends with one line and the right exit code
(130, 143), not a traceback. Only the standard library is imported here."""

from __future__ import annotations

import sys


def main() -> int:
    """Import the CLI with signals handled, then run it."""
    import signal

    def _sigterm(signum: int, frame: object) -> None:
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, _sigterm)
    try:
        from cryosam.cli import main as cli_main
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C) while starting; nothing was written", file=sys.stderr)
        return 130
    except SystemExit as exc:
        if exc.code == 143:
            print("terminated (SIGTERM) while starting; nothing was written", file=sys.stderr)
        raise
    return cli_main()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
