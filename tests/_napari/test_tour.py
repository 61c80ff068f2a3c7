"""Camera tours: the pure stops (order, centres, zooms, errors) and the Tour panel in a
real viewer."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from napari_slide_attention._napari.layers import attention_layer_data
from napari_slide_attention._napari.tour import (
    ATTENTION,
    DETAIL_FILL,
    HARD_TILE_PX,
    SAMPLED,
    TILE_FILL,
    attention_tour,
    box_centre,
    map_order,
    sampled_tour,
    supported_tours,
)
from napari_slide_attention.results import SlideResult

SCALE = (0.5, 0.5)  # µm per level-0 px: a 256 px tile is 128 µm
GRID_CONFIG = {"tile_um": 128.0, "input_px": 64}
DUAL_CLASSES = ("normal", "low-grade", "high-grade", "carcinoma")


@pytest.fixture
def grid_result(make_grid_result):
    """Builds two pieces of 256 px tiles, three maps; map 1 holds the attention the tests
    follow.

    Piece 1 at level-0 (512, 256), 2x2 cells; piece 2 at (1024, 1024), 1x3 cells.
    Map weights in the predicted class: map 0 1.0, map 1 3.5, map 2 2.1 -> order 1, 2, 0.
    """

    def build(config=GRID_CONFIG, shared=False) -> SlideResult:
        a = np.zeros((3, 2, 2))
        a[0] = 0.25
        a[1] = [[0.1, 0.4], [0.3, 0.2]]  # shown (/ 0.4): 0.25 1.0 / 0.75 0.5
        a[2, 0, 0] = 1.0
        b = np.zeros((3, 1, 3))
        b[0, 0, 0] = 1.0
        b[1] = [[0.0, 0.2, 0.8]]  # shown (/ 0.8): 0 0.25 1.0
        b[2, 0, 1] = 1.0
        pieces = [
            dict(index=1, origin=(512, 256), maps=a, contributions=[[0, 0, 0], [1.0, 3.0, 2.0]]),
            dict(index=2, origin=(1024, 1024), maps=b, contributions=[[0, 0, 0], [0.0, 0.5, 0.1]]),
        ]
        if shared:
            # a third piece whose single cell is piece 1's cell (0, 1), level-0 (768, 256)
            third = np.full((3, 1, 1), 0.05)
            pieces.append(
                dict(index=3, origin=(768, 256), maps=third, contributions=[[0, 0, 0], [0, 0, 0]])
            )
        return make_grid_result(
            slide="s.tif",
            classes=("normal", "tumour"),
            probabilities=[0.2, 0.8],
            tile_px=256,
            pieces=pieces,
            config=config,
        )

    return build


@pytest.fixture
def dual_result(make_dual_result):
    """Builds two sampled tiles of 256 level-0 px, the second ranked first; T glimpses each
    with a 32 px (finest) and a 64 px field."""

    def build(t: int = 3, config=None) -> SlideResult:
        soft = np.zeros((4, 5), np.float32)
        soft[1:3, 1:4] = 0.1
        result = make_dual_result(
            slide="d.tif",
            classes=DUAL_CLASSES,
            probabilities=[0.1, 0.3, 0.1, 0.5],
            soft_attention=soft,
            soft_cell_px=128,
            tile_boxes=[[256, 128, 256, 256], [1024, 512, 256, 256]],
            tile_attention=[0.4, 1.0],  # tile_rank [1, 0]
            tile_probabilities=[[0.2, 0.8, 0, 0], [0, 0, 0.1, 0.9]],
            glimpses=t,
            glimpse_start=(64, 96),
            glimpse_step=(40, 20),
            glimpse_sides=(32, 64),
            config=config,
        )
        # the top tile starts out "normal"
        result.arrays["glimpse_probabilities"][1, 0] = [0.6, 0.4, 0, 0]
        return result

    return build


def _tile_centre(x, y, size=256, scale=SCALE):
    """World (y, x) of the middle of a level-0 tile in napari's pixel-centre coordinates."""
    return ((y + size / 2 - 0.5) * scale[0], (x + size / 2 - 0.5) * scale[1])


