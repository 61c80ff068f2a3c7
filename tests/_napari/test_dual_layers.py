"""Dual-attention results as napari layers: soft attention, sampled tiles, glimpses."""

from __future__ import annotations

import numpy as np
import pytest

from napari_slide_attention._napari.layers import (
    glimpse_layer_data,
    sampled_tiles_layer_data,
    soft_attention_layer_data,
)
from napari_slide_attention.results import SlideResult

CLASSES = ("normal", "low-grade", "high-grade", "carcinoma")
SCALE = (0.5, 0.25)  # (y, x) µm per level-0 px, deliberately anisotropic


def _dual_result(t: int = 3) -> SlideResult:
    attention = np.zeros((4, 5), np.float32)
    tissue = np.zeros((4, 5), bool)
    tissue[1:3, 1:4] = True
    attention[tissue] = [0.1, 0.2, 0.1, 0.3, 0.2, 0.1]
    boxes = np.array([[256, 128, 256, 256], [1024, 512, 256, 256]], np.int64)
    centres = np.stack(
        [
            np.stack(
                [boxes[i, 0] + 128 + 10 * np.arange(t), boxes[i, 1] + 64 + 5 * np.arange(t)], -1
            )
            for i in range(2)
        ]
    ).astype(np.float32)  # (N, T, 2) level-0 (x, y)
    side = np.array([32.0, 64.0])
    glimpse_boxes = np.stack(
        [centres[..., 0, None] - side / 2, centres[..., 1, None] - side / 2]
        + [np.broadcast_to(side, (*centres.shape[:2], 2))] * 2,
        -1,
    ).astype(np.float32)  # (N, T, S, 4)
    step_probabilities = np.zeros((2, t, 4), np.float32)
    step_probabilities[0, :, 3] = 0.7
    step_probabilities[0, :, 0] = 0.3
    step_probabilities[1, :, 1] = 0.6
    step_probabilities[1, :, 2] = 0.4
    step_probabilities[1, 0] = [0.9, 0.1, 0, 0]  # the second tile changes its mind
    return SlideResult(
        slide="s.tif",
        model_kind="dual-attention",
        classes=CLASSES,
        probabilities=np.array([0.1, 0.3, 0.1, 0.5], np.float32),
        predicted=3,
        aggregation="most-frequent-tile-class",
        pieces=[],
        timings={},
        model={},
        slide_info={},
        arrays={
            "soft_attention": attention,
            "soft_tissue": tissue,
            "tile_boxes": boxes,
            "tile_attention": np.array([1.0, 0.5], np.float32),
            "tile_rank": np.array([0, 1], np.int64),
            "tile_classes": np.array([3, 1], np.int64),
            "tile_probabilities": np.array([[0.3, 0, 0, 0.7], [0, 0.6, 0.4, 0]], np.float32),
            "glimpse_centres": centres,
            "glimpse_boxes": glimpse_boxes,
            "glimpse_probabilities": step_probabilities,
        },
        info={
            "sampler": "attention",
            "soft_attention": {"origin": [0, 0], "cell_size": 128.0},
            "glimpse_scales": [1.0, 2.0],
        },
    )


def test_soft_attention_sits_on_its_cells_normalised_over_the_tissue():
    data, kwargs, kind = soft_attention_layer_data(_dual_result(), SCALE)
    assert kind == "image" and data.shape == (4, 5)
    assert data.max() == pytest.approx(1.0)
    assert data[2, 1] == 1.0  # the most attended tissue cell (0.3)
    assert (data[~_dual_result().arrays["soft_tissue"]] == 0).all()
    # Cell (r, c) covers level-0 px [128 r, 128 (r + 1)): its centre in napari's
    # pixel-centre world coordinates is (128 r + 64 - 0.5) * scale.
    assert kwargs["scale"] == pytest.approx((128 * 0.5, 128 * 0.25))
    assert kwargs["translate"] == pytest.approx(((64 - 0.5) * 0.5, (64 - 0.5) * 0.25))
    np.testing.assert_array_equal(
        kwargs["metadata"]["attention"], _dual_result().arrays["soft_attention"]
    )


def test_sampled_tiles_are_rectangles_on_their_boxes_with_rank_and_class():
    rects, kwargs, kind = sampled_tiles_layer_data(_dual_result(), SCALE)
    assert kind == "shapes" and len(rects) == 2
    # box (x=256, y=128, 256 x 256): edges half a pixel outside its first and last pixels
    top, left, bottom, right = 127.5 * 0.5, 255.5 * 0.25, 383.5 * 0.5, 511.5 * 0.25
    np.testing.assert_allclose(
        rects[0], [[top, left], [top, right], [bottom, right], [bottom, left]]
    )
    features = kwargs["features"]
    assert list(features["rank"]) == [1, 2]
    assert list(features["class"]) == ["carcinoma", "low-grade"]
    assert list(features["probability"]) == pytest.approx([0.7, 0.6])
    colours = np.asarray(kwargs["edge_color"])
    assert colours.shape == (2, 4) and not np.allclose(colours[0], colours[1])
    assert "{rank}" in kwargs["text"]["string"]


