"""Progress events: what long work (training, inference, cohort runs) yields.

Long work is a generator that yields ``Progress`` events and returns its result; the
GUI drives it in a thread worker, the CLI with a progress bar, tests directly
(``run_to_end``). No torch, no Qt here.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = ["Progress", "run_to_end"]

T = TypeVar("T")


@dataclass
class Progress:
    """One step of long work.

    Attributes:
        stage: what is being done ("tissue", "piece", "epoch", "step", "checkpoint" ...).
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


def run_to_end(
    work: Generator[Progress, None, T], on_progress: Callable[[Progress], Any] | None = None
) -> T:
    """Drive a progress generator to its end; returns what it returns."""
    while True:
        try:
            event = next(work)
        except StopIteration as stop:
            return stop.value
        if on_progress is not None:
            on_progress(event)
