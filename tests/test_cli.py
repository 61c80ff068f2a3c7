"""The slide-attention command line: facts, synthetic slides, tissue masks, readable errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import imagecodecs
import numpy as np
import pytest

from napari_slide_attention.cli import main
from slide_files import rgb_image, write_generic, write_svs


def test_info_json_has_the_slide_facts(tmp_path, capsys):
    path = tmp_path / "slide.svs"
    write_svs(path, rgb_image(1000, 1300), mpp=0.499, magnification=20)
    assert main(["info", str(path), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["vendor"] == "aperio"
    assert facts["dimensions"] == [1300, 1000]
    assert facts["mpp"] == [0.499, 0.499]
    assert facts["magnification"] == 20
    assert facts["tile_shape"] == [256, 256]
    assert [lvl["shape"] for lvl in facts["levels"]] == [[1000, 1300], [250, 325], [62, 81]]
    assert set(facts["associated"]) == {"thumbnail", "label", "macro"}
    assert 0.05 < facts["tissue_fraction"] < 0.95


def test_info_text_reads_like_a_summary(tmp_path, capsys):
    path = tmp_path / "slide.tif"
    write_generic(path, rgb_image(600, 800), mpp=0.25)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "generic-tiff" in out and "0.2500 x 0.2500 µm/px" in out and "tissue" in out


def test_missing_mpp_is_a_warning_and_can_be_overridden(tmp_path, capsys):
    path = tmp_path / "nompp.tif"
    write_generic(path, rgb_image(600, 800), mpp=None)
    assert main(["info", str(path), "--json", "--no-tissue"]) == 0
    captured = capsys.readouterr()
    assert "warning" in captured.err and "mpp" in captured.err
    assert json.loads(captured.out)["mpp"] is None
    assert main(["info", str(path), "--json", "--no-tissue", "--mpp", "0.5"]) == 0
    assert json.loads(capsys.readouterr().out)["mpp"] == [0.5, 0.5]


def test_errors_exit_non_zero_with_one_readable_line(tmp_path):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\x00" + bytes(10))
    result = subprocess.run(
        [sys.executable, "-m", "napari_slide_attention.cli", "info", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("slide-attention: error: ") and "broken.svs" in lines[0]
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "napari_slide_attention.cli",
            "tissue",
            str(tmp_path / "x.svs"),
            "--out",
            str(tmp_path / "m.png"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "no such file" in missing.stderr


def test_synth_then_info_then_tissue(tmp_path, capsys):
    out = tmp_path / "needle.tif"
    assert (
        main(["synth", str(out), "--size", "4096", "3072", "--label", "high-grade", "--seed", "3"])
        == 0
    )
    assert out.exists() and (tmp_path / "needle.tif.json").exists()
    truth = json.loads((tmp_path / "needle.tif.json").read_text())
    assert truth["label"] == "high-grade" and truth["lesions"]
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["dimensions"] == [4096, 3072] and facts["mpp"] == [0.5, 0.5]
    assert facts["tissue_fraction"] == pytest.approx(truth["tissue_fraction"], abs=0.05)
    mask_png = tmp_path / "mask.png"
    assert main(["tissue", str(out), "--out", str(mask_png), "--tile-size", "256", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    mask = imagecodecs.png_decode(mask_png.read_bytes())
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    assert list(mask.shape) == summary["mask_shape"]
    assert len(summary["pieces"]) == len(truth["pieces"])
    assert summary["tiles"] > 0


def test_synth_rejects_an_unknown_label(tmp_path, capsys):
    assert (
        main(["synth", str(tmp_path / "x.tif"), "--size", "1024", "1024", "--label", "banana"]) == 2
    )
    assert "banana" in capsys.readouterr().err


# -- models -------------------------------------------------------------------------------
def test_cli_predict_and_evaluate(tiny_cohort, tiny_grid_model, tmp_path, capsys):
    from napari_slide_attention.cli import main
    from napari_slide_attention.results import SlideResult

    slide = tiny_cohort.split("test")[0].slide
    out = tmp_path / "pred"
    assert (
        main(
            [
                "predict",
                "--model",
                str(tiny_grid_model),
                "--slide",
                str(slide),
                "--out",
                str(out),
                "--device",
                "cpu",
                "--quiet",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    result = SlideResult.load(out)
    assert result.predicted_class in printed and "saved:" in printed
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(tiny_grid_model),
                "--cohort",
                str(tiny_cohort.path),
                "--split",
                "val",
                "--device",
                "cpu",
                "--quiet",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    ((name, model),) = report["models"].items()
    assert name.startswith("grid-attention") and len(model["slides"]) == 4
    assert set(model["metrics"]["per_class"]) == set(tiny_cohort.classes)

    # --labels: an annotator's corrected label is the truth (stdout stays pure JSON)
    from napari_slide_attention.labels import LabelStore

    first = tiny_cohort.split("val")[0]
    corrected = tiny_cohort.classes[(first.label + 1) % len(tiny_cohort.classes)]
    with LabelStore(tmp_path / "labels.sqlite") as store:
        store.set_slide_label(first.slide, corrected)
    argv = ["evaluate", "--model", str(tiny_grid_model), "--cohort", str(tiny_cohort.path)]
    argv += ["--split", "val", "--device", "cpu", "--quiet", "--json"]
    assert main([*argv, "--labels", str(tmp_path / "labels.sqlite")]) == 0
    captured = capsys.readouterr()
    truth = {
        row["slide"]: row["truth"] for row in json.loads(captured.out)["models"][name]["slides"]
    }
    assert truth[str(first.slide)] == corrected and "1 slide label" in captured.err


def test_cli_model_errors_are_one_line(tmp_path, capsys, tiny_cohort):
    from napari_slide_attention.cli import main

    missing = tmp_path / "none.safetensors"
    assert (
        main(
            [
                "predict",
                "--model",
                str(missing),
                "--slide",
                str(tiny_cohort.entries[0].slide),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("slide-attention: error:") and str(missing) in err
    assert (
        main(["train", "grid", "--cohort", str(tmp_path / "no.csv"), "--out", str(tmp_path / "r")])
        == 2
    )
    assert "no such cohort file" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "grid",
                "--cohort",
                str(tiny_cohort.path),
                "--out",
                str(tmp_path / "r"),
                "--set",
                "colour=red",
            ]
        )
        == 2
    )
    assert "unknown setting" in capsys.readouterr().err


# -- labels and training events ------------------------------------------------------------
def test_cli_labels_show_export_import(tmp_path, capsys):
    from napari_slide_attention.labels import LabelStore

    db, slide = tmp_path / "c.labels.sqlite", tmp_path / "a.tif"
    with LabelStore(db, author="ann") as store:
        store.set_slide_label(slide, "carcinoma", note="lesion at 3h")
        store.add_region(
            slide, [(0, 0), (100, 0), (100, 50), (0, 50)], "carcinoma", kind="rectangle"
        )
        store.set_note(slide, "blurry")
    assert main(["labels", "show", "--store", str(db)]) == 0
    out = capsys.readouterr().out
    assert "a.tif" in out and "carcinoma" in out and "corrected" in out
    assert main(["labels", "show", "--store", str(db), "--slide", str(slide), "--history"]) == 0
    out = capsys.readouterr().out
    assert "0 0 100 50" in out and "blurry" in out and "lesion at 3h" in out
    assert "history: 3 change(s)" in out and "region:1" in out

    geojson, table = tmp_path / "a.geojson", tmp_path / "labels.csv"
    assert main(["labels", "export", "--store", str(db), "--geojson", str(geojson)]) == 0
    assert "1 region(s)" in capsys.readouterr().out
    assert (
        json.loads(geojson.read_text())["features"][0]["properties"]["classification"]["name"]
        == "carcinoma"
    )
    assert main(["labels", "export", "--store", str(db), "--csv", str(table)]) == 0
    assert "2 row(s)" in capsys.readouterr().out and table.read_text().startswith("slide,kind")

    other = tmp_path / "other.tif"
    args = ["labels", "import", "--store", str(db), "--geojson", str(geojson)]
    assert main([*args, "--slide", str(other), "--author", "bob"]) == 0
    captured = capsys.readouterr()
    assert "1 region(s)" in captured.out and "does not exist" in captured.err
    with LabelStore(db) as store:
        [region] = store.regions(other)
        assert region.author == "bob" and region.box == (0, 0, 100, 50)


def test_cli_labels_errors_are_one_line(tmp_path, capsys):
    missing = tmp_path / "none.labels.sqlite"
    assert main(["labels", "show", "--store", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slide-attention: error:") and str(missing) in err
    assert not missing.exists()  # showing does not create a store
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    args = ["labels", "import", "--store", str(tmp_path / "c.labels.sqlite"), "--geojson"]
    assert main([*args, str(bad), "--slide", "a.tif"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "not valid JSON" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.glob("c.labels.sqlite*")) == []  # no empty store left behind


def test_event_data_is_reduced_to_json_values():
    import torch

    from napari_slide_attention.cli.driver import json_safe

    data = {
        "loss": np.float32(0.5),
        "n": np.int64(3),
        "ok": np.bool_(True),
        "nan": float("nan"),
        "tensor": torch.ones(3),
        "array": np.ones(3),
        "row": {"f1": [np.float64(0.25), torch.zeros(1), "x"], 4: None},
        "result": object(),
    }
    assert json_safe(data) == {
        "loss": 0.5,
        "n": 3,
        "ok": True,
        "nan": None,
        "row": {"f1": [0.25, "x"], "4": None},
    }


TINY_TRAIN = [
    "--tile-um",
    "128",
    "--input-px",
    "64",
    "--n-maps",
    "4",
    "--chunk-tiles",
    "32",
    "--set",
    "normalise_tiles=16",
    "--device",
    "cpu",
]


def test_cli_train_with_labels_prints_json_events(tiny_cohort, tmp_path, capsys):
    import signal

    from napari_slide_attention.labels import LabelStore
    from napari_slide_attention.models.checkpoint import read_checkpoint

    entry = tiny_cohort.entries[0]
    db = tmp_path / "c.labels.sqlite"
    args = ["train", "grid", "--cohort", str(tiny_cohort.path), "--out", str(tmp_path / "run")]
    assert main([*args, "--labels", str(db), "--events", *TINY_TRAIN]) == 2
    assert "no such label store" in capsys.readouterr().err and not db.exists()
    with LabelStore(db) as store:
        store.set_slide_label(entry.slide, tiny_cohort.classes[-1])
        store.add_region(entry.slide, [(0, 0), (300, 0), (300, 300)], tiny_cohort.classes[-1])
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert main([*args, "--labels", str(db), "--events", "--epochs", "1", *TINY_TRAIN]) == 0
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert all(set(e) == {"stage", "done", "total", "message", "data"} for e in events)
    labels = events[0]
    assert labels["stage"] == "labels" and labels["data"]["slide_labels"] == 1
    assert labels["data"]["regions"] == 1 and labels["data"]["changed"] == 1
    stages = [e["stage"] for e in events]
    assert "step" in stages and stages.count("epoch") == 1
    epoch = events[stages.index("epoch")]
    assert epoch["done"] == epoch["total"] == 1 and "train_loss" in epoch["data"]["row"]
    done = events[-1]
    assert done["stage"] == "done" and done["data"]["epochs_done"] == 1
    assert done["data"]["stopped"] is False
    assert read_checkpoint(done["data"]["last"]).kind == "grid-attention"
    assert Path(done["data"]["best"]).is_absolute()


def test_cli_train_stops_cleanly_on_sigint(tiny_cohort, tmp_path):
    import signal

    from napari_slide_attention.models.checkpoint import load_model
    from napari_slide_attention.train.cohort import Cohort, write_cohort

    # the train split alone: no validation pass, so the first epoch comes sooner
    cohort = write_cohort(
        tmp_path / "train.csv", Cohort(tiny_cohort.classes, tiny_cohort.split("train"))
    )

    command = [
        sys.executable,
        "-m",
        "napari_slide_attention.cli",
        "train",
        "grid",
        "--cohort",
        str(cohort),
        "--out",
        str(tmp_path / "run"),
        "--epochs",
        "100",
        "--events",
        *TINY_TRAIN,
    ]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        events = []
        for line in child.stdout:
            events.append(json.loads(line))
            if events[-1]["stage"] == "epoch":
                child.send_signal(signal.SIGINT)
                break
        events += [json.loads(line) for line in child.stdout]
        status = child.wait(timeout=120)
    finally:
        if child.poll() is None:  # pragma: no cover - only when the test fails
            child.kill()
            child.wait()
    stderr = child.stderr.read()
    child.stderr.close()
    child.stdout.close()
    assert status == 130, stderr
    stopped = events[-1]
    assert stopped["stage"] == "stopped", events[-3:]
    assert stopped["data"]["signal"] == "SIGINT" and stopped["data"]["epochs_done"] >= 1
    assert [e["stage"] for e in events].count("epoch") < 100
    last = Path(stopped["data"]["last"])
    assert last == (tmp_path / "run" / "last.safetensors").absolute() and last.exists()
    model, checkpoint = load_model(last, device="cpu")
    assert checkpoint.kind == "grid-attention" and not model.training
    assert checkpoint.extra["epoch"] + 1 == stopped["data"]["epochs_done"]
    assert "Traceback" not in stderr


# -- cross-validation and the HER2 contest -------------------------------------------------
def _two_class_cohort(tiny_cohort, path: Path) -> Path:
    """The tiny cohort's lowest and highest class: three slides (three cases) of each."""
    from dataclasses import replace

    from napari_slide_attention.train.cohort import Cohort, write_cohort

    names = (tiny_cohort.classes[0], tiny_cohort.classes[-1])
    entries = [
        replace(e, label=names.index(tiny_cohort.classes[e.label]), lesions=None)
        for e in tiny_cohort.entries
        if tiny_cohort.classes[e.label] in names
    ]
    return write_cohort(path, Cohort(names, entries))