# -- attention tours ---------------------------------------------------------------------------


def test_map_order_is_the_attention_layers_order(grid_result):
    result = grid_result()
    _, kwargs, _ = attention_layer_data(result, SCALE)
    assert map_order(result) == kwargs["metadata"]["map_order"] == [1, 2, 0]


def test_attention_tour_visits_the_maps_tiles_highest_first_as_the_viewer_shows_them(grid_result):
    stops = attention_tour(grid_result(), 1, SCALE)
    # shown values: piece 2 (0, 2) 1.0 (raw 0.8) before piece 1 (0, 1) 1.0 (raw 0.4), then
    # 0.75, 0.5, and the two 0.25 cells by raw attention; piece 2's empty cell never
    assert [s.box[:2] for s in stops] == [
        (1536, 1024),
        (768, 256),
        (512, 512),
        (768, 512),
        (1280, 1024),
        (512, 256),
    ]
    assert [s.info["attention"] for s in stops] == pytest.approx([1, 1, 0.75, 0.5, 0.25, 0.25])
    assert [s.info["raw_attention"] for s in stops] == pytest.approx([0.8, 0.4, 0.3, 0.2, 0.2, 0.1])
    assert all(s.kind == "attention tile" for s in stops)
    first = stops[0]
    assert first.title == "map 1 (#1 for tumour), tile 1 of 6: attention 1.00"
    assert (first.info["piece"], first.info["row"], first.info["col"]) == (2, 0, 2)
    assert first.info["map_rank"] == 1 and first.info["map_weight"] == pytest.approx(3.5)
    assert [s.info["step"] for s in stops] == [1, 2, 3, 4, 5, 6]
    assert len(attention_tour(grid_result(), 1, SCALE, top=2)) == 2
    # map 0 (#3 by weight): piece 2's one cell (raw 1.0) before piece 1's flat 0.25s,
    # which come in reading order
    map0 = attention_tour(grid_result(), 0, SCALE, top=3)
    assert [s.box[:2] for s in map0] == [(1024, 1024), (512, 256), (768, 256)]
    assert map0[0].title.startswith("map 0 (#3 for tumour), tile 1 of 3")


def test_attention_stops_are_centred_on_their_tiles(grid_result):
    for scale in (SCALE, (0.5, 0.25), (1.0, 1.0)):
        stops = attention_tour(grid_result(), 1, scale)
        for stop in stops:
            x, y, w, h = stop.box
            assert (w, h) == (256, 256)
            assert stop.centre == pytest.approx(_tile_centre(x, y, scale=scale))
            assert stop.centre == pytest.approx(box_centre(stop.box, scale))
    # the centre is where the attention layer draws the cell: piece 2's cell (0, 2) is
    # lattice (row 4, col 6); the layer's first cell is lattice (1, 2)
    _, kwargs, _ = attention_layer_data(grid_result(), SCALE)
    _, ty, tx = kwargs["translate"]
    _, cy, cx = kwargs["scale"]
    stop = attention_tour(grid_result(), 1, SCALE)[0]
    assert stop.centre == pytest.approx((ty + (4 - 1) * cy, tx + (6 - 2) * cx))


def test_attention_zoom_shows_one_screen_pixel_per_input_pixel(grid_result):
    # 64 input px for a 128 µm tile: 0.5 screen px per µm
    stops = attention_tour(grid_result(), 1, SCALE)
    assert [s.zoom for s in stops] == pytest.approx([64 / 128] * len(stops))
    assert stops[0].zoom == pytest.approx(GRID_CONFIG["input_px"] / GRID_CONFIG["tile_um"])
    # without an mpp (1 world unit = 1 px): input_px / tile_size
    assert attention_tour(grid_result(), 1, (1.0, 1.0))[0].zoom == pytest.approx(64 / 256)
    # anisotropic pixels: the tile's larger world side (256 px x 0.5 µm) sets the zoom
    assert attention_tour(grid_result(), 1, (0.5, 0.25))[0].zoom == pytest.approx(64 / 128)
    # an input larger than the view: capped so the tile still fits
    big = grid_result({"tile_um": 128.0, "input_px": 4096})
    assert attention_tour(big, 1, SCALE)[0].zoom == pytest.approx(TILE_FILL * 1024 / 128)
    assert attention_tour(big, 1, SCALE, view_px=2000)[0].zoom == pytest.approx(0.9 * 2000 / 128)
    # no config (a run still in progress): the tile fills a third of the view
    bare = grid_result(config=None)
    assert attention_tour(bare, 1, SCALE)[0].zoom == pytest.approx(DETAIL_FILL * 1024 / 128)


