"""What a label store path holds decides what opening it does: nothing there is a new
store only for a writer; an empty file, a file that is not SQLite, another application's
database and a damaged store are refused in one line naming the file, and never written
to; reading commands never create or change anything."""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
import threading
from pathlib import Path

import pytest

from napari_slide_attention.cli import main
from napari_slide_attention.cli.driver import EXIT_ERROR
from napari_slide_attention.labels import LabelStore, LabelStoreError, opening, schema

SQUARE = [(10.0, 20.0), (110.0, 20.0), (110.0, 70.5), (10.0, 70.5)]
A, B = "/cohort/slides/a.tif", "/cohort/slides/b.tif"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _populated(path: Path) -> Path:
    """A closed store with labels, regions, notes and undone changes."""
    with LabelStore(path, author="ann") as store:
        store.set_slide_label(A, "carcinoma", note="lesion at 3 o'clock")
        store.set_slide_label(B, "benign", status="accepted")
        square = store.add_region(A, SQUARE, "carcinoma", kind="rectangle")
        store.add_region(B, [(0, 0), (40, 0), (20, 30)], "benign")
        store.add_region(B, [(0, 0), (256, 0), (256, 256), (0, 256)], "stroma", kind="tile")
        store.update_region(square.id, label="atypia")
        store.undo()
        store.update_region(square.id, label="stroma")
        store.set_note(A, "blurry corner")
    return path


def _read_everything(store: LabelStore) -> None:
    store.slide_labels()
    for key in store.slides():
        store.regions(key)
        store.note(key)
    store.regions_by_slide()
    store.history()


def _cli_refuses(argv: list[str], path: Path, problem: str, capsys) -> None:
    """The command ends with the error status and one line naming the file."""
    assert main(argv) == EXIT_ERROR
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("slide-attention: error: ")
    assert str(path) in err and problem in err, err
    assert "Traceback" not in captured.err


def _all_commands(path: Path, tmp_path: Path) -> list[list[str]]:
    geojson = tmp_path / "in.geojson"
    geojson.write_text('{"type": "FeatureCollection", "features": []}')
    store = ["--store", str(path)]
    return [
        ["labels", "show", *store],
        ["labels", "show", *store, "--history", "--slide", A],
        ["labels", "export", *store, "--csv", str(tmp_path / "out.csv")],
        ["labels", "export", *store, "--geojson", str(tmp_path / "out.geojson")],
        ["labels", "import", *store, "--geojson", str(geojson), "--slide", A],
    ]


# -- nothing there, an empty file ----------------------------------------------------------
def test_reading_commands_never_create_a_store(tmp_path, capsys):
    missing = tmp_path / "none.labels.sqlite"
    with pytest.raises(LabelStoreError, match="no label store here") as caught:
        LabelStore(missing, read_only=True)
    assert caught.value.path == str(missing)
    with pytest.raises(LabelStoreError, match="no label store here"):
        LabelStore(missing, create=False)
    for argv in _all_commands(missing, tmp_path)[:4]:
        _cli_refuses(argv, missing, "no label store here", capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.geojson"]
    # a writer makes one
    assert main(_all_commands(missing, tmp_path)[4]) == 0
    assert missing.is_file()


def test_an_empty_file_is_refused_and_left_empty(tmp_path, capsys):
    empty = tmp_path / "cohort.labels.sqlite"
    empty.touch()
    with pytest.raises(LabelStoreError, match="empty file, not a label store"):
        LabelStore(empty, read_only=True)
    with pytest.raises(LabelStoreError, match="empty file, not a label store; left as it is"):
        LabelStore(empty)  # a writer does not make a user's truncated file into a store
    for argv in _all_commands(empty, tmp_path):
        _cli_refuses(argv, empty, "empty file, not a label store", capsys)
    assert empty.stat().st_size == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort.labels.sqlite", "in.geojson"]


def test_a_store_opened_read_only_refuses_changes_and_writes_nothing(tmp_path):
    path = _populated(tmp_path / "c.labels.sqlite")
    before = _digest(path)
    with LabelStore(path, read_only=True) as store:
        assert store.read_only and not store.created and store.backup is None
        _read_everything(store)
        with pytest.raises(LabelStoreError, match="opened read-only"):
            store.set_slide_label(A, "benign")
        with pytest.raises(LabelStoreError, match="opened read-only"):
            store.undo()
    assert _digest(path) == before


def test_a_store_is_created_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "c.labels.sqlite"

    def fail(conn):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("CREATE TABLE meta (key TEXT)")
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(opening, "create_schema", fail)
    with pytest.raises(LabelStoreError, match=r"cannot create the label store \(disk I/O"):
        LabelStore(path)
    assert list(tmp_path.iterdir()) == []  # neither the store nor its temporary file
    monkeypatch.undo()
    with LabelStore(path) as store:
        assert store.created and store.history() == []
    with LabelStore(path) as store:
        assert not store.created


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_pipe_or_a_folder_is_refused_at_once(tmp_path):
    fifo = tmp_path / "c.labels.sqlite"
    os.mkfifo(fifo)
    result: list[BaseException] = []
    # opening a FIFO to read would wait for a writer forever: a thread, so a hang fails
    thread = threading.Thread(target=lambda: result.append(_refusal(fifo)), daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "opening a FIFO hangs"
    assert "not a regular file" in str(result[0])
    with pytest.raises(LabelStoreError, match="a folder, not a label store"):
        LabelStore(tmp_path)


def _refusal(path: Path) -> BaseException:
    try:
        LabelStore(path)
    except LabelStoreError as exc:
        return exc
    raise AssertionError(f"{path} was opened")


# -- other files ---------------------------------------------------------------------------
def _sqlite_file(path: Path, *statements: str) -> Path:
    conn = sqlite3.connect(path)
    for statement in statements:
        conn.execute(statement)
    conn.commit()
    conn.close()
    return path


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda p: p.write_bytes(os.urandom(4096)), "not an SQLite database"),
        (lambda p: p.write_text("slide,label\na.tif,benign\n"), "not an SQLite database"),
        (lambda p: p.write_bytes(schema.SQLITE_MAGIC + b"\0" * 20), "shorter than its header"),
        (
            lambda p: _sqlite_file(p, "CREATE TABLE things (x)"),
            "not a label store (tables: things)",
        ),
        (lambda p: _sqlite_file(p, "PRAGMA user_version = 3"), "an empty SQLite database"),
        (
            # a GeoPackage (QuPath and GIS tools write them) says so in its header
            lambda p: _sqlite_file(
                p, f"PRAGMA application_id = {0x47504B47}", "CREATE TABLE t (x)"
            ),
            "another application (application_id 0x47504b47)",
        ),
        (
            lambda p: _sqlite_file(
                p,
                "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)",
                "INSERT INTO meta VALUES ('application', 'someone else')",
            ),
            "another application ('someone else')",
        ),
    ],
    ids=["random", "csv", "cut-header", "tables", "empty-db", "app-id", "meta"],
)
def test_files_that_are_not_label_stores_are_refused_untouched(tmp_path, capsys, make, problem):
    path = tmp_path / "c.labels.sqlite"
    make(path)
    before = _digest(path)
    for read_only in (True, False):
        with pytest.raises(LabelStoreError, match="^" + str(path).replace("\\", "\\\\")) as caught:
            LabelStore(path, read_only=read_only)
        assert problem in str(caught.value)
    for argv in _all_commands(path, tmp_path):
        _cli_refuses(argv, path, problem, capsys)
    assert _digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.labels.sqlite", "in.geojson"]


