"""Results in napari: every overlay of each model kind from one function, and a result
saved from the Model panel and opened again (in a new viewer, with its slide found or
asked for) showing the same overlays at the same places in µm."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_slide_attention._napari.layers import (
    RESULT_ROLES,
    result_layer_data,
    result_scale,
    tile_probabilities_layer_data,
)
from napari_slide_attention._napari.session import session_for
from napari_slide_attention.results import PieceResult, SlideResult
from napari_slide_attention.slide.synthetic import write_synthetic_slide

PLUGIN = "napari-slide-attention"
CLASSES = ("normal", "low-grade", "high-grade", "carcinoma")
TILE = 256
# What each kind shows, in order.
ROLES = {
    "grid-attention": ["attention"],
    "sliding-window": ["tile probabilities"],
    "dual-attention": [
        "soft attention",
        "sampled tiles",
        "glimpse paths",
        "glimpses",
        "glimpse fields",
    ],
}


# -- results built directly (no model run needed) --------------------------------------


def _piece(index: int, origin: tuple[int, int], shape: tuple[int, int], kind: str, seed: int):
    rng = np.random.default_rng(seed)
    tissue = np.ones(shape, bool)
    tissue[0, -1] = False
    probabilities = rng.dirichlet(np.ones(len(CLASSES))).astype(np.float32)
    fields: dict = {"arrays": {}}
    if kind == "grid-attention":
        maps = rng.random((4, *shape)).astype(np.float32) * tissue
        fields.update(maps=maps / maps.sum(axis=(1, 2), keepdims=True), scores=maps)
        fields["arrays"]["map_contributions"] = rng.normal(size=(len(CLASSES), 4)).astype(
            np.float32
        )
    else:
        grid = rng.dirichlet(np.ones(len(CLASSES)), size=shape).astype(np.float32)
        grid = np.moveaxis(grid, -1, 0)  # (C, H', W')
        grid[:, ~tissue] = np.nan
        fields["arrays"]["tile_probabilities"] = grid
    return PieceResult(
        index=index,
        box=(origin[0] + 5, origin[1] + 7, shape[1] * TILE - 20, shape[0] * TILE - 30),
        probabilities=probabilities,
        grid_origin=origin,
        tile_size=TILE,
        level=0,
        tissue=tissue,
        **fields,
    )


def _dual_arrays(t: int = 3) -> dict[str, np.ndarray]:
    attention = np.zeros((12, 16), np.float32)
    tissue = np.zeros((12, 16), bool)
    tissue[2:9, 3:12] = True
    attention[tissue] = np.linspace(0.1, 1.0, tissue.sum())
    attention /= attention.sum()
    boxes = np.array([[512, 256, 256, 256], [1024, 768, 256, 256]], np.int64)
    steps = np.arange(t)
    centres = np.stack(
        [np.stack([b[0] + 100 + 10 * steps, b[1] + 90 + 5 * steps], -1) for b in boxes]
    ).astype(np.float32)  # (N, T, 2) level-0 (x, y)
    side = np.array([32.0, 64.0])
    glimpse_boxes = np.stack(
        [centres[..., 0, None] - side / 2, centres[..., 1, None] - side / 2]
        + [np.broadcast_to(side, (*centres.shape[:2], 2))] * 2,
        -1,
    ).astype(np.float32)  # (N, T, S, 4)
    step_probabilities = np.full((2, t, len(CLASSES)), 0.1, np.float32)
    step_probabilities[0, :, 3] = 0.7
    step_probabilities[1, :, 1] = 0.7
    return {
        "soft_attention": attention,
        "soft_tissue": tissue,
        "tile_boxes": boxes,
        "tile_attention": np.array([0.9, 0.4], np.float32),
        "tile_rank": np.array([0, 1], np.int64),
        "tile_classes": np.array([3, 1], np.int64),
        "tile_probabilities": np.array([[0.1, 0.1, 0.1, 0.7], [0.1, 0.7, 0.1, 0.1]], np.float32),
        "glimpse_centres": centres,
        "glimpse_boxes": glimpse_boxes,
        "glimpse_probabilities": step_probabilities,
    }


def make_result(kind: str, slide: str | Path, dimensions=(2048, 1536), mpp=(0.5, 0.5)):
    """A small result of ``kind`` on ``slide`` as the model kind's predict makes them."""
    pieces, arrays, info = [], {}, {}
    if kind == "dual-attention":
        arrays = _dual_arrays()
        info = {
            "sampler": "attention",
            "soft_attention": {"origin": [0, 0], "cell_size": 128.0},
            "glimpse_scales": [1.0, 2.0],
        }
    else:
        pieces = [
            _piece(0, (256, 256), (3, 4), kind, seed=1),
            _piece(1, (1280, 768), (2, 2), kind, seed=2),
        ]
    return SlideResult(
        slide=str(slide),
        model_kind=kind,
        classes=CLASSES,
        probabilities=np.array([0.1, 0.2, 0.3, 0.4], np.float32),
        predicted=3,
        aggregation="highest-risk",
        pieces=pieces,
        timings={"total": 1.0},
        model={"checkpoint": None, "config": {"kind": kind}},
        slide_info={"mpp": list(mpp) if mpp else None, "dimensions": list(dimensions)},
        arrays=arrays,
        info=info,
    )