def test_a_cell_two_pieces_share_is_visited_once(grid_result):
    stops = attention_tour(grid_result(shared=True), 1, SCALE)
    boxes = [s.box[:2] for s in stops]
    assert boxes.count((768, 256)) == 1 and len(boxes) == 6
    assert stops[1].info["piece"] == 1  # piece 1's value there (shown 1.0, raw 0.4) wins


def test_attention_tour_errors_say_what_is_wrong(grid_result, dual_result):
    result = grid_result()
    with pytest.raises(ValueError, match=r"map 3 is out of range: the result has 3 maps \(0..2\)"):
        attention_tour(result, 3, SCALE)
    with pytest.raises(ValueError, match="out of range"):
        attention_tour(result, -1, SCALE)
    with pytest.raises(ValueError, match="out of range"):
        attention_tour(result, True, SCALE)
    with pytest.raises(ValueError, match="top must be a positive"):
        attention_tour(result, 1, SCALE, top=0)
    with pytest.raises(ValueError, match=r"d\.tif \(dual-attention\) has no attention maps"):
        attention_tour(dual_result(), 0, SCALE)
    with pytest.raises(ValueError, match="no attention maps"):
        map_order(dual_result())


# -- sampled tiles and glimpses ----------------------------------------------------------------


def test_sampled_tour_goes_tile_by_tile_in_rank_order_with_its_glimpses(dual_result):
    result = dual_result(t=3)
    stops = sampled_tour(result, SCALE)
    tile_and_glimpses = ["sampled tile", "glimpse", "glimpse", "glimpse"]
    assert [s.kind for s in stops] == tile_and_glimpses * 2
    # tile_rank [1, 0]: the second box comes first
    assert stops[0].box == (1024, 512, 256, 256) and stops[4].box == (256, 128, 256, 256)
    assert stops[0].title == "tile 1 of 2: attention 1.00, carcinoma 90%"
    assert stops[4].title == "tile 2 of 2: attention 0.40, low-grade 80%"
    assert stops[1].title == "tile 1 of 2, glimpse 1 of 3: normal 60%"
    assert stops[2].title == "tile 1 of 2, glimpse 2 of 3: carcinoma 90%"
    assert [s.info["glimpse"] for s in stops[1:4]] == [1, 2, 3]
    assert [s.info["step"] for s in stops] == list(range(1, 9))
    assert {s.info["steps"] for s in stops} == {8}
    assert stops[1].info["scale"] == 1.0 and stops[1].info["rank"] == 1
    # each glimpse is its finest (32 px) field, centred on the glimpse
    centres = result.arrays["glimpse_centres"]
    for t, stop in enumerate(stops[1:4]):
        cx, cy = centres[1, t]
        assert stop.box == pytest.approx((cx - 16, cy - 16, 32, 32))
        # the box's middle in pixel-centre coordinates: half a pixel before the centre
        assert stop.centre == pytest.approx(((cy - 0.5) * SCALE[0], (cx - 0.5) * SCALE[1]))
    assert stops[0].centre == pytest.approx(_tile_centre(1024, 512))
    assert len(sampled_tour(result, SCALE, glimpses=False)) == 2
    assert [s.box[:2] for s in sampled_tour(result, SCALE, tiles=1)] == [(1024, 512)] + [
        tuple(b) for b in result.arrays["glimpse_boxes"][1, :, 0, :2]
    ]


