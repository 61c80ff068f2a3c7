"""The Tour panel: steps the camera through what the model looked at, in order.

A grid-attention result is toured through the top attention tiles of a chosen map; a
dual-attention result through its sampled tiles and then each tile's glimpses. Each
stop is shown at the magnification the model used, the way a pathologist moves under
the microscope; the stop's box is outlined in a shapes layer "tour".

The panel binds no keys (another panel owns the number keys and PageUp/PageDown).
"""

from __future__ import annotations

from typing import Any

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..layers import boxes_to_rectangles, map_ranking
from ..session import connect_while_alive, session_for
from ..tour import (
    ATTENTION,
    SAMPLED,
    VIEW_PX,
    TourStop,
    attention_tour,
    sampled_tour,
    supported_tours,
)

__all__ = ["TourPanel"]

# The tours the mode box offers, in its order.
MODES = ((ATTENTION, "attention map: top tiles"), (SAMPLED, "sampled tiles and glimpses"))
NO_RESULT = "Run a model in the Model panel first: the tour follows its result."
# The outline of the stop on show: yellow stands out on H&E's pinks and purples.
HIGHLIGHT = "#ffd400"
# The outline's width in screen px at the stop's zoom.
HIGHLIGHT_PX = 3.0


class TourPanel(QWidget):
    """Steps the camera through the model's attention tiles, or its sampled tiles and
    glimpses, one stop at a time or playing on a timer.

    Attributes:
        stops: the current tour.
        index: the stop on show (-1 before the first).
    """

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self.stops: list[TourStop] = []
        self.index = -1
        self._view_px = VIEW_PX
        self._syncing = False  # set while the panel itself moves the map slider

        self.mode = QComboBox()
        for key, text in MODES:
            self.mode.addItem(text, key)
        self.mode.setToolTip(
            "Grid models: the strongest tiles of one attention map.\n"
            "Dual models: the sampled tiles in rank order, each followed by its glimpses."
        )
        self.glimpses = QCheckBox("each tile's glimpses")
        self.glimpses.setChecked(True)
        self.map_choice = QComboBox()
        self.map_choice.setToolTip(
            "Maps by their weight in the predicted class, strongest first; "
            "choosing one also moves the attention layer's slider"
        )
        self.count = QSpinBox()
        self.count.setRange(1, 500)
        self.count.setValue(8)
        self.count.setToolTip(
            "How many tiles: the top attention tiles of the map, or the first sampled tiles"
        )
        self.interval = QDoubleSpinBox()
        self.interval.setRange(0.1, 60.0)
        self.interval.setSingleStep(0.5)
        self.interval.setDecimals(1)
        self.interval.setValue(2.0)
        self.interval.setSuffix(" s")
        self.interval.setToolTip("Time at each stop while playing")

        self.previous_button = QPushButton("◀ Previous")
        self.next_button = QPushButton("Next ▶")
        self.play_button = QPushButton("Play")
        self.stop_button = QPushButton("Stop")
        self.title = QLabel(NO_RESULT)
        self.title.setWordWrap(True)
        self.position = QLabel("")

        form = QFormLayout()
        form.addRow("tour", self.mode)
        form.addRow("", self.glimpses)
        form.addRow("map", self.map_choice)
        form.addRow("tiles", self.count)
        form.addRow("every", self.interval)
        buttons = QHBoxLayout()
        for button in (self.previous_button, self.next_button, self.play_button, self.stop_button):
            buttons.addWidget(button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.title)
        layout.addWidget(self.position)
        layout.addStretch(1)

        self._timer = QTimer(self)
        self._timer.timeout.connect(self._advance)
        self.previous_button.clicked.connect(self.previous)
        self.next_button.clicked.connect(self.next)
        self.play_button.clicked.connect(self.play)
        self.stop_button.clicked.connect(self.stop)
        self.interval.valueChanged.connect(self._on_interval)
        self.mode.currentIndexChanged.connect(self._on_mode)
        self.map_choice.currentIndexChanged.connect(self._on_map)
        self.count.valueChanged.connect(lambda _: self._build())
        self.glimpses.toggled.connect(lambda _: self._build())

        connections = [
            (self.session.result_shown, self._on_result),
            (self.session.slide_opened, self._on_slide),
            (self.viewer.dims.events.point, self._on_dims),
        ]
        connect_while_alive(self, connections)
        self._on_result(self.session.result)

    # -- the tour --------------------------------------------------------------------
    @property
    def tour(self) -> str | None:
        """The tour chosen in the mode box (``ATTENTION`` or ``SAMPLED``)."""
        return self.mode.currentData()

    @property
    def map_index(self) -> int | None:
        """The original number of the map chosen (None without maps)."""
        return self.map_choice.currentData()

    def next(self) -> None:
        """Go to the next stop (the first one before the tour started)."""
        if self.index + 1 < len(self.stops):
            self.go(self.index + 1)

    def previous(self) -> None:
        """Go to the previous stop."""
        if self.index > 0:
            self.go(self.index - 1)

    def play(self) -> None:
        """Step through the stops every ``interval`` seconds (from the start when at the end)."""
        if not self.stops:
            return
        if self.index < 0 or self.index + 1 >= len(self.stops):
            self.go(0)
        self._timer.start(round(self.interval.value() * 1000))
        self._update_buttons()

    def stop(self) -> None:
        """Stop playing (the camera stays where it is)."""
        self._timer.stop()
        self._update_buttons()

    def go(self, index: int) -> None:
        """Move the camera to stop ``index`` and outline its box."""
        if self._canvas_px() != self._view_px:
            # the canvas was resized: the zooms were computed for the old size
            self._build(keep=index)
        if not 0 <= index < len(self.stops):
            return
        self.index = index
        stop = self.stops[index]
        if self.tour == ATTENTION and self.map_index is not None:
            self._show_map(self.map_index)
        camera = self.session.camera
        camera.center = stop.centre
        camera.zoom = stop.zoom
        self._highlight(stop)
        self.title.setText(stop.title)
        self.position.setText(f"stop {index + 1} of {len(self.stops)} ({stop.kind})")
        self._update_buttons()

    # -- building --------------------------------------------------------------------
    def _on_result(self, result: Any) -> None:
        tours = supported_tours(result)
        model = self.mode.model()
        for row, (key, _) in enumerate(MODES):
            model.item(row).setEnabled(key in tours)
        self.mode.blockSignals(True)
        if tours and self.tour not in tours:
            self.mode.setCurrentIndex([key for key, _ in MODES].index(tours[0]))
        self.mode.blockSignals(False)
        self._fill_maps(result if ATTENTION in tours else None)
        self._build()

    def _on_slide(self, _slide: Any) -> None:
        self.session.remove_layers("tour")
        self._on_result(self.session.result)  # None: opening a slide forgets the result

    def _on_mode(self, _row: int) -> None:
        self._build()

    def _on_map(self, _row: int) -> None:
        if self.tour == ATTENTION and self.map_index is not None and not self._syncing:
            self._show_map(self.map_index)
        self._build()

    def _on_interval(self, seconds: float) -> None:
        if self._timer.isActive():
            self._timer.setInterval(round(seconds * 1000))

    def _fill_maps(self, result: Any) -> None:
        """List the result's maps strongest first, choosing the strongest."""
        self.map_choice.blockSignals(True)
        self.map_choice.clear()
        if result is not None:
            order, weights = map_ranking(result)
            for rank, (k, weight) in enumerate(zip(order, weights, strict=True), start=1):
                self.map_choice.addItem(f"map {k} (#{rank}, weight {weight:.3g})", int(k))
        self.map_choice.blockSignals(False)

    def _build(self, keep: int | None = None) -> None:
        """Make the tour of the current result and choices; ``keep``: the stop to stay at."""
        self._timer.stop()
        result = self.session.result
        tours = supported_tours(result)
        self._view_px = self._canvas_px()
        self.stops = []
        message = NO_RESULT
        if self.tour in tours:
            try:
                if self.tour == ATTENTION:
                    self.stops = attention_tour(
                        result,
                        self.map_index,
                        self.session.scale,
                        top=self.count.value(),
                        view_px=self._view_px,
                    )
                else:
                    self.stops = sampled_tour(
                        result,
                        self.session.scale,
                        glimpses=self.glimpses.isChecked(),
                        tiles=self.count.value(),
                        view_px=self._view_px,
                    )
                message = (
                    f"{len(self.stops)} stops: press Next or Play."
                    if self.stops
                    else "This result gives no stops (no attention on any tile)."
                )
            except ValueError as error:  # a result the tour cannot read: say why
                message = f"No tour: {error}"
        elif tours:
            message = "This result does not support that tour; choose another."
        self.mode.setEnabled(bool(tours))
        self.glimpses.setEnabled(self.tour == SAMPLED and SAMPLED in tours)
        self.map_choice.setEnabled(self.tour == ATTENTION and ATTENTION in tours)
        self.count.setEnabled(bool(tours))
        if keep is not None and 0 <= keep < len(self.stops):
            self.index = keep  # the caller moves there
        else:
            self.index = -1
            self.session.remove_layers("tour")
            self.title.setText(message)
            self.position.setText("")
        self._update_buttons()

    def _update_buttons(self) -> None:
        playing = self._timer.isActive()
        self.previous_button.setEnabled(self.index > 0)
        self.next_button.setEnabled(self.index + 1 < len(self.stops))
        self.play_button.setEnabled(bool(self.stops) and not playing)
        self.stop_button.setEnabled(playing)

    def _advance(self) -> None:
        if self.index + 1 < len(self.stops):
            self.go(self.index + 1)
        if self.index + 1 >= len(self.stops):
            self.stop()

    # -- the viewer ------------------------------------------------------------------
    def _highlight(self, stop: TourStop) -> None:
        """Outline the stop's box in the "tour" layer, leaving the layer selection alone."""
        active = self.viewer.layers.selection.active
        width = HIGHLIGHT_PX / stop.zoom
        layer = self.session.set_layer(
            "tour",
            boxes_to_rectangles([stop.box], self.session.scale),
            {
                "name": "tour",
                "shape_type": "rectangle",
                "edge_color": HIGHLIGHT,
                "face_color": "transparent",
                "edge_width": width,
                "units": self.session.units,
                "metadata": {"stop": self.index, "title": stop.title, "box": stop.box},
            },
            "shapes",
        )
        layer.edge_width = [width] * layer.nshapes  # an updated layer keeps its old widths
        if active is not None and active is not layer and active in self.viewer.layers:
            self.viewer.layers.selection.active = active

    def _show_map(self, map_index: int) -> None:
        """Move the attention layer's map slider to an original map number."""
        layer = self.session.layer("attention")
        order = list(layer.metadata.get("map_order", ())) if layer is not None else []
        if map_index not in order:
            return
        axis = self.viewer.dims.ndim - layer.ndim  # the layer's map axis in the world
        if axis < 0:
            return
        value = layer.translate[0] + order.index(map_index) * layer.scale[0]
        self._syncing = True
        try:
            self.viewer.dims.set_point(axis, value)
        finally:
            self._syncing = False

    def _on_dims(self, _event: Any = None) -> None:
        """Follow the attention layer's map slider when the user moves it."""
        if self._syncing or self.tour != ATTENTION:
            return
        layer = self.session.layer("attention")
        axis = self.viewer.dims.ndim - layer.ndim if layer is not None else -1
        if axis < 0:
            return
        order = list(layer.metadata.get("map_order", ()))
        position = round((self.viewer.dims.point[axis] - layer.translate[0]) / layer.scale[0])
        if not 0 <= position < len(order) or order[position] == self.map_index:
            return
        row = self.map_choice.findData(order[position])
        if row >= 0:
            self._syncing = True
            try:
                self.map_choice.setCurrentIndex(row)
            finally:
                self._syncing = False

    def _canvas_px(self) -> int:
        """The smaller side of the viewer's canvas in screen px (``VIEW_PX`` if unknown)."""
        canvas = getattr(self.viewer, "canvas", None)
        size = getattr(canvas, "size", None) or getattr(self.viewer, "_canvas_size", None)
        try:
            side = int(min(size))
        except (TypeError, ValueError):
            return VIEW_PX
        return side if side >= 64 else VIEW_PX  # a canvas not laid out yet

    def closeEvent(self, event) -> None:
        self._timer.stop()
        super().closeEvent(event)
