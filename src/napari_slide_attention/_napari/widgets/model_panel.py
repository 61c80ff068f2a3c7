"""The Model panel: pick a checkpoint (its kind is read from it), a device and a batch
size, and run it on the open slide in a thread worker; pieces appear as they arrive,
then the class probabilities and the slide's call."""

from __future__ import annotations

import contextlib
import functools
import html
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ...progress import Progress
from ..layers import inspect_at
from ..session import PartialResult, connect_while_alive, session_for
from . import error_html

KIND_NAMES = {
    "grid-attention": "grid attention (Tomita et al.)",
    "dual-attention": "dual attention (Raza et al.)",
    "sliding-window": "sliding-window baseline",
}


class Cancelled(Exception):
    """The user pressed Cancel; raised inside the worker at the next chunk of tiles."""


def describe_checkpoint(path: str | Path) -> tuple[str, dict[str, Any]]:
    """One line saying what a checkpoint holds, and its config; reads the header only.

    Raises:
        CheckpointError: not a checkpoint of this plugin (the message names the file).
    """
    from ...models.checkpoint import read_checkpoint

    header = read_checkpoint(path, tensors=False)
    config = header.config
    classes = config.get("classes", [])
    parts = [KIND_NAMES.get(header.kind, header.kind), f"{len(classes)} classes"]
    if "n_maps" in config:
        parts.append(f"{config['n_maps']} maps")
    if "tile_um" in config and "input_px" in config:
        parts.append(f"tiles {config['tile_um']:g} µm → {config['input_px']} px")
    epoch = header.extra.get("epoch")
    if epoch is not None:
        parts.append(f"epoch {int(epoch) + 1}")
    return " · ".join(parts) + f"\n{', '.join(classes)}", {"kind": header.kind, **config}


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # a broken torch install: the CPU choices still work
        return False


def inference_work(
    checkpoint: str,
    slide,
    *,
    device: str,
    chunk_tiles: int,
    tissue,
    cancel: threading.Event,
    tiles_done: list[int],
):
    """The run the worker drives: ``predict`` on the slide; ``tiles_done[0]`` counts
    tiles for the progress bar. Once ``cancel`` is set it stops at the next chunk of
    tiles and returns None (a cancelled run is no error to report)."""
    from ...inference import predict

    def on_tiles(n: int) -> None:
        if cancel.is_set():
            raise Cancelled
        tiles_done[0] += n

    work = predict(
        checkpoint, slide, device=device, chunk_tiles=chunk_tiles, tissue=tissue, on_tiles=on_tiles
    )
    while True:
        try:
            if cancel.is_set():
                raise Cancelled
            event = next(work)
        except StopIteration as stop:
            return stop.value
        except Cancelled:
            work.close()
            return None
        yield event


