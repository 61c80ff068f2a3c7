"""The label store of a cohort: slide labels, region labels and notes, with their history.

One SQLite file per cohort (``<cohort>.labels.sqlite`` next to the cohort CSV by default)
holds what pathologists decided while reviewing slides:

- a **slide label** per slide: the class they agreed with ("accepted") or set
  ("corrected"), with an optional note on why;
- **regions**: polygons, rectangles or a model's sampled tiles, in level-0 px (x, y),
  each with a class name;
- a free-text **note** per slide;
- the **history**: one row per change (who, when, what it was before and after), so
  every change can be undone and nothing a reviewer did is ever lost.

Each change is one SQLite transaction that writes the new state and its history row
together, so a crash or a kill never loses a committed change and never leaves a change
without its history. The file is in WAL mode, so a napari review panel and the command
line can read it while one of them writes.

Slides are keyed by their absolute resolved POSIX path (``slide_key``). No torch, no Qt
here: the review panel, the CLI and ``apply_labels`` (labels into a training cohort) all
use this module.
"""

from __future__ import annotations

import csv
import dataclasses
import getpass
import json
import math
import os
import sqlite3
import threading
import uuid
import warnings
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..train.cohort import Box, Cohort

__all__ = [
    "REGION_KINDS",
    "SCHEMA_VERSION",
    "STATUSES",
    "UNCLASSIFIED",
    "Change",
    "LabelStore",
    "LabelStoreError",
    "LabelsApplied",
    "Region",
    "RegionNotFoundError",
    "SlideLabel",
    "apply_labels",
    "apply_labels_with_summary",
    "slide_key",
]

SCHEMA_VERSION = 1
STATUSES = ("accepted", "corrected")
REGION_KINDS = ("rectangle", "polygon", "tile")
ACTIONS = ("set", "add", "update", "delete", "undo")
UNCLASSIFIED = "unclassified"
_APPLICATION = "napari-slide-attention labels"
_SQLITE_MAGIC = b"SQLite format 3\x00"

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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _default_author() -> str:
    try:
        return getpass.getuser() or "unknown"
    except Exception:  # no login name in some containers: getpass raises KeyError/OSError
        return "unknown"


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
def _check_geometry(geometry: Iterable[Sequence[float]], kind: str) -> tuple[Vertex, ...]:
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


def _is_axis_rectangle(vertices: Sequence[Vertex]) -> bool:
    if len(vertices) != 4:
        return False
    xs = {x for x, _ in vertices}
    ys = {y for _, y in vertices}
    return len(xs) == 2 and len(ys) == 2 and len(set(vertices)) == 4


def _label_colour(label: str) -> list[int]:
    """A stable colour per class name (QuPath shows classes by colour)."""
    palette = [
        (230, 25, 75),
        (60, 180, 75),
        (0, 130, 200),
        (245, 130, 48),
        (145, 30, 180),
        (70, 240, 240),
        (240, 50, 230),
        (210, 245, 60),
        (0, 128, 128),
        (170, 110, 40),
        (128, 0, 0),
        (0, 0, 128),
    ]
    # crc32, not hash(): Python salts str hashes per process, the colours must not change
    return list(palette[zlib.crc32(label.encode()) % len(palette)])


