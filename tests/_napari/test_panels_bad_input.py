"""Bad input in the panels: a damaged slide or a model that cannot run on a slide gives
the line the command line gives (file and problem), and the panels keep working."""

from __future__ import annotations

import pytest
import tifffile

from napari_slide_attention._napari.session import session_for
from napari_slide_attention.slide.synthetic import write_synthetic_slide

PLUGIN = "napari-slide-attention"

pytestmark = pytest.mark.gui


def dock(viewer, name: str):
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    return widget


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """A good slide, a copy cut inside level 0's tile offsets, and a slide scanned so
    coarsely (40 µm/px) that a model's 128 µm tiles would be 3 px."""
    folder = tmp_path_factory.mktemp("bad-input")
    good = folder / "good.tif"
    write_synthetic_slide(good, size=(2048, 1536), label="normal", seed=3, n_pieces=1)
    data = good.read_bytes()
    with tifffile.TiffFile(good) as tif:
        tag = tif.pages[0].tags[324]  # TileOffsets
        in_offsets = tag.valueoffset + tag.valuebytecount // 2
    cut_offsets = folder / "cut-offsets.tif"
    cut_offsets.write_bytes(data[:in_offsets])
    coarse = folder / "coarse.tif"
    write_synthetic_slide(coarse, size=(1024, 768), label="normal", seed=4, mpp=40.0)
    return good, cut_offsets, coarse


def test_the_slide_panel_names_a_damaged_slide_and_opens_the_next(make_napari_viewer, slides):
    good, cut_offsets, _ = slides
    viewer = make_napari_viewer()
    panel = dock(viewer, "Slide")
    assert panel.open_slide(cut_offsets) is None
    status = panel.status.text()
    assert "cut-offsets.tif" in status and "damaged" in status
    assert session_for(viewer).slide is None and len(viewer.layers) == 0
    assert panel.open_slide(good) is not None  # the panel still works
    assert session_for(viewer).slide is not None and len(viewer.layers) == 1


def test_the_model_panel_shows_a_failed_run_as_one_line_and_runs_again(
    make_napari_viewer, qtbot, slides, tiny_grid_model
):
    good, _, coarse = slides
    viewer = make_napari_viewer()
    session = session_for(viewer)
    session.open_slide(coarse)
    panel = dock(viewer, "Model")
    panel.set_checkpoint(tiny_grid_model)
    panel.run()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60_000)
    status = panel.status.text()
    assert "coarse.tif" in status and "3.2 px" in status and "--mpp" in status, status
    assert "Error:" not in status  # the line, not a type name before it
    assert session.result is None
    assert panel.run_button.isEnabled() and not panel.cancel_button.isEnabled()

    session.open_slide(good)
    panel.run()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60_000)
    assert panel.status.text().startswith("done"), panel.status.text()
    assert session.result is not None
