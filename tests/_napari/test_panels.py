"""The Slide and Model panels in a real viewer: open, tissue preview, run, cancel (grid
and dual models), alignment of the attention layer with the slide, and a responsive
event loop."""

from __future__ import annotations

import time

import numpy as np
import pytest

from napari_slide_attention._napari.session import session_for
from napari_slide_attention.slide.synthetic import read_sidecar, write_synthetic_slide

PLUGIN = "napari-slide-attention"

pytestmark = pytest.mark.gui


def dock(viewer, name: str):
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    return widget


@pytest.fixture
def sample_slide(tmp_path):
    path = tmp_path / "needle.tif"
    write_synthetic_slide(
        path, size=(2048, 1536), label="carcinoma", seed=3, n_pieces=1, lesion_size=30
    )
    return path


def test_slide_panel_opens_a_slide_shows_facts_and_previews_the_tissue(
    make_napari_viewer, qtbot, sample_slide
):
    viewer = make_napari_viewer()
    panel = dock(viewer, "Slide")
    panel.open_slide(sample_slide)
    session = session_for(viewer)
    assert session.slide is not None and session.layer("slide").multiscale
    assert "0.5" in panel.facts.text() and "20x" in panel.facts.text()
    qtbot.waitUntil(lambda: session.layer("tissue") is not None, timeout=30_000)
    first = session.layer("tissue").data.sum()
    assert "tissue in 1 piece" in panel.tissue_status.text()
    # a larger smallest-piece area than the piece itself: the preview drops it
    panel.fields["min_piece_area_um2"].setValue(1e8)
    qtbot.waitUntil(lambda: session.layer("tissue").data.sum() < first, timeout=30_000)
    assert session.tissue.min_piece_area_um2 == 1e8
    assert "0 piece(s)" in panel.tissue_status.text()


def test_slide_panel_reports_a_file_that_is_not_a_slide(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    panel = dock(viewer, "Slide")
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\x00" + b"\x00" * 64)
    assert panel.open_slide(bad) is None
    assert "broken.svs" in panel.status.text()
    assert session_for(viewer).slide is None and len(viewer.layers) == 0


def test_slide_panel_lists_a_cohort_and_opens_its_slides(make_napari_viewer, qtbot, tiny_cohort):
    viewer = make_napari_viewer()
    panel = dock(viewer, "Slide")
    panel.open_cohort(tiny_cohort.path)
    assert panel.cohort_list.count() == len(tiny_cohort.entries)
    panel._open_item(panel.cohort_list.item(2))
    session = session_for(viewer)
    assert session.cohort_index() == 2
    assert panel.cohort_list.currentRow() == 2
    session.step_slide(+1)
    assert session.cohort_index() == 3 and panel.cohort_list.currentRow() == 3
    assert len([layer for layer in viewer.layers if layer.multiscale]) == 1


def test_the_next_slide_shows_its_own_tissue_pieces_over_it(make_napari_viewer, qtbot, tiny_cohort):
    viewer = make_napari_viewer()
    panel = dock(viewer, "Slide")
    panel.open_cohort(tiny_cohort.path)
    panel._open_item(panel.cohort_list.item(0))
    session = session_for(viewer)
    qtbot.waitUntil(lambda: session.layer("tissue pieces") is not None, timeout=30_000)
    first = session.layer("tissue pieces")
    session.step_slide(+1)
    # the first slide's pieces went with it; the second slide's come over the new slide
    assert first not in viewer.layers
    qtbot.waitUntil(lambda: session.layer("tissue pieces") is not None, timeout=30_000)
    names = [layer.name for layer in viewer.layers]
    assert names.count("tissue pieces") == 1
    assert names.index("tissue pieces") > names.index(session.layer("slide").name)


def test_model_panel_runs_a_checkpoint_and_the_attention_lands_on_the_lesion(
    make_napari_viewer, qtbot, tiny_cohort, tiny_grid_model
):
    viewer = make_napari_viewer()
    session = session_for(viewer)
    entry = next(e for e in tiny_cohort.entries if e.split == "test" and e.lesions)
    session.open_slide(entry.slide)
    panel = dock(viewer, "Model")
    panel.set_checkpoint(tiny_grid_model)
    assert "grid attention" in panel.kind.text() and "4 maps" in panel.kind.text()
    assert panel.run_button.isEnabled()
    panel.batch.setValue(8)
    shown = []
    session.result_shown.connect(shown.append)
    panel.run()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60_000)
    assert panel.status.text().startswith("done"), panel.status.text()
    result = session.result
    assert result.predicted_class in panel.call.text()
    assert panel.table.rowCount() == len(result.classes)
    # pieces arrived one by one before the whole result
    assert len(shown) == len(result.pieces) + 1
    layer = session.layer("attention")
    assert layer.data.shape[0] == 4
    # a lesion's centre in µm falls on a grid cell whose tile holds the lesion
    (x, y, w, h), _ = entry.lesions[0]
    world = session.to_world(x + w / 2, y + h / 2)
    _, row, col = np.round(layer.world_to_data((0, *world))).astype(int)
    tile = layer.metadata["tile_size"]
    ox, oy = layer.metadata["origin"]
    cell_x, cell_y = ox + col * tile, oy + row * tile
    assert cell_x <= x + w / 2 < cell_x + tile and cell_y <= y + h / 2 < cell_y + tile

    # a click there (press and release, no drag) shows that tile at level 0
    from types import SimpleNamespace

    viewer.dims.set_current_step(0, 1)  # the second strongest map
    click = viewer.mouse_drag_callbacks[-1]
    event = SimpleNamespace(type="mouse_press", button=1, position=(1, *world))
    steps = click(viewer, event)
    next(steps)
    event.type = "mouse_release"
    with pytest.raises(StopIteration):
        next(steps)
    found = panel.inspected
    assert found["kind"] == "grid cell" and found["box"] == (cell_x, cell_y, tile, tile)
    assert found["map"] == layer.metadata["map_order"][1]
    assert f"map {found['map']}" in panel.inspect_title.text()
    qtbot.waitUntil(
        lambda: (
            panel.inspect_image.pixmap() is not None and not panel.inspect_image.pixmap().isNull()
        ),
        timeout=10_000,
    )
    assert panel.inspect_image.pixmap().width() == min(tile, 320)
    panel.inspect_zoom.click()
    assert session.camera.zoom == pytest.approx(1 / session.scale[1])
    # a drag is no click: the inspected tile stays
    event = SimpleNamespace(type="mouse_press", button=1, position=(1, 0.0, 0.0))
    steps = click(viewer, event)
    next(steps)
    event.type = "mouse_move"
    next(steps)
    event.type = "mouse_release"
    with pytest.raises(StopIteration):
        next(steps)
    assert panel.inspected is found


