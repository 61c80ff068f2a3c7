"""The label store's SQLite file: its tables, its version check, history rows, states.

A label store is an SQLite database whose ``meta`` table names this application and the
schema version; ``check_schema`` refuses other databases and newer versions, and
``create_schema`` makes the tables of an empty file. A change's old and new states (the
history's JSON) are read from rows and written back to them (an undo) here, so the store
and its undo agree on them. Everything here runs inside the store's transactions.
"""

from __future__ import annotations

import json
import os
import sqlite3
from typing import Any

from .records import Change, LabelStoreError, Region, SlideLabel, now

SCHEMA_VERSION = 1
_APPLICATION = "napari-slide-attention labels"
_SQLITE_MAGIC = b"SQLite format 3\x00"

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


def check_magic(path: os.PathLike) -> None:
    """Refuse a file that is not SQLite before SQLite touches it (a missing file is fine)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(_SQLITE_MAGIC))
    except FileNotFoundError:
        return
    except OSError as exc:
        raise LabelStoreError(path, f"cannot read the file ({exc})") from exc
    if head and head != _SQLITE_MAGIC:
        raise LabelStoreError(path, "not a label store (not an SQLite database)")


def check_schema(conn: sqlite3.Connection, path: os.PathLike) -> bool:
    """Whether the file is still empty; refuses other databases and newer schemas."""
    tables = sorted(
        row[0]
        for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        if not row[0].startswith("sqlite_")
    )
    if not tables:
        return True
    if "meta" not in tables:
        raise LabelStoreError(
            path,
            "an SQLite database but not a label store (no meta table; tables: "
            f"{', '.join(tables)})",
        )
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    if meta.get("application") != _APPLICATION:
        raise LabelStoreError(
            path,
            f"an SQLite database of another application ({meta.get('application')!r}), "
            "not a label store",
        )
    try:
        version = int(meta.get("schema_version", ""))
    except ValueError:
        raise LabelStoreError(
            path, f"unreadable schema version {meta.get('schema_version')!r}"
        ) from None
    if version > SCHEMA_VERSION:
        raise LabelStoreError(
            path,
            f"label store schema version {version} is newer than this version of "
            f"napari-slide-attention reads ({SCHEMA_VERSION}); update the package",
        )
    if version < 1:
        raise LabelStoreError(path, f"unknown label store schema version {version}")
    return False


def create_schema(conn: sqlite3.Connection) -> None:
    """Make the tables and the meta rows of a new store, in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        # IF NOT EXISTS / OR IGNORE: another process may have created it meanwhile
        for statement in _SCHEMA:
            conn.execute(statement)
        conn.executemany(
            "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
            [
                ("application", _APPLICATION),
                ("schema_version", str(SCHEMA_VERSION)),
                ("created", now()),
            ],
        )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


# -- history rows and states ---------------------------------------------------------------
def record_change(
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
    """Write one row of the history; gives it as a Change."""
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


def read_state(conn: sqlite3.Connection, slide: str, target: str) -> dict[str, Any] | None:
    """The current state of a change's target ("slide_label", "note", "region:<id>")."""
    if target == "slide_label":
        row = conn.execute("SELECT * FROM slide_labels WHERE slide = ?", (slide,)).fetchone()
        return label_state(row)
    if target == "note":
        row = conn.execute("SELECT * FROM notes WHERE slide = ?", (slide,)).fetchone()
        return note_state(row)
    row = conn.execute(
        "SELECT * FROM regions WHERE id = ?", (int(target.split(":", 1)[1]),)
    ).fetchone()
    return region_state(row)


def restore_state(
    conn: sqlite3.Connection, slide: str, target: str, state: dict[str, Any] | None
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


# -- rows as records and states ------------------------------------------------------------
def label_state(row: sqlite3.Row | None) -> dict[str, Any] | None:
    """A slide label row as a change's old/new state (None: no label)."""
    if row is None:
        return None
    return {k: row[k] for k in ("label", "status", "author", "time", "note")}


def note_state(row: sqlite3.Row | None) -> dict[str, Any] | None:
    """A note row as a change's old/new state (None: no note)."""
    if row is None:
        return None
    return {k: row[k] for k in ("text", "author", "time")}


def region_state(row: sqlite3.Row | None) -> dict[str, Any] | None:
    """A region row as a change's old/new state (None: no such region, or deleted)."""
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


def region_from_row(row: sqlite3.Row) -> Region:
    """The Region of a regions row."""
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


def slide_label_from_row(row: sqlite3.Row) -> SlideLabel:
    """The SlideLabel of a slide_labels row."""
    return SlideLabel(
        row["slide"], row["label"], row["status"], row["author"], row["time"], row["note"]
    )


def change_from_row(row: sqlite3.Row) -> Change:
    """The Change of a changes row joined with its undo (``undone_by``)."""
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
