"""The Model panel: pick a checkpoint (its kind is read from it), a device and a batch
size, and run it on the open slide in a thread worker; pieces appear as they arrive,
then the class probabilities and the slide's call. A result is saved to a folder and
opened again (with its slide) from here.

A run is one ``jobs.Job`` over ``inference.predict``: the worker drives ``job.events()``,
the bar follows its "tiles" events, and Cancel is ``job.stop("cancelled")``.
"""

from __future__ import annotations

import contextlib
import functools
import html
import os
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Qt
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

from ...jobs import Job, Progress, Stopped
from ...results import ResultError, SlideResult, is_result_directory
from ...slide.reader import SlideError
from ..layers import inspect_at
from ..reader import open_result_slide, result_slide_path
from ..session import PartialResult, connect_while_alive, session_for
from . import error_html

KIND_NAMES = {
    "grid-attention": "grid attention (Tomita et al.)",
    "dual-attention": "dual attention (Raza et al.)",
    "sliding-window": "sliding-window baseline",
}
# The kinds whose predict reads every tissue tile in batches (takes ``chunk_tiles``); the
# dual model reads its N sampled tiles, and ``predict`` refuses a batch size for it.
BATCHED_KINDS = ("grid-attention", "sliding-window")

SLIDE_FILTER = "Slides (*.svs *.ndpi *.tif *.tiff *.btf *.tf8 *.zarr *.dcm);;All files (*)"


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