def test_sampled_zooms_tile_at_the_models_magnification_glimpse_at_a_third_of_the_view(dual_result):
    # the hard attention read the 128 µm tile at 128 px: 1 screen px per µm, fits the view
    stops = sampled_tour(dual_result(config={"hard": {"tile_px": 128}}), SCALE)
    assert stops[0].zoom == pytest.approx(1.0)
    # the finest glimpse box (32 px = 16 µm) spans a third of a 1024 px view
    assert stops[1].zoom == pytest.approx(1024 / 3 / 16)
    assert stops[1].zoom * 16 == pytest.approx(1024 / 3)
    # the default tile_px (2048) would not fit: the tile fills 90% of the view
    default = sampled_tour(dual_result(config={"hard": {}}), SCALE, view_px=800)
    assert default[0].zoom == pytest.approx(TILE_FILL * 800 / 128)
    assert default[1].zoom == pytest.approx(800 / 3 / 16)
    # no config: fitted too
    assert sampled_tour(dual_result(), SCALE)[0].zoom == pytest.approx(TILE_FILL * 1024 / 128)


def test_hard_tile_px_matches_the_models_default():
    pytest.importorskip("torch")
    from napari_slide_attention.models.hard_attention import HardAttentionConfig

    fields = {f.name: f for f in dataclasses.fields(HardAttentionConfig)}
    assert fields["tile_px"].default == HARD_TILE_PX


def test_sampled_tour_refuses_a_grid_result_and_bad_counts(grid_result, dual_result):
    with pytest.raises(ValueError, match=r"s\.tif \(grid-attention\) has no tile_boxes.*dual"):
        sampled_tour(grid_result(), SCALE)
    with pytest.raises(ValueError, match="tiles must be"):
        sampled_tour(dual_result(), SCALE, tiles=0)
    result = dual_result()
    del result.arrays["glimpse_boxes"]
    with pytest.raises(ValueError, match="glimpse_boxes"):
        sampled_tour(result, SCALE)
    assert len(sampled_tour(result, SCALE, glimpses=False)) == 2


def test_supported_tours(grid_result, dual_result):
    assert supported_tours(grid_result()) == (ATTENTION,)
    assert supported_tours(dual_result()) == (SAMPLED,)
    assert supported_tours(None) == ()


# -- the panel in a real viewer ----------------------------------------------------------------

PLUGIN = "napari-slide-attention"


@pytest.fixture
def small_slide(tmp_path):
    from napari_slide_attention.slide.synthetic import write_synthetic_slide

    path = tmp_path / "small.tif"
    write_synthetic_slide(path, size=(2048, 1536), label="normal", seed=2, n_pieces=1)
    return path


def _tour_panel(viewer):
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Tour")
    return widget


def _camera(viewer):
    scene = getattr(viewer, "scene", None)  # napari >= 0.9 moved the camera there
    return scene.camera if scene is not None else viewer.camera


def _tour_layer_box(viewer):
    (rectangle,) = viewer.layers["tour"].data
    return rectangle


@pytest.mark.gui
def test_panel_without_a_result_disables_its_buttons(make_napari_viewer):
    viewer = make_napari_viewer()
    panel = _tour_panel(viewer)
    buttons = (panel.previous_button, panel.next_button, panel.play_button, panel.stop_button)
    assert not any(b.isEnabled() for b in buttons)
    assert not panel.mode.isEnabled() and not panel.map_choice.isEnabled()
    assert "Run a model in the Model panel first" in panel.title.text()
    panel.next()  # harmless
    panel.play()
    assert "tour" not in viewer.layers


