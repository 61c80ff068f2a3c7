"""The command line's one job driver: long work run as a ``jobs.Job``, its progress
printed for people (stderr) or as JSON lines for programs (stdout), stopped by signals.

SIGINT and SIGTERM call ``job.stop(signal name)`` while a job runs: the job ends at its
next progress event (never in the middle of writing a checkpoint or a result) and the
driver raises ``jobs.Stopped``, which the command turns into its message and status
``EXIT_STOPPED``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Generator, Iterator
from typing import Any, TypeVar

from ..jobs import Job, Progress

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERNAL",
    "EXIT_STOPPED",
    "EXIT_USAGE",
    "EventPrinter",
    "ProgressPrinter",
    "json_safe",
    "run_job",
    "stop_on_signals",
]

T = TypeVar("T")

# Bad input (a file that cannot be read, an option out of range): the user can fix it,
# as with a usage error, so both exit 2 with one line naming the file or option.
EXIT_ERROR = 2
EXIT_USAGE = 2
# A failure the tool did not foresee (a bug): one line too, the traceback with --debug.
EXIT_INTERNAL = 1
EXIT_STOPPED = 130  # what shells report for a command ended by Ctrl-C (128 + SIGINT)

# Stages that come many times a second: a live line on a terminal, nothing otherwise.
_LIVE_STAGES = ("step", "tiles")


class ProgressPrinter:
    """Prints progress events on stderr: one line per epoch/piece, a live line for steps
    and tiles on a terminal.

    Args:
        quiet: print nothing.

    Attributes:
        live: a live line is on the screen (the next line must start afresh).
    """

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.live = False

    def __call__(self, event: Progress) -> None:
        if self.quiet:
            return
        if event.stage in _LIVE_STAGES:
            if self.tty:
                text = event.message or f"{event.stage} {event.done}/{event.total}"
                print(f"\r{text:<78}", end="", file=sys.stderr, flush=True)
                self.live = True
            return
        self.end_live_line()
        total = f" [{event.done}/{event.total}]" if event.total else ""
        print(f"{event.stage}{total} {event.message}", file=sys.stderr, flush=True)

    def line(self, text: str) -> None:
        """Prints one line of text on stderr (after ending a live line)."""
        if self.quiet:
            return
        self.end_live_line()
        print(text, file=sys.stderr, flush=True)

    def end_live_line(self) -> None:
        """Ends the live line, if one is on the screen."""
        if self.live:
            print(file=sys.stderr)
            self.live = False


_DROP = object()


def json_safe(value: Any) -> Any:
    """Returns ``value`` reduced to what JSON carries, or a marker when none of it can go.

    Numbers, strings, bools and None stay (numpy scalars become Python numbers, NaN and
    infinities None, paths strings); lists, tuples and dicts keep their JSON-safe items;
    anything else (tensors, arrays, result objects) is dropped: an event line must stay
    small and parseable by any JSON reader.
    """
    if value is None or isinstance(value, bool | str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            item = json_safe(item)
            if isinstance(key, str | int | float) and item is not _DROP:
                out[str(key)] = item
        return out
    if isinstance(value, list | tuple):
        return [item for item in map(json_safe, value) if item is not _DROP]
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return json_safe(value.item())  # np.float32 losses, np.int64 counts, np.bool_
    return _DROP


class EventPrinter:
    """Prints progress events as JSON lines on stdout, one flushed line per event, for a
    program (the GUI) that runs the command and follows its output:
    ``{"stage", "done", "total", "message", "data"}``."""

    def __call__(self, event: Progress) -> None:
        self.emit(event.stage, event.done, event.total, event.message, event.data)

    @staticmethod
    def emit(
        stage: str,
        done: int = 0,
        total: int = 0,
        message: str = "",
        data: dict[str, Any] | None = None,
    ) -> None:
        """Prints one event line."""
        line = {
            "stage": stage,
            "done": json_safe(done),
            "total": json_safe(total),
            "message": str(message),
            "data": json_safe(dict(data or {})),
        }
        sys.stdout.write(json.dumps(line, allow_nan=False) + "\n")
        sys.stdout.flush()


@contextlib.contextmanager
def stop_on_signals(job: Job) -> Iterator[Job]:
    """SIGINT and SIGTERM call ``job.stop(signal name)`` while the block runs.

    The previous handlers come back when the block ends. Outside the main thread (the
    command run from a GUI thread) signals cannot be caught; nothing is installed.
    """

    def handle(signum: int, frame: object) -> None:
        job.stop(signal.Signals(signum).name)  # a second signal changes nothing

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, handle)
    try:
        yield job
    finally:
        for signum, handler in previous.items():
            # None: a handler set outside Python; the default is the nearest we can restore
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def run_job(
    work: Generator[Progress, None, T] | Job[T],
    on_progress: Callable[[Progress], Any] | None = None,
) -> T:
    """Returns what the job returns, driving it here with its events to ``on_progress``
    and SIGINT/SIGTERM stopping it.

    Args:
        work: the job, or the generator to run as one.
        on_progress: called with every event.

    Raises:
        jobs.Stopped: a signal (or ``job.stop``) ended it; ``reason`` names the signal.
    """
    job = work if isinstance(work, Job) else Job(work)
    with stop_on_signals(job):
        return job.run(on_progress)
