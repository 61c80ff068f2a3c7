"""Dual attention end to end on the tiny cohort: training, resume, checkpoints, inference,
results, the CLI, and the pieces of the slide call."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_slide_attention.inference.dual import (
    glimpse_geometry,
    predict_dual,
    select_tiles,
    slide_call,
)
from napari_slide_attention.jobs import run_to_end
from napari_slide_attention.models.checkpoint import load_model, read_checkpoint
from napari_slide_attention.models.dual_attention import DualAttention, DualAttentionConfig
from napari_slide_attention.results import SlideResult
from napari_slide_attention.slide.reader import open_slide
from napari_slide_attention.slide.sampling import read_tiles, read_view
from napari_slide_attention.train.dual import DualTrainSettings, train_dual
from napari_slide_attention.train.dual_data import mixed_steps, selection_score

SMALL_HARD = {
    "glimpses": 3,
    "glimpse_px": 16,
    "tile_px": 64,
    "context_px": 32,
    "feature": 32,
    "hidden": [32, 16],
    "glimpse_channels": [8, 16],
    "context_channels": [8, 16],
}
SMALL = {
    "n_tiles": 4,
    "tile_um": 64.0,
    "feature_px": 32,
    "feature_width": 8,
    "soft": {"pool": 4},
    "hard": SMALL_HARD,
    "normalise_tiles": 4,
}


@pytest.fixture(scope="module")
def dual_run(tiny_cohort, tmp_path_factory):
    run = tmp_path_factory.mktemp("dual-run")
    settings = DualTrainSettings.from_dict({"epochs": 2, **SMALL})
    events = []
    summary = run_to_end(train_dual(tiny_cohort, run, settings), events.append)
    return run, summary, events, settings


def test_training_writes_checkpoints_logs_and_events(dual_run):
    run, summary, events, _ = dual_run
    assert summary.epochs_done == 2
    assert summary.best.exists() and summary.last.exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "epoch-0001.safetensors",
        "epoch-0002.safetensors",
    ]
    log = json.loads((run / "log.json").read_text())
    assert [row["epoch"] for row in log] == [0, 1]
    for row in log:
        assert np.isfinite(row["train_loss"]) and np.isfinite(row["hard_loss"])
        assert "soft_loss" in row and "val_mean_f1" in row
    assert log[1]["joint_weight"] == pytest.approx(0.5)  # α^e with α = 0.5
    # the best epoch: highest validation F1, ties to the lower validation loss
    best = max(log, key=lambda row: (row["val_mean_f1"], -row["val_loss"]))
    assert read_checkpoint(summary.best, tensors=False).extra["epoch"] == best["epoch"]
    stages = {e.stage for e in events}
    assert {"prepare", "step", "epoch"} <= stages
    checkpoint = read_checkpoint(summary.best)
    assert checkpoint.kind == "dual-attention"
    assert checkpoint.config["classes"] == ["normal", "low-grade", "high-grade", "carcinoma"]
    # the normalisation measured on the training tiles is saved with the hard part's config
    assert checkpoint.config["hard"]["mean"] != [0.5, 0.5, 0.5]


def test_a_saturated_validation_f1_leaves_the_choice_to_the_loss():
    # a later epoch with the same F1 and a lower loss wins; any F1 step beats any loss
    assert selection_score(1.0, 0.2) > selection_score(1.0, 0.9)
    assert selection_score(0.9, 0.9) > selection_score(0.875, 0.0)
    assert selection_score(0.5, 1e9) > selection_score(0.498, 0.0)


def test_resume_continues_and_refuses_other_settings(dual_run, tiny_cohort, tmp_path):
    run, _, _, settings = dual_run
    more = DualTrainSettings.from_dict({**settings.to_dict(), "epochs": 3})
    with pytest.raises(ValueError, match="other settings"):
        run_to_end(train_dual(tiny_cohort, run, more))


def test_interrupted_run_resumes_to_the_same_weights(tiny_cohort, tmp_path):
    settings = DualTrainSettings.from_dict({"epochs": 2, **SMALL})
    straight = run_to_end(train_dual(tiny_cohort, tmp_path / "a", settings))
    work = train_dual(tiny_cohort, tmp_path / "b", settings)
    for event in work:  # stop the run after its first epoch, as a kill would
        if event.stage == "epoch":
            work.close()
            break
    assert json.loads((tmp_path / "b" / "log.json").read_text())[-1]["epoch"] == 0
    resumed = run_to_end(train_dual(tiny_cohort, tmp_path / "b", settings))
    assert resumed.epochs_done == 2
    a = read_checkpoint(straight.last).tensors
    b = read_checkpoint(resumed.last).tensors
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name)


def test_predict_gives_tiles_glimpses_and_a_call(dual_run, tiny_cohort, tmp_path):
    _, summary, _, settings = dual_run
    entry = tiny_cohort.split("test")[2]
    events = []
    result = run_to_end(predict_dual(summary.best, entry.slide, seed=3), events.append)
    assert result.model_kind == "dual-attention"
    n, t, k = settings.model["n_tiles"], SMALL_HARD["glimpses"], 4
    a = result.arrays
    assert a["tile_boxes"].shape == (n, 4) and a["tile_probabilities"].shape == (n, k)
    assert a["glimpse_centres"].shape == (n, t, 2)
    assert a["glimpse_boxes"].shape == (n, t, 2, 4)
    assert a["glimpse_probabilities"].shape == (n, t, k)
    np.testing.assert_allclose(a["soft_attention"][a["soft_tissue"]].sum(), 1.0, rtol=1e-5)
    assert (a["soft_attention"][~a["soft_tissue"]] == 0).all()
    np.testing.assert_array_equal(np.sort(a["tile_rank"]), np.arange(n))
    # glimpse centres lie inside their tiles; the slide call follows the tile votes
    x, y, w, h = (a["tile_boxes"][:, i][:, None] for i in range(4))
    cx, cy = a["glimpse_centres"][..., 0], a["glimpse_centres"][..., 1]
    assert ((cx >= x) & (cx <= x + w) & (cy >= y) & (cy <= y + h)).all()
    votes = np.bincount(a["tile_classes"], minlength=k)
    assert votes[result.predicted] == votes.max()
    np.testing.assert_allclose(result.probabilities, a["tile_probabilities"].mean(0), rtol=1e-5)
    assert {"tissue", "attention", "tiles"} <= {e.stage for e in events}
    # one "tiles" event per tile's glimpses: progress (and a stop) between tiles
    assert [(e.done, e.total) for e in events if e.stage == "tiles"] == [
        (i, n) for i in range(1, n + 1)
    ]
    # same seed, same result; saved and loaded back identically
    again = run_to_end(predict_dual(summary.best, entry.slide, seed=3))
    np.testing.assert_array_equal(again.arrays["tile_boxes"], a["tile_boxes"])
    result.save(tmp_path / "r")
    loaded = SlideResult.load(tmp_path / "r")
    for name, arr in a.items():
        np.testing.assert_array_equal(loaded.arrays[name], arr, err_msg=name)
    assert loaded.info["soft_attention"]["cell_size"] == result.info["soft_attention"]["cell_size"]


def test_predict_classifies_tiles_as_the_trained_hard_attention_does(dual_run, tiny_cohort):
    """Inference hands the hard attention the tiles as training does (uint8; it
    normalises its own glimpses), so a slide's tiles get the classes training taught."""
    _, summary, _, _ = dual_run
    model, _ = load_model(summary.best)
    model.set_normalisation([0.8, 0.7, 0.8], [0.1, 0.15, 0.1])  # far from neutral
    entry = tiny_cohort.split("test")[0]
    result = run_to_end(predict_dual(model, entry.slide, seed=5))
    boxes = result.arrays["tile_boxes"]
    with open_slide(entry.slide) as slide:
        tiles = read_tiles(slide, boxes, model.hard.config.tile_px)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(5)
        own = [
            torch.softmax(
                model.hard(torch.from_numpy(t[None]), sample=False, generator=generator).logits, -1
            )
            for t in tiles
        ]
    expected = torch.cat(own)[:, -1].numpy()
    np.testing.assert_allclose(result.arrays["tile_probabilities"], expected, atol=1e-5)