# -- damaged stores ------------------------------------------------------------------------
def _page_size(path: Path) -> int:
    size = int.from_bytes(path.read_bytes()[16:18], "big")
    return 65536 if size == 1 else size


def _garble_schema_name(path: Path) -> None:
    """A table name in sqlite_master (page 1) made of bytes that are not UTF-8: SQLite
    quotes it in its error, which the sqlite3 module then cannot decode."""
    data = bytearray(path.read_bytes())
    at = data.find(b"slide_labels", 100, _page_size(path))
    data[at + 2] = 0xFF
    path.write_bytes(bytes(data))


def _garble_page(path: Path) -> None:
    """The b-tree header of the file's third page overwritten."""
    data = bytearray(path.read_bytes())
    page = _page_size(path)
    data[2 * page : 2 * page + 12] = b"\xff" * 12
    path.write_bytes(bytes(data))


def _garble_indexed_text(path: Path) -> None:
    """A byte of each copy of a slide key flipped: the table and its index disagree."""
    data = bytearray(path.read_bytes())
    at = data.find(A.encode())
    while at >= 0:
        data[at + 3] = 0xFF
        at = data.find(A.encode(), at + 1)
    path.write_bytes(bytes(data))


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: _page_size(path) * 3 // 2])


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (_garble_schema_name, "damaged: bytes that are not UTF-8"),
        (_garble_page, "damaged: "),
        (_garble_indexed_text, "damaged: "),
        (_cut, "damaged: "),
    ],
    ids=["schema-name", "page-header", "indexed-text", "truncated"],
)
def test_a_damaged_store_is_refused_in_one_line_and_never_written(
    tmp_path, capsys, damage, problem
):
    path = _populated(tmp_path / "c.labels.sqlite")
    damage(path)
    before = _digest(path)
    for read_only in (True, False):
        with pytest.raises(LabelStoreError, match=problem) as caught:
            LabelStore(path, read_only=read_only)
        assert str(caught.value).startswith(f"{path}: damaged: ")
        assert "\n" not in str(caught.value)
    for argv in _all_commands(path, tmp_path):
        _cli_refuses(argv, path, problem, capsys)
    assert _digest(path) == before


@pytest.mark.parametrize("damage", [_garble_page, _cut], ids=["page-header", "truncated"])
def test_page_damage_is_found_by_the_quick_check_of_a_big_store_too(tmp_path, monkeypatch, damage):
    # the quick check reads every page but does not compare indexes with their tables
    path = _populated(tmp_path / "c.labels.sqlite")
    damage(path)
    monkeypatch.setattr(opening, "FULL_CHECK_BYTES", 0)
    with pytest.raises(LabelStoreError, match="damaged: "):
        LabelStore(path, read_only=True)


