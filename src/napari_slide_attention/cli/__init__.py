"""The ``slide-attention`` command line: everything the GUI does, headless.

Errors end the command with a non-zero status and one readable line on stderr
(``slide-attention: error: PATH: problem``); ``--debug`` shows the traceback.

Modules: ``parser`` (every subcommand and the shared option groups), ``driver`` (runs
a job with the progress or JSON-lines printer; SIGINT/SIGTERM stop it), and the
commands by topic: ``slides`` (info, synth, synth-cohort, tissue, demo), ``models``
(train, predict, evaluate), ``labels`` (labels export/import/show).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..jobs import Stopped
from .driver import EXIT_ERROR, EXIT_STOPPED, EventPrinter
from .parser import build_parser

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..slide.reader import SlideError

    try:
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
