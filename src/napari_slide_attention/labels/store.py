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
together (``edits.py``), committed and synced to disk before the call returns, so a
crash, a kill or a power cut never loses a change a reviewer saw saved and never leaves
a change without its history. The file is in WAL mode with a busy timeout, so a napari
review panel and the command line can read it while one of them writes, and both can
write. Opening checks what the file is and refuses anything else in one line, without
writing to it (``opening.py``).

Slides are keyed by their absolute resolved POSIX path (``slide_key``). No torch, no Qt
and no training code here: the review panel, the CLI and ``train.labels.apply_labels``
(labels into a training cohort) all use this module. The records are in ``records.py``,
the SQLite tables and versions in ``schema.py``, rows and history states in
``rows.py``, the GeoJSON and CSV files in ``exchange.py``.
"""

from __future__ import annotations

import getpass
import os
import sqlite3
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from . import edits
from .exchange import read_geojson, write_csv, write_geojson
from .opening import open_store, sqlite_errors
from .records import Change, LabelStoreError, Region, SlideLabel, slide_key
from .rows import change_from_row, region_from_row, slide_label_from_row


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
        read_only: opened for reading: changes raise LabelStoreError.
        created: this opening made the file.
        backup: the copy of the file made before migrating it from an older schema
            version when it was opened (None: no migration).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        author: str | None = None,
        read_only: bool = False,
        create: bool = True,
    ):
        """Open or create a label store.

        Args:
            path: the database file; its folder must exist.
            author: who changes are by; None = the login name ("unknown" without one).
            read_only: read only: nothing is created, migrated or written (``labels show``
                and ``export``).
            create: make a new store when nothing is at ``path`` (writers only; a
                zero-byte file is never made into a store).

        Raises:
            LabelStoreError: one line naming the file: nothing there (read-only or
                ``create=False``), the folder does not exist, an empty file, not an SQLite
                database, another application's database, damaged, a newer schema version.
        """
        self.path = Path(path)
        self.author = (author or "").strip() or _default_author()
        self.read_only = read_only
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._conn, self.created, self.backup = open_store(
            self.path, read_only=read_only, create=create
        )

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
            if self.read_only:
                raise LabelStoreError(self.path, "opened read-only; cannot change it")
            with sqlite_errors(self.path, "write"):
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        # a damaged file may refuse the rollback too; the first error
                        # is the one to report
                        with suppress(sqlite3.Error):
                            conn.execute("ROLLBACK")
                    raise

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._connection()
            with sqlite_errors(self.path, "read"):
                yield conn

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
        with self._transaction() as conn:
            return edits.set_slide_label(conn, key, label, status, note, self._who(author))

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
        with self._transaction() as conn:
            edits.set_note(conn, key, text or "", self._who(author))

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
            return edits.add_region(conn, key, geometry, label, kind, note, self._who(author))

    def region(self, region_id: int) -> Region:
        """The live region with this id.

        Raises:
            RegionNotFoundError: (a KeyError) no such region, or it was deleted.
        """
        with self._reading() as conn:
            return region_from_row(edits.live_row(conn, self.path, region_id))

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
            return edits.update_region(
                conn, self.path, region_id, label, geometry, note, self._who(author)
            )

    def delete_region(self, region_id: int, *, author: str | None = None) -> None:
        """Delete a region (kept in the file, so undo can restore it).

        Raises:
            RegionNotFoundError: (a KeyError) no such live region.
        """
        with self._transaction() as conn:
            edits.delete_region(conn, self.path, region_id, self._who(author))

    def slides(self) -> list[str]:
        """The keys of the slides with a label, a note or a live region, sorted."""
        with self._reading() as conn:
            rows = conn.execute(
                "SELECT slide FROM slide_labels UNION SELECT slide FROM notes "
                "UNION SELECT slide FROM regions WHERE deleted = 0 ORDER BY slide"
            ).fetchall()
            return [row[0] for row in rows]

    # -- history and undo ------------------------------------------------------------------
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
            rows = conn.execute(f"{edits.CHANGES}{where} ORDER BY c.id DESC{tail}", params)
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
        key = None if slide is None else slide_key(slide)
        with self._transaction() as conn:
            return edits.undo(conn, self.path, key, author, self._who(author))

    # -- files -----------------------------------------------------------------------------
    def _live_regions(self, slide: str | os.PathLike | None) -> list[tuple[Region, str]]:
        """The live regions (of one slide, or all by slide) with their stable ids."""
        with self._reading() as conn:
            if slide is None:
                rows = conn.execute(
                    "SELECT * FROM regions WHERE deleted = 0 ORDER BY slide, id"
                ).fetchall()
            else:
                rows = conn.execute(
                    "SELECT * FROM regions WHERE slide = ? AND deleted = 0 ORDER BY id",
                    (slide_key(slide),),
                ).fetchall()
            return [(region_from_row(row), row["uuid"]) for row in rows]

    def regions_by_slide(self) -> dict[str, list[Region]]:
        """Every live region, by slide key (in key order), each slide's in the order made."""
        regions: dict[str, list[Region]] = {}
        for region, _ in self._live_regions(None):
            regions.setdefault(region.slide, []).append(region)
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
        return write_geojson(path, self._live_regions(slide))

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
            edits.import_regions(conn, path, key, items, self._who(author))
        return len(items)

    def export_csv(self, path: str | os.PathLike) -> int:
        """Write one row per slide label and per live region; gives the number of rows.

        Columns ``slide,kind,id,label,status,author,time,note,x,y,w,h,geometry``: slide
        labels have kind "slide" and no id, box or geometry; regions their kind, id,
        bounding box and vertices as JSON.
        """
        return write_csv(path, self.slide_labels(), self.regions_by_slide())