class ModelPanel(QWidget):
    """Run a checkpoint on the open slide and show what it found.

    Args:
        napari_viewer: the viewer (npe2 passes it).
    """

    def __init__(self, napari_viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self.worker = None
        self._cancel = threading.Event()
        self._tiles = [0]
        self._total_tiles = 0
        self._pieces: list = []
        self._progress = None
        self._started = 0.0
        self.config: dict[str, Any] | None = None

        layout = QVBoxLayout(self)
        form = QFormLayout()
        row = QHBoxLayout()
        self.checkpoint = QComboBox()
        self.checkpoint.setEditable(True)
        self.checkpoint.setInsertPolicy(QComboBox.NoInsert)
        self.checkpoint.setMinimumContentsLength(20)
        self.checkpoint.currentTextChanged.connect(self._on_checkpoint)
        browse = QPushButton("…")
        browse.setToolTip("Choose a checkpoint (.safetensors)")
        browse.clicked.connect(self._choose_checkpoint)
        row.addWidget(self.checkpoint, 1)
        row.addWidget(browse)
        form.addRow("checkpoint", row)
        self.kind = QLabel("no checkpoint")
        self.kind.setWordWrap(True)
        form.addRow(self.kind)
        self.device = QComboBox()
        self.device.addItems(["auto", "cuda", "cpu"])
        self.device.setToolTip("auto: the GPU when there is one")
        form.addRow("device", self.device)
        self.batch = QSpinBox()
        self.batch.setRange(1, 4096)
        self.batch.setValue(64)
        self.batch.setToolTip("tiles per forward pass (GPU memory; Cancel acts between batches)")
        form.addRow("batch size", self.batch)
        layout.addLayout(form)

        buttons = QHBoxLayout()
        self.run_button = QPushButton("Run")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        self.cancel_button.setEnabled(False)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout.addLayout(buttons)
        self.bar = QProgressBar()
        self.bar.setRange(0, 1)
        self.bar.setValue(0)
        layout.addWidget(self.bar)
        self.status = QLabel("Open a slide and choose a checkpoint.")
        self.status.setWordWrap(True)
        layout.addWidget(self.status)
        self.call = QLabel()
        self.call.setTextFormat(Qt.RichText)
        layout.addWidget(self.call)
        self.table = QTableWidget(0, 2)
        self.table.setHorizontalHeaderLabels(["class", "probability"])
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QTableWidget.NoEditTriggers)
        layout.addWidget(self.table)
        inspect_box = QGroupBox("Inspect (click a tile, glimpse or attention cell)")
        inspect = QVBoxLayout(inspect_box)
        self.inspect_title = QLabel("Click on the slide after a run.")
        self.inspect_title.setWordWrap(True)
        self.inspect_image = QLabel()
        self.inspect_image.setAlignment(Qt.AlignCenter)
        self.inspect_zoom = QPushButton("View at 1:1")
        self.inspect_zoom.setToolTip("One screen pixel per level-0 pixel, centred on it")
        self.inspect_zoom.clicked.connect(self._zoom_to_inspected)
        self.inspect_zoom.setEnabled(False)
        inspect.addWidget(self.inspect_title)
        inspect.addWidget(self.inspect_image)
        inspect.addWidget(self.inspect_zoom)
        layout.addWidget(inspect_box)
        layout.addStretch(1)
        self.inspected: dict[str, Any] | None = None
        self._install_click()

        self._poll = QTimer(self)
        self._poll.setInterval(100)
        self._poll.timeout.connect(self._show_tiles)

        self._refresh_devices()
        for path in self.session.checkpoints:
            self._offer(path)
        connect_while_alive(
            self,
            [
                (self.session.checkpoint_added, self._offer),
                (self.session.slide_opened, self._on_slide),
            ],
        )
        self._update_buttons()

    # -- choices -----------------------------------------------------------------------
    def _refresh_devices(self) -> None:
        """Find out in a worker whether CUDA is there: importing torch takes seconds,
        which the viewer should not wait for (it also warms torch for the first run)."""
        from napari.qt.threading import create_worker

        item = self.device.model().item(1)
        item.setEnabled(False)
        item.setToolTip("checking for a CUDA GPU…")
        panel = weakref.ref(self)

        def show(cuda: bool) -> None:
            if panel() is not None:
                item.setEnabled(cuda)
                item.setToolTip("" if cuda else "no CUDA GPU here")

        worker = create_worker(_cuda_available, _start_thread=False)
        worker.returned.connect(show)
        worker.start()

    def _choose_checkpoint(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Choose a checkpoint", "", "Checkpoints (*.safetensors);;All files (*)"
        )
        if path:
            self.set_checkpoint(path)

    def set_checkpoint(self, path: str | Path) -> None:
        """Choose this checkpoint (offered to every panel, e.g. as the Fine-tune base)."""
        self.session.add_checkpoint(path)  # the session's signal comes back to _offer
        self._offer(str(path))

    def _offer(self, path: str) -> None:
        index = self.checkpoint.findText(path)
        if index < 0:
            self.checkpoint.addItem(path)
            index = self.checkpoint.count() - 1
        self.checkpoint.setCurrentIndex(index)

    def _on_checkpoint(self, path: str) -> None:
        self.config = None
        if not path:
            self.kind.setText("no checkpoint")
        else:
            try:
                line, self.config = describe_checkpoint(path)
                self.kind.setText(line)
            except Exception as exc:  # CheckpointError names the file and the problem
                self.kind.setText(error_html(str(exc)))
        self._update_buttons()

    def _on_slide(self, _slide) -> None:
        self.call.clear()
        self.table.setRowCount(0)
        self._update_buttons()

    def _update_buttons(self) -> None:
        running = self.worker is not None
        self.run_button.setEnabled(
            not running and self.config is not None and self.session.slide is not None
        )
        self.cancel_button.setEnabled(running)

    # -- running -----------------------------------------------------------------------
    def run(self) -> None:
        """Start the model on the open slide in a thread worker."""
        if self.worker is not None or self.config is None or self.session.slide is None:
            return
        from napari.qt.threading import create_worker
        from napari.utils import progress

        self._cancel.clear()
        self._tiles[0] = 0
        self._total_tiles = 0
        self._pieces = []
        self.call.clear()
        self.table.setRowCount(0)
        worker = create_worker(
            inference_work,
            self.checkpoint.currentText(),
            self.session.slide,
            device=self.device.currentText(),
            chunk_tiles=self.batch.value(),
            tissue=self.session.tissue,
            cancel=self._cancel,
            tiles_done=self._tiles,
            _start_thread=False,
        )
        worker.yielded.connect(self._on_event)
        worker.returned.connect(self._on_result)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self._prepare_attention_layer()
        self._progress = progress(total=0, desc=f"{Path(self.session.slide.path).name}")
        self._started = time.perf_counter()
        self.status.setText("finding tissue…")
        self.bar.setRange(0, 0)  # busy until the tile count is known
        self._update_buttons()
        self._poll.start()
        worker.start()

    def _prepare_attention_layer(self) -> None:
        """Make the attention layer before the run (empty), so the pieces that arrive
        only update it: making a layer costs the event loop a few hundred ms with
        software OpenGL, an update a few tens."""
        n_maps = self.config.get("n_maps") if self.config else None
        if not n_maps or self.session.layer("attention") is not None:
            return
        self.session.set_layer(
            "attention",
            np.zeros((int(n_maps), 1, 1), dtype=np.float32),
            {
                "name": "attention maps (running)",
                "colormap": "inferno",
                "opacity": 0.55,
                "blending": "additive",
                "contrast_limits": (0.0, 1.0),
                "axis_labels": ("map", "y", "x"),
                "units": ("pixel", *self.session.units),
            },
            "image",
        )

    def cancel(self) -> None:
        """Stop the run at its next chunk of tiles (well within a second)."""
        if self.worker is None:
            return
        self._cancel.set()
        self.worker.quit()
        self.status.setText("cancelling…")

    def _on_event(self, event: Progress) -> None:
        if event.stage == "tissue" and "tiles" in event.data:
            self._total_tiles = int(event.data["tiles"])
            self.bar.setRange(0, max(self._total_tiles, 1))
            if self._progress is not None:
                self._progress.total = self._total_tiles
        elif event.stage == "piece" and "piece" in event.data:
            self._pieces.append(event.data["piece"])
            classes = tuple(self.config.get("classes", ())) if self.config else ()
            self.session.show_result(PartialResult(list(self._pieces), classes))
        self.status.setText(event.message)

    def _show_tiles(self) -> None:
        if not self._total_tiles:
            return
        done = min(self._tiles[0], self._total_tiles)
        self.bar.setValue(done)
        if self._progress is not None:
            self._progress.n = done
            self._progress.refresh()

    def _on_result(self, result) -> None:
        if result is None:  # cancelled
            return
        self.session.show_result(result)
        seconds = time.perf_counter() - self._started
        self.call.setText(
            f"<b>{html.escape(result.predicted_class)}</b> "
            f"({result.confidence:.0%} confidence, {result.aggregation})"
        )
        self.table.setRowCount(len(result.classes))
        order = sorted(range(len(result.classes)), key=lambda i: -result.probabilities[i])
        for row, i in enumerate(order):
            self.table.setItem(row, 0, QTableWidgetItem(result.classes[i]))
            self.table.setItem(row, 1, QTableWidgetItem(f"{result.probabilities[i]:.1%}"))
        self.status.setText(
            f"done in {seconds:.1f} s: {result.info.get('tiles', '?')} tiles on "
            f"{result.info.get('device', '?')}"
        )
        self.bar.setRange(0, 1)
        self.bar.setValue(1)

    # -- inspecting ----------------------------------------------------------------------
    def _install_click(self) -> None:
        """A click (press and release without a drag) on the canvas inspects that point."""
        panel = weakref.ref(self)

        def on_mouse(_viewer, event):
            if event.type != "mouse_press" or event.button != 1:
                return
            dragged = False
            yield
            while event.type == "mouse_move":
                dragged = True
                yield
            alive = panel()
            if not dragged and alive is not None:
                alive.inspect_world(event.position[-2:])

        self.viewer.mouse_drag_callbacks.append(on_mouse)
        self.destroyed.connect(functools.partial(_remove_callback, self.viewer, on_mouse))

    def inspect_world(self, world_yx) -> dict[str, Any] | None:
        """Show what the result says at a world (y, x) point, with the level-0 pixels of
        its tile or glimpse (read in a worker)."""
        result, slide = self.session.result, self.session.slide
        if result is None or slide is None:
            return None
        x, y = self.session.to_level0(*world_yx)
        map_index = None
        layer = self.session.layer("attention")
        if layer is not None and "map_order" in layer.metadata:
            step = self.viewer.dims.current_step[self.viewer.dims.ndim - layer.ndim]
            order = layer.metadata["map_order"]
            map_index = int(order[min(max(int(step), 0), len(order) - 1)])
        found = inspect_at(result, x, y, map_index)
        self.inspected = found
        self.inspect_zoom.setEnabled(found is not None)
        if found is None:
            self.inspect_title.setText("The model said nothing about this point.")
            self.inspect_image.clear()
            return None
        self.inspect_title.setText(html.escape(found["title"]))
        from napari.qt.threading import create_worker

        bx, by, bw, bh = found["box"]
        worker = create_worker(slide.read_region, 0, bx, by, bw, bh, _start_thread=False)
        worker.returned.connect(self._show_inspected_pixels)
        worker.start()
        return found

    def _show_inspected_pixels(self, pixels) -> None:
        from .slide_panel import thumbnail

        side = max(pixels.shape[:2])
        shown = min(side, 320)
        self.inspect_image.setPixmap(thumbnail(pixels, shown))
        if shown < side:
            self.inspect_title.setText(
                self.inspect_title.text() + f" (level 0, {side} px, shown at 1:{side / shown:.2g})"
            )

    def _zoom_to_inspected(self) -> None:
        if self.inspected is None:
            return
        x, y, w, h = self.inspected["box"]
        camera = self.session.camera
        camera.center = self.session.to_world(x + w / 2, y + h / 2)
        camera.zoom = 1.0 / self.session.scale[1]  # one screen px per level-0 px

    def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, Cancelled) or self._cancel.is_set():
            self.status.setText("cancelled")
        else:
            self.status.setText(error_html(f"{type(exc).__name__}: {exc}"))

    def _on_finished(self) -> None:
        self._poll.stop()
        if self._cancel.is_set() and not self.status.text().startswith("done"):
            self.status.setText("cancelled")
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        if self.bar.maximum() == 0:
            self.bar.setRange(0, 1)
        self.worker = None
        self._update_buttons()


def _remove_callback(viewer, callback) -> None:
    with contextlib.suppress(ValueError, RuntimeError):
        viewer.mouse_drag_callbacks.remove(callback)


__all__ = ["Cancelled", "ModelPanel", "describe_checkpoint", "inference_work"]
