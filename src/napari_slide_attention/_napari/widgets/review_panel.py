"""The Review panel: accept or correct the slide's label, label regions (drawn, or a
model's sampled tiles), write notes, undo; every change goes to the cohort's
``LabelStore`` with who and when.

Keyboard (while the viewer has focus): 1-9 give the selected regions that class (the
slide itself when no region is selected); Page Down / Page Up open the next / previous
slide of the cohort; ] and [ step to the next / previous attention map.
"""

from __future__ import annotations

import contextlib
import functools
import html
import weakref
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..layers import regions_layer_data, world_to_geometry
from ..session import connect_while_alive, session_for
from . import error_html

KEYS_HELP = (
    "Keys: 1–9 class of the selected regions (or of the slide) · "
    "PgDn/PgUp next/previous slide · ] / [ next/previous map"
)


class ReviewPanel(QWidget):
    """Review one slide at a time: its label, regions and notes, stored with history.

    Args:
        napari_viewer: the viewer (npe2 passes it).
    """

    def __init__(self, napari_viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)

        layout = QVBoxLayout(self)
        self.title = QLabel()
        self.title.setWordWrap(True)
        layout.addWidget(self.title)
        form = QFormLayout()
        self.author = QLineEdit()
        self.author.setPlaceholderText("your name (stored with every change)")
        form.addRow("author", self.author)
        layout.addLayout(form)

        slide_box = QGroupBox("Slide label")
        slide_form = QVBoxLayout(slide_box)
        self.label_facts = QLabel()
        self.label_facts.setWordWrap(True)
        slide_form.addWidget(self.label_facts)
        row = QHBoxLayout()
        self.slide_class = QComboBox()
        self.accept_button = QPushButton("Accept")
        self.accept_button.setToolTip("Agree with the cohort's label")
        self.accept_button.clicked.connect(self.accept_label)
        self.correct_button = QPushButton("Correct")
        self.correct_button.setToolTip("Store the chosen class as the slide's label")
        self.correct_button.clicked.connect(
            lambda: self.correct_label(self.slide_class.currentText())
        )
        row.addWidget(self.slide_class, 1)
        row.addWidget(self.accept_button)
        row.addWidget(self.correct_button)
        slide_form.addLayout(row)
        layout.addWidget(slide_box)

        region_box = QGroupBox("Regions")
        regions = QVBoxLayout(region_box)
        hint = QLabel(
            "Draw rectangles or polygons on the 'regions' layer, or select sampled tiles, "
            "then give them a class."
        )
        hint.setWordWrap(True)
        regions.addWidget(hint)
        row = QHBoxLayout()
        self.region_class = QComboBox()
        self.label_regions_button = QPushButton("Label selected")
        self.label_regions_button.clicked.connect(
            lambda: self.label_selected(self.region_class.currentText())
        )
        self.tiles_button = QPushButton("Add selected tiles")
        self.tiles_button.clicked.connect(
            lambda: self.add_selected_tiles(self.region_class.currentText())
        )
        row.addWidget(self.region_class, 1)
        row.addWidget(self.label_regions_button)
        row.addWidget(self.tiles_button)
        regions.addLayout(row)
        self.region_list = QListWidget()
        self.region_list.itemActivated.connect(self._go_to_region)
        regions.addWidget(self.region_list)
        self.delete_button = QPushButton("Delete region")
        self.delete_button.clicked.connect(self.delete_selected_region)
        regions.addWidget(self.delete_button)
        layout.addWidget(region_box)

        notes_box = QGroupBox("Notes")
        notes = QVBoxLayout(notes_box)
        self.notes = QPlainTextEdit()
        self.notes.setPlaceholderText("free text about this slide")
        self.notes.setMaximumHeight(90)
        self.save_note_button = QPushButton("Save note")
        self.save_note_button.clicked.connect(lambda: self.save_note(self.notes.toPlainText()))
        notes.addWidget(self.notes)
        notes.addWidget(self.save_note_button)
        layout.addWidget(notes_box)

        row = QHBoxLayout()
        self.undo_button = QPushButton("Undo")
        self.undo_button.setToolTip("Revert the latest change on this slide")
        self.undo_button.clicked.connect(self.undo)
        row.addWidget(self.undo_button)
        layout.addLayout(row)
        self.history = QListWidget()
        self.history.setMaximumHeight(120)
        layout.addWidget(QLabel("History of this slide (newest first)"))
        layout.addWidget(self.history)
        self.status = QLabel()
        self.status.setWordWrap(True)
        layout.addWidget(self.status)
        keys = QLabel(KEYS_HELP)
        keys.setWordWrap(True)
        layout.addWidget(keys)
        layout.addStretch(1)

        self._bind_keys()
        connect_while_alive(
            self,
            [
                (self.session.slide_opened, self._on_slide),
                (self.session.cohort_opened, self._on_slide),
                (self.session.result_shown, self._on_result),
                (self.session.labels_changed, self._on_labels_changed),
                (self.viewer.layers.events.inserted, self._on_inserted),
            ],
        )
        self.refresh()

    # -- state -------------------------------------------------------------------------
    @property
    def store(self):
        return self.session.labels

    @property
    def classes(self) -> list[str]:
        """The label set: the cohort's, else the model's."""
        if self.session.cohort is not None:
            return list(self.session.cohort.classes)
        if self.session.result is not None:
            return list(self.session.result.classes)
        return []

    def _who(self) -> str | None:
        return self.author.text().strip() or None

    def _cohort_label(self) -> str | None:
        index = self.session.cohort_index()
        if index is None:
            return None
        entry = self.session.cohort.entries[index]
        return self.session.cohort.classes[entry.label]

    def _ready(self) -> bool:
        if self.session.slide is None:
            self._say("Open a slide first.")
            return False
        if self.store is None:
            self._say("Open a cohort in the Slide panel: labels are stored with the cohort.")
            return False
        return True

    def _say(self, text: str, error: bool = False) -> None:
        self.status.setText(error_html(text) if error else html.escape(text))

    # -- refresh -----------------------------------------------------------------------
    def refresh(self, regions: bool = True) -> None:
        """Show the stored labels, regions, note and history of the open slide."""
        classes = self.classes
        for combo in (self.slide_class, self.region_class):
            current = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(classes)
            if current in classes:
                combo.setCurrentText(current)
            combo.blockSignals(False)
        slide = self.session.slide
        enabled = slide is not None and self.store is not None and bool(classes)
        for widget in (
            self.accept_button,
            self.correct_button,
            self.label_regions_button,
            self.tiles_button,
            self.delete_button,
            self.save_note_button,
            self.undo_button,
        ):
            widget.setEnabled(enabled)
        self.accept_button.setEnabled(enabled and self._cohort_label() is not None)
        if slide is None:
            self.title.setText("No slide open.")
            return
        self.title.setText(f"<b>{html.escape(Path(slide.path).name)}</b>")
        facts = []
        cohort_label = self._cohort_label()
        if cohort_label is not None:
            facts.append(f"cohort: {cohort_label}")
        result = self.session.result
        if result is not None and hasattr(result, "confidence"):
            facts.append(f"model: {result.predicted_class} ({result.confidence:.0%})")
        if self.store is None:
            facts.append("no label store (open a cohort)")
            self.label_facts.setText(" · ".join(facts))
            return
        stored = self.store.slide_label(slide.path)
        if stored is not None:
            facts.append(
                f"stored: {stored.label} ({stored.status} by {stored.author}, {stored.time[:16]})"
            )
            self.slide_class.setCurrentText(stored.label)
        elif cohort_label is not None:
            self.slide_class.setCurrentText(cohort_label)
        self.label_facts.setText(" · ".join(facts))
        if regions:
            self.notes.setPlainText(self.store.note(slide.path))
            self._show_regions()
        self._show_history()

    def _show_regions(self) -> None:
        regions = self.store.regions(self.session.slide.path)
        data, kwargs, kind = regions_layer_data(
            regions, self.classes, self.session.scale, self.session.units
        )
        layer = self.session.layer("regions")
        if layer is not None:
            self.viewer.layers.remove(layer)
        layer = self.session.set_layer("regions", data, kwargs, kind)
        layer.mode = "select"
        self.region_list.clear()
        for region in regions:
            _, _, w, h = region.box
            item = QListWidgetItem(
                f"#{region.id} {region.label} · {region.kind} {w}×{h} px · {region.author}"
            )
            item.setData(256, region.id)  # Qt.UserRole
            self.region_list.addItem(item)

    def _show_history(self) -> None:
        self.history.clear()
        for change in reversed(self.store.history(self.session.slide.path, limit=None)[-50:]):
            old = _brief(change.old)
            new = _brief(change.new)
            self.history.addItem(
                f"{change.time[:19]} {change.author}: {change.action} {change.target} {old} → {new}"
            )

    def _on_labels_changed(self, key: str) -> None:
        from ...labels import slide_key

        if self.session.slide is not None and slide_key(self.session.slide.path) == key:
            self.refresh()

    def _changed(self) -> None:
        from ...labels import slide_key

        self.session.labels_changed.emit(slide_key(self.session.slide.path))

    # -- slide label -------------------------------------------------------------------
    def accept_label(self) -> None:
        """Store the cohort's label as accepted."""
        label = self._cohort_label()
        if not self._ready() or label is None:
            return
        self.store.set_slide_label(
            self.session.slide.path, label, status="accepted", author=self._who()
        )
        self._say(f"accepted: {label}")
        self._changed()

    def correct_label(self, label: str) -> None:
        """Store ``label`` as the slide's corrected label."""
        if not self._ready() or not label:
            return
        self.store.set_slide_label(
            self.session.slide.path, label, status="corrected", author=self._who()
        )
        self._say(f"slide label: {label}")
        self._changed()

    # -- regions -----------------------------------------------------------------------
    def label_selected(self, label: str) -> int:
        """Give the selected shapes of the regions layer this class (new shapes become
        regions); returns how many changed."""
        if not self._ready() or not label:
            return 0
        layer = self.session.layer("regions")
        if layer is None or not layer.selected_data:
            self._say("Select shapes on the 'regions' layer first (or draw some).")
            return 0
        ids = layer.features["id"].to_numpy()
        changed = 0
        for index in sorted(layer.selected_data):
            shape_type = layer.shape_type[index]
            geometry = world_to_geometry(layer.data[index], self.session.scale)
            if shape_type not in ("rectangle", "polygon"):
                self._say(f"a {shape_type} is not a region: draw rectangles or polygons", True)
                continue
            try:
                if ids[index] >= 0:
                    self.store.update_region(
                        int(ids[index]), label=label, geometry=geometry, author=self._who()
                    )
                else:
                    self._add_region(geometry, label, shape_type)
                changed += 1
            except ValueError as exc:
                self._say(str(exc), True)
        if changed:
            self._say(f"{changed} region(s): {label}")
            self._changed()
        return changed

    def _add_region(self, geometry, label: str, kind: str) -> None:
        try:
            self.store.add_region(
                self.session.slide.path, geometry, label, kind=kind, author=self._who()
            )
        except ValueError:
            if kind != "rectangle":
                raise
            # a rotated rectangle is a polygon to the store
            self.store.add_region(
                self.session.slide.path, geometry, label, kind="polygon", author=self._who()
            )

    def add_selected_tiles(self, label: str) -> int:
        """Store the selected sampled tiles as regions of this class."""
        if not self._ready() or not label:
            return 0
        tiles = self.session.layer("sampled tiles")
        if tiles is None or not tiles.selected_data:
            self._say("Select tiles on the 'sampled tiles' layer first.")
            return 0
        for index in sorted(tiles.selected_data):
            geometry = world_to_geometry(tiles.data[index], self.session.scale)
            rank = int(tiles.features["rank"].iloc[index]) if "rank" in tiles.features else 0
            self.store.add_region(
                self.session.slide.path,
                geometry,
                label,
                kind="tile",
                note=f"sampled tile {rank}" if rank else "",
                author=self._who(),
            )
        self._say(f"{len(tiles.selected_data)} tile(s): {label}")
        self._changed()
        return len(tiles.selected_data)

    def delete_selected_region(self) -> None:
        item = self.region_list.currentItem()
        if item is None or not self._ready():
            return
        self.store.delete_region(int(item.data(256)), author=self._who())
        self._changed()

    def _go_to_region(self, item: QListWidgetItem) -> None:
        region = self.store.region(int(item.data(256)))
        x, y, w, h = region.box
        camera = self.session.camera
        camera.center = self.session.to_world(x + w / 2, y + h / 2)
        sy, sx = self.session.scale
        camera.zoom = 600 / max(w * sx, h * sy, 1e-9)

    # -- notes and undo ----------------------------------------------------------------
    def save_note(self, text: str) -> None:
        if not self._ready():
            return
        self.store.set_note(self.session.slide.path, text, author=self._who())
        self._say("note saved")
        self._changed()

    def undo(self) -> None:
        """Revert the latest change on this slide."""
        if not self._ready():
            return
        try:
            change = self.store.undo(slide=self.session.slide.path)
        except ValueError as exc:
            self._say(str(exc), True)
            return
        if change is None:
            self._say("nothing to undo on this slide")
            return
        self._say(f"undone: the latest change to {change.target}")
        self._changed()

    # -- keys --------------------------------------------------------------------------
    def _bind_keys(self) -> None:
        # The key functions reach the panel through a weak reference: a binding must not
        # keep a closed panel alive (napari's dock close only unparents it).
        panel = weakref.ref(self)

        def call(method: str, *args: Any):
            def press(_target) -> None:
                alive = panel()
                if alive is not None:
                    getattr(alive, method)(*args)

            return press

        self._class_keys = {str(k + 1): call("class_key", k) for k in range(9)}
        bindings: dict[str, Any] = dict(self._class_keys)
        bindings["PageDown"] = call("step_slide", +1)
        bindings["PageUp"] = call("step_slide", -1)
        bindings["]"] = call("step_map", +1)
        bindings["["] = call("step_map", -1)
        for key, func in bindings.items():
            self.viewer.bind_key(key, func, overwrite=True)
        # napari's layers take number keys for their modes, and the active layer's keys
        # come first: on every layer, the number keys mean classes while this panel is open.
        for layer in self.viewer.layers:
            self._bind_class_keys(layer)
        self.destroyed.connect(
            functools.partial(_unbind_keys, self.viewer, tuple(bindings), tuple(self._class_keys))
        )

    def class_key(self, k: int) -> None:
        """Number key k + 1: class k for the selected regions, else for the slide."""
        classes = self.classes
        if k >= len(classes):
            return
        layer = self.session.layer("regions")
        if layer is not None and layer.selected_data:
            self.label_selected(classes[k])
        else:
            self.correct_label(classes[k])

    def step_slide(self, step: int) -> None:
        """Open the next (+1) or previous (-1) slide of the cohort."""
        self.session.step_slide(step)

    def _on_slide(self, _value: Any) -> None:
        self.refresh()

    def _on_result(self, _result: Any) -> None:
        self.refresh(regions=False)

    def _on_inserted(self, event) -> None:
        self._bind_class_keys(event.value)

    def _bind_class_keys(self, layer) -> None:
        for key, func in self._class_keys.items():
            layer.bind_key(key, func, overwrite=True)

    def step_map(self, step: int) -> None:
        """Show the next (+1) or previous (-1) attention map."""
        layer = self.session.layer("attention")
        if layer is None:
            return
        n = layer.data.shape[0]
        current = self.viewer.dims.current_step[0]
        self.viewer.dims.set_current_step(0, int(np.clip(current + step, 0, n - 1)))

    def closeEvent(self, event) -> None:
        _unbind_keys(self.viewer, ("PageDown", "PageUp", "]", "["), tuple(self._class_keys))
        super().closeEvent(event)


def _unbind_keys(viewer, keys: tuple[str, ...], class_keys: tuple[str, ...]) -> None:
    """Give the viewer's and the layers' keys back (the panel closed or was deleted)."""
    with contextlib.suppress(RuntimeError):
        for key in keys + class_keys:
            viewer.bind_key(key, None, overwrite=True)
        for layer in viewer.layers:
            for key in class_keys:
                layer.bind_key(key, None, overwrite=True)


def _brief(state: dict[str, Any] | None) -> str:
    if not state:
        return "—"
    for name in ("label", "text"):
        if name in state:
            return str(state[name])[:30]
    return ",".join(f"{k}={v}" for k, v in list(state.items())[:2])[:40]


__all__ = ["KEYS_HELP", "ReviewPanel"]
