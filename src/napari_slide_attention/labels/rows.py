"""The label store's rows as records and history states, and the history rows themselves.

A change's old and new states (the history's JSON) are read from rows and written back to
them (an undo) here, so the store and its undo agree on them. Everything here runs inside
the store's transactions. A stored value that cannot be decoded (JSON that does not
parse, a geometry that is not pairs of numbers) raises ``DamagedRow``, which the store
reports as a damaged file: it never reaches a user as a bare ``ValueError``.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from .records import Change, Region, SlideLabel


class DamagedRow(Exception):
    """A stored value that this package did not write: the file is damaged."""


def _json(text: Any, where: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError) as exc:
        raise DamagedRow(f"{where} is not the JSON this package writes ({exc})") from None


def _vertices(text: Any, where: str) -> tuple[tuple[float, float], ...]:
    geometry = _json(text, where)
    try:
        vertices = tuple((float(x), float(y)) for x, y in geometry)
    except (TypeError, ValueError):
        raise DamagedRow(f"{where} is not a list of (x, y) pairs") from None
    if not vertices:
        raise DamagedRow(f"{where} has no vertices")
    return vertices


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
    row = conn.execute("SELECT * FROM regions WHERE id = ?", (region_id(target),)).fetchone()
    return region_state(row)


def region_id(target: str) -> int:
    """The region id of a "region:<id>" target."""
    try:
        return int(target.split(":", 1)[1])
    except (IndexError, ValueError):
        raise DamagedRow(f"a history row names the target {target!r}") from None


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
    number = region_id(target)
    if state is None:
        conn.execute("UPDATE regions SET deleted = 1 WHERE id = ?", (number,))
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
                number,
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
        "geometry": [list(v) for v in _vertices(row["geometry"], f"region {row['id']}")],
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
        _vertices(row["geometry"], f"region {row['id']}"),
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
    where = f"change {row['id']}"
    old = None if row["old"] is None else _json(row["old"], f"{where}'s old state")
    new = None if row["new"] is None else _json(row["new"], f"{where}'s new state")
    if not all(state is None or isinstance(state, dict) for state in (old, new)):
        raise DamagedRow(f"{where}'s states are not JSON objects")
    return Change(
        row["id"],
        row["time"],
        row["author"],
        row["slide"],
        row["target"],
        row["action"],
        old,
        new,
        row["undoes"],
        row["undone_by"],
    )
