"""The command line's IHC slides: ``synth --stain`` and ``synth-cohort --stain``."""

from __future__ import annotations

import json

import pytest

from napari_slide_attention.cli import main
from napari_slide_attention.slide.synthetic import IHC_SETTINGS, read_sidecar
from napari_slide_attention.train.cohort import read_cohort


def test_synth_writes_an_mmr_slide(tmp_path, capsys):
    out = tmp_path / "mmr.tif"
    assert main(["synth", str(out), "--stain", "mmr", "--size", "1024", "768", "--seed", "2"]) == 0
    truth = read_sidecar(out)
    assert truth["stain"] == "mmr" and truth["label"] == "loss"  # the stain's highest class
    assert truth["classes"] == ["intact", "loss"] and truth["tumour_boxes"]
    said = capsys.readouterr().out
    assert "mmr loss" in said and "tumour" in said and str(out) in said

    other = tmp_path / "intact.tif"
    assert main(["synth", str(other), "--stain", "mmr", "--label", "intact", "--size", "1024",
                 "768", "--seed", "2"]) == 0  # fmt: skip
    again = read_sidecar(other)
    assert again["label"] == "intact"
    # The same seed gives the same layout: the class is only in how the tumour stains.
    assert again["tumour_boxes"] == truth["tumour_boxes"]
    assert again["artefact_boxes"] == truth["artefact_boxes"]


@pytest.mark.filterwarnings("ignore:lesions cover")  # a small slide for a needle slide
def test_synth_keeps_he_as_the_default(tmp_path, capsys):
    out = tmp_path / "needle.tif"
    assert main(["synth", str(out), "--size", "1024", "768"]) == 0
    truth = read_sidecar(out)
    assert "stain" not in truth and truth["label"] == "carcinoma" and truth["lesions"]


def test_synth_cohort_writes_the_four_her2_scores(tmp_path, capsys):
    out = tmp_path / "her2"
    args = ["synth-cohort", str(out), "--stain", "her2", "--per-class", "train=1", "test=1"]
    assert main([*args, "--size", "1024", "768", "--seed", "3"]) == 0
    assert "8 slides" in capsys.readouterr().out
    cohort = read_cohort(out / "cohort.csv")
    assert cohort.classes == ("0", "1+", "2+", "3+")
    assert cohort.counts()["test"] == {"0": 1, "1+": 1, "2+": 1, "3+": 1}
    for entry in cohort:
        info = read_sidecar(entry.slide)
        assert info["stain"] == "her2" and info["label"] == cohort.classes[entry.label]
        # The lesions column gives the tumour regions, of the slide's class.
        assert [list(box) for box, _ in entry.lesions] == info["tumour_boxes"]
        assert {c for _, c in entry.lesions} == {entry.label}
    # The settings were written down with the slides, before any model ran.
    record = json.loads((out / "synthetic-cohort.json").read_text())
    assert record["stain"] == "her2" and record["size"] == [1024, 768] and record["seed"] == 3
    assert record["ihc_settings"] == IHC_SETTINGS
    assert record["slides_per_class"] == {"train": 1, "test": 1}

    # Run again: the slides are kept; more slides per class are fine.
    first = (out / "test-3-3+-000.tif").stat().st_mtime_ns
    assert main([*args, "--size", "1024", "768", "--seed", "3"]) == 0
    assert (out / "test-3-3+-000.tif").stat().st_mtime_ns == first
    # Other settings in the same folder are refused in one line.
    capsys.readouterr()
    assert main([*args, "--size", "1024", "1024", "--seed", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0] and "size" in err[0]


def test_a_bad_stain_is_one_clear_line(tmp_path, capsys):
    for command in (
        ["synth", str(tmp_path / "x.tif"), "--stain", "ki67"],
        ["synth-cohort", str(tmp_path / "c"), "--stain", "ki67"],
    ):
        assert main(command) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            "slide-attention: error: unknown stain 'ki67'; expected one of he, her2, mmr"
        ]
    assert not (tmp_path / "x.tif").exists() and not (tmp_path / "c").exists()


def test_a_bad_per_class_is_one_clear_line(tmp_path, capsys):
    assert main(["synth-cohort", str(tmp_path / "c"), "--per-class", "train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SPLIT=N" in err[0]
