"""Schema versions: a store written by each older version of this package (a file its
code wrote, in tests/labels/data) is read as it is by a reader and migrated by a writer,
after a backup copy, in one transaction, losing nothing; a newer store is refused."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
from pathlib import Path

import pytest

from napari_slide_attention.cli import main
from napari_slide_attention.labels import SCHEMA_VERSION, LabelStore, LabelStoreError, schema

DATA = Path(__file__).with_name("data")
A, B, C = "/study/slides/a.tif", "/study/slides/b.tif", "/study/slides/c é.tif"


def _copy(version: int, tmp_path: Path) -> Path:
    path = tmp_path / "cohort.labels.sqlite"
    shutil.copyfile(DATA / f"v{version}.labels.sqlite", path)
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rows(path: Path) -> dict[str, list[tuple]]:
    """Every row of the store's tables but meta (which a migration adds to)."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return {
            table: conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
            for table in ("slide_labels", "notes", "regions", "changes", "sqlite_sequence")
        }
    finally:
        conn.close()


def _header(path: Path) -> tuple[int, int, str]:
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta"))
        return (
            conn.execute("PRAGMA application_id").fetchone()[0],
            conn.execute("PRAGMA user_version").fetchone()[0],
            meta["schema_version"],
        )
    finally:
        conn.close()


def _check_v1_content(store: LabelStore) -> None:
    """What make_v1_store.py wrote."""
    labels = store.slide_labels()
    assert {k: (v.label, v.status, v.author) for k, v in labels.items()} == {
        A: ("carcinoma", "corrected", "bob"),
        B: ("benign", "accepted", "ann"),
    }
    assert labels[A].note == "lesion at 3 o'clock" and store.slide_label(C) is None
    assert [(r.label, r.kind, r.note) for r in store.regions(A)] == [
        ("atypia", "rectangle", "on second look"),
        ("benign", "polygon", ""),
    ]
    assert store.regions(A)[0].geometry == ((10, 20), (110, 20), (110, 70.5), (10, 70.5))
    assert [(r.id, r.label) for r in store.regions(B)] == [(4, "stroma")]
    assert store.note(A) == "blurry in the corner — 中文 too" and store.note(B) == "check stain"
    history = store.history()
    assert len(history) == 15 and [c.id for c in history] == list(range(1, 16))
    assert [c.action for c in history].count("undo") == 2
    undone = {c.id: c.undone_by for c in history if c.undone_by}
    assert undone == {4: 5, 12: 13}  # C's label, the stroma triangle's deletion
    assert history[3].new["label"] == "atypia" and history[3].slide == C


def test_every_older_schema_version_has_a_store_written_by_its_code():
    assert sorted(schema.VERSIONS) == list(range(1, SCHEMA_VERSION + 1))
    for version in range(1, SCHEMA_VERSION):
        assert (DATA / f"v{version}.labels.sqlite").is_file(), version
        assert version in schema.MIGRATIONS and version in schema.DEFINITIONS


@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION))
def test_a_reader_reads_an_older_store_as_it_is(tmp_path, version, capsys):
    path = _copy(version, tmp_path)
    before = _digest(path)
    with LabelStore(path, read_only=True) as store:
        assert store.backup is None
        if version == 1:
            _check_v1_content(store)
    assert main(["labels", "show", "--store", str(path), "--history"]) == 0
    assert "15 change(s)" in capsys.readouterr().out
    assert _digest(path) == before  # not migrated, not written
    assert sorted(p.name for p in tmp_path.iterdir() if "-" not in p.name) == [path.name]


@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION))
def test_a_writer_migrates_an_older_store_after_a_backup(tmp_path, version):
    path = _copy(version, tmp_path)
    original, rows, header = path.read_bytes(), _rows(path), _header(path)
    with LabelStore(path, author="cid") as store:
        assert store.backup == tmp_path / f"cohort.labels.sqlite.schema-{version}.bak"
        if version == 1:
            _check_v1_content(store)
    # the backup is the store as it was: same rows, same header, same version
    assert _rows(store.backup) == rows and _header(store.backup) == header
    assert store.backup.read_bytes()[100:] == original[100:]
    assert _header(path) == (schema.APPLICATION_ID, SCHEMA_VERSION, str(SCHEMA_VERSION))
    assert _rows(path) == rows  # nothing lost or changed
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert conn.execute(
        f"SELECT count(*) FROM meta WHERE key = 'migrated_{version}_to_{version + 1}'"
    ).fetchone() == (1,)
    conn.close()
    with LabelStore(path, author="cid") as store:
        assert store.backup is None  # migrated once
        store.set_slide_label(C, "benign")
        assert store.history()[-1].id == len(rows["changes"]) + 1
        undo = store.undo()
        assert undo.undoes == len(rows["changes"]) + 1 and store.slide_label(C) is None
        store.undo()  # walks on into the history the older version wrote
        assert store.note(B) == ""


def test_a_failed_migration_leaves_the_store_as_it_was(tmp_path, monkeypatch):
    path = _copy(1, tmp_path)
    rows, header = _rows(path), _header(path)

    def half_done(conn):
        conn.execute(f"PRAGMA application_id = {schema.APPLICATION_ID}")
        conn.execute("DELETE FROM changes WHERE id > 10")
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setitem(schema.MIGRATIONS, 1, half_done)
    with pytest.raises(LabelStoreError, match=r"cannot open for writing \(disk I/O error\)"):
        LabelStore(path)
    assert _header(path) == header == (0, 0, "1") and _rows(path) == rows
    assert (tmp_path / "cohort.labels.sqlite.schema-1.bak").is_file()
    monkeypatch.undo()
    with LabelStore(path) as store:  # the next opening migrates, with a backup of its own
        assert store.backup == tmp_path / "cohort.labels.sqlite.schema-1.2.bak"
        _check_v1_content(store)


def test_a_cli_import_says_it_migrated_and_where_the_backup_is(tmp_path, capsys):
    path = _copy(1, tmp_path)
    geojson = tmp_path / "in.geojson"
    geojson.write_text('{"type": "FeatureCollection", "features": []}')
    assert (
        main(["labels", "import", "--store", str(path), "--geojson", str(geojson), "--slide", A])
        == 0
    )
    err = capsys.readouterr().err
    assert f"upgraded to schema version {SCHEMA_VERSION}" in err
    assert str(tmp_path / "cohort.labels.sqlite.schema-1.bak") in err


def test_migrating_a_store_migrated_meanwhile_does_nothing(tmp_path):
    path = _copy(1, tmp_path)
    LabelStore(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        assert schema.migrate(conn, path) is None  # another process got there first
    finally:
        conn.close()
    assert _header(path) == (schema.APPLICATION_ID, SCHEMA_VERSION, str(SCHEMA_VERSION))