def _set_raw(path: Path, statement: str) -> None:
    conn = sqlite3.connect(path)
    conn.execute(statement)
    conn.commit()
    conn.close()


@pytest.mark.parametrize(
    ("statement", "problem"),
    [
        # text that is not UTF-8 in a column no index covers passes the integrity check
        ("UPDATE notes SET text = CAST(x'626cff' AS TEXT)", "Could not decode to UTF-8"),
        ("UPDATE slide_labels SET note = CAST(x'c3' AS TEXT)", "Could not decode to UTF-8"),
        ("UPDATE regions SET geometry = 'garbage' WHERE id = 1", "region 1 is not the JSON"),
        ("UPDATE regions SET geometry = '[[1, \"x\"]]' WHERE id = 1", "region 1 is not a list"),
        ("UPDATE changes SET new = '{' WHERE id = 2", "change 2's new state is not the JSON"),
    ],
    ids=["note-bytes", "label-note-bytes", "geometry", "vertex", "history"],
)
def test_damaged_values_found_while_reading_are_one_line_too(tmp_path, capsys, statement, problem):
    path = _populated(tmp_path / "c.labels.sqlite")
    _set_raw(path, statement)
    with LabelStore(path) as store, pytest.raises(LabelStoreError, match=problem) as caught:
        _read_everything(store)
    assert str(caught.value).startswith(f"{path}: damaged: ")
    assert main(["labels", "show", "--store", str(path), "--history"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and problem in err and str(path) in err


def test_a_store_of_a_newer_version_is_refused_untouched(tmp_path, capsys):
    path = _populated(tmp_path / "c.labels.sqlite")
    _set_raw(path, f"PRAGMA user_version = {schema.SCHEMA_VERSION + 1}")
    before = _digest(path)
    for read_only in (True, False):
        with pytest.raises(LabelStoreError, match="newer than this napari-slide-attention"):
            LabelStore(path, read_only=read_only)
    for argv in _all_commands(path, tmp_path):
        _cli_refuses(argv, path, f"schema version {schema.SCHEMA_VERSION + 1}", capsys)
    assert _digest(path) == before


# -- random damage -------------------------------------------------------------------------
FUZZ_CASES = 300


def _damaged_copy(original: bytes, rng: random.Random) -> bytes:
    data = bytearray(original)
    how = rng.choice(["bytes", "run", "truncate", "page"])
    if how == "truncate":
        return bytes(data[: rng.randrange(1, len(data))])
    if how == "page":  # a whole page of zeros or noise, as a torn or lost write leaves it
        page = 4096
        start = rng.randrange(0, len(data) // page) * page
        data[start : start + page] = bytes(page) if rng.random() < 0.5 else rng.randbytes(page)
    elif how == "run":
        start = rng.randrange(0, len(data) - 64)
        data[start : start + rng.randint(2, 64)] = rng.randbytes(rng.randint(2, 64))
    else:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data[: len(original)])


def _one_line(exc: LabelStoreError, path: Path) -> str:
    text = str(exc)
    assert text.startswith(f"{path}: ") and "\n" not in text and len(text) < 600, text
    return text


@pytest.mark.slow
def test_randomly_damaged_stores_read_or_refuse_in_one_line(tmp_path):
    original = _populated(tmp_path / "original.labels.sqlite").read_bytes()
    rng = random.Random(1515)
    outcomes: dict[str, int] = {}
    for case in range(FUZZ_CASES):
        path = tmp_path / f"{case}.labels.sqlite"
        path.write_bytes(_damaged_copy(original, rng))
        before = _digest(path)
        try:
            store = LabelStore(path, read_only=True)
        except LabelStoreError as exc:
            _one_line(exc, path)
            read = "refused when opened"
        else:
            try:
                with store:
                    _read_everything(store)
                read = "read whole"
            except LabelStoreError as exc:
                assert ": damaged: " in _one_line(exc, path)
                read = "damage found while reading"
        assert _digest(path) == before, f"case {case}: reading wrote the file"
        try:
            store = LabelStore(path, author="fuzz")
        except LabelStoreError as exc:
            _one_line(exc, path)
            assert _digest(path) == before, f"case {case}: a refused store was written"
            write = "refused when opened"
        else:
            try:
                with store:
                    store.set_slide_label(A, "benign")
                write = "written"
            except LabelStoreError as exc:
                assert ": damaged: " in _one_line(exc, path)
                write = "damage found by the change"
        # a writer opens exactly what a reader opens
        assert (read == "refused when opened") == (write == "refused when opened"), case
        outcome = f"{read} / {write}"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        for sidecar in tmp_path.glob(f"{case}.labels.sqlite*"):
            sidecar.unlink()
    print(f"\n{FUZZ_CASES} damaged stores (reader / writer): {outcomes}")
    assert outcomes.get("refused when opened / refused when opened", 0) > FUZZ_CASES // 2