@pytest.fixture
def slide_path(tmp_path):
    path = tmp_path / "slides" / "needle.tif"
    path.parent.mkdir()
    write_synthetic_slide(
        path, size=(2048, 1536), label="carcinoma", seed=3, n_pieces=1, lesion_size=30
    )
    return path


# -- pure: every overlay of each kind --------------------------------------------------


@pytest.mark.parametrize("kind", sorted(ROLES))
def test_result_layer_data_gives_every_overlay_of_each_kind(kind):
    result = make_result(kind, "s.tif")
    layers = result_layer_data(result, (0.5, 0.5))
    assert [role for role, _ in layers] == ROLES[kind]
    assert all(role in RESULT_ROLES for role, _ in layers)
    if kind == "dual-attention":  # the soft attention starts hidden, as after a run
        assert layers[0][1][1]["visible"] is False


def test_tile_probabilities_lie_on_the_tile_lattice_one_slice_per_class():
    result = make_result("sliding-window", "s.tif")
    scale = (0.5, 0.25)
    data, kwargs, kind = tile_probabilities_layer_data(result, scale)
    # pieces at lattice cells (1, 1) 3x4 and (3, 5) 2x2: rows 1..4, cols 1..6
    assert kind == "image" and data.shape == (4, 4, 6)
    first = result.pieces[0].arrays["tile_probabilities"]
    np.testing.assert_allclose(data[:, :3, :4], np.nan_to_num(first))
    assert (data[:, 0, 3] == 0).all()  # off tissue (NaN) shows as 0
    second = result.pieces[1].arrays["tile_probabilities"]
    np.testing.assert_allclose(data[:, 2:4, 4:6], np.nan_to_num(second))
    assert kwargs["scale"] == pytest.approx((1.0, TILE * 0.5, TILE * 0.25))
    # cell (0, 0) covers level-0 px [256, 512): centred at px 383.5
    assert kwargs["translate"] == pytest.approx((0.0, 383.5 * 0.5, 383.5 * 0.25))
    assert kwargs["metadata"]["predicted_index"] == 3
    assert kwargs["axis_labels"] == ("class", "y", "x")


def test_result_scale_comes_from_the_result_slide_info():
    assert result_scale(make_result("grid-attention", "s.tif", mpp=(0.25, 0.5))) == (
        (0.5, 0.25),
        ("µm", "µm"),
    )
    assert result_scale(make_result("grid-attention", "s.tif", mpp=None)) == (
        (1.0, 1.0),
        ("pixel", "pixel"),
    )


# -- in a viewer ------------------------------------------------------------------------


def dock(viewer, name: str):
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    return widget


def overlays(session) -> dict[str, dict]:
    """Each result layer of a session: its kind, data and placement in world units (µm).

    (``__class__``: layers made through a panel's viewer are napari's PublicOnlyProxy.)
    """
    out = {}
    for role in RESULT_ROLES:
        layer = session.layer(role)
        if layer is None:
            continue
        data = layer.data
        if layer.__class__.__name__ == "Shapes":
            data = [np.asarray(d) for d in data]
        out[role] = {
            "kind": layer.__class__.__name__,
            "data": data,
            "scale": tuple(layer.scale),
            "translate": tuple(layer.translate),
            "world": [layer.data_to_world(p) for p in _corners(layer)],
        }
    return out


def _corners(layer):
    """A few data points whose world positions say where the layer is."""
    if layer.__class__.__name__ == "Image":
        return [np.zeros(layer.ndim), np.asarray(layer.data.shape) - 1]
    if layer.__class__.__name__ == "Points":
        return list(np.asarray(layer.data)[:3])
    return [np.asarray(d)[0] for d in layer.data[:3]]