def test_model_panel_refuses_a_file_that_is_not_a_checkpoint(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    panel = dock(viewer, "Model")
    bad = tmp_path / "weights.safetensors"
    bad.write_bytes(b"not a checkpoint")
    panel.set_checkpoint(bad)
    assert "weights.safetensors" in panel.kind.text()
    assert not panel.run_button.isEnabled()


def test_cancel_stops_a_run_within_a_second_and_the_event_loop_never_stalls(
    make_napari_viewer, qtbot, tmp_path, tiny_grid_model
):
    from qtpy.QtCore import QTimer

    path = tmp_path / "large.tif"
    write_synthetic_slide(path, size=(8192, 6144), label="carcinoma", seed=1, n_pieces=2)
    viewer = make_napari_viewer(show=True)
    session = session_for(viewer)
    session.open_slide(path)
    panel = dock(viewer, "Model")
    panel.set_checkpoint(tiny_grid_model)
    panel.batch.setValue(4)
    panel.run()  # the event loop is measured while the worker runs
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    qtbot.waitUntil(lambda: len(panel._pieces) >= 1, timeout=60_000)  # a piece was drawn
    qtbot.wait(500)
    start = time.perf_counter()
    panel.cancel()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=5_000)
    took = time.perf_counter() - start
    timer.stop()
    assert took < 1.0, f"cancel took {took:.2f} s"
    assert panel.status.text() == "cancelled"
    assert panel.run_button.isEnabled() and not panel.cancel_button.isEnabled()
    gaps = np.diff(ticks)
    assert len(gaps) > 50 and gaps.max() < 0.2, f"longest stall {gaps.max():.3f} s"
    assert read_sidecar(path)["lesions"]  # (the slide had something to find)


def test_all_five_panels_open_from_the_plugin_and_closed_ones_let_go(
    make_napari_viewer, qtbot, sample_slide
):
    from qtpy.QtWidgets import QApplication

    viewer = make_napari_viewer()
    names = ("Slide", "Model", "Review", "Fine-tune", "Tour")
    docks = [viewer.window.add_plugin_dock_widget(PLUGIN, name) for name in names]
    assert [type(w).__name__ for _, w in docks] == [
        "SlidePanel",
        "ModelPanel",
        "ReviewPanel",
        "FineTunePanel",
        "TourPanel",
    ]
    import gc
    import weakref

    panels = [weakref.ref(widget) for _, widget in docks]
    for dock_widget, _ in docks:
        viewer.window.remove_dock_widget(dock_widget)
    del docks, dock_widget, _
    QApplication.sendPostedEvents(None, 0)  # deleteLater
    QApplication.processEvents()
    gc.collect()
    assert [ref() for ref in panels] == [None] * 5  # nothing keeps a closed panel
    session = session_for(viewer)
    session.open_slide(sample_slide)  # no signal reaches a deleted panel
    session.add_checkpoint(sample_slide.with_suffix(".safetensors"))
    assert session.slide is not None


