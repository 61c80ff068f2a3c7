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


@pytest.fixture
def dual_result(make_dual_result) -> SlideResult:
    """Two sampled tiles of 256 level-0 px, the first ranked first, with three glimpses
    each of a 32 px (finest) and a 64 px field; the second tile changes its mind after
    its first glimpse."""
    soft = np.zeros((4, 5), np.float32)
    soft[1:3, 1:4] = [[0.1, 0.2, 0.1], [0.3, 0.2, 0.1]]  # the tissue
    result = make_dual_result(
        slide="s.tif",
        classes=CLASSES,
        probabilities=[0.1, 0.3, 0.1, 0.5],
        soft_attention=soft,
        soft_cell_px=128,
        tile_boxes=[[256, 128, 256, 256], [1024, 512, 256, 256]],
        tile_attention=[1.0, 0.5],  # tile_rank [0, 1]
        tile_probabilities=[[0.3, 0, 0, 0.7], [0, 0.6, 0.4, 0]],
        glimpses=3,
        glimpse_start=(128, 64),
        glimpse_step=(10, 5),
        glimpse_sides=(32, 64),
    )
    result.arrays["glimpse_probabilities"][1, 0] = [0.9, 0.1, 0, 0]  # starts "normal"
    return result


def test_soft_attention_sits_on_its_cells_normalised_over_the_tissue(dual_result):
    data, kwargs, kind = soft_attention_layer_data(dual_result, SCALE)
    assert kind == "image" and data.shape == (4, 5)
    assert data.max() == pytest.approx(1.0)
    assert data[2, 1] == 1.0  # the most attended tissue cell (0.3)
    assert (data[~dual_result.arrays["soft_tissue"]] == 0).all()
    # Cell (r, c) covers level-0 px [128 r, 128 (r + 1)): its centre in napari's
    # pixel-centre world coordinates is (128 r + 64 - 0.5) * scale.
    assert kwargs["scale"] == pytest.approx((128 * 0.5, 128 * 0.25))
    assert kwargs["translate"] == pytest.approx(((64 - 0.5) * 0.5, (64 - 0.5) * 0.25))
    np.testing.assert_array_equal(
        kwargs["metadata"]["attention"], dual_result.arrays["soft_attention"]
    )


def test_sampled_tiles_are_rectangles_on_their_boxes_with_rank_and_class(dual_result):
    rects, kwargs, kind = sampled_tiles_layer_data(dual_result, SCALE)
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


def test_tile_colours_follow_the_class_not_the_order(dual_result):
    dual_result.arrays["tile_classes"] = np.array([2, 2], np.int64)
    _, kwargs, _ = sampled_tiles_layer_data(dual_result, SCALE)
    colours = np.asarray(kwargs["edge_color"])
    np.testing.assert_allclose(colours[0], colours[1])


def test_glimpses_give_paths_numbered_centres_and_fields(dual_result):
    (paths, path_kw, k1), (points, point_kw, k2), (fields, field_kw, k3) = glimpse_layer_data(
        dual_result, SCALE
    )
    assert (k1, k2, k3) == ("shapes", "points", "shapes")
    assert len(paths) == 2 and all(p.shape == (3, 2) for p in paths)
    assert list(path_kw["features"]["tile"]) == [1, 2]
    centres = dual_result.arrays["glimpse_centres"]
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


def test_a_grid_result_is_refused_with_a_reason(dual_result):
    dual_result.arrays.clear()
    dual_result.model_kind = "grid-attention"
    with pytest.raises(ValueError, match="dual-attention"):
        sampled_tiles_layer_data(dual_result, SCALE)
    with pytest.raises(ValueError, match="glimpse_centres"):
        glimpse_layer_data(dual_result, SCALE)


@pytest.mark.gui
def test_dual_layers_load_into_a_real_viewer(make_napari_viewer, dual_result):
    viewer = make_napari_viewer(show=True)
    tuples = [
        soft_attention_layer_data(dual_result, SCALE),
        sampled_tiles_layer_data(dual_result, SCALE),
        *glimpse_layer_data(dual_result, SCALE),
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


def test_inspect_at_finds_the_glimpse_then_the_tile_then_nothing(dual_result):
    from napari_slide_attention._napari.layers import inspect_at

    # tile 2 (rank 2), its first glimpse is centred at (1024 + 128, 512 + 64): the 32 px box
    found = inspect_at(dual_result, 1024 + 128, 512 + 64)
    assert found["kind"] == "glimpse" and (found["tile"], found["step"]) == (2, 1)
    assert found["class"] == CLASSES[0] and found["probability"] == pytest.approx(0.9)
    assert found["box"] == (1024 + 128 - 16, 512 + 64 - 16, 32, 32)
    # inside tile 2 but off its glimpses: the tile's call
    found = inspect_at(dual_result, 1024 + 250, 512 + 250)
    assert found["kind"] == "sampled tile" and found["rank"] == 2
    assert (found["class"], found["box"]) == (CLASSES[1], (1024, 512, 256, 256))
    # outside every tile; no grid in a dual result
    assert inspect_at(dual_result, 10, 10) is None
