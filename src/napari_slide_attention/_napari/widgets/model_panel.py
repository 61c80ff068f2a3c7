"""The Model panel: pick a checkpoint (its kind is read from it), a device and a batch
size, and run it on the open slide in a thread worker; pieces appear as they arrive,
then the class probabilities and the slide's call."""

from __future__ import annotations

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
from ..session import PartialResult, connect_while_alive, session_for

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
        layout.addStretch(1)

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
                self.kind.setText(f"<span style='color:#e05050'>{html.escape(str(exc))}</span>")
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

    def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, Cancelled) or self._cancel.is_set():
            self.status.setText("cancelled")
        else:
            self.status.setText(
                f"<span style='color:#e05050'>{html.escape(type(exc).__name__)}: "
                f"{html.escape(str(exc))}</span>"
            )

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


__all__ = ["Cancelled", "ModelPanel", "describe_checkpoint", "inference_work"]