def inference_work(checkpoint: str, slide, **options: Any):
    """``predict(checkpoint, slide, **options)``, imported in the worker's thread when the
    job starts (importing torch takes the viewer seconds); yields its events and returns
    its ``SlideResult``. Closing it (``Job.stop``) closes ``predict``'s generator."""
    from ...inference import predict

    return (yield from predict(checkpoint, slide, **options))


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
        self.job: Job | None = None
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
        files = QHBoxLayout()
        self.open_button = QPushButton("Open result…")
        self.open_button.setToolTip(
            "Open a saved result folder: its slide (asked for when it has moved) and overlays"
        )
        self.open_button.clicked.connect(lambda: self.open_result())
        self.save_button = QPushButton("Save result…")
        self.save_button.setToolTip("Save the result on show into a folder")
        self.save_button.clicked.connect(lambda: self.save_result())
        files.addWidget(self.open_button)
        files.addWidget(self.save_button)
        layout.addLayout(files)
        self._folder = ""  # the last folder a result was saved to or opened from
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

        self._refresh_devices()
        for path in self.session.checkpoints:
            self._offer(path)
        connect_while_alive(
            self,
            [
                (self.session.checkpoint_added, self._offer),
                (self.session.slide_opened, self._on_slide),
                (self.session.result_shown, self._on_result_shown),
            ],
        )
        if isinstance(self.session.result, SlideResult):  # a result dropped before the panel
            self._show_call(self.session.result)
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
        self.batch.setEnabled(self.config is None or self.config.get("kind") in BATCHED_KINDS)
        self.run_button.setEnabled(
            not running and self.config is not None and self.session.slide is not None
        )
        self.cancel_button.setEnabled(running)
        self.open_button.setEnabled(not running)
        self.save_button.setEnabled(not running and isinstance(self.session.result, SlideResult))

    # -- running -----------------------------------------------------------------------
    def run(self) -> None:
        """Start the model on the open slide in a thread worker."""
        if self.worker is not None or self.config is None or self.session.slide is None:
            return
        from napari.qt.threading import create_worker
        from napari.utils import progress

        self._pieces = []
        self.call.clear()
        self.table.setRowCount(0)
        options: dict[str, Any] = {"device": self.device.currentText()}
        if self.session.tissue is not None:
            options["tissue"] = self.session.tissue
        if self.config.get("kind") in BATCHED_KINDS:
            options["chunk_tiles"] = self.batch.value()
        self.job = Job(inference_work(self.checkpoint.currentText(), self.session.slide, **options))
        worker = create_worker(
            self.job.events,
            _start_thread=False,
            _connect={
                "yielded": self._on_event,
                "returned": self._on_result,
                "errored": self._on_error,  # (without it, the worker re-raises errors)
                "finished": self._on_finished,
            },
        )
        self.worker = worker
        self._prepare_layers()
        self._progress = progress(total=0, desc=f"{Path(self.session.slide.path).name}")
        self._started = time.perf_counter()
        self.status.setText("finding tissue…")
        self.bar.setFormat("%p%")
        self.bar.setRange(0, 0)  # busy until the tile count is known
        self._update_buttons()
        worker.start()

    def _prepare_layers(self) -> None:
        """Make the layer the pieces are drawn into before the run (empty): the attention
        maps of a grid model, the tile probabilities of a sliding window. The pieces that
        arrive then only update it: making a layer costs the event loop a few hundred ms
        with software OpenGL, an update a few tens."""
        config = self.config or {}
        if config.get("kind") == "sliding-window":
            role, depth, name, colormap, axis = (
                "tile probabilities",
                len(config.get("classes", ())),
                "tile probabilities (running)",
                "viridis",
                "class",
            )
        else:
            role, depth, name, colormap, axis = (
                "attention",
                config.get("n_maps"),
                "attention maps (running)",
                "inferno",
                "map",
            )
        if not depth or self.session.layer(role) is not None:
            return
        self.session.set_layer(
            role,
            np.zeros((int(depth), 1, 1), dtype=np.float32),
            {
                "name": name,
                "colormap": colormap,
                "opacity": 0.55,
                "blending": "additive",
                "contrast_limits": (0.0, 1.0),
                "axis_labels": (axis, "y", "x"),
                "units": ("pixel", *self.session.units),
            },
            "image",
        )

    def cancel(self) -> None:
        """Stop the run at its next event (a chunk of tiles, or a sampled tile of a dual
        model: well within a second)."""
        if self.worker is None or self.job is None:
            return
        self.job.stop("cancelled")
        self.status.setText("cancelling…")

    def _on_event(self, event: Progress) -> None:
        if event.stage == "tiles":
            if event.total:
                self.bar.setFormat("%v / %m tiles")
                self.bar.setRange(0, event.total)
                self.bar.setValue(min(event.done, event.total))
            if self._progress is not None:
                self._progress.total = event.total
                self._progress.n = event.done
                self._progress.refresh()
            return  # the bar counts them; the status keeps the last piece's line
        if event.stage == "piece" and "piece" in event.data:
            self._pieces.append(event.data["piece"])
            classes = tuple(self.config.get("classes", ())) if self.config else ()
            self.session.show_result(PartialResult(list(self._pieces), classes))
        self.status.setText(event.message)

    def _on_result(self, result: SlideResult) -> None:
        self.session.show_result(result)  # the call and table come back through result_shown
        seconds = time.perf_counter() - self._started
        self.status.setText(
            f"done in {seconds:.1f} s: {result.info.get('tiles', '?')} tiles on "
            f"{result.info.get('device', '?')}"
        )
        if self.bar.maximum() <= 0:
            self.bar.setRange(0, 1)
        self.bar.setValue(self.bar.maximum())

    def _on_result_shown(self, result) -> None:
        if isinstance(result, SlideResult):
            self._show_call(result)
        self._update_buttons()

    def _show_call(self, result: SlideResult) -> None:
        """The slide's call and its class probabilities, most probable first."""
        self.call.setText(
            f"<b>{html.escape(result.predicted_class)}</b> "
            f"({result.confidence:.0%} confidence, {result.aggregation})"
        )
        self.table.setRowCount(len(result.classes))
        order = sorted(range(len(result.classes)), key=lambda i: -result.probabilities[i])
        for row, i in enumerate(order):
            self.table.setItem(row, 0, QTableWidgetItem(result.classes[i]))
            self.table.setItem(row, 1, QTableWidgetItem(f"{result.probabilities[i]:.1%}"))

    # -- saving and opening results ------------------------------------------------------
    def save_result(self, directory: str | os.PathLike | None = None) -> Path | None:
        """Save the result on show into a folder (asked for when not given); returns the
        result folder, or None.

        An empty folder or an earlier result folder is written into (replacing the
        result there); any other folder gets a new result folder inside it, named after
        the slide and the model kind.
        """
        result = self.session.result
        if not isinstance(result, SlideResult):
            return None
        if directory is None:
            directory = QFileDialog.getExistingDirectory(
                self, "Save the result into a folder", self._folder
            )
            if not directory:
                return None
        try:
            saved = result.save(_result_folder(Path(directory), result))
        except (ResultError, OSError, ValueError) as exc:
            self.status.setText(error_html(f"not saved: {exc}"))
            return None
        self._folder = str(saved.parent)
        self.status.setText(f"result saved to {saved}")
        return saved

    def open_result(self, directory: str | os.PathLike | None = None) -> SlideResult | None:
        """Open a result folder (asked for when not given) and show it over its slide as
        after a run; returns the result, or None.

        Its slide is opened unless it is the one on show; when it is not where the result
        says (moved), a file dialog asks for it.
        """
        if self.worker is not None:
            return None
        if directory is None:
            directory = QFileDialog.getExistingDirectory(self, "Open a result folder", self._folder)
            if not directory:
                return None
        directory = Path(directory)
        try:
            result = SlideResult.load(directory)
        except ResultError as exc:
            hint = "" if is_result_directory(directory) else " (not a result folder)"
            self.status.setText(error_html(f"{exc}{hint}"))
            return None
        self._folder = str(directory.parent)
        if not self._is_open_slide(result, directory):
            chosen = None
            if result_slide_path(result, directory) is None:
                chosen, _ = QFileDialog.getOpenFileName(
                    self,
                    f"Where is {Path(result.slide).name}? (not found at {result.slide})",
                    str(directory.parent),
                    SLIDE_FILTER,
                )
                if not chosen:
                    self.status.setText(
                        error_html(f"not opened: the slide {result.slide} was not found")
                    )
                    return None
            slide, problem = open_result_slide(result, directory, chosen)
            if slide is None:
                self.status.setText(error_html(f"not opened: {problem}"))
                return None
            self.session.show_slide(slide)
        self.session.show_result(result)
        self.status.setText(f"opened the result in {directory.name}")
        return result

    def _is_open_slide(self, result: SlideResult, directory: Path) -> bool:
        """Whether the slide on show is the one the result was made on."""
        slide = self.session.slide
        where = result_slide_path(result, directory)
        if slide is None or where is None:
            return False
        try:
            return Path(slide.path).resolve() == where.resolve()
        except (OSError, RuntimeError):
            return False

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
        if isinstance(exc, Stopped):  # Cancel: no error to report
            self.status.setText(exc.reason)
        elif isinstance(exc, (SlideError, ValueError, OSError)):
            # bad input: the same line the command line prints (file and problem)
            self.status.setText(error_html(str(exc)))
        else:  # a failure nobody foresaw: say so, as the command line does
            self.status.setText(error_html(f"internal error: {type(exc).__name__}: {exc}"))

    def _on_finished(self) -> None:
        if self.job is not None and self.job.stopping and not self.status.text().startswith("done"):
            self.status.setText(self.job.reason)
        self.job = None
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        if self.bar.maximum() == 0:
            self.bar.setRange(0, 1)
        self.worker = None
        self._update_buttons()


def _result_folder(directory: Path, result: SlideResult) -> Path:
    """Where a result saved into ``directory`` goes: there when it is empty (or absent)
    or a result folder, else a new folder inside named after the slide and the model."""
    if not directory.exists() or is_result_directory(directory) or not any(directory.iterdir()):
        return directory
    stem = f"{Path(result.slide).stem}.{result.model_kind}"
    target, n = directory / stem, 1
    while target.exists():
        n += 1
        target = directory / f"{stem}-{n}"
    return target


def _remove_callback(viewer, callback) -> None:
    with contextlib.suppress(ValueError, RuntimeError):
        viewer.mouse_drag_callbacks.remove(callback)


__all__ = ["ModelPanel", "describe_checkpoint", "inference_work"]