def test_tile_colours_follow_the_class_not_the_order():
    result = _dual_result()
    result.arrays["tile_classes"] = np.array([2, 2], np.int64)
    _, kwargs, _ = sampled_tiles_layer_data(result, SCALE)
    colours = np.asarray(kwargs["edge_color"])
    np.testing.assert_allclose(colours[0], colours[1])


def test_glimpses_give_paths_numbered_centres_and_fields():
    result = _dual_result(t=3)
    (paths, path_kw, k1), (points, point_kw, k2), (fields, field_kw, k3) = glimpse_layer_data(
        result, SCALE
    )
    assert (k1, k2, k3) == ("shapes", "points", "shapes")
    assert len(paths) == 2 and all(p.shape == (3, 2) for p in paths)
    assert list(path_kw["features"]["tile"]) == [1, 2]
    centres = result.arrays["glimpse_centres"]
    # level-0 (x, y) -> world (y, x)
    np.testing.assert_allclose(points[:3], centres[0][:, ::-1] * SCALE)
    np.testing.assert_allclose(paths[1], centres[1][:, ::-1] * SCALE)
    assert list(point_kw["features"]["step"]) == [1, 2, 3, 1, 2, 3]
    assert list(point_kw["features"]["tile"]) == [1, 1, 1, 2, 2, 2]
    # the class after each glimpse: the second tile starts at "normal", then "low-grade"
    assert list(point_kw["features"]["class"][3:]) == ["normal", "low-grade", "low-grade"]
    assert point_kw["features"]["probability"][3] == pytest.approx(0.9)
    assert len(fields) == 2 * 3 * 2
    assert list(field_kw["features"]["scale"][:2]) == [1.0, 2.0]


def test_a_grid_result_is_refused_with_a_reason():
    result = _dual_result()
    result.arrays.clear()
    result.model_kind = "grid-attention"
    with pytest.raises(ValueError, match="dual-attention"):
        sampled_tiles_layer_data(result, SCALE)
    with pytest.raises(ValueError, match="glimpse_centres"):
        glimpse_layer_data(result, SCALE)


@pytest.mark.gui
def test_dual_layers_load_into_a_real_viewer(make_napari_viewer):
    result = _dual_result()
    viewer = make_napari_viewer(show=True)
    tuples = [
        soft_attention_layer_data(result, SCALE),
        sampled_tiles_layer_data(result, SCALE),
        *glimpse_layer_data(result, SCALE),
    ]
    for data, kwargs, kind in tuples:
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    names = [layer.name for layer in viewer.layers]
    assert names == [
        "soft attention (carcinoma)",
        "sampled tiles (attention)",
        "glimpse paths",
        "glimpses",
        "glimpse fields",
    ]
    tiles = viewer.layers["sampled tiles (attention)"]
    assert list(tiles.features["class"]) == ["carcinoma", "low-grade"]
    assert tiles.text.values[0].startswith("1. carcinoma 70%")
    points = viewer.layers["glimpses"]
    assert len(points.data) == 6 and list(points.text.values[:3]) == ["1", "2", "3"]
    # the soft attention's last cell (3, 4) is centred on level-0 px (447.5, 575.5)
    soft = viewer.layers["soft attention (carcinoma)"]
    assert tuple(soft.data_to_world((3, 4))) == pytest.approx((447.5 * 0.5, 575.5 * 0.25))
    viewer.reset_view()
    viewer.screenshot(canvas_only=True, flash=False)


def test_inspect_at_finds_the_glimpse_then_the_tile_then_nothing():
    from napari_slide_attention._napari.layers import inspect_at

    result = _dual_result(t=3)
    # tile 2 (rank 2), its first glimpse is centred at (1024 + 128, 512 + 64): the 32 px box
    found = inspect_at(result, 1024 + 128, 512 + 64)
    assert found["kind"] == "glimpse" and (found["tile"], found["step"]) == (2, 1)
    assert found["class"] == CLASSES[0] and found["probability"] == pytest.approx(0.9)
    assert found["box"] == (1024 + 128 - 16, 512 + 64 - 16, 32, 32)
    # inside tile 2 but off its glimpses: the tile's call
    found = inspect_at(result, 1024 + 250, 512 + 250)
    assert found["kind"] == "sampled tile" and found["rank"] == 2
    assert (found["class"], found["box"]) == (CLASSES[1], (1024, 512, 256, 256))
    assert inspect_at(result, 10, 10) is None  # outside every tile; no grid in a dual result
