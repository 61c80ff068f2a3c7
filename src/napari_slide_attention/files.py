"""Files written whole or not at all: a temporary sibling, flushed, renamed into place.

Every output a user keeps (checkpoints, training state, logs, cohort CSVs, label exports,
masks, reports) goes through here or through ``results.SlideResult.save`` (folders), so
a crash, a kill or a full disk leaves the old file or the new one, never half of one.
Temporary files are created as a plain ``open`` would create the file (mode 0666 less the
umask; ``tempfile.mkstemp`` gives 0600, and the renamed file would differ from its
neighbours), are named ``.NAME.<8 hex>.tmp`` (``is_temporary``), and are removed when the
write fails. Shared by every layer: imports nothing of ours.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "atomic_copy",
    "atomic_write_bytes",
    "atomic_write_text",
    "commit",
    "is_temporary",
    "temp_sibling",
    "written_atomically",
]


def temp_sibling(path: str | os.PathLike) -> Path:
    """Returns a new, empty file beside ``path`` with a hidden temporary name."""
    path = Path(path)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def commit(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Flushes ``tmp`` to disk and renames it over ``path`` (then flushes the rename)."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(Path(path).parent, os.O_RDONLY)
    except OSError:  # a directory that cannot be opened (some platforms): skip
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def written_atomically(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path to write ``path``'s content to; renames it into place when
    the block ends without an error, removes it otherwise (for writers that want a path:
    image and CSV libraries)."""
    path = Path(path)
    tmp = temp_sibling(path)
    mode = tmp.stat().st_mode & 0o777
    try:
        yield tmp
        os.chmod(tmp, mode)  # writers that create their file anew make it 0600 at times
        commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Returns ``path`` after writing ``data`` to it whole."""
    with written_atomically(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Returns ``path`` after writing ``text`` (UTF-8) to it whole."""
    with written_atomically(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_copy(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Returns ``target`` after copying ``source`` over it: ``target`` is always either the
    old file or a complete copy."""
    with written_atomically(target) as tmp, open(source, "rb") as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
    return Path(target)


def is_temporary(path: str | os.PathLike) -> bool:
    """Whether ``path`` is named as this module's temporary files are (a write that a
    crash cut short leaves one behind; nothing reads them)."""
    return bool(re.fullmatch(r"\..+\.[0-9a-f]{8}\.tmp", Path(path).name))
