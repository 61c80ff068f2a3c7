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
and no training code here: the review panel, the CLI and ``train.labels.apply_labels``
(labels into a training cohort) all use this module. The records are in ``records.py``,
the SQLite tables in ``schema.py``, the GeoJSON and CSV files in ``exchange.py``.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import os
import sqlite3
import threading
import uuid
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .exchange import read_geojson, write_csv, write_geojson
from .records import (
    STATUSES,
    Change,
    LabelStoreError,
    Region,
    RegionNotFoundError,
    SlideLabel,
    check_geometry,
    now,
    slide_key,
)
from .schema import (
    change_from_row,
    check_magic,
    check_schema,
    create_schema,
    read_state,
    record_change,
    region_from_row,
    region_state,
    restore_state,
    slide_label_from_row,
)


def _default_author() -> str:
    try:
        return getpass.getuser() or "unknown"
    except Exception:  # no login name in some containers: getpass raises KeyError/OSError
        return "unknown"


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
        check_magic(self.path)
        try:
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT),
            # one per change; check_same_thread=False: the lock serialises threads instead
            self._conn = sqlite3.connect(
                self.path, timeout=10.0, isolation_level=None, check_same_thread=False
            )
            self._conn.row_factory = sqlite3.Row
            new = check_schema(self._conn, self.path)
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
                create_schema(self._conn)
        except sqlite3.Error as exc:
            self.close()
            raise LabelStoreError(self.path, f"not a usable label store ({exc})") from exc
        except BaseException:
            self.close()
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

    # -- slide labels ----------------------------------------------------------------------
    def slide_label(self, slide: str | os.PathLike) -> SlideLabel | None:
        """The slide's label, or None when it has none."""
        with self._reading() as conn:
            row = conn.execute(
                "SELECT * FROM slide_labels WHERE slide = ?", (slide_key(slide),)
            ).fetchone()
        return None if row is None else slide_label_from_row(row)

    def slide_labels(self) -> dict[str, SlideLabel]:
        """Every slide label, by slide key (in key order)."""
        with self._reading() as conn:
            rows = conn.execute("SELECT * FROM slide_labels ORDER BY slide").fetchall()
        return {row["slide"]: slide_label_from_row(row) for row in rows}

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
        who, time = self._who(author), now()
        new = SlideLabel(key, label, status, who, time, note or "")
        with self._transaction() as conn:
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
        who, time = self._who(author), now()
        with self._transaction() as conn:
            old = read_state(conn, key, "note")
            if (old["text"] if old else "") == text:
                return
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
        vertices = check_geometry(geometry, kind)
        who, time = self._who(author), now()
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
        record_change(
            conn,
            time=time,
            author=who,
            slide=key,
            target=f"region:{region.id}",
            action="add",
            old=None,
            new=read_state(conn, key, f"region:{region.id}"),
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
            return region_from_row(self._live_row(conn, region_id))

    def regions(self, slide: str | os.PathLike) -> list[Region]:
        """The slide's live regions, in the order they were made."""
        with self._reading() as conn:
            rows = conn.execute(
                "SELECT * FROM regions WHERE slide = ? AND deleted = 0 ORDER BY id",
                (slide_key(slide),),
            ).fetchall()
        return [region_from_row(row) for row in rows]

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
        current = region_from_row(row)
        if label is not None:
            label = str(label).strip()
            if not label:
                raise ValueError(f"region {region_id}: a region label must not be empty")
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
        updated = dataclasses.replace(updated, author=self._who(author), time=now())
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

    def delete_region(self, region_id: int, *, author: str | None = None) -> None:
        """Delete a region (kept in the file, so undo can restore it).

        Raises:
            RegionNotFoundError: (a KeyError) no such live region.
        """
        who, time = self._who(author), now()
        with self._transaction() as conn:
            row = self._live_row(conn, region_id)
            conn.execute("UPDATE regions SET deleted = 1 WHERE id = ?", (row["id"],))
            record_change(
                conn,
                time=time,
                author=who,
                slide=row["slide"],
                target=f"region:{row['id']}",
                action="delete",
                old=region_state(row),
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
            changes = [change_from_row(row) for row in rows]
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
        who, time = self._who(author), now()
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
            change = change_from_row(row)
            current = read_state(conn, change.slide, change.target)
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
            restore_state(conn, change.slide, change.target, change.old)
            return record_change(
                conn,
                time=time,
                author=who,
                slide=change.slide,
                target=change.target,
                action="undo",
                old=current,
                new=read_state(conn, change.slide, change.target),
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

    def regions_by_slide(self) -> dict[str, list[Region]]:
        """Every live region, by slide key (in key order), each slide's in the order made."""
        regions: dict[str, list[Region]] = {}
        for row in self._all_live_regions(None):
            regions.setdefault(row["slide"], []).append(region_from_row(row))
        return regions

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
        rows = self._all_live_regions(slide)
        return write_geojson(path, [(region_from_row(row), row["uuid"]) for row in rows])

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
        items, skipped = read_geojson(Path(path))
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
        return write_csv(path, self.slide_labels(), self.regions_by_slide())