# -- the store -----------------------------------------------------------------------------
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS slide_labels (
        slide TEXT PRIMARY KEY,
        label TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('accepted', 'corrected')),
        author TEXT NOT NULL,
        time TEXT NOT NULL,
        note TEXT NOT NULL DEFAULT '')""",
    """CREATE TABLE IF NOT EXISTS notes (
        slide TEXT PRIMARY KEY,
        text TEXT NOT NULL,
        author TEXT NOT NULL,
        time TEXT NOT NULL)""",
    # regions are only ever soft-deleted (``deleted``), so an undo can restore them and
    # every "region:<id>" in the history keeps pointing at its region
    """CREATE TABLE IF NOT EXISTS regions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        uuid TEXT NOT NULL UNIQUE,
        slide TEXT NOT NULL,
        label TEXT NOT NULL,
        geometry TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('rectangle', 'polygon', 'tile')),
        author TEXT NOT NULL,
        time TEXT NOT NULL,
        note TEXT NOT NULL DEFAULT '',
        deleted INTEGER NOT NULL DEFAULT 0)""",
    "CREATE INDEX IF NOT EXISTS regions_by_slide ON regions (slide, deleted, id)",
    """CREATE TABLE IF NOT EXISTS changes (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        time TEXT NOT NULL,
        author TEXT NOT NULL,
        slide TEXT NOT NULL,
        target TEXT NOT NULL,
        action TEXT NOT NULL
            CHECK (action IN ('set', 'add', 'update', 'delete', 'undo')),
        old TEXT,
        new TEXT,
        region INTEGER REFERENCES regions (id),
        undoes INTEGER UNIQUE REFERENCES changes (id))""",
    "CREATE INDEX IF NOT EXISTS changes_by_slide ON changes (slide, id)",
    "CREATE INDEX IF NOT EXISTS changes_by_target ON changes (slide, target, id)",
)


class LabelStore:
    """The labels of a cohort in one SQLite file, with the history of every change.

    Every method that takes a slide accepts a path (``str`` or ``os.PathLike``) and keys
    it with ``slide_key``. Every change is one transaction that writes the new state and
    its history row. A store may be used from several threads (calls are serialised) and
    several processes (SQLite's locking; WAL lets readers go on while one writes).

    Attributes:
        path: the database file.
        author: who the changes are by unless a call names someone else.
    """

    def __init__(self, path: str | os.PathLike, *, author: str | None = None):
        """Open or create a label store.

        Args:
            path: the database file; its folder must exist.
            author: who changes are by; None = the login name ("unknown" without one).

        Raises:
            LabelStoreError: the folder does not exist, or the file is not a label store
                (another file, another SQLite database, a newer schema version).
        """
        self.path = Path(path)
        self.author = (author or "").strip() or _default_author()
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        if not self.path.parent.is_dir():
            raise LabelStoreError(self.path, f"the folder {self.path.parent} does not exist")
        if self.path.is_dir():
            raise LabelStoreError(self.path, "is a folder, not a label store")
        self._check_magic()
        try:
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT),
            # one per change; check_same_thread=False: the lock serialises threads instead
            self._conn = sqlite3.connect(
                self.path, timeout=10.0, isolation_level=None, check_same_thread=False
            )
            self._conn.row_factory = sqlite3.Row
            new = self._check_schema()
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise LabelStoreError(
                    self.path, f"cannot use WAL journaling here (SQLite kept {mode!r})"
                )
            # FULL: a commit is on disk (the WAL fsynced) before the call returns, so a
            # reviewer's change survives a power cut too; labels are written at human pace
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            if new:
                self._create_schema()
        except sqlite3.Error as exc:
            self.close()
            raise LabelStoreError(self.path, f"not a usable label store ({exc})") from exc
        except BaseException:
            self.close()
            raise

    # -- opening ---------------------------------------------------------------------------
    def _check_magic(self) -> None:
        """Refuse a file that is not SQLite before SQLite touches it."""
        try:
            with open(self.path, "rb") as handle:
                head = handle.read(len(_SQLITE_MAGIC))
        except FileNotFoundError:
            return
        except OSError as exc:
            raise LabelStoreError(self.path, f"cannot read the file ({exc})") from exc
        if head and head != _SQLITE_MAGIC:
            raise LabelStoreError(self.path, "not a label store (not an SQLite database)")

    def _check_schema(self) -> bool:
        """Whether the file is still empty; refuses other databases and newer schemas."""
        assert self._conn is not None
        tables = sorted(
            row[0]
            for row in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            if not row[0].startswith("sqlite_")
        )
        if not tables:
            return True
        if "meta" not in tables:
            raise LabelStoreError(
                self.path,
                "an SQLite database but not a label store (no meta table; tables: "
                f"{', '.join(tables)})",
            )
        meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("application") != _APPLICATION:
            raise LabelStoreError(
                self.path,
                f"an SQLite database of another application ({meta.get('application')!r}), "
                "not a label store",
            )
        try:
            version = int(meta.get("schema_version", ""))
        except ValueError:
            raise LabelStoreError(
                self.path, f"unreadable schema version {meta.get('schema_version')!r}"
            ) from None
        if version > SCHEMA_VERSION:
            raise LabelStoreError(
                self.path,
                f"label store schema version {version} is newer than this version of "
                f"napari-slide-attention reads ({SCHEMA_VERSION}); update the package",
            )
        if version < 1:
            raise LabelStoreError(self.path, f"unknown label store schema version {version}")
        return False

    def _create_schema(self) -> None:
        assert self._conn is not None
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            # IF NOT EXISTS / OR IGNORE: another process may have created it meanwhile
            for statement in _SCHEMA:
                self._conn.execute(statement)
            self._conn.executemany(
                "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
                [
                    ("application", _APPLICATION),
                    ("schema_version", str(SCHEMA_VERSION)),
                    ("created", _now()),
                ],
            )
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

    @staticmethod
    def default_path(cohort_csv: str | os.PathLike) -> Path:
        """The default store of a cohort: ``<csv folder>/<csv stem>.labels.sqlite``."""
        csv_path = Path(cohort_csv)
        return csv_path.with_name(f"{csv_path.stem}.labels.sqlite")

    def close(self) -> None:
        """Close the database (committed changes are already on disk)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> LabelStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LabelStore({str(self.path)!r}, author={self.author!r})"

    # -- plumbing --------------------------------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise LabelStoreError(self.path, "the label store is closed")
        return self._conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE takes the write lock first, so the state
        a change reads cannot change under it in another process."""
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise LabelStoreError(self.path, f"cannot write ({exc})") from exc
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise LabelStoreError(self.path, f"cannot write ({exc})") from exc
                raise

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._connection()
            try:
                yield conn
            except sqlite3.Error as exc:
                raise LabelStoreError(self.path, f"cannot read ({exc})") from exc

    def _who(self, author: str | None) -> str:
        return (author or "").strip() or self.author

    @staticmethod
    def _record(
        conn: sqlite3.Connection,
        *,
        time: str,
        author: str,
        slide: str,
        target: str,
        action: str,
        old: dict[str, Any] | None,
        new: dict[str, Any] | None,
        undoes: int | None = None,
    ) -> Change:
        region = int(target.split(":", 1)[1]) if target.startswith("region:") else None
        cursor = conn.execute(
            "INSERT INTO changes (time, author, slide, target, action, old, new, region, "
            "undoes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                time,
                author,
                slide,
                target,
                action,
                None if old is None else json.dumps(old),
                None if new is None else json.dumps(new),
                region,
                undoes,
            ),
        )
        return Change(cursor.lastrowid, time, author, slide, target, action, old, new, undoes)

    # -- states: what a change's old/new hold ------------------------------------------------
    @staticmethod
    def _label_state(row: sqlite3.Row | None) -> dict[str, Any] | None:
        if row is None:
            return None
        return {k: row[k] for k in ("label", "status", "author", "time", "note")}

    @staticmethod
    def _note_state(row: sqlite3.Row | None) -> dict[str, Any] | None:
        if row is None:
            return None
        return {k: row[k] for k in ("text", "author", "time")}

    @staticmethod
    def _region_state(row: sqlite3.Row | None) -> dict[str, Any] | None:
        if row is None or row["deleted"]:
            return None
        return {
            "label": row["label"],
            "geometry": json.loads(row["geometry"]),
            "kind": row["kind"],
            "author": row["author"],
            "time": row["time"],
            "note": row["note"],
        }

    @staticmethod
    def _region(row: sqlite3.Row) -> Region:
        return Region(
            row["id"],
            row["slide"],
            row["label"],
            tuple((float(x), float(y)) for x, y in json.loads(row["geometry"])),
            row["kind"],
            row["author"],
            row["time"],
            row["note"],
        )

    @staticmethod
    def _slide_label(row: sqlite3.Row) -> SlideLabel:
        return SlideLabel(
            row["slide"], row["label"], row["status"], row["author"], row["time"], row["note"]
        )

    def _state(self, conn: sqlite3.Connection, slide: str, target: str) -> dict[str, Any] | None:
        if target == "slide_label":
            row = conn.execute("SELECT * FROM slide_labels WHERE slide = ?", (slide,)).fetchone()
            return self._label_state(row)
        if target == "note":
            row = conn.execute("SELECT * FROM notes WHERE slide = ?", (slide,)).fetchone()
            return self._note_state(row)
        row = conn.execute(
            "SELECT * FROM regions WHERE id = ?", (int(target.split(":", 1)[1]),)
        ).fetchone()
        return self._region_state(row)

    def _restore(
        self, conn: sqlite3.Connection, slide: str, target: str, state: dict[str, Any] | None
    ) -> None:
        """Put a target back into a state from the history (None: it did not exist)."""
        if target in ("slide_label", "note"):
            table = "slide_labels" if target == "slide_label" else "notes"
            conn.execute(f"DELETE FROM {table} WHERE slide = ?", (slide,))
            if state is not None:
                columns = list(state)
                conn.execute(
                    f"INSERT INTO {table} (slide, {', '.join(columns)}) "
                    f"VALUES (?{', ?' * len(columns)})",
                    (slide, *state.values()),
                )
            return
        region_id = int(target.split(":", 1)[1])
        if state is None:
            conn.execute("UPDATE regions SET deleted = 1 WHERE id = ?", (region_id,))
        else:
            conn.execute(
                "UPDATE regions SET label = ?, geometry = ?, kind = ?, author = ?, time = ?, "
                "note = ?, deleted = 0 WHERE id = ?",
                (
                    state["label"],
                    json.dumps(state["geometry"]),
                    state["kind"],
                    state["author"],
                    state["time"],
                    state["note"],
                    region_id,
                ),
            )

    # -- slide labels ----------------------------------------------------------------------
    def slide_label(self, slide: str | os.PathLike) -> SlideLabel | None:
        """The slide's label, or None when it has none."""
        with self._reading() as conn:
            row = conn.execute(
                "SELECT * FROM slide_labels WHERE slide = ?", (slide_key(slide),)
            ).fetchone()
        return None if row is None else self._slide_label(row)

    def slide_labels(self) -> dict[str, SlideLabel]:
        """Every slide label, by slide key (in key order)."""
        with self._reading() as conn:
            rows = conn.execute("SELECT * FROM slide_labels ORDER BY slide").fetchall()
        return {row["slide"]: self._slide_label(row) for row in rows}

    def set_slide_label(
        self,
        slide: str | os.PathLike,
        label: str,
        *,
        status: str = "corrected",
        note: str = "",
        author: str | None = None,
    ) -> SlideLabel:
        """The slide's new label, stored with its history row.

        Setting the same label again is recorded too: a second reviewer's agreement is a
        decision of its own.

        Args:
            slide: the slide.
            label: the class name.
            status: "accepted" (agrees with the cohort's or the model's label) or
                "corrected".
            note: why (free text).
            author: who; None = the store's author.

        Raises:
            ValueError: an empty label or an unknown status.
        """
        key = slide_key(slide)
        label = str(label).strip()
        if not label:
            raise ValueError(f"{key}: a slide label must not be empty")
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
        who, time = self._who(author), _now()
        new = SlideLabel(key, label, status, who, time, note or "")
        with self._transaction() as conn:
            old = self._state(conn, key, "slide_label")
            conn.execute(
                "INSERT OR REPLACE INTO slide_labels (slide, label, status, author, time, note) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                dataclasses.astuple(new),
            )
            self._record(
                conn,
                time=time,
                author=who,
                slide=key,
                target="slide_label",
                action="set",
                old=old,
                new=self._state(conn, key, "slide_label"),
            )
        return new

    # -- notes -----------------------------------------------------------------------------
    def note(self, slide: str | os.PathLike) -> str:
        """The slide's note ("" when it has none)."""
        with self._reading() as conn:
            row = conn.execute(
                "SELECT text FROM notes WHERE slide = ?", (slide_key(slide),)
            ).fetchone()
        return "" if row is None else row["text"]

    def set_note(self, slide: str | os.PathLike, text: str, *, author: str | None = None) -> None:
        """Set the slide's note; "" removes it. An unchanged note records nothing (a panel
        may save on every edit)."""
        key = slide_key(slide)
        text = text or ""
        who, time = self._who(author), _now()
        with self._transaction() as conn:
            old = self._state(conn, key, "note")
            if (old["text"] if old else "") == text:
                return
            conn.execute("DELETE FROM notes WHERE slide = ?", (key,))
            if text:
                conn.execute(
                    "INSERT INTO notes (slide, text, author, time) VALUES (?, ?, ?, ?)",
                    (key, text, who, time),
                )
            self._record(
                conn,
                time=time,
                author=who,
                slide=key,
                target="note",
                action="set",
                old=old,
                new=self._state(conn, key, "note"),
            )

    # -- regions ---------------------------------------------------------------------------
    def add_region(
        self,
        slide: str | os.PathLike,
        geometry: Iterable[Sequence[float]],
        label: str,
        *,
        kind: str = "polygon",
        note: str = "",
        author: str | None = None,
    ) -> Region:
        """The new region, stored with its history row.

        Args:
            slide: the slide.
            geometry: (x, y) vertices in level-0 px (the ring closes implicitly; a
                repeated first vertex at the end is dropped).
            label: the class name.
            kind: "polygon" (3 or more vertices), "rectangle" or "tile" (4 vertices).
            note: free text.
            author: who; None = the store's author.

        Raises:
            ValueError: an empty label, an unknown kind, or a geometry that is not a
                region (too few vertices, not finite, no area).
        """
        key = slide_key(slide)
        with self._transaction() as conn:
            return self._add_region(conn, key, geometry, label, kind, note, author, None)

    def _add_region(
        self,
        conn: sqlite3.Connection,
        key: str,
        geometry: Iterable[Sequence[float]],
        label: str,
        kind: str,
        note: str,
        author: str | None,
        region_uuid: str | None,
    ) -> Region:
        label = str(label).strip()
        if not label:
            raise ValueError(f"{key}: a region label must not be empty")
        vertices = _check_geometry(geometry, kind)
        who, time = self._who(author), _now()
        cursor = conn.execute(
            "INSERT INTO regions (uuid, slide, label, geometry, kind, author, time, note) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                region_uuid or str(uuid.uuid4()),
                key,
                label,
                json.dumps([list(v) for v in vertices]),
                kind,
                who,
                time,
                note or "",
            ),
        )
        region = Region(cursor.lastrowid, key, label, vertices, kind, who, time, note or "")
        self._record(
            conn,
            time=time,
            author=who,
            slide=key,
            target=f"region:{region.id}",
            action="add",
            old=None,
            new=self._state(conn, key, f"region:{region.id}"),
        )
        return region

    def _live_row(self, conn: sqlite3.Connection, region_id: int) -> sqlite3.Row:
        row = conn.execute("SELECT * FROM regions WHERE id = ?", (int(region_id),)).fetchone()
        if row is None:
            raise RegionNotFoundError(f"{self.path}: no region {region_id}")
        if row["deleted"]:
            raise RegionNotFoundError(
                f"{self.path}: region {region_id} was deleted (undo brings it back)"
            )
        return row

    def region(self, region_id: int) -> Region:
        """The live region with this id.

        Raises:
            RegionNotFoundError: (a KeyError) no such region, or it was deleted.
        """
        with self._reading() as conn:
            return self._region(self._live_row(conn, region_id))

    def regions(self, slide: str | os.PathLike) -> list[Region]:
        """The slide's live regions, in the order they were made."""
        with self._reading() as conn:
            rows = conn.execute(
                "SELECT * FROM regions WHERE slide = ? AND deleted = 0 ORDER BY id",
                (slide_key(slide),),
            ).fetchall()
        return [self._region(row) for row in rows]

    def update_region(
        self,
        region_id: int,
        *,
        label: str | None = None,
        geometry: Iterable[Sequence[float]] | None = None,
        note: str | None = None,
        author: str | None = None,
    ) -> Region:
        """The region after changing its label, geometry and/or note (None = keep).

        A change that changes nothing records nothing (a panel may send its shapes again).

        Raises:
            RegionNotFoundError: (a KeyError) no such live region.
            ValueError: nothing to change, an empty label, or a geometry that is not a
                region of its kind.
        """
        if label is None and geometry is None and note is None:
            raise ValueError("update_region needs a label, a geometry or a note")
        with self._transaction() as conn:
            return self._update_region(conn, region_id, label, geometry, note, author, None)

    def _update_region(
        self,
        conn: sqlite3.Connection,
        region_id: int,
        label: str | None,
        geometry: Iterable[Sequence[float]] | None,
        note: str | None,
        author: str | None,
        kind: str | None,
    ) -> Region:
        """``update_region`` inside a transaction; ``kind`` changes the kind too (an import
        of a rectangle that was edited into a polygon elsewhere)."""
        row = self._live_row(conn, region_id)
        current = self._region(row)
        if label is not None:
            label = str(label).strip()
            if not label:
                raise ValueError(f"region {region_id}: a region label must not be empty")
        kind = kind or current.kind
        vertices = _check_geometry(current.geometry if geometry is None else geometry, kind)
        updated = dataclasses.replace(
            current,
            label=current.label if label is None else label,
            geometry=vertices,
            kind=kind,
            note=current.note if note is None else note,
        )
        if updated == current:
            return current
        updated = dataclasses.replace(updated, author=self._who(author), time=_now())
        target = f"region:{current.id}"
        old = self._region_state(row)
        conn.execute(
            "UPDATE regions SET label = ?, geometry = ?, kind = ?, author = ?, time = ?, "
            "note = ? WHERE id = ?",
            (
                updated.label,
                json.dumps([list(v) for v in updated.geometry]),
                updated.kind,
                updated.author,
                updated.time,
                updated.note,
                current.id,
            ),
        )
        self._record(
            conn,
            time=updated.time,
            author=updated.author,
            slide=current.slide,
            target=target,
            action="update",
            old=old,
            new=self._state(conn, current.slide, target),
        )
        return updated

    def delete_region(self, region_id: int, *, author: str | None = None) -> None:
        """Delete a region (kept in the file, so undo can restore it).

        Raises:
            RegionNotFoundError: (a KeyError) no such live region.
        """
        who, time = self._who(author), _now()
        with self._transaction() as conn:
            row = self._live_row(conn, region_id)
            conn.execute("UPDATE regions SET deleted = 1 WHERE id = ?", (row["id"],))
            self._record(
                conn,
                time=time,
                author=who,
                slide=row["slide"],
                target=f"region:{row['id']}",
                action="delete",
                old=self._region_state(row),
                new=None,
            )

    def slides(self) -> list[str]:
        """The keys of the slides with a label, a note or a live region, sorted."""
        with self._reading() as conn:
            rows = conn.execute(
                "SELECT slide FROM slide_labels UNION SELECT slide FROM notes "
                "UNION SELECT slide FROM regions WHERE deleted = 0 ORDER BY slide"
            ).fetchall()
        return [row[0] for row in rows]

    # -- history and undo ------------------------------------------------------------------
    @staticmethod
    def _change(row: sqlite3.Row) -> Change:
        return Change(
            row["id"],
            row["time"],
            row["author"],
            row["slide"],
            row["target"],
            row["action"],
            None if row["old"] is None else json.loads(row["old"]),
            None if row["new"] is None else json.loads(row["new"]),
            row["undoes"],
            row["undone_by"],
        )

    _CHANGES = (
        "SELECT c.*, u.id AS undone_by FROM changes AS c LEFT JOIN changes AS u ON u.undoes = c.id"
    )

    def history(
        self, slide: str | os.PathLike | None = None, *, limit: int | None = None
    ) -> list[Change]:
        """The changes, oldest first.

        Args:
            slide: only this slide's changes; None = all.
            limit: only the latest ``limit`` changes (still oldest first).
        """
        where, params = "", []
        if slide is not None:
            where, params = " WHERE c.slide = ?", [slide_key(slide)]
        tail = ""
        if limit is not None:
            tail, params = " LIMIT ?", [*params, max(0, int(limit))]
        with self._reading() as conn:
            rows = conn.execute(f"{self._CHANGES}{where} ORDER BY c.id DESC{tail}", params)
            changes = [self._change(row) for row in rows]
        return changes[::-1]

    def undo(
        self, *, slide: str | os.PathLike | None = None, author: str | None = None
    ) -> Change | None:
        """The "undo" change that reverted the latest change not yet undone, or None when
        there is nothing to undo.

        Undo of an "add" deletes the region, of a "delete" restores it, of a "set" or an
        "update" brings back the previous state (or removes the label or note when there
        was none). Undoing again walks further back; undos themselves are not undone.

        Args:
            slide: only this slide's changes.
            author: only this author's changes; the undo is recorded as theirs (None =
                any author's, recorded as the store's author).

        Raises:
            ValueError: the change's target was changed since by a change that the
                filters leave out (another author's): undo that one first.
        """
        who, time = self._who(author), _now()
        clauses = ["c.action != 'undo'", "u.id IS NULL"]
        params: list[Any] = []
        if slide is not None:
            clauses.append("c.slide = ?")
            params.append(slide_key(slide))
        if author is not None:
            clauses.append("c.author = ?")
            params.append(author)
        with self._transaction() as conn:
            row = conn.execute(
                f"{self._CHANGES} WHERE {' AND '.join(clauses)} ORDER BY c.id DESC LIMIT 1",
                params,
            ).fetchone()
            if row is None:
                return None
            change = self._change(row)
            current = self._state(conn, change.slide, change.target)
            if current != change.new:
                later = conn.execute(
                    "SELECT id, author, action FROM changes WHERE slide = ? AND target = ? "
                    "AND id > ? ORDER BY id DESC LIMIT 1",
                    (change.slide, change.target, change.id),
                ).fetchone()
                since = (
                    f" (change {later['id']}, {later['action']} by {later['author']})"
                    if later
                    else ""
                )
                raise ValueError(
                    f"{self.path}: cannot undo change {change.id} ({change.action} of "
                    f"{change.target} of {change.slide} by {change.author}): it was changed "
                    f"since{since}; undo that first"
                )
            self._restore(conn, change.slide, change.target, change.old)
            return self._record(
                conn,
                time=time,
                author=who,
                slide=change.slide,
                target=change.target,
                action="undo",
                old=current,
                new=self._state(conn, change.slide, change.target),
                undoes=change.id,
            )

    # -- files -----------------------------------------------------------------------------
    def _all_live_regions(self, slide: str | os.PathLike | None) -> list[sqlite3.Row]:
        with self._reading() as conn:
            if slide is None:
                return conn.execute(
                    "SELECT * FROM regions WHERE deleted = 0 ORDER BY slide, id"
                ).fetchall()
            return conn.execute(
                "SELECT * FROM regions WHERE slide = ? AND deleted = 0 ORDER BY id",
                (slide_key(slide),),
            ).fetchall()

    def export_geojson(
        self, path: str | os.PathLike, *, slide: str | os.PathLike | None = None
    ) -> int:
        """Write the live regions as QuPath-compatible GeoJSON; gives the number written.

        A FeatureCollection of Polygon features in level-0 px (first vertex repeated), with
        QuPath's ``objectType``, ``classification`` (name, colour), ``isLocked`` and
        ``name`` (the region's note), our ``metadata`` (slide, author, time, kind, id; as
        strings, QuPath's metadata map holds strings) and a stable ``id`` per region, so a
        file that comes back from QuPath updates the regions instead of copying them.

        Args:
            path: the file to write (replaced atomically).
            slide: only this slide's regions; None = every slide's (``metadata.slide``
                tells them apart).
        """
        features = []
        for row in self._all_live_regions(slide):
            region = self._region(row)
            ring = [[x, y] for x, y in region.geometry]
            features.append(
                {
                    "type": "Feature",
                    "id": row["uuid"],
                    "geometry": {"type": "Polygon", "coordinates": [[*ring, ring[0]]]},
                    "properties": {
                        "objectType": "annotation",
                        "classification": {
                            "name": region.label,
                            "color": _label_colour(region.label),
                        },
                        "isLocked": False,
                        "name": region.note,
                        "metadata": {
                            "slide": region.slide,
                            "author": region.author,
                            "time": region.time,
                            "kind": region.kind,
                            "id": str(region.id),
                        },
                    },
                }
            )
        _write_atomically(
            Path(path), json.dumps({"type": "FeatureCollection", "features": features}, indent=1)
        )
        return len(features)

    def import_geojson(
        self, path: str | os.PathLike, slide: str | os.PathLike, *, author: str | None = None
    ) -> int:
        """Add the regions of a GeoJSON file (ours or QuPath's) to a slide; gives how many
        regions of the file the slide now has.

        Reads a FeatureCollection, a single Feature or a bare list of features (QuPath
        writes all three). Each Polygon's exterior ring becomes a region, each part of a
        MultiPolygon one region (holes are dropped); points and lines are skipped with a
        warning, as are features without a geometry. The class is
        ``classification.name`` ("unclassified" without one), the note QuPath's ``name``.
        A feature whose ``id`` is a live region of this slide (a file exported from here)
        updates that region instead of adding a copy. One transaction: all or nothing.

        Args:
            path: the GeoJSON file.
            slide: the slide the regions belong to.
            author: who; None = the store's author.

        Raises:
            LabelStoreError: the file cannot be read, is not GeoJSON, or has a feature that
                is not a region (named by its index).
        """
        key = slide_key(slide)
        items, skipped = _read_geojson(Path(path))
        if skipped:
            warnings.warn(
                f"{path}: skipped {skipped} feature(s) without an area (points, lines or no "
                "geometry)",
                stacklevel=2,
            )
        with self._transaction() as conn:
            seen: set[str] = set()
            for item in items:
                row = None
                if item.uuid is not None and item.uuid not in seen:
                    row = conn.execute(
                        "SELECT * FROM regions WHERE uuid = ?", (item.uuid,)
                    ).fetchone()
                try:
                    if row is not None and row["slide"] == key and not row["deleted"]:
                        self._update_region(
                            conn, row["id"], item.label, item.geometry, item.note, author, item.kind
                        )
                    else:
                        # an id taken elsewhere (another slide, a deleted region) or repeated
                        # in the file: the region gets a fresh one
                        fresh = item.uuid not in seen and row is None
                        self._add_region(
                            conn,
                            key,
                            item.geometry,
                            item.label,
                            item.kind,
                            item.note,
                            author,
                            item.uuid if fresh else None,
                        )
                except ValueError as exc:
                    raise LabelStoreError(path, f"feature {item.feature}: {exc}") from None
                if item.uuid is not None:
                    seen.add(item.uuid)
        return len(items)

    def export_csv(self, path: str | os.PathLike) -> int:
        """Write one row per slide label and per live region; gives the number of rows.

        Columns ``slide,kind,id,label,status,author,time,note,x,y,w,h,geometry``: slide
        labels have kind "slide" and no id, box or geometry; regions their kind, id,
        bounding box and vertices as JSON.
        """
        labels = self.slide_labels()
        regions: dict[str, list[Region]] = {}
        for row in self._all_live_regions(None):
            regions.setdefault(row["slide"], []).append(self._region(row))
        rows: list[list[Any]] = []
        for key in sorted(set(labels) | set(regions)):
            if key in labels:
                lab = labels[key]
                rows.append(
                    [key, "slide", "", lab.label, lab.status, lab.author, lab.time, lab.note]
                    + [""] * 5
                )
            for region in regions.get(key, []):
                rows.append(
                    [
                        key,
                        region.kind,
                        region.id,
                        region.label,
                        "",
                        region.author,
                        region.time,
                        region.note,
                        *region.box,
                        json.dumps([list(v) for v in region.geometry]),
                    ]
                )
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_COLUMNS)
            writer.writerows(rows)
        os.replace(tmp, path)
        return len(rows)


