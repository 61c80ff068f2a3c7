"""The label store: labels and regions survive reopening and kills, every change is in the
history and can be undone, files that are not stores are refused, GeoJSON (QuPath's) and
CSV come in and go out, and the labels reach a cohort."""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import subprocess
import sys
import threading
import warnings
from datetime import datetime, timezone

import pytest

from napari_slide_attention.labels import (
    SCHEMA_VERSION,
    LabelStore,
    LabelStoreError,
    Region,
    RegionNotFoundError,
    slide_key,
)
from napari_slide_attention.train.labels import apply_labels, apply_labels_with_summary

SQUARE = [(10.0, 20.0), (110.0, 20.0), (110.0, 70.5), (10.0, 70.5)]
TRIANGLE = [(0.0, 0.0), (40.5, 0.0), (20.0, 30.25)]


@pytest.fixture
def store(tmp_path):
    with LabelStore(tmp_path / "cohort.labels.sqlite", author="ann") as opened:
        yield opened


def _recent(stamp: str) -> bool:
    """An ISO-8601 UTC time with microseconds, from the last minute."""
    when = datetime.fromisoformat(stamp)
    age = (datetime.now(timezone.utc) - when).total_seconds()
    return when.utcoffset().total_seconds() == 0 and "." in stamp and 0 <= age < 60


def test_labels_regions_and_notes_round_trip_and_persist(tmp_path, monkeypatch):
    db = tmp_path / "c.labels.sqlite"
    slide = tmp_path / "slides" / "a.tif"
    with LabelStore(db, author="ann") as store:
        label = store.set_slide_label(slide, "carcinoma", status="corrected", note="lesion at 3h")
        square = store.add_region(slide, SQUARE, "carcinoma", kind="rectangle", note="big one")
        triangle = store.add_region(str(slide), TRIANGLE, "benign")
        store.set_note(slide, "blurry in the corner")
    # a relative path with ".." keys the same slide
    monkeypatch.chdir(tmp_path)
    with LabelStore(db, author="bob") as again:
        same = "slides/../slides/a.tif"
        assert slide_key(same) == slide.resolve().as_posix()
        assert again.slide_label(same) == label
        assert label.label == "carcinoma" and label.status == "corrected"
        assert label.author == "ann" and label.note == "lesion at 3h" and _recent(label.time)
        assert again.regions(same) == [square, triangle]
        assert again.region(square.id).geometry == tuple(SQUARE)
        assert again.region(triangle.id).kind == "polygon"
        assert again.note(same) == "blurry in the corner"
        assert again.note(tmp_path / "other.tif") == ""
        assert again.slide_label(tmp_path / "other.tif") is None
        assert again.slide_labels() == {slide.resolve().as_posix(): label}
        assert again.author == "bob"


def test_region_box_covers_the_region_in_whole_pixels():
    region = Region(
        1, "/s.tif", "x", ((10.5, 20.2), (30.1, 20.2), (30.1, 40.9)), "polygon", "a", "t"
    )
    assert region.box == (10, 20, 21, 21)


@pytest.mark.parametrize(
    ("geometry", "kind", "problem"),
    [
        ([(0, 0), (1, 1)], "polygon", "at least 3 vertices"),
        (TRIANGLE, "rectangle", "exactly 4 vertices"),
        ([(0, 0), (1, float("nan")), (2, 0)], "polygon", "finite"),
        ([(0, 0), (1, 1), (2, 2)], "polygon", "no area"),
        ([(0, 0), "ab", (2, 0)], "polygon", "vertex 1"),
        (TRIANGLE, "circle", "kind"),
    ],
)
def test_regions_that_are_not_regions_are_refused(store, tmp_path, geometry, kind, problem):
    with pytest.raises(ValueError, match=problem):
        store.add_region(tmp_path / "a.tif", geometry, "benign", kind=kind)
    assert store.regions(tmp_path / "a.tif") == [] and store.history() == []