@pytest.mark.gui
def test_panel_tours_a_grid_result_map_by_map(make_napari_viewer, small_slide, grid_result):
    from napari_slide_attention._napari.session import session_for

    viewer = make_napari_viewer()
    session = session_for(viewer)
    session.open_slide(small_slide)
    panel = _tour_panel(viewer)
    assert not panel.next_button.isEnabled()
    session.show_result(grid_result())
    scale = session.scale
    assert panel.mode.currentData() == ATTENTION
    assert not panel.mode.model().item(1).isEnabled()  # no sampled tiles in a grid result
    assert [panel.map_choice.itemData(i) for i in range(3)] == [1, 2, 0]
    assert panel.next_button.isEnabled() and not panel.previous_button.isEnabled()

    expected = attention_tour(grid_result(), 1, scale, view_px=panel._view_px)
    active = viewer.layers.selection.active
    for i in range(3):
        panel.next_button.click()
        stop = expected[i]
        assert tuple(_camera(viewer).center[-2:]) == pytest.approx(stop.centre)
        assert _camera(viewer).zoom == pytest.approx(stop.zoom)
        x, y = stop.box[:2]
        np.testing.assert_allclose(
            _tour_layer_box(viewer).min(0), [(y - 0.5) * scale[0], (x - 0.5) * scale[1]]
        )
        assert panel.title.text() == stop.title
    assert len([layer for layer in viewer.layers if layer.name == "tour"]) == 1
    assert panel.previous_button.isEnabled()
    panel.previous_button.click()
    assert tuple(_camera(viewer).center[-2:]) == pytest.approx(expected[1].centre)
    assert viewer.layers.selection.active is active  # left alone

    # another map: the attention layer's slider follows (layer position 1 = map 2)
    panel.map_choice.setCurrentIndex(1)
    assert viewer.dims.current_step[0] == 1
    assert "tour" not in viewer.layers and not panel.previous_button.isEnabled()
    panel.next_button.click()
    assert panel.title.text().startswith("map 2 (#2 for tumour), tile 1 of")
    # and moving the slider chooses the map
    viewer.dims.set_current_step(0, 2)
    assert panel.map_index == 0
    # opening another slide forgets the result: back to disabled
    session.open_slide(small_slide)
    assert not panel.next_button.isEnabled() and "tour" not in viewer.layers


@pytest.mark.gui
def test_panel_plays_a_dual_result_on_a_timer(make_napari_viewer, qtbot, small_slide, dual_result):
    from napari_slide_attention._napari.session import session_for

    viewer = make_napari_viewer()
    session = session_for(viewer)
    session.open_slide(small_slide)
    session.show_result(dual_result(t=2, config={"hard": {"tile_px": 128}}))
    panel = _tour_panel(viewer)  # made after the result: picks it up
    assert panel.mode.currentData() == SAMPLED and not panel.map_choice.isEnabled()
    assert len(panel.stops) == 6
    panel.interval.setValue(0.1)
    panel.play_button.click()
    assert panel.index == 0 and panel.stop_button.isEnabled()
    assert panel.stops[0].kind == "sampled tile"
    qtbot.waitUntil(lambda: panel.index >= 2, timeout=5000)
    assert panel.title.text().startswith("tile 1 of 2, glimpse")
    assert _camera(viewer).zoom == pytest.approx(panel.stops[panel.index].zoom)
    panel.stop_button.click()
    stopped = panel.index
    qtbot.wait(300)
    assert panel.index == stopped and not panel.stop_button.isEnabled()
    # played to the end, the timer stops by itself
    panel.play_button.click()
    qtbot.waitUntil(lambda: not panel._timer.isActive(), timeout=5000)
    assert panel.index == len(panel.stops) - 1 and not panel.next_button.isEnabled()
    # without glimpses: tiles only
    panel.glimpses.setChecked(False)
    assert len(panel.stops) == 2


@pytest.mark.gui
def test_a_closed_panel_never_hears_a_later_result(
    make_napari_viewer, qtbot, small_slide, grid_result
):
    from napari_slide_attention._napari.session import session_for

    viewer = make_napari_viewer()
    session = session_for(viewer)
    session.open_slide(small_slide)
    panel = _tour_panel(viewer)
    gone = []
    panel.destroyed.connect(lambda *_: gone.append(True))
    viewer.window.remove_dock_widget("all")
    panel.deleteLater()
    qtbot.waitUntil(lambda: bool(gone), timeout=5000)
    session.show_result(grid_result())  # must not reach the deleted widget
    assert session.layer("attention") is not None