def test_random_sampler_baseline_trains_hard_attention_only(tiny_cohort, tmp_path):
    settings = DualTrainSettings.from_dict(
        {"epochs": 1, "mode": "hard", "sampler": "random", **SMALL}
    )
    summary = run_to_end(train_dual(tiny_cohort, tmp_path, settings))
    log = json.loads((tmp_path / "log.json").read_text())
    assert "soft_loss" not in log[0] and "hard_loss" in log[0]
    result = run_to_end(
        predict_dual(summary.best, tiny_cohort.split("test")[0].slide, sampler="random")
    )
    assert result.info["sampler"] == "random"
    with pytest.raises(ValueError, match="mode 'hard'"):
        DualTrainSettings(sampler="random")


def test_soft_only_training_is_validated_by_the_soft_attentions_own_call(tiny_cohort, tmp_path):
    settings = DualTrainSettings.from_dict({"epochs": 2, "mode": "soft", **SMALL})
    summary = run_to_end(train_dual(tiny_cohort, tmp_path, settings))
    log = json.loads((tmp_path / "log.json").read_text())
    assert "hard_loss" not in log[0] and "soft_loss" in log[0]
    # the best epoch is chosen on the validation slides, as for the other modes
    for row in log:
        assert 0.0 <= row["val_mean_f1"] <= 1.0 and 0.0 <= row["val_accuracy"] <= 1.0
    best = max(log, key=lambda row: (row["val_mean_f1"], -row["val_loss"]))
    assert read_checkpoint(summary.best).extra["epoch"] == best["epoch"]
    # the same seeded draws: validating the same weights twice gives the same figures
    again = run_to_end(train_dual(tiny_cohort, tmp_path / "again", settings))
    assert (
        json.loads((tmp_path / "again" / "log.json").read_text())[0]["val_mean_f1"]
        == (log[0]["val_mean_f1"])
    )
    assert again.epochs_done == 2