CSV_COLUMNS = (
    "slide",
    "kind",
    "id",
    "label",
    "status",
    "author",
    "time",
    "note",
    "x",
    "y",
    "w",
    "h",
    "geometry",
)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# -- GeoJSON reading -----------------------------------------------------------------------
@dataclass
class _ImportedRegion:
    feature: int
    geometry: tuple[Vertex, ...]
    label: str
    kind: str
    note: str
    uuid: str | None


_NO_AREA = ("Point", "MultiPoint", "LineString", "MultiLineString")


def _exterior_rings(geometry: Any, path: Path, where: str) -> list[Any] | None:
    """The exterior rings of a geometry; None when it has no area (points, lines)."""
    if not isinstance(geometry, dict) or "type" not in geometry:
        raise LabelStoreError(path, f"{where}: the geometry is not a GeoJSON object")
    kind = geometry["type"]
    if kind in _NO_AREA:
        return None
    if kind == "GeometryCollection":
        rings = []
        for part in geometry.get("geometries") or []:
            rings += _exterior_rings(part, path, where) or []
        return rings or None
    coordinates = geometry.get("coordinates")
    if kind == "Polygon":
        polygons = [coordinates]
    elif kind == "MultiPolygon":
        polygons = coordinates
    else:
        raise LabelStoreError(path, f"{where}: unknown geometry type {kind!r}")
    if not isinstance(polygons, list) or not all(
        isinstance(p, list) and p and isinstance(p[0], list) for p in polygons
    ):
        raise LabelStoreError(path, f"{where}: {kind} coordinates are not lists of rings")
    return [polygon[0] for polygon in polygons]


