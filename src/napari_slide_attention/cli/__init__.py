"""The ``slide-attention`` command line: everything the GUI does, headless.

Errors end the command with one readable line on stderr and a non-zero status: bad
input (a file that cannot be read, an option out of range) exits 2 with
``slide-attention: error: PATH: problem``; a failure the tool did not foresee exits 1
with ``slide-attention: internal error: ...``; ``--debug`` shows the traceback.

Modules: ``parser`` (every subcommand and the shared option groups), ``driver`` (runs
a job with the progress or JSON-lines printer; SIGINT/SIGTERM stop it), and the
commands by topic: ``slides`` (info, synth, synth-cohort, tissue, demo), ``models``
(train, predict, evaluate), ``labels`` (labels export/import/show).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..jobs import Stopped
from .driver import EXIT_ERROR, EXIT_INTERNAL, EXIT_STOPPED, EventPrinter
from .parser import build_parser, check_options

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..slide.reader import SlideError

    try:
        check_options(args)
        return int(args.func(args) or 0)
    except (SlideError, ValueError, OSError) as exc:
        if args.debug:
            raise
        if getattr(args, "events", False):  # a program following the lines learns it too
            EventPrinter.emit("error", message=str(exc))
        print(f"slide-attention: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except (KeyboardInterrupt, Stopped):
        print("slide-attention: interrupted", file=sys.stderr)
        return EXIT_STOPPED
    except Exception as exc:  # a bug: still one line, never a wall of traceback
        if args.debug:
            raise
        message = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        if getattr(args, "events", False):
            EventPrinter.emit("error", message=f"internal error: {message}")
        print(
            f"slide-attention: internal error: {message} (please report it; --debug shows "
            "the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
