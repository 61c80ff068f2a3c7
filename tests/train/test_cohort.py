"""Cohort manifests: reading, validation with line numbers, synthetic cohorts."""

from __future__ import annotations

import json

import pytest

from napari_slide_attention.train.cohort import (
    CohortError,
    make_synthetic_cohort,
    read_cohort,
    write_cohort,
)


def _csv(tmp_path, text, slides=("a.tif", "b.tif", "c.tif")):
    for name in slides:
        (tmp_path / name).write_bytes(b"x")
    path = tmp_path / "cohort.csv"
    path.write_text(text)
    return path


def test_reads_paths_labels_splits_cases_and_lesions(tmp_path):
    lesions = json.dumps([{"class": "tumour", "box": [10, 20, 30, 40]}]).replace('"', '""')
    path = _csv(
        tmp_path,
        "slide,label,split,case,lesions\n"
        "a.tif,normal,train,p1,\n"
        f'b.tif,tumour,validation,p2,"{lesions}"\n'
        "c.tif,normal,test,,\n",
    )
    cohort = read_cohort(path, ["normal", "tumour"])
    assert cohort.classes == ("normal", "tumour")
    a, b, c = cohort.entries
    assert a.slide == (tmp_path / "a.tif").resolve() and a.split == "train" and a.case == "p1"
    assert b.split == "val" and b.label == 1 and b.lesions == [((10, 20, 30, 40), 1)]
    assert a.lesions is None and c.case == ""
    assert [e.slide.name for e in cohort.split("test")] == ["c.tif"]
    assert cohort.counts()["val"] == {"normal": 0, "tumour": 1}


def test_classes_default_to_order_of_appearance(tmp_path):
    path = _csv(tmp_path, "slide,label,split\na.tif,x,train\nb.tif,y,train\nc.tif,x,test\n")
    assert read_cohort(path).classes == ("x", "y")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("slide,label\na.tif,x\n", "missing column"),
        ("slide,label,split\na.tif,x,train\nb.tif,z,train\n", "line 3: label 'z'"),
        ("slide,label,split\na.tif,x,train\nb.tif,y,holdout\n", "line 3: split 'holdout'"),
        ("slide,label,split\na.tif,x,train\nmissing.tif,y,train\n", "line 3: slide"),
        ("slide,label,split\na.tif,x,train\na.tif,y,test\n", "listed twice"),
        (
            "slide,label,split,case\na.tif,x,train,p1\nb.tif,y,test,p1\n",
            "case 'p1' has slides in both",
        ),
        ("slide,label,split,lesions\na.tif,x,train,[oops\nb.tif,y,train,\n", "not valid JSON"),
        (
            'slide,label,split,lesions\na.tif,x,train,"[{""class"": ""q"", ""box"": [1,2,3,4]}]"\n'
            "b.tif,y,train,\n",
            "lesion class 'q'",
        ),
        ("slide,label,split\n", "lists no slides"),
        (
            'slide,label,split,lesions\na.tif,x,train,[{"class": "y", "box": [1, 2]}]\n'
            "b.tif,y,train,\n",
            "fields for 4 columns",
        ),
    ],
)
def test_bad_manifests_name_file_line_and_problem(tmp_path, text, message):
    path = _csv(tmp_path, text)
    with pytest.raises(CohortError, match=message) as info:
        read_cohort(path, ["x", "y"] if "label 'z'" in message else None)
    assert str(path) in str(info.value)


def test_missing_cohort_file(tmp_path):
    with pytest.raises(CohortError, match="no such cohort file"):
        read_cohort(tmp_path / "none.csv")


def test_write_then_read_round_trip(tmp_path):
    path = _csv(
        tmp_path,
        'slide,label,split,lesions\na.tif,x,train,"[{""class"": ""y"", ""box"": [1,2,3,4]}]"\n'
        "b.tif,y,test,\n",
    )
    cohort = read_cohort(path, ["x", "y"])
    again = read_cohort(write_cohort(tmp_path / "sub" / "copy.csv", cohort), ["x", "y"])
    assert [(e.slide, e.label, e.split, e.lesions) for e in again] == [
        (e.slide, e.label, e.split, e.lesions) for e in cohort
    ]


def test_a_pixel_size_per_slide_or_for_the_whole_cohort(tmp_path):
    path = _csv(tmp_path, "slide,label,split,mpp\na.tif,x,train,0.25\nb.tif,y,test,\n")
    cohort = read_cohort(path)
    assert [e.mpp for e in cohort] == [0.25, None]  # None: the file's own
    again = read_cohort(write_cohort(tmp_path / "copy.csv", cohort))
    assert [e.mpp for e in again] == [0.25, None]
    assert [e.mpp for e in cohort.with_mpp(0.5)] == [0.5, 0.5]  # --mpp: every slide
    assert cohort.with_mpp(None) is cohort
    with pytest.raises(ValueError, match="positive number"):
        cohort.with_mpp(0)
    bad = _csv(tmp_path, "slide,label,split,mpp\na.tif,x,train,abc\nb.tif,y,test,\n")
    with pytest.raises(CohortError, match=r"cohort.csv, line 2: mpp 'abc' is not a positive"):
        read_cohort(bad)


def test_synthetic_cohort_is_deterministic_and_reads_lesions_from_sidecars(tmp_path):
    per = {"train": 1, "val": 0, "test": 1}
    a = make_synthetic_cohort(
        tmp_path / "a", slides_per_class=per, size=(1024, 768), seed=3, lesion_size=60
    )
    b = make_synthetic_cohort(
        tmp_path / "b", slides_per_class=per, size=(1024, 768), seed=3, lesion_size=60
    )
    assert len(a) == 8 and a.counts()["test"] == dict.fromkeys(a.classes, 1)
    for ea, eb in zip(a, b, strict=True):
        assert ea.slide.read_bytes() == eb.slide.read_bytes()
        assert ea.lesions == eb.lesions
        # lesion-free class has none; others only lesions of their own class
        assert (ea.lesions == []) == (ea.label == 0)
        assert {c for _, c in ea.lesions} <= {ea.label}