def _read_geojson(path: Path) -> tuple[list[_ImportedRegion], int]:
    """The regions in a GeoJSON file and the number of features skipped (no area)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise LabelStoreError(path, "no such GeoJSON file") from None
    except json.JSONDecodeError as exc:
        raise LabelStoreError(
            path, f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelStoreError(path, f"cannot read the file ({exc})") from exc
    if isinstance(data, list):  # QuPath's "bare list of features" export
        features = data
    elif isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
        if not isinstance(features, list):
            raise LabelStoreError(path, "the FeatureCollection has no list of features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    else:
        found = data.get("type") if isinstance(data, dict) else type(data).__name__
        raise LabelStoreError(
            path,
            f"not GeoJSON features (a FeatureCollection or a list of Features), found {found!r}",
        )
    regions: list[_ImportedRegion] = []
    skipped = 0
    for n, feature in enumerate(features):
        where = f"feature {n}"
        if not isinstance(feature, dict) or feature.get("type", "Feature") != "Feature":
            found = feature.get("type") if isinstance(feature, dict) else type(feature).__name__
            raise LabelStoreError(path, f"{where} is a {found!r}, not a Feature")
        geometry = feature.get("geometry")
        rings = None if geometry is None else _exterior_rings(geometry, path, where)
        if not rings:
            skipped += 1
            continue
        properties = feature.get("properties") or {}
        if not isinstance(properties, dict):
            raise LabelStoreError(path, f"{where}: properties are not an object")
        classification = properties.get("classification")
        # some exporters write the class name alone instead of QuPath's object
        label = classification.get("name") if isinstance(classification, dict) else classification
        label = str(label).strip() if label is not None else ""
        metadata = properties.get("metadata")
        metadata = metadata if isinstance(metadata, dict) else {}
        note = properties.get("name")
        feature_id = feature.get("id")
        for k, ring in enumerate(rings):
            try:
                # a third coordinate (z) is allowed by GeoJSON; regions are 2-D
                vertices = [point[:2] for point in ring]
                kind = metadata.get("kind")
                checked = _check_geometry(vertices, "polygon")
                if kind not in REGION_KINDS or (kind != "polygon" and len(checked) != 4):
                    kind = "rectangle" if _is_axis_rectangle(checked) else "polygon"
            except (TypeError, ValueError) as exc:
                raise LabelStoreError(path, f"{where}: {exc}") from None
            region_uuid = None
            if feature_id is not None:
                # each part of a MultiPolygon gets its own stable id
                region_uuid = (
                    str(feature_id)
                    if len(rings) == 1
                    else str(uuid.uuid5(uuid.NAMESPACE_URL, f"{feature_id}#{k}"))
                )
            regions.append(
                _ImportedRegion(
                    n,
                    checked,
                    label or UNCLASSIFIED,
                    kind,
                    str(note) if note is not None else "",
                    region_uuid,
                )
            )
    return regions, skipped


# -- labels into a cohort ------------------------------------------------------------------
@dataclass(frozen=True)
class LabelsApplied:
    """What ``apply_labels_with_summary`` took from a store.

    Attributes:
        slide_labels: cohort slides whose label came from the store.
        changed: of those, how many differ from the cohort's own label.
        regions: regions that became lesion boxes.
        slides_with_regions: cohort slides whose lesions the regions replaced.
        ignored_regions: live regions of cohort slides whose label is not a cohort class.
        not_in_cohort: slides with a label or live regions in the store but not in the
            cohort (moved slides, another cohort).
    """

    slide_labels: int = 0
    changed: int = 0
    regions: int = 0
    slides_with_regions: int = 0
    ignored_regions: int = 0
    not_in_cohort: int = 0

    def summary(self) -> str:
        """One readable line."""
        text = (
            f"{self.slide_labels} slide label(s) ({self.changed} differ from the cohort's), "
            f"{self.regions} region(s) on {self.slides_with_regions} slide(s)"
        )
        if self.ignored_regions:
            text += f"; {self.ignored_regions} region(s) of other classes ignored"
        if self.not_in_cohort:
            text += f"; {self.not_in_cohort} labelled slide(s) are not in the cohort"
        return text


def apply_labels_with_summary(cohort: Cohort, store: LabelStore) -> tuple[Cohort, LabelsApplied]:
    """The cohort with the store's labels (see ``apply_labels``) and what was applied."""
    classes = list(cohort.classes)
    labels = store.slide_labels()
    entries = []
    counts = dict.fromkeys(
        ("slide_labels", "changed", "regions", "slides_with_regions", "ignored_regions"), 0
    )
    for entry in cohort.entries:
        key = slide_key(entry.slide)
        changes: dict[str, Any] = {}
        if key in labels:
            name = labels[key].label
            if name not in classes:
                raise ValueError(
                    f"{store.path}: slide {key} is labelled {name!r}, which is not one of the "
                    f"cohort's classes {classes}"
                )
            changes["label"] = classes.index(name)
            counts["slide_labels"] += 1
            counts["changed"] += changes["label"] != entry.label
        regions = store.regions(key)
        lesions = [(r.box, classes.index(r.label)) for r in regions if r.label in classes]
        counts["ignored_regions"] += len(regions) - len(lesions)
        if lesions:
            # the annotator's regions are the corrected truth: they replace the cohort's boxes
            changes["lesions"] = lesions
            counts["regions"] += len(lesions)
            counts["slides_with_regions"] += 1
        entries.append(dataclasses.replace(entry, **changes) if changes else entry)
    labelled = set(labels) | {r["slide"] for r in store._all_live_regions(None)}
    not_in_cohort = len(labelled - {slide_key(e.slide) for e in cohort.entries})
    applied = LabelsApplied(**counts, not_in_cohort=not_in_cohort)
    return Cohort(cohort.classes, entries, cohort.path), applied


def apply_labels(cohort: Cohort, store: LabelStore) -> Cohort:
    """A new cohort with the store's labels in place of the cohort's.

    Each slide with a slide label in the store takes it; each slide with live regions
    whose label is one of the cohort's classes gets those regions' bounding boxes (with
    their class indices) as its lesions, in place of the cohort's own boxes: the
    annotator's regions are the corrected truth. Slides the store does not know stay as
    they are; the classes and the path are kept.

    Raises:
        ValueError: a slide label that is not one of the cohort's classes (naming the
            slide, the label and the classes).
    """
    return apply_labels_with_summary(cohort, store)[0]