def test_sampled_tiles_lie_in_tissue_and_in_the_slide(tiny_cohort):
    model = DualAttention(
        DualAttentionConfig(classes=("a", "b"), soft={"pool": 4}, hard=SMALL_HARD)
    )
    entry = tiny_cohort.split("train")[3]
    with open_slide(entry.slide) as slide:
        view = read_view(slide, 32.0)
        chosen = select_tiles(model, view, slide.dimensions, 128, np.random.default_rng(0))
        tiles = read_tiles(slide, chosen.boxes, 64)
        width, height = slide.dimensions
    boxes = chosen.boxes
    assert ((boxes[:, 0] >= 0) & (boxes[:, 1] >= 0)).all()
    assert ((boxes[:, 0] + boxes[:, 2] <= width) & (boxes[:, 1] + boxes[:, 3] <= height)).all()
    assert chosen.tissue[chosen.cells[:, 0], chosen.cells[:, 1]].all()
    assert tiles.shape == (len(boxes), 64, 64, 3) and tiles.dtype == np.uint8
    assert (tiles < 235).mean() > 0.2  # tissue, not glass


def test_slide_call_takes_the_most_frequent_tile_class_ties_to_higher_risk():
    probs = np.array([[0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    mean, call = slide_call(probs, risk=(0, 1))
    assert call == 1
    np.testing.assert_allclose(mean, probs.mean(0), rtol=1e-6)
    tie = np.array([[0.9, 0.1], [0.1, 0.9]])
    assert slide_call(tie, risk=(0, 1))[1] == 1
    assert slide_call(tie, risk=(1, 0))[1] == 0


def test_steps_mix_classes_and_use_every_slide():
    labels = [0, 0, 0, 1, 1, 2, 2, 3]
    steps = mixed_steps(labels, 4, np.random.default_rng(0))
    used = {i for step in steps for i in step}
    assert used == set(range(len(labels)))
    assert len(steps) == 3  # class 0's three slides need three turns of four classes
    for step in steps:
        assert len({labels[i] for i in step}) == 4
    assert mixed_steps(labels, 4, np.random.default_rng(0)) == steps  # seeded


def test_glimpse_geometry_maps_tile_coordinates_to_level0():
    from napari_slide_attention.models.hard_attention import HardAttentionConfig

    hard = HardAttentionConfig(
        classes=("a", "b"), tile_px=64, glimpse_px=16, scales=(1, 2), context_px=32
    )
    tiles = np.array([[1000, 2000, 128, 128]])  # a 128-px tile read at 64 px
    loc = np.array([[[0.0, 0.0], [-1.0, 1.0]]])
    centres, boxes = glimpse_geometry(tiles, loc, hard)
    np.testing.assert_allclose(centres[0], [[1064, 2064], [1000, 2128]])
    # the 40x glimpse covers 16 tile px = 32 level-0 px, the 20x one twice that
    np.testing.assert_allclose(boxes[0, 0, 0], [1048, 2048, 32, 32])
    np.testing.assert_allclose(boxes[0, 0, 1], [1032, 2032, 64, 64])


def test_checkpoint_round_trip_and_config_errors(dual_run):
    _, summary, _, _ = dual_run
    model, _ = load_model(summary.best, "cpu")
    assert isinstance(model, DualAttention)
    assert model.config.hard["tile_px"] == 64
    with pytest.raises(ValueError, match="refine"):
        DualAttentionConfig(classes=("a", "b"), refine="otsu")
    with pytest.raises(ValueError, match="candidates"):
        DualAttentionConfig(classes=("a", "b"), n_tiles=10, candidates=5)
    with pytest.raises(ValueError, match="classes"):
        DualAttentionConfig(classes=("a", "b"), hard={"classes": ("x", "y")})


def test_cli_trains_and_predicts_dual(tiny_cohort, tmp_path, capsys):
    from napari_slide_attention.cli import main

    run = tmp_path / "run"
    sets = [f"--set={k}={json.dumps(v)}" for k, v in SMALL.items()]
    code = main(
        [
            "train",
            "dual",
            "--cohort",
            str(tiny_cohort.path),
            "--out",
            str(run),
            "--epochs",
            "1",
            "--quiet",
            *sets,
        ]
    )
    assert code == 0
    out = tmp_path / "result"
    slide = tiny_cohort.split("test")[1].slide
    code = main(
        [
            "predict",
            "--model",
            str(run / "best.safetensors"),
            "--slide",
            str(slide),
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    loaded = SlideResult.load(out)
    assert loaded.model_kind == "dual-attention" and "tile_boxes" in loaded.arrays
