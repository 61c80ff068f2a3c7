"""Opening a label store: what a path holds, new stores, checks, upgrades, error lines.

``open_store`` gives a checked connection, or one ``LabelStoreError`` line that names the
file and what it is instead:

- nothing there: a new store only when the caller writes (``create``), never for a
  reader; a new store is built in a temporary file and linked into place, so a path
  never holds half a store (a kill while creating leaves no file, or a whole store);
- a zero-byte file: never ours (see above), maybe a user's file cut short: refused, and
  never written;
- not SQLite, another application's SQLite file, an empty SQLite database: refused;
- ours but damaged (``PRAGMA integrity_check``, unreadable header or tables): refused
  with "damaged: ...";
- ours, of a newer schema version: refused; of an older one: copied to a backup file,
  then migrated in one transaction (``schema.migrate``) when opened for writing, read
  as it is when opened read-only.

Every check runs on a read-only connection first, so a file that is refused is never
written: not even its journal mode, nor a checkpoint of its write-ahead log on close.
``sqlite_errors`` turns what SQLite and the sqlite3 module raise on a damaged file
(``DatabaseError``, ``UnicodeDecodeError`` from undecodable names or text) into a
``LabelStoreError`` of the same shape, for every later read and write too.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

from .records import LabelStoreError
from .rows import DamagedRow
from .schema import SCHEMA_VERSION, SQLITE_MAGIC, create_schema, migrate, store_version

# a full integrity check reads every page and checks every index against its table;
# above this size the quick check (pages and records, no index cross-check) keeps the
# cost of opening a store bounded by a read of the file
FULL_CHECK_BYTES = 64 * 2**20
# how long a write waits for another process's transaction (changes take milliseconds;
# a large import may take seconds)
BUSY_TIMEOUT_S = 30.0
_DAMAGE_CODES = ("SQLITE_CORRUPT", "SQLITE_NOTADB")
_DAMAGE_WORDS = ("disk image is malformed", "file is not a database")


@contextlib.contextmanager
def sqlite_errors(path: os.PathLike | str, doing: str) -> Iterator[None]:
    """Re-raise what reading or writing a store raises as a LabelStoreError naming it."""
    try:
        yield
    except LabelStoreError:
        raise
    except DamagedRow as exc:
        raise LabelStoreError(path, f"damaged: {exc}") from None
    except UnicodeDecodeError as exc:
        # SQLite's messages quote names from the file: garbled bytes fail to decode
        raise LabelStoreError(
            path, f"damaged: bytes that are not UTF-8 in its tables or names ({exc.reason})"
        ) from None
    except sqlite3.Error as exc:
        raise LabelStoreError(path, describe(exc, doing)) from None


def describe(exc: sqlite3.Error, doing: str) -> str:
    """The problem an sqlite3 error tells of, in the words of a LabelStoreError."""
    name = getattr(exc, "sqlite_errorname", None) or ""  # Python 3.11+
    text = " ".join(str(exc).split())  # one line
    if len(text) > 300:  # the sqlite3 module quotes a whole undecodable value
        text = text[:300] + "…"
    if (
        name.startswith(_DAMAGE_CODES)
        or any(words in text for words in _DAMAGE_WORDS)
        or text.startswith("Could not decode to UTF-8")  # the sqlite3 module's own
    ):
        return f"damaged: {text}"
    return f"cannot {doing} ({text})"


def open_store(
    path: Path, *, read_only: bool = False, create: bool = True
) -> tuple[sqlite3.Connection, bool, Path | None]:
    """A checked connection to the store at ``path``, whether this call created the
    file, and the backup copy made before a migration (None: none was needed).

    Args:
        path: the store's file.
        read_only: open for reading only: nothing is created, migrated or written.
        create: make a new store when nothing is at ``path`` (when not read-only).

    Raises:
        LabelStoreError: one line naming the file and why it cannot be used.
    """
    created = False
    if not path.exists() and not path.is_symlink():
        if read_only or not create:
            raise LabelStoreError(path, "no label store here")
        if not path.parent.is_dir():
            raise LabelStoreError(path, f"the folder {path.parent} does not exist")
        created = create_store(path)
    _check_file(path, writing=not read_only)
    check = _connect(path, read_only=True)
    try:
        with sqlite_errors(path, "read"):
            version = store_version(check, path)
            check_integrity(check, path)
        if read_only:
            return check, created, None
        backup = backup_copy(check, path, version) if version < SCHEMA_VERSION else None
    except BaseException:
        check.close()
        raise
    check.close()
    conn = _connect(path, read_only=False)
    try:
        with sqlite_errors(path, "open for writing"):
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise LabelStoreError(
                    path, f"cannot use WAL journaling here (SQLite kept {mode!r})"
                )
            # FULL: the WAL is on disk (fsynced) before a change returns, so a change a
            # reviewer saw saved survives a power cut too, not only a killed process;
            # labels are written at human pace, the fsync costs milliseconds
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            if backup is not None:
                migrate(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn, created, backup


def _connect(path: Path, *, read_only: bool) -> sqlite3.Connection:
    # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT), one
    # per change; check_same_thread=False: the store's lock serialises threads instead
    target = path.resolve().as_uri() + ("?mode=ro" if read_only else "?mode=rw")
    try:
        conn = sqlite3.connect(
            target,
            uri=True,
            timeout=BUSY_TIMEOUT_S,
            isolation_level=None,
            check_same_thread=False,
        )
    except sqlite3.Error as exc:
        raise LabelStoreError(path, describe(exc, "open")) from None
    conn.row_factory = sqlite3.Row
    return conn


def _check_file(path: Path, *, writing: bool) -> None:
    """Refuse what is not an SQLite file before SQLite opens it."""
    try:
        info = path.stat()
    except OSError as exc:
        raise LabelStoreError(path, f"cannot read the file ({exc.strerror or exc})") from None
    if stat.S_ISDIR(info.st_mode):
        raise LabelStoreError(path, "a folder, not a label store")
    if not stat.S_ISREG(info.st_mode):
        # opening a FIFO for reading would wait for a writer forever
        raise LabelStoreError(path, "not a regular file, not a label store")
    if info.st_size == 0:
        # never one of ours (new stores are linked into place whole): maybe a user's file
        # cut short, so it is not made into a store either
        raise LabelStoreError(
            path,
            "empty file, not a label store"
            + ("; left as it is (delete it to start a new store here)" if writing else ""),
        )
    try:
        with open(path, "rb") as handle:
            head = handle.read(100)
    except OSError as exc:
        raise LabelStoreError(path, f"cannot read the file ({exc.strerror or exc})") from None
    if not head.startswith(SQLITE_MAGIC):
        raise LabelStoreError(path, "not a label store (not an SQLite database)")
    if len(head) < 100:
        raise LabelStoreError(path, f"damaged: {info.st_size} bytes, shorter than its header")


def check_integrity(conn: sqlite3.Connection, path: Path) -> None:
    """Refuse a store whose pages SQLite finds damaged (cost: one read of the file)."""
    size = path.stat().st_size
    pragma = "integrity_check" if size <= FULL_CHECK_BYTES else "quick_check"
    rows = [row[0] for row in conn.execute(f"PRAGMA {pragma}(5)").fetchall()]
    if rows == ["ok"]:
        return
    # a row may hold several lines under a "*** in database main ***" heading
    problems = [
        line.strip()
        for row in rows
        for line in str(row).splitlines()
        if line.strip() and not line.startswith("***")
    ] or ["the integrity check failed"]
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    raise LabelStoreError(path, f"damaged: {problems[0]}{more}")


def create_store(path: Path) -> bool:
    """Make a new, empty store at ``path``; gives False when another process made one
    there first (which the caller then opens).

    The store is written to a temporary file in the same folder, synced, and hard-linked
    to ``path``, which fails rather than replace a file that appeared meanwhile.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.new")
    try:
        with sqlite_errors(path, "create the label store"):
            conn = sqlite3.connect(tmp, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                create_schema(conn)
                # the WAL into the file, so the file alone is the whole store
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.close()
        _fsync(tmp)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:
            # a file system without hard links: a rename, which could replace a store
            # created in the last instant, so look first
            if path.exists():
                return False
            os.rename(tmp, path)
        _fsync(path.parent)
        return True
    except OSError as exc:
        raise LabelStoreError(path, f"cannot create the label store ({exc})") from None
    finally:
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            leftover.unlink(missing_ok=True)


def backup_copy(conn: sqlite3.Connection, path: Path, version: int) -> Path:
    """Copy the store (as ``conn`` reads it, its write-ahead log included) to a new file
    next to it, ``<name>.schema-<version>.bak``; gives the copy's path."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.bak")
    try:
        with sqlite_errors(path, "back up the label store before migrating it"):
            copy = sqlite3.connect(tmp)
            try:
                conn.backup(copy)
            finally:
                copy.close()
        _fsync(tmp)
        for n in range(1, 1000):
            name = f"{path.name}.schema-{version}{'' if n == 1 else f'.{n}'}.bak"
            try:
                os.link(tmp, path.with_name(name))
            except FileExistsError:
                continue
            _fsync(path.parent)
            return path.with_name(name)
        raise LabelStoreError(path, "cannot back up the label store: 999 backups exist")
    except OSError as exc:
        raise LabelStoreError(
            path, f"cannot back up the label store before migrating it ({exc})"
        ) from None
    finally:
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm"), Path(f"{tmp}-journal")):
            leftover.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