def assert_same_overlays(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for role in a:
        assert a[role]["kind"] == b[role]["kind"], role
        assert a[role]["scale"] == pytest.approx(b[role]["scale"]), role
        assert a[role]["translate"] == pytest.approx(b[role]["translate"]), role
        np.testing.assert_allclose(a[role]["world"], b[role]["world"], err_msg=role)
        if isinstance(a[role]["data"], list):
            assert len(a[role]["data"]) == len(b[role]["data"]), role
            for x, y in zip(a[role]["data"], b[role]["data"], strict=True):
                np.testing.assert_allclose(x, y, err_msg=role)
        else:
            np.testing.assert_allclose(
                np.asarray(a[role]["data"]), np.asarray(b[role]["data"]), err_msg=role
            )


@pytest.mark.gui
@pytest.mark.parametrize("kind", sorted(ROLES))
def test_save_then_open_in_a_new_viewer_shows_the_same_overlays(
    make_napari_viewer, qtbot, tmp_path, slide_path, monkeypatch, kind
):
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QFileDialog

    viewer = make_napari_viewer()
    session = session_for(viewer)
    session.open_slide(slide_path)
    panel = dock(viewer, "Model")
    assert not panel.save_button.isEnabled()  # nothing to save yet
    result = make_result(kind, slide_path)
    session.show_result(result)
    assert panel.save_button.isEnabled()
    assert "carcinoma" in panel.call.text() and panel.table.rowCount() == len(CLASSES)
    before = overlays(session)
    assert list(before) == ROLES[kind]

    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("a folder with other things in it")
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: str(folder))
    qtbot.mouseClick(panel.save_button, Qt.LeftButton)
    saved = folder / f"needle.{kind}"  # a new result folder beside the other things
    assert (saved / "result.json").is_file(), panel.status.text()
    assert str(saved) in panel.status.text()

    again = make_napari_viewer()
    other = dock(again, "Model")
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: str(saved))
    monkeypatch.setattr(
        QFileDialog, "getOpenFileName", lambda *a, **k: pytest.fail("the slide was found")
    )
    qtbot.mouseClick(other.open_button, Qt.LeftButton)
    reopened = session_for(again)
    assert reopened.slide is not None, other.status.text()
    assert Path(reopened.slide.path).resolve() == slide_path.resolve()
    assert isinstance(reopened.result, SlideResult)
    assert reopened.result.predicted_class == "carcinoma"
    assert "carcinoma" in other.call.text() and other.save_button.isEnabled()
    assert_same_overlays(before, overlays(reopened))
    assert reopened.scale == pytest.approx(session.scale)

    # saving into the result folder itself replaces the result there
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: str(saved))
    qtbot.mouseClick(other.save_button, Qt.LeftButton)
    assert sorted(p.name for p in folder.iterdir()) == ["needle." + kind, "notes.txt"]


@pytest.mark.gui
def test_open_asks_for_a_moved_slide_and_shows_the_result_over_it(
    make_napari_viewer, qtbot, tmp_path, slide_path, monkeypatch
):
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QFileDialog

    saved = make_result("grid-attention", slide_path).save(tmp_path / "result")
    moved = tmp_path / "elsewhere" / "needle-moved.tif"
    moved.parent.mkdir()
    slide_path.rename(moved)
    viewer = make_napari_viewer()
    panel = dock(viewer, "Model")
    asked = []

    def where_is_it(_parent, caption, *args, **kwargs):
        asked.append(caption)
        return str(moved), ""

    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: str(saved))
    monkeypatch.setattr(QFileDialog, "getOpenFileName", where_is_it)
    qtbot.mouseClick(panel.open_button, Qt.LeftButton)
    assert len(asked) == 1 and "needle.tif" in asked[0]
    session = session_for(viewer)
    assert Path(session.slide.path) == moved, panel.status.text()
    assert list(overlays(session)) == ["attention"]
    assert session.layer("attention").metadata["tile_size"] == TILE

    # the user cancels the question: nothing changes, and the panel says why
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: ("", ""))
    second = make_napari_viewer()
    other = dock(second, "Model")
    qtbot.mouseClick(other.open_button, Qt.LeftButton)
    assert session_for(second).slide is None and len(second.layers) == 0
    assert "was not found" in other.status.text()

    # a slide of another size is refused: the overlays would not fit it
    small = tmp_path / "small.tif"
    write_synthetic_slide(small, size=(1024, 1024), label="normal", seed=1, n_pieces=1)
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(small), ""))
    qtbot.mouseClick(other.open_button, Qt.LeftButton)
    assert session_for(second).slide is None
    assert "1024 x 1024" in other.status.text() and "2048 x 1536" in other.status.text()


@pytest.mark.gui
def test_open_reports_a_folder_that_is_not_a_result(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    panel = dock(viewer, "Model")
    assert panel.open_result(tmp_path) is None
    assert "not a result folder" in panel.status.text()
    assert len(viewer.layers) == 0
