"""The Slide panel: open a slide (dialog, drag and drop, or a cohort list), read its facts
and associated images, and tune the tissue mask with a live preview."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QImage, QPixmap
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ...slide.reader import Slide
from ...slide.tissue import TissueMask, TissueParams, tissue_mask, tissue_pieces
from ..layers import boxes_to_rectangles
from ..session import connect_while_alive, session_for
from . import error_html

SLIDE_FILTER = "Slides (*.svs *.ndpi *.tif *.tiff *.btf *.tf8 *.zarr);;All files (*)"

# Tissue parameters the panel edits: (field, label, low, high, step, decimals).
TISSUE_FIELDS = (
    ("smooth_sigma_um", "smoothing σ (µm)", 0.0, 200.0, 2.0, 1),
    ("closing_radius_um", "closing radius (µm)", 0.0, 500.0, 4.0, 1),
    ("opening_radius_um", "opening radius (µm)", 0.0, 500.0, 4.0, 1),
    ("min_piece_area_um2", "smallest piece (µm²)", 0.0, 1e8, 10_000.0, 0),
    ("max_hole_area_um2", "largest hole filled (µm²)", 0.0, 1e8, 1_000.0, 0),
)


def slide_facts_html(slide: Slide) -> str:
    """The slide's facts (vendor, size, mpp, magnification, levels) as an HTML table."""
    facts = slide.describe()
    w, h = facts["dimensions"]
    mpp = facts["mpp"]
    rows = [
        ("file", Path(facts["path"]).name),
        ("vendor", facts["vendor"]),
        ("size", f"{w:,} × {h:,} px"),
        (
            "pixel size",
            f"{mpp[0]:.4g} × {mpp[1]:.4g} µm ({facts['mpp_source']})" if mpp else "unknown",
        ),
        ("magnification", f"{facts['magnification']:g}x" if facts["magnification"] else "unknown"),
        (
            "levels",
            ", ".join(
                f"{lv['downsample']:g}" + (" (virtual)" if lv["virtual"] else "")
                for lv in facts["levels"]
            )
            + " (downsample)",
        ),
        ("associated", ", ".join(facts["associated"]) or "none"),
    ]
    rows += [("note", n) for n in facts["notes"]]
    cells = "".join(
        f"<tr><td><b>{html.escape(k)}</b></td><td>{html.escape(str(v))}</td></tr>" for k, v in rows
    )
    return f"<table cellspacing='2'>{cells}</table>"