def test_every_change_is_in_the_history_with_author_time_old_and_new(store, tmp_path):
    slide = tmp_path / "a.tif"
    key = slide_key(slide)
    store.set_slide_label(slide, "benign", status="accepted")
    store.set_slide_label(slide, "carcinoma", author="bob")
    region = store.add_region(slide, SQUARE, "carcinoma", kind="rectangle")
    store.update_region(region.id, label="benign", note="on second look")
    store.update_region(region.id, label="benign")  # no change: nothing recorded
    store.delete_region(region.id, author="bob")
    store.set_note(slide, "check stain")
    store.set_note(slide, "check stain")  # unchanged note: nothing recorded
    store.set_note(tmp_path / "b.tif", "other slide")
    changes = store.history(slide)
    assert [(c.target, c.action, c.author) for c in changes] == [
        ("slide_label", "set", "ann"),
        ("slide_label", "set", "bob"),
        (f"region:{region.id}", "add", "ann"),
        (f"region:{region.id}", "update", "ann"),
        (f"region:{region.id}", "delete", "bob"),
        ("note", "set", "ann"),
    ]
    assert all(c.slide == key and _recent(c.time) for c in changes)
    assert [c.id for c in changes] == sorted(c.id for c in changes)
    first, second, added, updated, deleted, noted = changes
    assert first.old is None and first.new["label"] == "benign"
    assert first.new["status"] == "accepted"
    assert second.old == first.new and second.new["label"] == "carcinoma"
    assert added.old is None and added.new["geometry"] == [list(v) for v in SQUARE]
    assert updated.old == added.new
    assert updated.new["label"] == "benign" and updated.new["note"] == "on second look"
    assert deleted.old == updated.new and deleted.new is None
    assert noted.old is None and noted.new["text"] == "check stain"
    assert len(store.history()) == 7  # the other slide's note too
    assert store.history(limit=2) == [noted, store.history()[-1]]


def test_undo_walks_back_through_the_changes(store, tmp_path):
    slide = tmp_path / "a.tif"
    store.set_slide_label(slide, "benign")
    store.set_slide_label(slide, "carcinoma")
    kept = store.add_region(slide, TRIANGLE, "benign")
    region = store.add_region(slide, SQUARE, "carcinoma", kind="rectangle")
    store.update_region(region.id, geometry=[(0, 0), (5, 0), (5, 5), (0, 5)])
    store.delete_region(region.id)
    with pytest.raises(RegionNotFoundError, match=f"region {region.id} was deleted"):
        store.region(region.id)

    undo = store.undo()  # delete -> restored, with the geometry it had
    assert undo.action == "undo" and undo.old is None and undo.author == "ann"
    assert store.region(region.id).geometry == ((0, 0), (5, 0), (5, 5), (0, 5))
    store.undo()  # update -> the first geometry
    assert store.region(region.id).geometry == tuple(SQUARE)
    undo = store.undo()  # add -> gone
    assert undo.new is None and undo.old["label"] == "carcinoma"
    assert store.regions(slide) == [kept]
    store.undo()
    assert store.regions(slide) == []
    undo = store.undo()  # second set -> the first label
    assert store.slide_label(slide).label == "benign"
    assert undo.old["label"] == "carcinoma" and undo.new["label"] == "benign"
    store.undo()  # first set -> no label at all
    assert store.slide_label(slide) is None
    assert store.undo() is None
    history = store.history()
    undone = [c for c in history if c.action != "undo"]
    assert all(c.undone_by is not None for c in undone)
    assert sorted(c.undoes for c in history if c.action == "undo") == [c.id for c in undone]


def test_undo_by_slide_and_author(store, tmp_path):
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    store.set_slide_label(a, "benign", author="ann")
    store.set_slide_label(b, "benign", author="bob")
    store.set_slide_label(a, "carcinoma", author="bob")
    assert store.undo(slide=b).slide == slide_key(b)
    assert store.slide_label(b) is None and store.slide_label(a).label == "carcinoma"
    # ann's change was overwritten by bob's: undoing it alone would drop bob's work
    with pytest.raises(ValueError, match=r"changed since.*by bob"):
        store.undo(author="ann")
    assert store.slide_label(a).label == "carcinoma"
    assert store.undo(author="bob").author == "bob"
    assert store.slide_label(a).label == "benign"
    assert store.undo(author="bob") is None
    assert store.undo(author="ann") is not None and store.slide_label(a) is None