@pytest.fixture(scope="module")
def small_dual_model(tmp_path_factory):
    """An untrained dual-attention checkpoint, small but slow enough per sampled tile
    (256 px tiles, 6 glimpses) that a run is still going when Cancel is clicked."""
    import torch

    from napari_slide_attention.models.checkpoint import save_checkpoint
    from napari_slide_attention.models.dual_attention import DualAttention, DualAttentionConfig

    torch.manual_seed(0)
    config = DualAttentionConfig(
        classes=("normal", "low-grade", "high-grade", "carcinoma"),
        n_tiles=24,
        tile_um=128.0,
        feature_px=32,
        feature_width=8,
        soft={"pool": 4},
        hard={
            "glimpses": 6,
            "glimpse_px": 32,
            "tile_px": 256,
            "context_px": 64,
            "feature": 64,
            "hidden": [64, 32],
            "glimpse_channels": [16, 32],
            "context_channels": [8, 16],
        },
    )
    model = DualAttention(config)
    path = tmp_path_factory.mktemp("small-dual") / "dual"
    return save_checkpoint(path, config.kind, config.to_dict(), model.state_dict())


def test_a_dual_model_shows_tile_progress_and_cancels_within_a_second(
    make_napari_viewer, qtbot, tmp_path, small_dual_model
):
    from qtpy.QtCore import Qt

    from napari_slide_attention._napari.layers import RESULT_ROLES

    path = tmp_path / "slide.tif"
    write_synthetic_slide(
        path, size=(4096, 3072), label="carcinoma", seed=1, n_pieces=2, lesion_size=40
    )
    viewer = make_napari_viewer()
    session = session_for(viewer)
    session.open_slide(path)
    panel = dock(viewer, "Model")
    panel.set_checkpoint(small_dual_model)
    assert "dual attention" in panel.kind.text()
    assert not panel.batch.isEnabled()  # the dual model reads only its sampled tiles

    # a whole run first: tile progress up to the sampled tiles, then every overlay
    qtbot.mouseClick(panel.run_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60_000)
    assert panel.status.text().startswith("done"), panel.status.text()
    n = session.result.info["tiles"]
    assert panel.bar.maximum() == n > 1 and panel.bar.value() == n
    assert [role for role in RESULT_ROLES if session.layer(role) is not None] == [
        "soft attention",
        "sampled tiles",
        "glimpse paths",
        "glimpses",
        "glimpse fields",
    ]

    # again, cancelled once the first sampled tiles are done
    session.open_slide(path)  # no result on show
    qtbot.mouseClick(panel.run_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: panel.bar.maximum() > 1 and panel.bar.value() >= 1, timeout=60_000)
    assert 1 <= panel.bar.value() < panel.bar.maximum() == n
    start = time.perf_counter()
    qtbot.mouseClick(panel.cancel_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: panel.worker is None, timeout=5_000)
    took = time.perf_counter() - start
    assert took < 1.0, f"cancel took {took:.2f} s"
    assert panel.status.text() == "cancelled"
    assert session.result is None
    assert all(session.layer(role) is None for role in RESULT_ROLES)
    assert panel.run_button.isEnabled() and not panel.cancel_button.isEnabled()
    assert panel.job is None and not panel.save_button.isEnabled()


def test_a_sliding_window_model_draws_its_tile_probabilities(
    make_napari_viewer, qtbot, tmp_path, sample_slide
):
    import torch
    from qtpy.QtCore import Qt

    from napari_slide_attention.models.checkpoint import save_checkpoint
    from napari_slide_attention.models.sliding_window import CropClassifier, SlidingWindowConfig

    torch.manual_seed(0)
    config = SlidingWindowConfig(
        classes=("normal", "low-grade", "high-grade", "carcinoma"), crop_um=128.0, input_px=32
    )
    checkpoint = save_checkpoint(
        tmp_path / "window", config.kind, config.to_dict(), CropClassifier(config).state_dict()
    )
    viewer = make_napari_viewer()
    session = session_for(viewer)
    session.open_slide(sample_slide)
    panel = dock(viewer, "Model")
    panel.set_checkpoint(checkpoint)
    assert panel.batch.isEnabled()
    panel.batch.setValue(8)
    qtbot.mouseClick(panel.run_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60_000)
    assert panel.status.text().startswith("done"), panel.status.text()
    result = session.result
    assert panel.bar.maximum() == result.info["tiles"] == panel.bar.value()
    layer = session.layer("tile probabilities")
    assert layer is not None and session.layer("attention") is None
    assert layer.data.shape[0] == 4 and layer.metadata["predicted"] == result.predicted_class
    # each tissue tile's probabilities sum to 1 over the classes
    totals = np.asarray(layer.data).sum(0)
    assert np.allclose(totals[totals > 0], 1.0, atol=1e-4)
