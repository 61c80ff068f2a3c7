"""Layer data made from results by pure functions (no viewer needed)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_slide_attention._napari.layers import attention_layer_data
from napari_slide_attention.results import SlideResult


@pytest.fixture
def grid_result(make_grid_result) -> SlideResult:
    """Two pieces of 256 px tiles, three maps: piece 1 at level-0 (512, 256), 2x2 cells;
    piece 2 at (1024, 1024), 1x3 cells."""
    a = np.zeros((3, 2, 2))
    a[:, 0, 0] = 0.5
    a[:, 1, 1] = 0.5
    b = np.zeros((3, 1, 3))
    b[:, 0, 2] = 1.0
    return make_grid_result(
        slide="s.tif",
        classes=("normal", "tumour"),
        probabilities=[0.2, 0.8],
        tile_px=256,
        pieces=[
            dict(index=1, origin=(512, 256), maps=a, contributions=[[0, 0, 0], [1.0, 3.0, 2.0]]),
            dict(index=2, origin=(1024, 1024), maps=b, contributions=[[0, 0, 0], [0.0, 0.5, 0.1]]),
        ],
    )


def test_maps_of_all_pieces_share_one_grid_aligned_with_the_slide(grid_result):
    data, kwargs, kind = attention_layer_data(grid_result, (0.5, 0.5))
    assert kind == "image" and data.shape == (3, 4, 5)  # rows 1..4, cols 2..6 of the lattice
    # piece 1 at lattice (row 1, col 2): its cells (0,0) and (1,1), normalised to 1
    assert data[0, 0, 0] == 1 and data[0, 1, 1] == 1 and data[0, 0, 1] == 0
    # piece 2 at lattice (row 4, col 4): cell (0, 2) -> (3, 4)
    assert data[0, 3, 4] == 1
    tile_um = 256 * 0.5
    assert kwargs["scale"] == (1.0, tile_um, tile_um)
    # the first cell's centre is level-0 (256 + 127.5, 512 + 127.5) px in pixel-centre
    # coordinates, times 0.5 µm/px
    assert kwargs["translate"] == pytest.approx((0.0, (256 + 127.5) * 0.5, (512 + 127.5) * 0.5))


def test_maps_are_ordered_by_their_weight_in_the_predicted_class(grid_result):
    _, kwargs, _ = attention_layer_data(grid_result, (0.5, 0.5))
    assert kwargs["metadata"]["map_order"] == [1, 2, 0]  # weights 3.5, 2.1, 1.0
    assert kwargs["metadata"]["predicted"] == "tumour"
    assert kwargs["contrast_limits"] == (0.0, 1.0)
