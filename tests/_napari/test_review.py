"""The Review panel in a real viewer: accept and correct slide labels, label drawn
regions and sampled tiles with number keys, notes, undo, persistence across viewers."""

from __future__ import annotations

import numpy as np
import pytest

from napari_slide_attention._napari.session import session_for
from napari_slide_attention.jobs import run_to_end
from napari_slide_attention.labels import LabelStore

PLUGIN = "napari-slide-attention"

pytestmark = pytest.mark.gui


def open_review(viewer, cohort, store_path, slide_index: int = 0):
    session = session_for(viewer)
    session.open_cohort(cohort.path, labels=store_path)
    session.open_cohort_slide(slide_index)
    _, panel = viewer.window.add_plugin_dock_widget(PLUGIN, "Review")
    return session, panel


def press(viewer, qtbot, key) -> None:
    canvas = viewer.window._qt_viewer.canvas.native
    canvas.setFocus()
    qtbot.keyClick(canvas, key)


def test_labels_regions_notes_and_undo_persist_and_reopen(
    make_napari_viewer, qtbot, tiny_cohort, tmp_path
):
    store_path = tmp_path / "labels.sqlite"
    viewer = make_napari_viewer(show=True)
    session, panel = open_review(viewer, tiny_cohort, store_path)
    slide = session.slide.path
    classes = list(tiny_cohort.classes)
    cohort_label = classes[tiny_cohort.entries[0].label]
    panel.author.setText("dr-a")
    panel.accept_button.click()
    stored = session.labels.slide_label(slide)
    assert (stored.label, stored.status, stored.author) == (cohort_label, "accepted", "dr-a")

    # a number key with no region selected corrects the slide's label
    press(viewer, qtbot, "3")
    assert session.labels.slide_label(slide).label == classes[2]
    assert session.labels.slide_label(slide).status == "corrected"

    # draw a rectangle (world µm), select it, key 2 labels it: level-0 px in the store
    regions = session.layer("regions")
    sy, sx = session.scale
    regions.add_rectangles(
        np.array(
            [[100 * sy - 0.5 * sy, 200 * sx - 0.5 * sx], [300 * sy - 0.5 * sy, 500 * sx - 0.5 * sx]]
        )
    )
    regions.selected_data = {0}
    press(viewer, qtbot, "2")
    (region,) = session.labels.regions(slide)
    assert region.label == classes[1] and region.kind == "rectangle"
    assert region.box == (200, 100, 300, 200)
    assert session.layer("regions").features["id"].tolist() == [region.id]
    assert panel.region_list.count() == 1

    panel.notes.setPlainText("crush artefact at the top edge")
    panel.save_note_button.click()
    assert session.labels.note(slide) == "crush artefact at the top edge"
    panel.undo_button.click()  # the note goes
    assert session.labels.note(slide) == ""
    panel.undo_button.click()  # then the region
    assert session.labels.regions(slide) == []
    assert panel.region_list.count() == 0
    panel.undo_button.click()  # then the correction: back to the accepted label
    assert session.labels.slide_label(slide).status == "accepted"
    history = session.labels.history(slide)
    assert [c.action for c in history].count("undo") == 3
    assert panel.history.count() == len(history)

    press(viewer, qtbot, "2")  # relabel, then see it in a new viewer
    session.labels.close()
    viewer.close()
    other = make_napari_viewer()
    session2, panel2 = open_review(other, tiny_cohort, store_path)
    assert session2.labels.slide_label(slide).label == classes[1]
    assert panel2.slide_class.currentText() == classes[1]
    assert classes[1] in panel2.label_facts.text()


def test_keys_step_slides_and_maps_and_tiles_become_regions(
    make_napari_viewer, qtbot, tiny_cohort, tiny_grid_model, tmp_path
):
    from napari_slide_attention.inference import predict

    viewer = make_napari_viewer(show=True)
    session, panel = open_review(viewer, tiny_cohort, tmp_path / "labels.sqlite", 1)
    from qtpy.QtCore import Qt

    press(viewer, qtbot, Qt.Key_PageDown)
    assert session.cohort_index() == 2
    session.show_result(run_to_end(predict(tiny_grid_model, session.slide.path)))
    assert viewer.dims.current_step[0] == 0
    press(viewer, qtbot, "]")
    assert viewer.dims.current_step[0] == 1
    press(viewer, qtbot, "[")
    assert viewer.dims.current_step[0] == 0
    # no sampled tiles (a grid result): a clear message, nothing stored
    assert panel.add_selected_tiles(tiny_cohort.classes[1]) == 0
    assert "sampled tiles" in panel.status.text()
    assert LabelStore(tmp_path / "labels.sqlite").regions(session.slide.path) == []
