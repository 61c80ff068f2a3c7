"""What a label store holds, as Python values: slide labels, regions, changes.

Also the names every part of the store agrees on: the slide key (``slide_key``), the
statuses, region kinds and history actions, the errors, and what makes a geometry a
region (``check_geometry``). No SQLite and no file formats here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..slide.boxes import Box

STATUSES = ("accepted", "corrected")
REGION_KINDS = ("rectangle", "polygon", "tile")
ACTIONS = ("set", "add", "update", "delete", "undo")
UNCLASSIFIED = "unclassified"

Vertex = tuple[float, float]


class LabelStoreError(ValueError):
    """A label store or a labels file cannot be used; the message names the file and the
    problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


class RegionNotFoundError(KeyError):
    """No live region has the id asked for."""

    def __str__(self) -> str:
        # KeyError's own str() quotes its argument; this one is a sentence
        return str(self.args[0]) if self.args else ""


def slide_key(path: str | os.PathLike) -> str:
    """The key of a slide in a label store: its absolute resolved POSIX path.

    Raises:
        ValueError: an empty path.
    """
    text = os.fspath(path)
    if not str(text).strip():
        raise ValueError("a slide path must not be empty")
    return Path(text).expanduser().resolve().as_posix()


def now() -> str:
    """The time of a change: ISO-8601 UTC with microseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


# -- records -------------------------------------------------------------------------------
@dataclass(frozen=True)
class SlideLabel:
    """The label a reviewer gave a slide.

    Attributes:
        slide: the slide's key (``slide_key``).
        label: the class name.
        status: "accepted" (agreed with the cohort's or the model's label) or "corrected".
        author: who set it.
        time: when (ISO-8601 UTC, microseconds).
        note: why (free text, may be "").
    """

    slide: str
    label: str
    status: str
    author: str
    time: str
    note: str = ""


@dataclass(frozen=True)
class Region:
    """A labelled region of a slide.

    Attributes:
        id: the region's id in its store (never reused).
        slide: the slide's key.
        label: the class name.
        geometry: (x, y) vertices in level-0 px; the ring is closed implicitly (the first
            vertex is not repeated).
        kind: "rectangle", "polygon" or "tile" (a model's sampled tile).
        author: who made the region's current version.
        time: when (ISO-8601 UTC, microseconds).
        note: free text (may be "").
    """

    id: int
    slide: str
    label: str
    geometry: tuple[Vertex, ...]
    kind: str
    author: str
    time: str
    note: str = ""

    @property
    def box(self) -> Box:
        """The bounding box (x, y, w, h) in whole level-0 px that covers the region."""
        xs = [x for x, _ in self.geometry]
        ys = [y for _, y in self.geometry]
        x0, y0 = math.floor(min(xs)), math.floor(min(ys))
        return x0, y0, math.ceil(max(xs)) - x0, math.ceil(max(ys)) - y0


@dataclass(frozen=True)
class Change:
    """One row of a store's history.

    Attributes:
        id: the change's number (increasing with time).
        time: when (ISO-8601 UTC, microseconds).
        author: who.
        slide: the slide's key.
        target: "slide_label", "note" or "region:<id>".
        action: "set", "add", "update", "delete" or "undo".
        old: the target's state before (None: it did not exist).
        new: the target's state after (None: it no longer exists).
        undoes: for an "undo", the change it reverted.
        undone_by: the "undo" that reverted this change, if any.
    """

    id: int
    time: str
    author: str
    slide: str
    target: str
    action: str
    old: dict[str, Any] | None
    new: dict[str, Any] | None
    undoes: int | None = None
    undone_by: int | None = None


# -- geometry ------------------------------------------------------------------------------
def check_geometry(geometry: Iterable[Sequence[float]], kind: str) -> tuple[Vertex, ...]:
    """The vertices of a region as float (x, y) pairs, checked for its kind.

    Raises:
        ValueError: an unknown kind, too few or too many vertices, a vertex that is not
            two finite numbers, or no area.
    """
    if kind not in REGION_KINDS:
        raise ValueError(f"region kind {kind!r} is not one of {', '.join(REGION_KINDS)}")
    vertices: list[Vertex] = []
    for n, point in enumerate(geometry):
        try:
            x, y = (float(v) for v in point)
        except (TypeError, ValueError):
            raise ValueError(f"vertex {n} is {point!r}, not an (x, y) pair of numbers") from None
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ValueError(f"vertex {n} is ({x}, {y}); coordinates must be finite")
        vertices.append((x, y))
    # a ring written closed (GeoJSON style) is the same region
    if len(vertices) > 1 and vertices[0] == vertices[-1]:
        vertices.pop()
    if kind == "polygon" and len(vertices) < 3:
        raise ValueError(f"a polygon needs at least 3 vertices, got {len(vertices)}")
    if kind in ("rectangle", "tile") and len(vertices) != 4:
        raise ValueError(f"a {kind} needs exactly 4 vertices, got {len(vertices)}")
    area = 0.5 * abs(
        sum(
            x0 * y1 - x1 * y0
            for (x0, y0), (x1, y1) in zip(vertices, vertices[1:] + vertices[:1], strict=True)
        )
    )
    if not area > 0:
        raise ValueError(f"the {kind} has no area (vertices {vertices})")
    return tuple(vertices)