def thumbnail(image: np.ndarray, side: int = 160) -> QPixmap:
    """A QPixmap of an associated image (label, macro), at most ``side`` px."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[..., :3]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    step = max(1, int(np.ceil(max(image.shape[:2]) / side)))
    image = np.ascontiguousarray(image[::step, ::step, :3]).astype(np.uint8)
    h, w = image.shape[:2]
    qimage = QImage(image.data, w, h, 3 * w, QImage.Format_RGB888).copy()
    return QPixmap.fromImage(qimage)


class SlidePanel(QWidget):
    """Open a slide, see its facts and associated images, and tune its tissue mask.

    Args:
        napari_viewer: the viewer (npe2 passes it).
    """

    def __init__(self, napari_viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self._worker = None
        self._pending = False
        self.mask: TissueMask | None = None

        layout = QVBoxLayout(self)
        row = QHBoxLayout()
        self.open_button = QPushButton("Open slide…")
        self.open_button.clicked.connect(self._choose_slide)
        self.cohort_button = QPushButton("Open cohort…")
        self.cohort_button.clicked.connect(self._choose_cohort)
        row.addWidget(self.open_button)
        row.addWidget(self.cohort_button)
        layout.addLayout(row)
        self.status = QLabel("Open a slide, drop one on the viewer, or open a cohort CSV.")
        self.status.setWordWrap(True)
        layout.addWidget(self.status)

        self.cohort_list = QListWidget()
        self.cohort_list.setToolTip("Double-click (or Enter) opens the slide")
        self.cohort_list.itemActivated.connect(self._open_item)
        self.cohort_list.setVisible(False)
        layout.addWidget(self.cohort_list)

        self.facts = QLabel()
        self.facts.setTextFormat(Qt.RichText)
        self.facts.setWordWrap(True)
        self.facts.setTextInteractionFlags(Qt.TextSelectableByMouse)
        layout.addWidget(self.facts)

        self.associated_box = QGroupBox("Associated images")
        associated = QVBoxLayout(self.associated_box)
        self.associated_choice = QComboBox()
        self.associated_choice.currentTextChanged.connect(self._show_thumbnail)
        self.associated_image = QLabel()
        self.associated_image.setAlignment(Qt.AlignCenter)
        self.associated_layer_button = QPushButton("Show as layer")
        self.associated_layer_button.clicked.connect(self._associated_as_layer)
        associated.addWidget(self.associated_choice)
        associated.addWidget(self.associated_image)
        associated.addWidget(self.associated_layer_button)
        self.associated_box.setVisible(False)
        layout.addWidget(self.associated_box)

        tissue_box = QGroupBox("Tissue mask")
        form = QFormLayout(tissue_box)
        self.show_tissue = QCheckBox("show and preview")
        self.show_tissue.setChecked(True)
        self.show_tissue.toggled.connect(self._schedule_preview)
        form.addRow(self.show_tissue)
        self.method = QComboBox()
        self.method.addItems(["auto", "saturation", "od"])
        self.method.setToolTip(
            "saturation: H&E; od: pale IHC/DAB and grey images; auto: tissue where either says so"
        )
        self.method.currentTextChanged.connect(self._schedule_preview)
        form.addRow("method", self.method)
        defaults = TissueParams()
        self.fields: dict[str, QDoubleSpinBox] = {}
        for name, label, low, high, step, decimals in TISSUE_FIELDS:
            box = QDoubleSpinBox()
            box.setRange(low, high)
            box.setSingleStep(step)
            box.setDecimals(decimals)
            box.setValue(getattr(defaults, name))
            box.setKeyboardTracking(False)  # preview when the value is done, not per digit
            box.valueChanged.connect(self._schedule_preview)
            form.addRow(label, box)
            self.fields[name] = box
        self.tissue_status = QLabel()
        form.addRow(self.tissue_status)
        reset = QPushButton("Defaults")
        reset.clicked.connect(self.reset_tissue_params)
        form.addRow(reset)
        layout.addWidget(tissue_box)
        layout.addStretch(1)

        # Parameter edits arrive in bursts (spin box arrows): preview once they settle.
        self._debounce = QTimer(self)
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(250)
        self._debounce.timeout.connect(self._preview)

        connect_while_alive(
            self,
            [
                (self.session.slide_opened, self._on_slide),
                (self.session.cohort_opened, self._on_cohort),
            ],
        )
        if self.session.slide is not None:
            self._on_slide(self.session.slide)
        if self.session.cohort is not None:
            self._on_cohort(self.session.cohort)

    # -- opening -----------------------------------------------------------------------
    def _choose_slide(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open a whole-slide image", "", SLIDE_FILTER)
        if path:
            self.open_slide(path)

    def open_slide(self, path: str | Path) -> Slide | None:
        """Open and show a slide; a file that is not one is reported here, not raised."""
        try:
            return self.session.open_slide(path)
        except Exception as exc:  # SlideError names the file and the problem
            self.status.setText(error_html(str(exc)))
            return None

    def _choose_cohort(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open a cohort", "", "Cohort CSV (*.csv)")
        if path:
            self.open_cohort(path)

    def open_cohort(self, path: str | Path) -> None:
        """Read a cohort CSV and list its slides (with their labels and splits)."""
        try:
            self.session.open_cohort(path)
        except Exception as exc:  # CohortError / LabelStoreError name the file
            self.status.setText(error_html(str(exc)))

    def _on_cohort(self, cohort) -> None:
        self.cohort_list.clear()
        for i, entry in enumerate(cohort.entries):
            text = f"{Path(entry.slide).name}  ·  {cohort.classes[entry.label]}  ·  {entry.split}"
            item = QListWidgetItem(text)
            item.setData(Qt.UserRole, i)
            item.setToolTip(str(entry.slide))
            self.cohort_list.addItem(item)
        self.cohort_list.setVisible(True)
        self.status.setText(
            f"cohort {self.session.cohort_path.name}: {len(cohort.entries)} slides; "
            f"labels in {self.session.labels.path.name}"
        )
        self._select_current()

    def _open_item(self, item: QListWidgetItem) -> None:
        try:
            self.session.open_cohort_slide(int(item.data(Qt.UserRole)))
        except Exception as exc:
            self.status.setText(error_html(str(exc)))

    def _select_current(self) -> None:
        index = self.session.cohort_index()
        if index is not None:
            self.cohort_list.setCurrentRow(index)

    # -- facts and associated images ---------------------------------------------------
    def _on_slide(self, slide: Slide) -> None:
        self.status.setText(f"{Path(slide.path).name} is open.")
        self.facts.setText(slide_facts_html(slide))
        self.associated_choice.blockSignals(True)
        self.associated_choice.clear()
        self.associated_choice.addItems(list(slide.associated))
        self.associated_choice.blockSignals(False)
        self.associated_box.setVisible(bool(slide.associated))
        self._show_thumbnail(self.associated_choice.currentText())
        self.mask = None
        self._select_current()
        self._schedule_preview()

    def _show_thumbnail(self, name: str) -> None:
        slide = self.session.slide
        if slide is None or not name:
            self.associated_image.clear()
            return
        try:
            self.associated_image.setPixmap(thumbnail(slide.associated[name]))
        except Exception as exc:
            self.associated_image.setText(f"cannot read {name}: {exc}")

    def _associated_as_layer(self) -> None:
        slide, name = self.session.slide, self.associated_choice.currentText()
        if slide is None or not name:
            return
        image = np.asarray(slide.associated[name])
        self.viewer.add_image(
            image, name=f"{Path(slide.path).name} [{name}]", rgb=image.ndim == 3, visible=True
        )

    # -- tissue ------------------------------------------------------------------------
    def tissue_params(self) -> TissueParams:
        """The tissue parameters as the panel shows them."""
        values: dict[str, Any] = {name: box.value() for name, box in self.fields.items()}
        return TissueParams(method=self.method.currentText(), **values)

    def reset_tissue_params(self) -> None:
        defaults = TissueParams()
        for name, box in self.fields.items():
            box.setValue(getattr(defaults, name))
        self.method.setCurrentText(defaults.method)

    def _schedule_preview(self, *_: Any) -> None:
        if self.session.slide is None:
            return
        self.session.tissue = self.tissue_params()
        if not self.show_tissue.isChecked():
            self.session.remove_layers("tissue", "tissue pieces")
            return
        self._debounce.start()

    def _preview(self) -> None:
        """Compute the mask in a worker thread; a newer request waits for it."""
        if self._worker is not None:
            self._pending = True
            return
        from napari.qt.threading import create_worker

        slide, params = self.session.slide, self.tissue_params()
        if slide is None:
            return
        self.tissue_status.setText("computing…")

        def compute():
            mask = tissue_mask(slide, params)
            return slide, mask, tissue_pieces(mask, mpp=slide.mpp)

        worker = create_worker(compute, _start_thread=False)
        worker.returned.connect(self._show_mask)
        worker.errored.connect(
            lambda exc: self.tissue_status.setText(f"tissue detection failed: {exc}")
        )
        worker.finished.connect(self._preview_done)
        self._worker = worker
        worker.start()

    def _preview_done(self) -> None:
        self._worker = None
        if self._pending:
            self._pending = False
            self._preview()

    def _show_mask(self, computed) -> None:
        slide, mask, pieces = computed
        if slide is not self.session.slide or not self.show_tissue.isChecked():
            return  # the slide changed while the mask was computed
        self.mask = mask
        sy, sx = self.session.scale
        d = mask.downsample
        self.session.set_layer(
            "tissue",
            mask.mask.astype(np.uint8),
            {
                "name": "tissue",
                "scale": (sy * d, sx * d),
                # mask pixel (0, 0) covers level-0 px [0, d): its centre is at (d - 1) / 2
                "translate": ((d - 1) / 2 * sy, (d - 1) / 2 * sx),
                "units": self.session.units,
                "opacity": 0.3,
            },
            "labels",
        )
        self.session.set_layer(
            "tissue pieces",
            boxes_to_rectangles([p.box for p in pieces], (sy, sx)),
            {
                "name": "tissue pieces",
                "shape_type": "rectangle",
                "edge_color": "cyan",
                "face_color": "transparent",
                "edge_width": 4 * d * sx / 8,
                "units": self.session.units,
            },
            "shapes",
        )
        self.tissue_status.setText(
            f"{mask.fraction:.1%} tissue in {len(pieces)} piece(s) "
            f"(mask {mask.shape[1]}×{mask.shape[0]} px, 1:{mask.downsample:g})"
        )

    def closeEvent(self, event) -> None:
        self._debounce.stop()
        super().closeEvent(event)


__all__ = ["SlidePanel", "slide_facts_html", "thumbnail"]