def test_cli_train_and_evaluate_folds(tiny_cohort, tmp_path, capsys):
    import shutil

    from napari_slide_attention.train.cohort import read_cohort
    from napari_slide_attention.train.crossval import summarise_folds

    cohort_csv = _two_class_cohort(tiny_cohort, tmp_path / "two.csv")
    cohort = read_cohort(cohort_csv)
    run = tmp_path / "run"
    train = ["train", "grid", "--cohort", str(cohort_csv), "--out", str(run), "--folds", "2"]
    assert main([*train, "--val-fraction", "0", "--epochs", "1", "--quiet", *TINY_TRAIN]) == 0
    out = capsys.readouterr().out
    assert "fold 1: best:" in out and "fold 2: best:" in out
    assert f"evaluate --folds 2 --cohort {cohort_csv} --model {run}" in out
    tested = []
    for fold in (1, 2):
        fold_cohort = read_cohort(run / f"fold-{fold}" / "cohort.csv", cohort.classes)
        assert not fold_cohort.split("val")  # --val-fraction 0
        tested += [e.slide for e in fold_cohort.split("test")]
        assert (run / f"fold-{fold}" / "best.safetensors").is_file()
    assert sorted(tested) == sorted(e.slide for e in cohort.entries)  # each slide once

    evaluate = ["evaluate", "--cohort", str(cohort_csv), "--model", str(run), "--folds", "2"]
    assert main([*evaluate, "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("Method"))
    assert "F1 (mean ± std)" in lines[header] and "AUROC (mean ± std)" in lines[header]
    assert lines[header + 2].startswith("grid-attention (run)") and "±" in lines[header + 2]
    assert "2-fold cross-validation" in captured.out and "per fold" in captured.out
    assert captured.err.count("fold 1/2: [") == 3 and captured.err.count("fold 2/2: [") == 3

    assert main([*evaluate, "--device", "cpu", "--quiet", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["folds"] == 2 and report["slides"] == 6
    ((name, method),) = report["models"].items()
    assert name == "grid-attention (run)" and len(method["folds"]) == 2
    rows = [f["slides"] for f in method["folds"]]
    assert sorted(r["slide"] for fold in rows for r in fold) == sorted(map(str, tested))
    expected = summarise_folds(
        [[r["truth"] for r in fold] for fold in rows],
        [[r["predicted"] for r in fold] for fold in rows],
        None,
        cohort.classes,
    )
    assert [f["f1"] for f in method["folds"]] == pytest.approx(expected.f1.values)
    assert method["f1"]["mean"] == pytest.approx(expected.f1.mean)
    assert method["f1"]["std"] == pytest.approx(expected.f1.std)

    # a run of other folds, or the wrong K, is refused before any model runs
    other = tmp_path / "other"
    shutil.copytree(run, other)
    first, second = other / "fold-1" / "cohort.csv", other / "fold-2" / "cohort.csv"
    text = first.read_text()
    first.write_text(second.read_text())
    second.write_text(text)
    assert main([*evaluate, "--model", str(other), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "its folds differ" in err and len(err.strip().splitlines()) == 1
    assert main([*evaluate[:-1], "3", "--device", "cpu"]) == 2
    assert "not a run of `train --folds 3`" in capsys.readouterr().err


HER2 = ("0", "1+", "2+", "3+")
# Made up for the test (15 points minus 5 per score of distance): NOT the contest's table.
ILLUSTRATIVE_POINTS = {
    "name": "illustrative",
    "source": "made up for the tests; not the contest's table",
    "points": [[15 - 5 * abs(t - p) for p in range(4)] for t in range(4)],
}


def test_cli_evaluate_her2_points(tiny_cohort, tiny_grid_model, tmp_path, capsys):
    from napari_slide_attention.models.checkpoint import read_checkpoint, save_checkpoint
    from napari_slide_attention.train.cohort import Cohort, write_cohort
    from napari_slide_attention.train.her2_contest import load_points_table, score_contest

    # the tiny cohort and model with their four classes named as HER2 scores
    cohort_csv = write_cohort(tmp_path / "her2.csv", Cohort(HER2, tiny_cohort.entries))
    base = read_checkpoint(tiny_grid_model)
    model = save_checkpoint(
        tmp_path / "her2-run" / "best.safetensors",
        base.kind,
        {**base.config, "classes": list(HER2)},
        base.tensors,
        base.extra,
    )
    points, weights = tmp_path / "points.json", tmp_path / "weights.json"
    points.write_text(json.dumps(ILLUSTRATIVE_POINTS))
    weights.write_text(
        json.dumps({"source": "right predictions only", "points": np.eye(4).tolist()})
    )
    argv = ["evaluate", "--model", str(model), "--cohort", str(cohort_csv), "--device", "cpu"]
    argv += ["--quiet", "--her2-points", str(points)]

    assert main([*argv, "--her2-weights", str(weights), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    ((name, evaluated),) = report["models"].items()
    slides = evaluated["slides"]
    assert set(slides[0]) == {"slide", "truth", "predicted", "confidence"}
    expected = score_contest(
        [r["truth"] for r in slides],
        [r["predicted"] for r in slides],
        [r["confidence"] for r in slides],
        points=load_points_table(points),
        weights=load_points_table(weights),
    )
    scored = report["her2"]["models"][name]
    assert scored["n"] == 4 and scored["points"] == expected.total_points
    assert scored["combined"] == pytest.approx(expected.total_combined)
    assert scored["weighted_confidence"] == pytest.approx(expected.total_weighted_confidence)
    right = [r["confidence"] for r in slides if r["truth"] == r["predicted"]]
    assert scored["weighted_confidence"] == pytest.approx(sum(right))
    assert report["her2"]["points"]["verified"] is False

    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "HER2 contest criteria over 4 cases" in out and "not verified" in out
    plain = score_contest(
        [r["truth"] for r in slides],
        [r["predicted"] for r in slides],
        [r["confidence"] for r in slides],
        points=load_points_table(points),
    )
    table = out.splitlines()[-3:]
    assert table[0].split() == ["Method", "Points", "W.C.", "C.Pts", "n"]
    assert table[2].startswith(name)
    assert table[2].split()[-4:] == [
        f"{plain.total_points:.1f}",
        "n/a",
        f"{plain.total_combined:.1f}",
        "4",
    ]

    # classes that are not HER2 scores, or weights alone, are refused at once
    other = ["evaluate", "--model", str(tiny_grid_model), "--cohort", str(tiny_cohort.path)]
    assert main([*other, "--her2-points", str(points)]) == 2
    err = capsys.readouterr().err
    assert "HER2 scores" in err and "carcinoma" in err and len(err.strip().splitlines()) == 1
    assert main([*other, "--her2-weights", str(weights)]) == 2
    assert "--her2-weights goes with --her2-points" in capsys.readouterr().err
