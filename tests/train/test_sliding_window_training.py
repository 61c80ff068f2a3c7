"""Training the sliding-window baseline: files, resume, tuned thresholds, whole-slide runs."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from napari_slide_attention.inference.sliding_window import predict_sliding_window
from napari_slide_attention.jobs import run_to_end
from napari_slide_attention.models.checkpoint import read_checkpoint
from napari_slide_attention.models.sliding_window import CropClassifier, aggregate_tiles
from napari_slide_attention.results import SlideResult
from napari_slide_attention.slide.sampling import slide_pieces, tile_edge_px
from napari_slide_attention.train import sliding_window as sw
from napari_slide_attention.train.cohort import Cohort, make_synthetic_cohort
from napari_slide_attention.train.sliding_window import (
    SlidingWindowSettings,
    train_sliding_window,
    tune_thresholds,
)

# The thresholds tried are not the default 0.5, so tuned values in the checkpoint show.
SETTINGS = SlidingWindowSettings.from_dict(
    dict(
        epochs=2,
        batch_size=8,
        crops_per_lesion=1,
        negatives_per_slide=2,
        crop_um=64.0,
        input_px=16,
        trainable_blocks=1,
        normalise_tiles=4,
        chunk_tiles=16,
        device="cpu",
        threshold_grid=(0.3, 0.7),
        min_count_grid=(1, 2),
    )
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny tensors: on a busy small machine, handing them between threads costs more
    # than it saves (a 3-4x slower run).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Cohort:
    directory = tmp_path_factory.mktemp("sw-cohort")
    # one tissue piece per slide: small slides with more pieces fall under the minimum area
    return make_synthetic_cohort(
        directory,
        slides_per_class={"train": 1, "val": 1, "test": 0},
        size=(1536, 1024),
        seed=3,
        n_pieces=1,
    )


@pytest.fixture(scope="module")
def resumed(cohort, tmp_path_factory):
    """A 2-epoch run killed after epoch 1, then resumed; and the same run uninterrupted."""
    root = tmp_path_factory.mktemp("sw-runs")
    work = train_sliding_window(cohort, root / "cut", SETTINGS)
    for event in work:
        if event.stage == "epoch":
            work.close()  # killed after the first epoch's checkpoint
            break
    first = read_checkpoint(root / "cut" / "last.safetensors")
    events = []
    summary = run_to_end(train_sliding_window(cohort, root / "cut", SETTINGS), events.append)
    whole = run_to_end(train_sliding_window(cohort, root / "whole", SETTINGS))
    return root, first, events, summary, whole


def test_a_run_writes_checkpoints_logs_and_state(resumed, cohort):
    root, _, events, summary, _ = resumed
    run = root / "cut"
    for name in (
        "settings.json",
        "log.csv",
        "log.json",
        "last.safetensors",
        "best.safetensors",
        "training-state.safetensors",
        "checkpoints/epoch-0001.safetensors",
        "checkpoints/epoch-0002.safetensors",
    ):
        assert (run / name).exists(), name
    assert summary.best == run / "best.safetensors" and summary.epochs_done == 2
    log = json.loads((run / "log.json").read_text())
    assert [r["epoch"] for r in log] == [0, 1]
    assert {"train_loss", "lr", "crops", "val_crop_mean_f1", "seconds"} <= set(log[0])
    assert log[1]["lr"] == pytest.approx(1e-3 * 0.95)
    header = (run / "log.csv").read_text().splitlines()[0].split(",")
    assert "val_crop_mean_f1" in header and "val_crop_metrics" not in header
    # every lesion gives crops_per_lesion crops, every slide negatives_per_slide negatives
    lesions = sum(len(e.lesions) for e in cohort.split("train"))
    assert log[0]["crops"] == 1 * lesions + 2 * 4
    last = read_checkpoint(run / "last.safetensors")
    assert last.kind == "sliding-window" and tuple(last.config["classes"]) == cohort.classes
    assert last.config["mean"] != [0.5, 0.5, 0.5] and last.extra["epoch"] == 1
    assert "step" in [e.stage for e in events]


def test_resume_continues_at_epoch_two_and_ends_as_an_uninterrupted_run(resumed):
    root, first, events, _, whole = resumed
    assert first.extra["epoch"] == 0
    assert any(e.stage == "resume" and e.done == 1 for e in events)
    assert [e.done for e in events if e.stage == "epoch"] == [2]
    cut = read_checkpoint(root / "cut" / "last.safetensors").tensors
    assert not torch.equal(cut["classifier.weight"], first.tensors["classifier.weight"])
    for name, tensor in read_checkpoint(whole.last).tensors.items():
        torch.testing.assert_close(cut[name], tensor, msg=name)


def test_tuned_thresholds_land_in_the_best_checkpoint(resumed):
    root, _, events, _, _ = resumed
    rule = [e for e in events if e.stage == "tune" and "rule" in e.data][-1].data["rule"]
    best = read_checkpoint(root / "cut" / "best.safetensors")
    assert best.config["thresholds"] == rule["thresholds"]
    assert best.config["min_counts"] == rule["min_counts"]
    assert best.extra["aggregation"]["thresholds"] == rule["thresholds"]
    # lowest-risk class keeps the unused default; the others come from the grids tried
    assert best.config["thresholds"][0] == 0.5 and best.config["min_counts"][0] == 1
    assert set(best.config["thresholds"][1:]) <= {0.3, 0.7}
    assert set(best.config["min_counts"][1:]) <= {1, 2}
    assert rule["val_slides"] == 4 and rule["search"] == "exhaustive"
    assert events[-1].stage == "checkpoint"
    # the per-epoch copy keeps the defaults: only best is re-saved
    epoch = read_checkpoint(root / "cut" / "checkpoints" / "epoch-0002.safetensors")
    assert epoch.config["thresholds"] == [0.5] * 4


def test_predict_slide_gives_tile_probabilities_on_the_pieces_grid(resumed, cohort, tmp_path):
    root = resumed[0]
    entry = cohort.split("val")[3]
    events = []
    result = run_to_end(
        predict_sliding_window(root / "cut" / "best.safetensors", entry.slide, device="cpu"),
        events.append,
    )
    stages = [e.stage for e in events]
    assert [s for s in stages if s != "tiles"] == ["tissue", "tissue", "piece"]
    assert stages[2:-1] == ["tiles"] * (len(stages) - 3)  # progress inside the piece
    assert events[-2].done == events[-2].total == result.info["tiles"]
    assert result.model_kind == "sliding-window" and result.aggregation == "thresholds"
    config = result.model["config"]
    from napari_slide_attention.slide.reader import open_slide

    with open_slide(entry.slide) as slide:
        pieces = slide_pieces(slide, tile_edge_px(slide, config["crop_um"]))
    assert len(result.pieces) == len(pieces)
    every = []
    for piece, sample in zip(result.pieces, pieces, strict=True):
        grid = piece.arrays["tile_probabilities"]
        assert grid.dtype == np.float32 and grid.shape == (4, *sample.grid.shape)
        assert piece.grid_origin == sample.grid.origin and piece.tile_size == 128
        np.testing.assert_array_equal(piece.tissue, sample.grid.in_tissue)
        assert np.isnan(grid[:, ~piece.tissue]).all()
        on = grid[:, piece.tissue]  # (C, n)
        assert np.isfinite(on).all()
        np.testing.assert_allclose(on.sum(0), 1.0, rtol=1e-5)
        every.append(on.T)
    probs, call = aggregate_tiles(
        np.concatenate(every), config["thresholds"], config["min_counts"], range(4)
    )
    assert result.predicted == call
    np.testing.assert_allclose(result.probabilities, probs, rtol=1e-6)
    loaded = SlideResult.load(result.save(tmp_path / "result"))
    assert loaded.model_kind == "sliding-window" and loaded.predicted == result.predicted
    np.testing.assert_array_equal(
        loaded.pieces[0].arrays["tile_probabilities"], result.pieces[0].arrays["tile_probabilities"]
    )


def test_slides_above_the_lowest_risk_need_lesion_boxes(cohort, tmp_path):
    entries = [replace(e) for e in cohort.entries]
    victim = next(e for e in entries if e.split == "val" and e.label == 2)
    victim.lesions = None
    bare = Cohort(cohort.classes, entries, cohort.path)
    with pytest.raises(ValueError, match=victim.slide.name) as info:
        next(train_sliding_window(bare, tmp_path / "run", SETTINGS))
    assert "lesion boxes" in str(info.value) and "'val'" in str(info.value)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_without_a_validation_split_the_defaults_stay_and_a_message_says_so(cohort, tmp_path):
    train_only = Cohort(cohort.classes, cohort.split("train"), cohort.path)
    settings = replace(SETTINGS, epochs=1, model={**SETTINGS.model, "trainable_blocks": 0})
    events = []
    summary = run_to_end(
        train_sliding_window(train_only, tmp_path / "run", settings), events.append
    )
    tune = [e for e in events if e.stage == "tune"]
    assert len(tune) == 1 and "no validation split" in tune[0].message
    best = read_checkpoint(summary.best)
    assert best.config["thresholds"] == [0.5] * 4 and best.config["min_counts"] == [1] * 4
    assert "aggregation" not in best.extra
    assert "val_crop_mean_f1" not in summary.log[0]


def test_tune_thresholds_finds_the_separating_rule():
    # p(tumour) of the tiles of four slides: two normal, two tumour
    slides = [[0.65, 0.6, 0.1], [0.95, 0.2], [0.92, 0.91, 0.3], [0.75, 0.72, 0.71]]
    tiles = [np.stack([1 - np.array(p), np.array(p)], 1) for p in slides]
    rule = tune_thresholds(
        tiles, [0, 0, 1, 1], ("normal", "tumour"), (0, 1), (0.5, 0.7, 0.9), (1, 2)
    )
    # only "two tiles at p >= 0.7" calls all four right
    assert rule.thresholds == (0.5, 0.7) and rule.min_counts == (1, 2)
    assert rule.metrics.mean.f1 == 1.0 and rule.combinations == 6


def test_tune_thresholds_coordinate_search(monkeypatch):
    rng = np.random.default_rng(0)
    classes = ("a", "b", "c")
    tiles, labels = [], []
    for label in (0, 1, 2, 0, 1, 2):
        p = rng.dirichlet([1, 1, 1], size=6)
        p[:3, label] += 2.0  # three confident tiles of the slide's class
        tiles.append(p / p.sum(1, keepdims=True))
        labels.append(label)
    exhaustive = tune_thresholds(tiles, labels, classes, (0, 1, 2))
    monkeypatch.setattr(sw, "_MAX_EXHAUSTIVE", 0)
    coordinate = tune_thresholds(tiles, labels, classes, (0, 1, 2))
    assert exhaustive.search == "exhaustive" and coordinate.search == "coordinate"
    assert coordinate.combinations < exhaustive.combinations == 30**2
    assert coordinate.metrics.mean.f1 == exhaustive.metrics.mean.f1 == 1.0


def test_predict_refuses_other_models():
    from napari_slide_attention.models.grid_attention import GridAttention, GridAttentionConfig

    grid = GridAttention(GridAttentionConfig(classes=("a", "b"), input_px=32))
    with pytest.raises(TypeError, match="sliding-window"):
        next(predict_sliding_window(grid, "nowhere.tif"))
    assert issubclass(CropClassifier, torch.nn.Module)
