"""The label store's changes, each written with its history row inside the caller's
transaction: slide labels, notes, regions, undo and the regions of an imported file.

``LabelStore`` opens the transaction (one per change, or one for a whole import), names
the author and hands the connection here; these functions check their input, write the
new state and record the change, so a state is never written without its history row.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from .exchange import ImportedRegion
from .records import (
    STATUSES,
    Change,
    LabelStoreError,
    Region,
    RegionNotFoundError,
    SlideLabel,
    check_geometry,
    now,
)
from .rows import (
    change_from_row,
    read_state,
    record_change,
    region_from_row,
    region_state,
    restore_state,
)

# every change joined with the undo that reverted it, if any
CHANGES = (
    "SELECT c.*, u.id AS undone_by FROM changes AS c LEFT JOIN changes AS u ON u.undoes = c.id"
)


def checked_label(label: object, what: str) -> str:
    """A class name, stripped.

    Raises:
        ValueError: an empty name (``what``: "<slide>: a slide label", "<slide>: a region
            label", "region <id>: a region label").
    """
    text = str(label).strip()
    if not text:
        raise ValueError(f"{what} must not be empty")
    return text


def set_slide_label(
    conn: sqlite3.Connection, key: str, label: str, status: str, note: str, who: str
) -> SlideLabel:
    """The slide's new label, written with its history row."""
    label = checked_label(label, f"{key}: a slide label")
    if status not in STATUSES:
        raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
    time = now()
    new = SlideLabel(key, label, status, who, time, note or "")
    old = read_state(conn, key, "slide_label")
    conn.execute(
        "INSERT OR REPLACE INTO slide_labels (slide, label, status, author, time, note) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        dataclasses.astuple(new),
    )
    record_change(
        conn,
        time=time,
        author=who,
        slide=key,
        target="slide_label",
        action="set",
        old=old,
        new=read_state(conn, key, "slide_label"),
    )
    return new


def set_note(conn: sqlite3.Connection, key: str, text: str, who: str) -> None:
    """Set the slide's note ("" removes it); an unchanged note records nothing."""
    old = read_state(conn, key, "note")
    if (old["text"] if old else "") == text:
        return
    time = now()
    conn.execute("DELETE FROM notes WHERE slide = ?", (key,))
    if text:
        conn.execute(
            "INSERT INTO notes (slide, text, author, time) VALUES (?, ?, ?, ?)",
            (key, text, who, time),
        )
    record_change(
        conn,
        time=time,
        author=who,
        slide=key,
        target="note",
        action="set",
        old=old,
        new=read_state(conn, key, "note"),
    )


def add_region(
    conn: sqlite3.Connection,
    key: str,
    geometry: Iterable[Sequence[float]],
    label: str,
    kind: str,
    note: str,
    who: str,
    region_uuid: str | None = None,
) -> Region:
    """The new region, written with its history row."""
    label = checked_label(label, f"{key}: a region label")
    vertices = check_geometry(geometry, kind)
    time = now()
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
    target = f"region:{region.id}"
    record_change(
        conn,
        time=time,
        author=who,
        slide=key,
        target=target,
        action="add",
        old=None,
        new=read_state(conn, key, target),
    )
    return region


def live_row(conn: sqlite3.Connection, path: os.PathLike | str, region_id: int) -> sqlite3.Row:
    """The regions row of a live region.

    Raises:
        RegionNotFoundError: no such region, or it was deleted.
    """
    row = conn.execute("SELECT * FROM regions WHERE id = ?", (int(region_id),)).fetchone()
    if row is None:
        raise RegionNotFoundError(f"{path}: no region {region_id}")
    if row["deleted"]:
        raise RegionNotFoundError(f"{path}: region {region_id} was deleted (undo brings it back)")
    return row


def update_region(
    conn: sqlite3.Connection,
    path: os.PathLike | str,
    region_id: int,
    label: str | None,
    geometry: Iterable[Sequence[float]] | None,
    note: str | None,
    who: str,
    kind: str | None = None,
) -> Region:
    """The region after the change (None = keep); ``kind`` changes the kind too (an import
    of a rectangle that was edited into a polygon elsewhere). A change that changes
    nothing records nothing."""
    row = live_row(conn, path, region_id)
    current = region_from_row(row)
    if label is not None:
        label = checked_label(label, f"region {region_id}: a region label")
    kind = kind or current.kind
    vertices = check_geometry(current.geometry if geometry is None else geometry, kind)
    updated = dataclasses.replace(
        current,
        label=current.label if label is None else label,
        geometry=vertices,
        kind=kind,
        note=current.note if note is None else note,
    )
    if updated == current:
        return current
    updated = dataclasses.replace(updated, author=who, time=now())
    target = f"region:{current.id}"
    old = region_state(row)
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
    record_change(
        conn,
        time=updated.time,
        author=updated.author,
        slide=current.slide,
        target=target,
        action="update",
        old=old,
        new=read_state(conn, current.slide, target),
    )
    return updated


def delete_region(
    conn: sqlite3.Connection, path: os.PathLike | str, region_id: int, who: str
) -> None:
    """Mark a live region deleted, with its history row."""
    row = live_row(conn, path, region_id)
    conn.execute("UPDATE regions SET deleted = 1 WHERE id = ?", (row["id"],))
    record_change(
        conn,
        time=now(),
        author=who,
        slide=row["slide"],
        target=f"region:{row['id']}",
        action="delete",
        old=region_state(row),
        new=None,
    )


def undo(
    conn: sqlite3.Connection,
    path: os.PathLike | str,
    key: str | None,
    author: str | None,
    who: str,
) -> Change | None:
    """The "undo" change that reverted the latest change not yet undone (of the slide
    ``key`` and by ``author`` when given), or None when there is none."""
    clauses = ["c.action != 'undo'", "u.id IS NULL"]
    params: list[Any] = []
    if key is not None:
        clauses.append("c.slide = ?")
        params.append(key)
    if author is not None:
        clauses.append("c.author = ?")
        params.append(author)
    row = conn.execute(
        f"{CHANGES} WHERE {' AND '.join(clauses)} ORDER BY c.id DESC LIMIT 1", params
    ).fetchone()
    if row is None:
        return None
    change = change_from_row(row)
    current = read_state(conn, change.slide, change.target)
    if current != change.new:
        later = conn.execute(
            "SELECT id, author, action FROM changes WHERE slide = ? AND target = ? "
            "AND id > ? ORDER BY id DESC LIMIT 1",
            (change.slide, change.target, change.id),
        ).fetchone()
        since = f" (change {later['id']}, {later['action']} by {later['author']})" if later else ""
        raise ValueError(
            f"{path}: cannot undo change {change.id} ({change.action} of "
            f"{change.target} of {change.slide} by {change.author}): it was changed "
            f"since{since}; undo that first"
        )
    restore_state(conn, change.slide, change.target, change.old)
    return record_change(
        conn,
        time=now(),
        author=who,
        slide=change.slide,
        target=change.target,
        action="undo",
        old=current,
        new=read_state(conn, change.slide, change.target),
        undoes=change.id,
    )


def import_regions(
    conn: sqlite3.Connection,
    path: os.PathLike | str,
    key: str,
    items: Sequence[ImportedRegion],
    who: str,
) -> None:
    """Add or update (by the feature's id) the regions read from a file, named ``path``
    in errors."""
    seen: set[str] = set()
    for item in items:
        row = None
        if item.uuid is not None and item.uuid not in seen:
            row = conn.execute("SELECT * FROM regions WHERE uuid = ?", (item.uuid,)).fetchone()
        try:
            if row is not None and row["slide"] == key and not row["deleted"]:
                update_region(
                    conn, path, row["id"], item.label, item.geometry, item.note, who, item.kind
                )
            else:
                # an id taken elsewhere (another slide, a deleted region) or repeated in
                # the file: the region gets a fresh one
                fresh = item.uuid not in seen and row is None
                add_region(
                    conn,
                    key,
                    item.geometry,
                    item.label,
                    item.kind,
                    item.note,
                    who,
                    item.uuid if fresh else None,
                )
        except ValueError as exc:
            raise LabelStoreError(path, f"feature {item.feature}: {exc}") from None
        if item.uuid is not None:
            seen.add(item.uuid)
