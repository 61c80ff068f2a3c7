"""The dual model's extensions for sparse lesions, as ``train dual`` settings: tile labels
from region labels (the cohort's lesion boxes or a label store's regions) with the
highest-risk slide call, and the sharper soft attention; their command-line options."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from napari_slide_attention.cli import build_parser, main
from napari_slide_attention.inference.dual import predict_dual, slide_call
from napari_slide_attention.jobs import run_to_end
from napari_slide_attention.labels import LabelStore
from napari_slide_attention.models.checkpoint import read_checkpoint
from napari_slide_attention.train.dual import DualTrainSettings, train_dual
from napari_slide_attention.train.labels import apply_labels
from napari_slide_attention.train.tile_labels import region_tile_labels
from tiny_models import TINY_HARD

SMALL = {
    "n_tiles": 4,
    "tile_um": 64.0,
    "feature_px": 32,
    "feature_width": 8,
    "soft": {"pool": 4},
    "hard": dict(TINY_HARD),
    "normalise_tiles": 4,
}


# -- tile labels from regions ----------------------------------------------------------------
def test_tiles_take_the_class_of_the_regions_they_overlap():
    tiles = np.array(
        [
            [0, 0, 100, 100],  # overlaps region A (class 2)
            [100, 0, 100, 100],  # only touches A's right edge: no region
            [250, 250, 100, 100],  # overlaps B (class 1) and C (class 3)
            [600, 600, 50, 50],  # far from everything
            [290, 180, 20, 80],  # overlaps B only
        ]
    )
    regions = [((50, 50, 50, 50), 2), ((200, 200, 100, 100), 1), ((300, 300, 40, 40), 3)]
    assert region_tile_labels(tiles, regions, (0, 1, 2, 3)).tolist() == [2, 0, 3, 0, 1]
    # the lowest-risk class is the risk order's first, and "highest" follows the order too
    assert region_tile_labels(tiles, regions, (2, 3, 1, 0)).tolist() == [2, 2, 1, 2, 1]
    assert region_tile_labels(tiles, [], (0, 1, 2, 3)).tolist() == [0] * 5
    assert region_tile_labels(np.zeros((0, 4)), regions, (0, 1, 2, 3)).shape == (0,)


def test_region_labels_set_the_highest_risk_slide_call():
    settings = DualTrainSettings.from_dict({"tile_labels": "regions"})
    assert settings.model["slide_call"] == "highest-risk"
    assert DualTrainSettings().model["slide_call"] == "most-frequent"
    again = DualTrainSettings.from_dict(json.loads(json.dumps(settings.to_dict())))
    assert again == settings
    with pytest.raises(ValueError, match="tile_labels"):
        DualTrainSettings(tile_labels="lesions")
    # the slide call from tiles: the highest-risk class any tile shows, that tile's values
    tiles = np.array([[0.9, 0.1, 0.0], [0.8, 0.0, 0.2], [0.3, 0.6, 0.1], [0.4, 0.1, 0.5]])
    probs, call = slide_call(tiles, (0, 1, 2), "highest-risk")
    assert call == 2 and probs.tolist() == pytest.approx([0.4, 0.1, 0.5])
    probs, call = slide_call(tiles, (0, 1, 2))  # the paper's: most frequent tile class
    assert call == 0 and probs.tolist() == pytest.approx(tiles.mean(0).tolist())


def _without_lesions(cohort):
    """The cohort with no lesion boxes known on any slide (an empty region list each)."""
    return replace(cohort, entries=[replace(e, lesions=[]) for e in cohort.entries])


def test_the_stores_regions_label_the_tiles_and_reach_training(tiny_cohort, tmp_path):
    """A region in the label store (an annotator's correction: a lesion on a slide
    the cohort calls normal) is where the training tiles of other classes come from."""
    cohort = _without_lesions(tiny_cohort)
    normal = next(e for e in cohort.entries if e.split == "train" and e.label == 0)
    with LabelStore(tmp_path / "labels.sqlite") as store:
        store.add_region(normal.slide, [(0, 0), (2048, 0), (2048, 1280), (0, 1280)], "high-grade")
        labelled = apply_labels(cohort, store)
    settings = DualTrainSettings.from_dict(
        {"epochs": 1, "mode": "hard", "tile_labels": "regions", **SMALL}
    )
    events = []
    summary = run_to_end(train_dual(labelled, tmp_path / "run", settings), events.append)
    (row,) = json.loads((tmp_path / "run" / "log.json").read_text())
    counts = row["train_tile_labels"]
    # every tile of the corrected slide lies in its region; no other slide has one
    assert counts["high-grade"] > 0 and counts["normal"] > 0
    assert counts["low-grade"] == counts["carcinoma"] == 0
    said = [e.message for e in events if e.stage == "prepare" and normal.slide.name in e.message]
    assert said and "1 region(s) (high-grade)" in said[0]
    config = read_checkpoint(summary.last, tensors=False).config
    assert config["slide_call"] == "highest-risk"
    result = run_to_end(predict_dual(summary.last, normal.slide, device="cpu"))
    assert result.aggregation == "highest-risk-tile-class"
    assert result.predicted == int(result.arrays["tile_classes"].max())


def test_the_cohorts_lesion_boxes_label_the_tiles(tiny_cohort, tmp_path):
    settings = DualTrainSettings.from_dict(
        {"epochs": 1, "mode": "hard", "tile_labels": "regions", **SMALL}
    )
    run_to_end(train_dual(tiny_cohort, tmp_path / "run", settings))
    (row,) = json.loads((tmp_path / "run" / "log.json").read_text())
    counts = row["train_tile_labels"]
    # tiles on the sidecar's lesion boxes take their classes; the rest the lowest-risk one
    assert counts["normal"] > max(counts[c] for c in tiny_cohort.classes[1:])
    assert sum(counts.values()) == sum(counts[c] for c in tiny_cohort.classes)
    # the paper's labels: every tile its slide's class, so each class gets tiles
    paper = DualTrainSettings.from_dict({"epochs": 1, "mode": "hard", **SMALL})
    run_to_end(train_dual(tiny_cohort, tmp_path / "paper", paper))
    (row,) = json.loads((tmp_path / "paper" / "log.json").read_text())
    assert all(n > 0 for n in row["train_tile_labels"].values())


def test_a_slide_without_regions_is_named(tiny_cohort, tmp_path):
    carcinoma = next(e for e in tiny_cohort.entries if e.split == "train" and e.label == 3)
    entries = [
        replace(e, lesions=None) if e.split == "train" and e.label in (0, 3) else e
        for e in tiny_cohort.entries
    ]
    settings = DualTrainSettings.from_dict(
        {"epochs": 1, "mode": "hard", "tile_labels": "regions", **SMALL}
    )
    with pytest.raises(ValueError) as info:
        run_to_end(train_dual(replace(tiny_cohort, entries=entries), tmp_path / "r", settings))
    message = str(info.value)
    # the carcinoma slide is named; the normal one needs no regions (it shows no lesion)
    assert str(carcinoma.slide) in message and "\n" not in message
    assert "lesions column" in message and "--labels" in message


# -- the sharper soft attention in training ---------------------------------------------------
def test_soft_training_with_top_k_keeps_it_in_the_checkpoint(tiny_cohort, tmp_path):
    soft = {"pool": 4, "top_k": 3, "temperature": 0.5}
    settings = DualTrainSettings.from_dict(
        {"epochs": 1, "mode": "soft", "soft_samples": 8, **{**SMALL, "soft": soft}}
    )
    summary = run_to_end(train_dual(tiny_cohort, tmp_path / "run", settings))
    config = read_checkpoint(summary.last, tensors=False).config
    assert config["soft"]["top_k"] == 3 and config["soft"]["temperature"] == 0.5
    slide = tiny_cohort.split("test")[2].slide
    result = run_to_end(predict_dual(summary.last, slide, device="cpu"))
    attention = result.arrays["soft_attention"]
    assert int((attention > 0).sum()) == 3 and float(attention.sum()) == pytest.approx(1.0)
    # tiles are drawn from A's k cells first (the rest of the tissue fills up to N)
    on_a = result.arrays["tile_attention"] > 0
    first = int(np.argmin(result.arrays["tile_rank"]))
    assert on_a[first] and 1 <= int(on_a.sum()) <= 3


# -- command line and fine-tuning ---------------------------------------------------------------
def _train_args(tiny_cohort, tmp_path, *options):
    return [
        "train",
        "dual",
        "--cohort",
        str(tiny_cohort.path),
        "--out",
        str(tmp_path / "run"),
        *options,
    ]


def test_cli_options_reach_the_settings(tiny_cohort, tmp_path):
    from napari_slide_attention.cli.models import _settings

    args = build_parser().parse_args(
        _train_args(
            tiny_cohort,
            tmp_path,
            "--tile-labels",
            "regions",
            "--attention-temperature",
            "0.25",
            "--attention-top-k",
            "8",
            "--set",
            'soft={"pool": 4}',
        )
    )
    settings = _settings(DualTrainSettings, args)
    assert settings.tile_labels == "regions" and settings.model["slide_call"] == "highest-risk"
    assert settings.model["soft"] == {"pool": 4, "temperature": 0.25, "top_k": 8}
    plain = _settings(
        DualTrainSettings, build_parser().parse_args(_train_args(tiny_cohort, tmp_path))
    )
    assert plain == DualTrainSettings()  # the paper's: none of the extensions


@pytest.mark.parametrize(
    ("options", "said"),
    [
        (["--attention-temperature", "0"], "temperature must be a positive number"),
        (["--attention-top-k", "-2"], "top_k must be a whole number"),
    ],
)
def test_bad_values_get_one_clean_line(tiny_cohort, tmp_path, capsys, options, said):
    code = main(_train_args(tiny_cohort, tmp_path, *options))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("slide-attention: error:") and said in err
    assert err.strip().count("\n") == 0
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_dual_options_are_refused_for_other_models(tiny_cohort, tmp_path, capsys):
    args = ["train", "grid", "--cohort", str(tiny_cohort.path), "--out", str(tmp_path / "g")]
    assert main([*args, "--tile-labels", "regions"]) == 2
    err = capsys.readouterr().err
    assert "settings of train dual" in err and err.strip().count("\n") == 0


def test_fine_tuning_switches_the_tile_labels_but_not_the_attention(tmp_path):
    base = DualTrainSettings.from_dict({**SMALL, "soft": {"pool": 4, "top_k": 6}})
    checkpoint = base.model_config(("a", "b")).to_dict()
    tuned = DualTrainSettings.from_dict({"tile_labels": "regions"}).with_model(checkpoint)
    # the checkpoint's attention (top-k included) and the fine-tune's slide call
    assert tuned.model["soft"]["top_k"] == 6 and tuned.model["slide_call"] == "highest-risk"
    back = DualTrainSettings().with_model({**checkpoint, "slide_call": "highest-risk"})
    assert back.model["slide_call"] == "most-frequent"  # tiles labelled by slide again
    other = DualTrainSettings.from_dict({"soft": {"pool": 4, "temperature": 0.5}})
    with pytest.raises(ValueError, match="--init takes the model's settings"):
        other.with_model(checkpoint)
