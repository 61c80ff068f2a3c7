"""Sliding-window baseline: the aggregation heuristic, the config, the crop classifier."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

import napari_slide_attention.models as models_package
from napari_slide_attention.models.checkpoint import load_model, save_checkpoint
from napari_slide_attention.models.device import Autocast
from napari_slide_attention.models.sliding_window import (
    CropClassifier,
    SlidingWindowConfig,
    aggregate_tiles,
)

CLASSES = ("normal", "low-grade", "high-grade", "carcinoma")
RISK = (0, 1, 2, 3)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny tensors: on a busy small machine, handing them between threads costs more
    # than it saves (a 3-4x slower run).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_model(**kw) -> CropClassifier:
    torch.manual_seed(0)
    return CropClassifier(SlidingWindowConfig(classes=CLASSES, input_px=32, **kw))


# -- aggregate_tiles -------------------------------------------------------------------------
def test_the_highest_risk_class_with_enough_confident_tiles_decides():
    tiles = np.array(
        [
            [0.05, 0.05, 0.05, 0.85],  # one confident carcinoma tile: not enough (needs 2)
            [0.10, 0.10, 0.75, 0.05],  # high-grade over its 0.7 threshold, 1 needed
            [0.20, 0.70, 0.05, 0.05],  # low-grade over its 0.6 threshold
            [0.90, 0.05, 0.03, 0.02],
        ]
    )
    thresholds, counts = [0.99, 0.6, 0.7, 0.8], [9, 1, 1, 2]
    probs, call = aggregate_tiles(tiles, thresholds, counts, RISK)
    assert call == 2
    np.testing.assert_allclose(probs, tiles[1], rtol=1e-6)
    assert probs.dtype == np.float32

    # a second confident carcinoma tile tips the slide to carcinoma; the probabilities are
    # the mean of the two tiles with the highest carcinoma probability
    more = np.vstack([tiles, [0.02, 0.02, 0.06, 0.90], [0.1, 0.1, 0.0, 0.8]])
    probs, call = aggregate_tiles(more, thresholds, counts, RISK)
    assert call == 3
    np.testing.assert_allclose(probs, (more[0] + more[4]) / 2, rtol=1e-6)
    assert probs.sum() == pytest.approx(1.0)


def test_without_enough_confident_tiles_the_lowest_risk_class_takes_the_mean():
    tiles = np.array([[0.4, 0.55, 0.05, 0.0], [0.8, 0.1, 0.05, 0.05], [0.3, 0.3, 0.3, 0.1]])
    probs, call = aggregate_tiles(tiles, [0.5] * 4, [1, 2, 1, 1], RISK)
    assert call == 0
    np.testing.assert_allclose(probs, tiles.mean(0), rtol=1e-6)
    # the rule decides, not the argmax: low-grade is on average as likely as normal here
    tiles[1] = [0.3, 0.4, 0.2, 0.1]
    probs, call = aggregate_tiles(tiles, [0.5] * 4, [1, 2, 1, 1], RISK)
    assert call == 0 and probs.argmax() == 1


def test_risk_order_decides_which_class_is_checked_first_and_which_is_the_default():
    tiles = np.array([[0.1, 0.9, 0.0], [0.0, 0.1, 0.9], [0.95, 0.05, 0.0]])
    # risk: class 2 lowest, then 0, then 1 (highest)
    assert aggregate_tiles(tiles, [0.5] * 3, [1] * 3, (2, 0, 1))[1] == 1
    # class 1 needs 2 tiles now; class 0 is the next highest risk with one tile
    assert aggregate_tiles(tiles, [0.5] * 3, [1, 2, 1], (2, 0, 1))[1] == 0
    # the lowest-risk class's own threshold and count are never used; it is the default
    assert aggregate_tiles(tiles, [0.5, 0.5, 0.0], [5, 5, 1], (2, 0, 1))[1] == 2


def test_aggregate_tiles_rejects_bad_input():
    with pytest.raises(ValueError, match="N >= 1"):
        aggregate_tiles(np.zeros((0, 4)), [0.5] * 4, [1] * 4, RISK)
    with pytest.raises(ValueError, match="one value per class"):
        aggregate_tiles(np.full((2, 4), 0.25), [0.5] * 3, [1] * 4, RISK)
    with pytest.raises(ValueError, match="at least 1"):
        aggregate_tiles(np.full((2, 4), 0.25), [0.5] * 4, [1, 0, 1, 1], RISK)
    with pytest.raises(ValueError, match="risk"):
        aggregate_tiles(np.full((2, 4), 0.25), [0.5] * 4, [1] * 4, (0, 1, 2))


# -- config ----------------------------------------------------------------------------------
def test_config_round_trips_through_json_and_fills_the_default_rule():
    config = SlidingWindowConfig(
        classes=CLASSES, risk_order=(0, 2, 1, 3), crop_um=64.0, input_px=32, mean=(0.1, 0.2, 0.3)
    )
    assert config.kind == "sliding-window" and config.trainable_blocks == 5
    assert config.thresholds == (0.5,) * 4 and config.min_counts == (1,) * 4
    data = json.loads(json.dumps(config.to_dict()))
    assert data["kind"] == "sliding-window" and data["thresholds"] == [0.5] * 4
    again = SlidingWindowConfig.from_dict(data)
    assert again == config and again.risk == (0, 2, 1, 3)
    tuned = SlidingWindowConfig.from_dict({**data, "thresholds": [0.5, 0.9, 0.7, 0.95]})
    assert tuned.thresholds == (0.5, 0.9, 0.7, 0.95)


def test_config_validation():
    with pytest.raises(TypeError):
        SlidingWindowConfig(classes=CLASSES, kind="grid-attention")
    with pytest.raises(ValueError, match="unknown sliding-window settings: n_maps"):
        SlidingWindowConfig.from_dict({"classes": list(CLASSES), "n_maps": 64})
    with pytest.raises(ValueError, match="one value per class"):
        SlidingWindowConfig(classes=CLASSES, thresholds=(0.5, 0.5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        SlidingWindowConfig(classes=CLASSES, thresholds=(0.5, 1.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="trainable_blocks"):
        SlidingWindowConfig(classes=CLASSES, trainable_blocks=6)
    with pytest.raises(ValueError, match="risk_order"):
        SlidingWindowConfig(classes=CLASSES, risk_order=(0, 1, 1, 3))


# -- the crop classifier -----------------------------------------------------------------------
def test_prepare_and_forward_shapes():
    model = small_model().eval()
    tiles = torch.randint(0, 256, (3, 50, 50, 3), dtype=torch.uint8)
    x = model.prepare(tiles)
    assert x.shape == (3, 3, 32, 32)
    assert model(tiles).shape == (3, 4)
    autocast = Autocast(torch.device("cpu"), False)
    probs = torch.cat(
        [model.probabilities(t, torch.device("cpu"), autocast) for t in (tiles[:2], tiles[2:])]
    )
    torch.testing.assert_close(probs, torch.softmax(model(tiles), 1), rtol=1e-5, atol=1e-6)


def test_frozen_stages_keep_running_statistics_and_get_no_gradients():
    model = small_model(trainable_blocks=1)
    model.train()
    assert not model.trunk.stem.training and not model.trunk.layer3.training
    assert model.trunk.layer4.training and model.classifier.training
    assert not any(p.requires_grad for p in model.trunk.layer3.parameters())
    loss = model(torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)).sum()
    loss.backward()
    assert model.trunk.layer4[0].conv1.weight.grad is not None
    assert model.trunk.layer1[0].conv1.weight.grad is None
    # all stages train by default (the paper's baseline trains the whole ResNet-18)
    full = small_model()
    assert all(p.requires_grad for p in full.parameters())


def test_checkpoint_round_trip_gives_identical_logits(tmp_path, monkeypatch):
    model = small_model(dropout=0.3)
    model.set_normalisation((0.6, 0.5, 0.7), (0.2, 0.25, 0.3))
    model.set_rule((0.5, 0.8, 0.9, 0.95), (1, 3, 2, 1))
    with torch.no_grad():  # BN statistics that differ from a fresh model's
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    model.eval()
    path = save_checkpoint(
        tmp_path / "sw", model.config.kind, model.config.to_dict(), model.state_dict()
    )
    # load_model must find the kind on its own, as in a fresh process where nothing imported
    # the sliding-window module yet
    name = "napari_slide_attention.models.sliding_window"
    monkeypatch.delitem(sys.modules, name)
    monkeypatch.delattr(models_package, "sliding_window")
    loaded, checkpoint = load_model(path)
    assert type(loaded).__name__ == "CropClassifier" and checkpoint.kind == "sliding-window"
    assert loaded.config.thresholds == (0.5, 0.8, 0.9, 0.95)
    assert loaded.config.min_counts == (1, 3, 2, 1)
    assert loaded.config.mean == pytest.approx((0.6, 0.5, 0.7))
    assert not loaded.training
    tiles = torch.randint(0, 256, (5, 40, 40, 3), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tiles), model(tiles), rtol=0, atol=0)
