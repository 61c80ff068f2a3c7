"""Long work and the one way to drive it.

Every long job (inference, training, evaluation, a cohort run, a fine-tune subprocess)
is a generator that yields ``Progress`` events often (at least once per chunk of tiles
or training step) and returns its result. ``Job`` drives one, the same way for every
caller:

* the CLI calls ``Job.run(printer)`` and its SIGINT/SIGTERM handler calls ``Job.stop``;
* the GUI runs ``Job.events()`` in a napari thread worker and its Cancel/Stop button
  calls ``Job.stop``;
* tests and scripts call ``run_to_end(work)``.

There is one stop mechanism: ``stop()`` (from any thread) makes the driver close the
generator at its next event, so the generator's ``finally`` blocks run there (files
closed, threads joined) and never in the middle of writing a file, and the driver
raises ``Stopped``. Work that must wind down itself (a subprocess that saves its last
checkpoint on SIGINT) registers a hook with ``current_job().on_stop``: ``stop()`` calls
the hook at once, and the driver then lets the work run to its end and return its
result (which says it was stopped) instead of closing it. No torch, no Qt here.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

__all__ = ["Job", "Progress", "Stopped", "current_job", "run_to_end"]

T = TypeVar("T")


@dataclass
class Progress:
    """One step of long work.

    Attributes:
        stage: what is being done ("tissue", "tiles", "piece", "epoch", "step" ...).
        done: units finished in this stage.
        total: units in this stage (0 when unknown).
        message: one human line.
        data: facts for programs (loss, metrics, a piece's result ...).
    """

    stage: str
    done: int = 0
    total: int = 0
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        """done / total, or 0 when the total is unknown."""
        return self.done / self.total if self.total else 0.0


class Stopped(Exception):
    """A job ended early because ``Job.stop`` was called; its generator has been closed.

    Attributes:
        reason: what stopped it ("stopped", a signal's name, "cancelled" ...).
    """

    def __init__(self, reason: str = "stopped"):
        super().__init__(reason)
        self.reason = reason


_CURRENT: contextvars.ContextVar[Job | None] = contextvars.ContextVar("job", default=None)


def current_job() -> Job | None:
    """The job whose driver is running this code (inside its generator), or None."""
    return _CURRENT.get()


class Job(Generic[T]):
    """Drives one generator job; ``stop()`` from any thread ends it at its next event.

    Args:
        work: the job's generator (yields ``Progress``, returns the result).

    Attributes:
        result: what the generator returned, once it has ended by itself.
        events_seen: how many events it has yielded so far.
    """

    def __init__(self, work: Generator[Progress, None, T]):
        self.work = work
        self.result: T | None = None
        self.events_seen = 0
        self._stop = threading.Event()
        self._reason = "stopped"
        self._hooks: list[Callable[[], Any]] = []
        self._winds_down = False
        self._lock = threading.Lock()

    # -- stopping (any thread) ------------------------------------------------------------
    def stop(self, reason: str = "stopped") -> None:
        """Ask the job to end at its next event; runs the registered stop hooks now."""
        with self._lock:
            if self._stop.is_set():
                return
            self._reason = reason
            self._stop.set()
            hooks = list(self._hooks)
        for hook in hooks:
            hook()

    @property
    def stopping(self) -> bool:
        """Whether ``stop()`` has been called."""
        return self._stop.is_set()

    @property
    def reason(self) -> str:
        """Why the job was stopped (``stop``'s argument)."""
        return self._reason

    def on_stop(self, hook: Callable[[], Any]) -> None:
        """Call ``hook()`` when the job is stopped (at once when it already is); from then
        on the work ends itself after a stop and its result is returned."""
        with self._lock:
            self._winds_down = True
            if not self._stop.is_set():
                self._hooks.append(hook)
                return
        hook()

    # -- driving (one thread) -------------------------------------------------------------
    def events(self) -> Generator[Progress, None, T]:
        """The job's events, for a GUI thread worker; returns the job's result.

        Raises:
            Stopped: ``stop()`` was called; the generator has been closed (not for work
                that winds down itself, see ``on_stop``).
        """
        while True:
            if self._must_close():
                self._close()
            token = _CURRENT.set(self)
            try:
                event = next(self.work)
            except StopIteration as end:
                self.result = end.value
                return end.value
            except Stopped:
                raise
            except Exception:
                # A stop may make blocked work fail (a pipe closed under it): once stop()
                # has been called, that failure is the stop.
                if self._must_close():
                    self._close()
                raise
            finally:
                _CURRENT.reset(token)
            self.events_seen += 1
            yield event  # a stop that came meanwhile closes the work at the next call

    def run(self, on_progress: Callable[[Progress], Any] | None = None) -> T:
        """Drive the job to its end in this thread; returns its result.

        Raises:
            Stopped: ``stop()`` was called (from a signal handler or another thread).
        """
        events = self.events()
        while True:
            try:
                event = next(events)
            except StopIteration as end:
                return end.value
            if on_progress is not None:
                on_progress(event)

    def _must_close(self) -> bool:
        return self._stop.is_set() and not self._winds_down

    def _close(self) -> None:
        token = _CURRENT.set(self)
        try:
            self.work.close()
        finally:
            _CURRENT.reset(token)
        raise Stopped(self._reason)


def run_to_end(
    work: Generator[Progress, None, T], on_progress: Callable[[Progress], Any] | None = None
) -> T:
    """Drive a job generator to its end; returns what it returns (tests, scripts)."""
    return Job(work).run(on_progress)