def test_a_store_is_usable_from_another_thread(store, tmp_path):
    errors = []

    def work():
        try:
            store.add_region(tmp_path / "a.tif", TRIANGLE, "benign")
        except Exception as exc:  # pragma: no cover - the failure is reported below
            errors.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert errors == [] and len(store.regions(tmp_path / "a.tif")) == 1


_WRITE_AND_DIE = """
import os, signal, sys
from napari_slide_attention.labels import LabelStore
store = LabelStore(sys.argv[1], author="crash")
store.set_slide_label(sys.argv[2], "carcinoma")
store.add_region(sys.argv[2], [(0, 0), (9, 0), (9, 9)], "carcinoma")
if sys.argv[3] == "exit":
    os._exit(1)  # no close, no atexit, no flush
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("death", ["exit", "kill"])
def test_a_committed_change_survives_the_process_being_killed(tmp_path, death):
    db, slide = tmp_path / "c.labels.sqlite", tmp_path / "a.tif"
    result = subprocess.run(
        [sys.executable, "-c", _WRITE_AND_DIE, str(db), str(slide), death],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0, result.stderr
    assert (tmp_path / "c.labels.sqlite-wal").exists()  # nobody checkpointed or closed
    with LabelStore(db) as store:
        assert store.slide_label(slide).label == "carcinoma"
        assert [r.label for r in store.regions(slide)] == ["carcinoma"]
        assert [c.action for c in store.history()] == ["set", "add"]


def test_the_store_is_in_wal_mode_with_full_sync(store):
    conn = sqlite3.connect(store.path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
    assert store._connection().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store._connection().execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_files_that_are_not_label_stores_are_refused(tmp_path):
    random = tmp_path / "random.sqlite"
    random.write_bytes(os.urandom(4096))
    with pytest.raises(LabelStoreError, match="not an SQLite database") as caught:
        LabelStore(random)
    assert str(random) in str(caught.value)

    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE things (x)")
    conn.commit()
    conn.close()
    with pytest.raises(LabelStoreError, match=r"not a label store.*things") as caught:
        LabelStore(other)
    assert str(other) in str(caught.value)
    conn = sqlite3.connect(other)  # refused untouched: still a rollback-journal database
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    conn.close()

    newer = tmp_path / "newer.labels.sqlite"
    LabelStore(newer).close()
    conn = sqlite3.connect(newer)
    conn.execute(
        "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),)
    )
    conn.commit()
    conn.close()
    with pytest.raises(LabelStoreError, match="newer") as caught:
        LabelStore(newer)
    assert str(newer) in str(caught.value) and isinstance(caught.value, ValueError)

    with pytest.raises(LabelStoreError, match="does not exist"):
        LabelStore(tmp_path / "no-folder" / "c.labels.sqlite")
    assert not (tmp_path / "no-folder").exists()


def test_default_store_sits_next_to_the_cohort(tmp_path):
    assert LabelStore.default_path(tmp_path / "study" / "cohort.csv") == (
        tmp_path / "study" / "cohort.labels.sqlite"
    )


def test_geojson_export_and_import_round_trip(store, tmp_path):
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    square = store.add_region(a, SQUARE, "carcinoma", kind="rectangle", note="big one")
    triangle = store.add_region(a, TRIANGLE, "benign")
    store.add_region(b, TRIANGLE, "benign")
    out = tmp_path / "a.geojson"
    assert store.export_geojson(out, slide=a) == 2
    data = json.loads(out.read_text())
    assert data["type"] == "FeatureCollection"
    feature = data["features"][0]
    ring = feature["geometry"]["coordinates"][0]
    assert feature["geometry"]["type"] == "Polygon" and ring[0] == ring[-1]
    assert [tuple(p) for p in ring[:-1]] == SQUARE
    props = feature["properties"]
    assert props["objectType"] == "annotation" and props["isLocked"] is False
    assert props["classification"]["name"] == "carcinoma"
    assert len(props["classification"]["color"]) == 3 and props["name"] == "big one"
    assert props["metadata"]["slide"] == slide_key(a) and props["metadata"]["kind"] == "rectangle"
    assert len(feature["id"]) == 36 and feature["id"] != data["features"][1]["id"]

    with LabelStore(tmp_path / "other.labels.sqlite", author="bob") as other:
        assert other.import_geojson(out, tmp_path / "c.tif") == 2
        got = other.regions(tmp_path / "c.tif")
        assert [(r.geometry, r.label, r.kind, r.note) for r in got] == [
            (square.geometry, "carcinoma", "rectangle", "big one"),
            (triangle.geometry, "benign", "polygon", ""),
        ]
        assert {r.author for r in got} == {"bob"}
    # the same file again (back from QuPath, one class changed): updates, no copies
    data["features"][1]["properties"]["classification"]["name"] = "atypia"
    out.write_text(json.dumps(data))
    assert store.import_geojson(out, a) == 2
    assert [(r.id, r.label) for r in store.regions(a)] == [
        (square.id, "carcinoma"),
        (triangle.id, "atypia"),
    ]
    assert store.history()[-1].action == "update"
    assert store.export_geojson(tmp_path / "all.geojson") == 3


def test_imports_qupath_files_with_multipolygons_and_bare_feature_lists(store, tmp_path):
    qupath = [
        {
            "type": "Feature",
            "id": "4c3fbd7e-3d2a-4a55-9d5e-0f1f6b1d2c3a",
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[0, 0], [100, 0], [100, 50], [0, 50], [0, 0]]],
            },
            "properties": {
                "objectType": "annotation",
                "classification": {"name": "Tumor", "color": [200, 0, 0]},
                "isLocked": False,
            },
        },
        {
            "type": "Feature",
            "id": "0b6a3c5e-8b1e-4d43-9a57-2f2d8f8e8a11",
            "geometry": {
                "type": "MultiPolygon",
                "coordinates": [
                    [
                        [[0, 0, 0], [10, 0, 0], [5, 8, 0], [0, 0, 0]],
                        [[1, 1], [2, 1], [2, 2], [1, 1]],  # a hole: dropped
                    ],
                    [[[200, 200], [260, 200], [230, 250], [200, 200]]],
                ],
            },
            "properties": {"objectType": "annotation", "classification": {"name": "Stroma"}},
        },
        {  # unclassified, with a name
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [0, 4], [0, 0]]]},
            "properties": {"objectType": "annotation", "name": "look here"},
        },
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}},
        {"type": "Feature", "geometry": None, "properties": {"classification": {"name": "X"}}},
    ]
    path = tmp_path / "qupath.geojson"
    path.write_text(json.dumps(qupath))
    slide = tmp_path / "a.tif"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert store.import_geojson(path, slide) == 4
    assert any("skipped 2 feature(s)" in str(w.message) for w in caught)
    regions = store.regions(slide)
    assert [(r.label, r.kind) for r in regions] == [
        ("Tumor", "rectangle"),
        ("Stroma", "polygon"),
        ("Stroma", "polygon"),
        ("unclassified", "polygon"),
    ]
    assert regions[0].geometry == ((0, 0), (100, 0), (100, 50), (0, 50))
    assert regions[1].geometry == ((0, 0), (10, 0), (5, 8))
    assert regions[2].box == (200, 200, 60, 50)
    assert regions[3].note == "look here"
    # a single Feature and a FeatureCollection read the same way
    path.write_text(json.dumps({"type": "FeatureCollection", "features": qupath[:1]}))
    assert store.import_geojson(path, tmp_path / "b.tif") == 1
    path.write_text(json.dumps(qupath[2]))
    assert store.import_geojson(path, tmp_path / "b.tif") == 1


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "not valid JSON"),
        ('{"type": "Topology"}', "not GeoJSON features"),
        ('[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": 5}}]', "feature 0"),
        (
            '[{"type": "Feature", "geometry": {"type": "Polygon", '
            '"coordinates": [[[0, 0], [1, 1], [0, 0]]]}}]',
            "feature 0: a polygon needs at least 3 vertices",
        ),
        ('[{"type": "Feature", "geometry": {"type": "Circle"}}]', "unknown geometry type"),
    ],
)
def test_malformed_geojson_names_the_file_and_writes_nothing(store, tmp_path, text, problem):
    path = tmp_path / "bad.geojson"
    path.write_text(text)
    with pytest.raises(LabelStoreError, match=problem) as caught:
        store.import_geojson(path, tmp_path / "a.tif")
    assert str(path) in str(caught.value)
    assert store.history() == []


def test_csv_export_has_a_row_per_slide_label_and_live_region(store, tmp_path):
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    store.set_slide_label(a, "carcinoma", note="lesion")
    square = store.add_region(a, SQUARE, "carcinoma", kind="rectangle")
    gone = store.add_region(b, TRIANGLE, "benign")
    store.delete_region(gone.id)
    store.add_region(b, TRIANGLE, "benign")
    out = tmp_path / "labels.csv"
    assert store.export_csv(out) == 3
    with open(out, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames == [
        "slide",
        "kind",
        "id",
        "label",
        "status",
        "author",
        "time",
        "note",
        "x",
        "y",
        "w",
        "h",
        "geometry",
    ]
    label, region, other = rows
    assert label["slide"] == slide_key(a) and label["kind"] == "slide"
    assert label["status"] == "corrected" and label["note"] == "lesion"
    assert label["geometry"] == label["x"] == ""
    assert region["id"] == str(square.id) and region["kind"] == "rectangle"
    assert [int(region[k]) for k in "xywh"] == [10, 20, 100, 51]
    assert json.loads(region["geometry"]) == [list(v) for v in SQUARE]
    assert other["slide"] == slide_key(b) and other["author"] == "ann"


def test_apply_labels_replaces_labels_and_lesions_of_the_labelled_slides(tiny_cohort, tmp_path):
    classes = tiny_cohort.classes
    relabelled, annotated, untouched = tiny_cohort.entries[:3]
    with LabelStore(tmp_path / "c.labels.sqlite") as store:
        new_class = classes[(relabelled.label + 1) % len(classes)]
        store.set_slide_label(relabelled.slide, new_class)
        store.add_region(annotated.slide, SQUARE, classes[-1], kind="rectangle")
        store.add_region(annotated.slide, TRIANGLE, "artefact")  # not a class: ignored
        store.add_region(tmp_path / "elsewhere.tif", TRIANGLE, classes[0])
        store.set_note(tmp_path / "noted.tif", "a note is not a label")  # not counted
        cohort, applied = apply_labels_with_summary(tiny_cohort, store)
        assert apply_labels(tiny_cohort, store) == cohort
    assert cohort is not tiny_cohort
    assert cohort.classes == classes and cohort.path == tiny_cohort.path
    assert cohort.entries[0].label == classes.index(new_class)
    assert cohort.entries[0].lesions == relabelled.lesions
    assert cohort.entries[1].label == annotated.label
    assert cohort.entries[1].lesions == [((10, 20, 100, 51), len(classes) - 1)]
    assert cohort.entries[2] == untouched and cohort.entries[3:] == tiny_cohort.entries[3:]
    assert tiny_cohort.entries[1].lesions == annotated.lesions  # the input is unchanged
    assert (applied.slide_labels, applied.changed, applied.regions) == (1, 1, 1)
    assert (applied.ignored_regions, applied.not_in_cohort) == (1, 1)
    assert applied.summary() == (
        "1 slide label(s) (1 differ from the cohort's), 1 region(s) on 1 slide(s); "
        "1 region(s) of other classes ignored; 1 labelled slide(s) are not in the cohort"
    )

    with LabelStore(tmp_path / "bad.labels.sqlite") as store:
        store.set_slide_label(relabelled.slide, "banana")
        with pytest.raises(ValueError, match="banana") as caught:
            apply_labels(tiny_cohort, store)
    message = str(caught.value)
    assert str(slide_key(relabelled.slide)) in message and all(c in message for c in classes)
