"""The slide-attention command line: facts, synthetic slides, tissue masks, readable errors."""

from __future__ import annotations

import json
import subprocess
import sys

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
    assert result.returncode == 1
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
    assert missing.returncode == 1 and "no such file" in missing.stderr


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
        main(["synth", str(tmp_path / "x.tif"), "--size", "1024", "1024", "--label", "banana"]) == 1
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
        == 1
    )
    err = capsys.readouterr().err
    assert err.startswith("slide-attention: error:") and str(missing) in err
    assert (
        main(["train", "grid", "--cohort", str(tmp_path / "no.csv"), "--out", str(tmp_path / "r")])
        == 1
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
        == 1
    )
    assert "unknown setting" in capsys.readouterr().err
