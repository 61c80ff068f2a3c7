"""The label store's SQLite file: its tables, how a file is known as a store, its versions.

A label store is an SQLite database whose header carries this package's
``application_id`` and the schema version as ``user_version`` (from schema version 2; a
version-1 store says both in its ``meta`` table only). ``store_version`` reads a file's
version and refuses other files: other applications' databases, empty databases, stores
newer than this code. ``create_schema`` makes the tables of a new file, and
``MIGRATIONS`` takes an older store one version up; every version this package has
written is listed in ``VERSIONS``, and each has a migration path to ``SCHEMA_VERSION``
tested on a store that version's code wrote (``tests/labels/data``).
"""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import Callable

from .records import LabelStoreError, now

SCHEMA_VERSION = 2
# "NSAL": napari-slide-attention labels, in the header's application_id field (what
# `file` and other tools read to tell an SQLite file's owner)
APPLICATION_ID = 0x4E53414C
APPLICATION = "napari-slide-attention labels"
SQLITE_MAGIC = b"SQLite format 3\x00"

VERSIONS = {
    1: "2026-11: slide labels, notes, regions, history; the version in the meta table only",
    2: "2026-12: the header's application_id and user_version say what the file is",
}

_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE slide_labels (
        slide TEXT PRIMARY KEY,
        label TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('accepted', 'corrected')),
        author TEXT NOT NULL,
        time TEXT NOT NULL,
        note TEXT NOT NULL DEFAULT '')""",
    """CREATE TABLE notes (
        slide TEXT PRIMARY KEY,
        text TEXT NOT NULL,
        author TEXT NOT NULL,
        time TEXT NOT NULL)""",
    # regions are only ever soft-deleted (``deleted``), so an undo can restore them and
    # every "region:<id>" in the history keeps pointing at its region
    """CREATE TABLE regions (
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
    "CREATE INDEX regions_by_slide ON regions (slide, deleted, id)",
    """CREATE TABLE changes (
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
    "CREATE INDEX changes_by_slide ON changes (slide, id)",
    "CREATE INDEX changes_by_target ON changes (slide, target, id)",
)


def create_schema(conn: sqlite3.Connection) -> None:
    """Make the tables, meta rows and header fields of a new store, in one transaction.

    Only ever run on a file nobody else can see yet (``opening.create_store`` builds a
    store in a temporary file and links it into place).
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in _SCHEMA:
            conn.execute(statement)
        conn.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?)",
            [
                ("application", APPLICATION),
                ("schema_version", str(SCHEMA_VERSION)),
                ("created", now()),
            ],
        )
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def store_version(conn: sqlite3.Connection, path: os.PathLike | str) -> int:
    """The schema version of the label store ``conn`` reads.

    Raises:
        LabelStoreError: the database is not a label store (another application's, an
            empty one, tables of its own), is one of a version newer than this code
            reads, or is ours with its tables or version damaged.
    """
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    header_version = conn.execute("PRAGMA user_version").fetchone()[0]
    tables = sorted(
        row[0]
        for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        if not row[0].startswith("sqlite_")
    )
    ours = app_id == APPLICATION_ID
    if not ours and app_id != 0:
        raise LabelStoreError(
            path,
            f"an SQLite database of another application (application_id {app_id:#010x}), "
            "not a label store",
        )
    if not ours and not tables:
        raise LabelStoreError(path, "an empty SQLite database, not a label store")
    if not ours and "meta" not in tables:
        raise LabelStoreError(
            path,
            f"an SQLite database but not a label store (tables: {', '.join(tables)})",
        )
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall()) if "meta" in tables else {}
    if not ours and meta.get("application") != APPLICATION:
        raise LabelStoreError(
            path,
            f"an SQLite database of another application ({meta.get('application')!r}), "
            "not a label store",
        )
    try:
        meta_version = int(meta.get("schema_version", ""))
    except ValueError:
        meta_version = None
    # version 1 wrote neither header field: its version is the meta table's
    version = header_version if ours else meta_version
    if max(header_version, meta_version or 0) > SCHEMA_VERSION:
        raise LabelStoreError(
            path,
            f"a label store of schema version {max(header_version, meta_version or 0)}, "
            f"newer than this napari-slide-attention reads ({SCHEMA_VERSION}); update the "
            "package (the file is left as it is)",
        )
    if version not in VERSIONS or (ours and meta_version != header_version):
        raise LabelStoreError(
            path,
            f"damaged: unreadable label store version (header {header_version}, meta "
            f"table {meta.get('schema_version')!r}, application_id {app_id:#x})",
        )
    if ours and version == 1:
        raise LabelStoreError(path, "damaged: a version-1 store with a version-2 header")
    _check_definitions(conn, path, version)
    return version


def _words(sql: str) -> str:
    return " ".join(sql.split())


def _check_definitions(conn: sqlite3.Connection, path: os.PathLike | str, version: int) -> None:
    """Refuse a store whose tables or indexes are not those of its version: a damaged
    definition (a garbled CHECK) would otherwise show up as a baffling failure to write.
    Objects of a user's own (an index, a view) are let be."""
    stored = {
        name: _words(sql or "")
        for name, sql in conn.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL")
    }
    for statement in DEFINITIONS[version]:
        name = re.match(r"CREATE (?:TABLE|INDEX) (\w+)", statement).group(1)
        if stored.get(name) != _words(statement):
            found = "missing" if name not in stored else "not as this package writes it"
            raise LabelStoreError(
                path, f"damaged: the definition of {name} is {found} (schema version {version})"
            )


# -- migrations ----------------------------------------------------------------------------
def _v1_to_v2(conn: sqlite3.Connection) -> None:
    """Version 2 writes what the file is into the header; the tables are unchanged."""
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")


MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _v1_to_v2}
# the tables and indexes of each version (the statements as SQLite keeps them)
DEFINITIONS = {1: _SCHEMA, 2: _SCHEMA}


def migrate(conn: sqlite3.Connection, path: os.PathLike | str) -> int | None:
    """Take the store up to ``SCHEMA_VERSION`` in one transaction; gives the version it
    had, or None when it was current already (another process may have migrated it).

    The caller has made a backup copy first; a failure rolls everything back, leaving the
    file as it was.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        start = version = store_version(conn, path)
        while version < SCHEMA_VERSION:
            MIGRATIONS[version](conn)
            version += 1
            conn.execute(f"PRAGMA user_version = {version}")
            conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                (f"migrated_{version - 1}_to_{version}", now()),
            )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return None if start == SCHEMA_VERSION else start
