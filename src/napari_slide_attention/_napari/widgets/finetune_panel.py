"""The Fine-tune panel: train a checkpoint further on the cohort with its corrected labels.

Start runs ``slide-attention train ... --init BASE --events`` as a separate process (an
out-of-memory kill or a crash in training ends that process, never the viewer) and
follows it from a thread worker (``finetune.fine_tune``): per-step progress, the loss
per step and the validation loss and mean F1 per epoch in a live plot, Stop that ends
the run at its next step and keeps its checkpoints; at the end a before/after table of
the base and the new best checkpoint on the validation split, and the new checkpoint
offered in the Model panel. Nothing here blocks the GUI thread: the checkpoint's header
is read in the worker too (reading it imports torch).
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any

from qtpy.QtCore import QEvent, Qt
from qtpy.QtGui import QValidator
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ...jobs import Job
from ...labels import LabelStore
from ..finetune import FineTuneOutcome, FineTuneRequest, ProcessJob, epoch_row, fine_tune
from ..session import connect_while_alive, session_for
from . import error_html
from .plot import LinePlot

__all__ = ["FineTunePanel", "ScientificSpinBox"]

BLOCKS_TIP = (
    "How many of the ResNet trunk's last stages train (grid attention; the dual model's "
    "parts all train).\n1 = the last residual stage (layer4), the paper's choice; "
    "4 = every residual stage; 5 = the whole trunk, stem included.\nMore blocks: more "
    "memory and time per step, and more to overfit on a small cohort."
)
TILE_LABELS_TIP = (
    "Dual attention: what each sampled tile is labelled with for the glimpse model.\n"
    "slide: its slide's class (the paper).\nregions: the class of the regions it overlaps "
    "(the cohort's lesion boxes, replaced by the label store's regions on the slides that "
    "have some: tiles relabelled in the Review panel count), the lowest-risk class when it "
    "touches none; the slide then takes its highest-risk tile's class."
)
EXTRA_TIP = (
    "More options of `slide-attention train`, added last, e.g.\n"
    "--chunk-tiles 32 --set lr_decay=1 --set select=f1 --amp\n"
    "(the model's shape, its classes and --init come from the base checkpoint)."
)
# The bar counts this many units over the whole run (steps within epochs).
_BAR_UNITS = 1000


class ScientificSpinBox(QDoubleSpinBox):
    """A spin box for learning rates: shows ``1e-04``, steps through 1, 2, 5 per decade."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setDecimals(12)
        self.setRange(1e-9, 1.0)
        self.setKeyboardTracking(False)

    def textFromValue(self, value: float) -> str:  # Qt's name
        return f"{value:.3g}" if 1e-3 <= value < 1 else f"{value:.2e}".replace(".00e", "e")

    def valueFromText(self, text: str) -> float:  # Qt's name
        return float(text)

    def validate(self, text: str, pos: int):  # Qt's signature
        try:
            value = float(text)
        except ValueError:
            # a number being typed ("1e", "3.") is not wrong yet
            partial = text.strip().lower().rstrip("e-+.") or "0"
            try:
                float(partial)
            except ValueError:
                return QValidator.Invalid, text, pos
            return QValidator.Intermediate, text, pos
        ok = self.minimum() <= value <= self.maximum()
        return (QValidator.Acceptable if ok else QValidator.Intermediate), text, pos

    def stepBy(self, steps: int) -> None:  # Qt's name
        value = self.value()
        for _ in range(abs(steps)):
            value = _next_125(value, up=steps > 0)
        self.setValue(value)


def _next_125(value: float, up: bool) -> float:
    """Returns the next value of the 1-2-5 sequence above (or below) ``value``."""
    decade = 10 ** math.floor(math.log10(value))
    ladder = [decade * m for m in (0.5, 1, 2, 5, 10, 20)]
    if up:
        return next(v for v in ladder if v > value * (1 + 1e-9))
    return next(v for v in reversed(ladder) if v < value * (1 - 1e-9))


class FineTunePanel(QWidget):
    """Fine-tune a checkpoint on the cohort and its corrected labels.

    Args:
        napari_viewer: the viewer (npe2 passes it).
        parent: the parent widget.

    Attributes:
        outcome: how the latest run ended (None before one ends).
        job: the latest run's process control (None before the first Start).
    """

    def __init__(self, napari_viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self.worker = None
        self.job: Job | None = None  # the fine-tune, driven from the worker
        self.process: ProcessJob | None = None  # its processes, which Stop reaches
        self.outcome: FineTuneOutcome | None = None
        self._request: FineTuneRequest | None = None
        self._steps: tuple[list[float], list[float]] = ([], [])
        self._rows: list[dict[str, Any]] = []
        self._jobs: list[Job] = []

        layout = QVBoxLayout(self)
        form = QFormLayout()
        self.cohort = QLineEdit()
        self.cohort.setPlaceholderText("cohort CSV (slide,label,split,...)")
        form.addRow("cohort", self._with_browse(self.cohort, self._choose_cohort))
        self.labels = QLineEdit()
        self.labels.setPlaceholderText("none: the CSV's labels as they are")
        self.labels.setToolTip("The label store whose corrections the training applies")
        form.addRow("labels", self._with_browse(self.labels, self._choose_labels))
        self.base = QComboBox()
        self.base.setEditable(True)
        self.base.setInsertPolicy(QComboBox.NoInsert)
        self.base.setMinimumContentsLength(20)
        self.base.setToolTip("The checkpoint to start from (grid or dual attention)")
        form.addRow("base checkpoint", self._with_browse(self.base, self._choose_base))
        self.out = QLineEdit()
        self.out.setPlaceholderText("default: <base run>/finetune-<date-time>")
        form.addRow("out folder", self._with_browse(self.out, self._choose_out))
        self.epochs = QSpinBox()
        self.epochs.setRange(1, 10_000)
        self.epochs.setValue(10)
        form.addRow("epochs", self.epochs)
        self.lr = ScientificSpinBox()
        self.lr.setValue(1e-4)
        self.lr.setToolTip(
            "Initial learning rate (Adam; the run's schedule decays it). Lower than "
            "training from scratch (1e-3), so the base's weights are refined, not lost."
        )
        form.addRow("learning rate", self.lr)
        self.blocks = QSpinBox()
        self.blocks.setRange(1, 5)
        self.blocks.setValue(1)
        self.blocks.setToolTip(BLOCKS_TIP)
        form.addRow("trainable blocks", self.blocks)
        self.tile_labels = QComboBox()
        self.tile_labels.addItem("slide (the paper)", "slide")
        self.tile_labels.addItem("regions (lesion boxes, label store)", "regions")
        self.tile_labels.setToolTip(TILE_LABELS_TIP)
        form.addRow("tile labels (dual)", self.tile_labels)
        self.device = QComboBox()
        self.device.addItems(["auto", "cuda", "cpu"])
        self.device.setToolTip("auto: the GPU when there is one")
        form.addRow("device", self.device)
        self.extra = QLineEdit()
        self.extra.setPlaceholderText("more train options (optional)")
        self.extra.setToolTip(EXTRA_TIP)
        form.addRow("options", self.extra)
        layout.addLayout(form)

        buttons = QHBoxLayout()
        self.start_button = QPushButton("Start")
        self.start_button.clicked.connect(self.start)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("End the run at its next step; its checkpoints stay")
        self.stop_button.clicked.connect(self.stop)
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.stop_button)
        layout.addLayout(buttons)
        self.bar = QProgressBar()
        self.bar.setRange(0, _BAR_UNITS)
        self.bar.setValue(0)
        self.bar.setFormat("")
        layout.addWidget(self.bar)
        self.status = QLabel("Choose a cohort and a base checkpoint, then Start.")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextSelectableByMouse)
        layout.addWidget(self.status)
        self.error = QPlainTextEdit()
        self.error.setReadOnly(True)
        self.error.setLineWrapMode(QPlainTextEdit.NoWrap)
        self.error.setMaximumHeight(160)
        self.error.setVisible(False)
        layout.addWidget(self.error)
        self.loss_plot = LinePlot("loss", "epoch")
        self.metric_plot = LinePlot("validation", "epoch")
        layout.addWidget(self.loss_plot)
        layout.addWidget(self.metric_plot)
        self.table = QTableWidget(0, 4)
        self.table.setHorizontalHeaderLabels(["metric", "before", "after", "change"])
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeToContents)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QTableWidget.NoEditTriggers)
        self.table.setVisible(False)
        layout.addWidget(self.table)
        layout.addStretch(1)

        for path in self.session.checkpoints:
            self._offer(path)
        connect_while_alive(
            self,
            [
                (self.session.checkpoint_added, self._offer),
                (self.session.cohort_opened, self._on_cohort),
            ],
        )
        # a run must not outlive its panel: stopped when the viewer deletes the panel
        # (and when napari closes its dock, in changeEvent)
        jobs = self._jobs
        self.destroyed.connect(lambda *_: [job.stop() for job in jobs])
        if self.session.cohort_path is not None:
            self._on_cohort(self.session.cohort)
        self._update_buttons()

    def changeEvent(self, event) -> None:  # Qt's name
        """Stops the run when the panel leaves the window: napari's dock close button
        takes the panel out of its dock (no parent) without deleting it."""
        super().changeEvent(event)
        if event.type() == QEvent.ParentChange and self.parent() is None and self.running:
            self.stop()

    # -- choices -----------------------------------------------------------------------
    @staticmethod
    def _with_browse(field: QWidget, choose) -> QHBoxLayout:
        row = QHBoxLayout()
        browse = QPushButton("…")
        browse.setToolTip("Browse")
        browse.clicked.connect(choose)
        row.addWidget(field, 1)
        row.addWidget(browse)
        return row

    def _on_cohort(self, _cohort) -> None:
        """The session's cohort and its label store fill the fields."""
        if self.running or self.session.cohort_path is None:
            return
        self.cohort.setText(str(self.session.cohort_path))
        store = getattr(self.session.labels, "path", None)
        self.labels.setText(str(store) if store else "")

    def _offer(self, path: str) -> None:
        """A checkpoint offered in the session becomes the base (the newest is chosen)."""
        index = self.base.findText(path)
        if index < 0:
            self.base.addItem(path)
            index = self.base.count() - 1
        if not self.running:
            self.base.setCurrentIndex(index)

    def _choose_cohort(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Choose a cohort", "", "Cohort CSV (*.csv);;All files (*)"
        )
        if path:
            self.cohort.setText(path)
            store = LabelStore.default_path(path)
            self.labels.setText(str(store) if store.is_file() else "")

    def _choose_labels(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Choose a label store", "", "Label stores (*.sqlite);;All files (*)"
        )
        if path:
            self.labels.setText(path)

    def _choose_base(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Choose the base checkpoint", "", "Checkpoints (*.safetensors);;All files (*)"
        )
        if path:
            self._offer(path)
            self.base.setCurrentIndex(self.base.findText(path))

    def _choose_out(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Choose the run folder")
        if path:
            self.out.setText(path)

    # -- running -----------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Returns whether a fine-tune (training or its evaluation) is under way."""
        return self.worker is not None

    def request(self) -> FineTuneRequest:
        """Returns the fine-tune the fields describe (the files are checked by the run).

        Raises:
            ValueError: a field is empty or cannot be read.
        """
        cohort, base = self.cohort.text().strip(), self.base.currentText().strip()
        if not cohort:
            raise ValueError("choose a cohort CSV")
        if not base:
            raise ValueError("choose a base checkpoint")
        return FineTuneRequest(
            cohort=Path(cohort),
            base=Path(base),
            out=Path(self.out.text().strip()) if self.out.text().strip() else None,
            labels=Path(self.labels.text().strip()) if self.labels.text().strip() else None,
            epochs=self.epochs.value(),
            lr=self.lr.value(),
            trainable_blocks=self.blocks.value(),
            device=self.device.currentText(),
            tissue=self.session.tissue,  # the Slide panel's: training finds the same tissue
            tile_labels=self.tile_labels.currentData(),
            extra_args=tuple(shlex.split(self.extra.text())),
        )

    def start(self) -> None:
        """Starts the fine-tune: the training process, followed from a thread worker."""
        if self.running:
            return
        from napari.qt.threading import thread_worker

        try:
            request = self.request()
        except ValueError as exc:
            self._set_status(str(exc), error=True)
            return
        self._reset()
        self._request = request
        self.process = ProcessJob()
        self.job = Job(fine_tune(request, self.process))
        worker = thread_worker(self.job.events, start_thread=False)()
        worker.yielded.connect(self._on_event)
        worker.returned.connect(self._on_outcome)
        worker.errored.connect(self._on_crash)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self.status.setText(f"Starting: {request.run_dir}")
        self.bar.setRange(0, 0)  # busy until the first event
        self._jobs.append(self.job)
        self._update_buttons()
        worker.start()

    def stop(self) -> None:
        """Ends the run at its next step (SIGINT; SIGTERM, then a kill, if it hangs)."""
        if not self.running or self.job is None:
            return
        self.job.stop("stopped")
        self.stop_button.setEnabled(False)
        self.status.setText("Stopping at the next step…")

    def _reset(self) -> None:
        self.outcome = None
        self._steps = ([], [])
        self._rows = []
        self.loss_plot.clear()
        self.metric_plot.clear()
        self.table.setRowCount(0)
        self.table.setVisible(False)
        self.error.clear()
        self.error.setVisible(False)

    def _update_buttons(self) -> None:
        self.start_button.setEnabled(not self.running)
        self.stop_button.setEnabled(self.running and not (self.job and self.job.stopping))

    # -- events (GUI thread) -----------------------------------------------------------
    def _on_event(self, event: dict[str, Any]) -> None:
        stage, done, total = event["stage"], event["done"], event["total"]
        data = event.get("data") or {}
        if stage == "launch":
            self.status.setToolTip(shlex.join(data.get("command", [])))
            self.bar.setRange(0, 0)
        elif stage == "step":
            epoch = int(data.get("epoch", 0))
            self._show_run_progress(epoch, done, total)
            if "loss" in data and total:
                self._steps[0].append(epoch + done / total)
                self._steps[1].append(data["loss"])
                self.loss_plot.set_series("train loss (step)", *self._steps)
        elif stage == "epoch":
            self._show_run_progress(done, 0, 0)
            self._rows.append(epoch_row(event))
            self._plot_epochs(event.get("log") or self._rows)
        elif stage == "evaluate" and total:
            self._show_fraction(done / total, f"evaluating {done}/{total}")
        elif total:
            self._show_fraction(done / total, f"{stage} {done}/{total}")
        if event.get("message"):
            self.status.setText(event["message"])

    def _show_fraction(self, fraction: float, text: str) -> None:
        self.bar.setRange(0, _BAR_UNITS)
        self.bar.setValue(round(min(max(fraction, 0.0), 1.0) * _BAR_UNITS))
        self.bar.setFormat(text)

    def _show_run_progress(self, epoch: int, step: int, steps: int) -> None:
        """The bar over the whole run: ``epoch`` epochs done and ``step`` of ``steps``."""
        epochs = self._request.epochs if self._request else 1
        fraction = (epoch + (step / steps if steps else 0)) / epochs
        text = f"epoch {min(epoch + 1, epochs) if steps else epoch}/{epochs}"
        self._show_fraction(fraction, text + (f" · step {step}/{steps}" if steps else ""))

    def _plot_epochs(self, rows: list[dict[str, Any]]) -> None:
        """Per-epoch series from the run's log: losses in one plot, metrics in the other."""
        xs = [int(r.get("epoch", i)) + 1 for i, r in enumerate(rows)]
        for plot, key, name in (
            (self.loss_plot, "train_loss", "train loss"),
            (self.loss_plot, "val_loss", "val loss"),
            (self.metric_plot, "val_mean_f1", "val mean F1"),
            (self.metric_plot, "val_accuracy", "val accuracy"),
        ):
            values = [r.get(key) for r in rows]
            if any(isinstance(v, int | float) for v in values):
                ys = [v if isinstance(v, int | float) else None for v in values]
                plot.set_series(name, xs, ys, markers=True)

    def _on_outcome(self, outcome: FineTuneOutcome) -> None:
        self.outcome = outcome
        if outcome.status == "failed":
            # the log's last line is the CLI's one-line error (or the traceback's end)
            last = (outcome.error or "no message").splitlines()[-1]
            self._set_status(f"Fine-tuning failed: {last}", error=True)
            where = f"\n\n(the whole log: {outcome.log})" if outcome.log else ""
            self._show_error((outcome.error or "no message") + where)
            return
        if outcome.status == "stopped":
            last = outcome.last or outcome.best
            where = f"last checkpoint: {last}" if last else "no epoch finished: no checkpoint"
            self.status.setText(f"Stopped after {outcome.epochs_done} epoch(s); {where}")
            self._show_fraction(outcome.epochs_done / max(self._request.epochs, 1), "stopped")
        else:
            self.status.setText(
                f"Done: {outcome.epochs_done} epoch(s); best checkpoint {outcome.best} "
                "(offered in the Model panel)"
            )
            self._show_fraction(1.0, "done")
        if outcome.evaluation:
            self._show_table(outcome)
        elif outcome.evaluation_error and outcome.status == "done":
            self._show_error(f"No before/after table: {outcome.evaluation_error}")
        if outcome.best is not None:
            self.session.add_checkpoint(outcome.best)

    def _show_table(self, outcome: FineTuneOutcome) -> None:
        self.table.setRowCount(len(outcome.evaluation))
        for i, row in enumerate(outcome.evaluation):
            change = row.change
            cells = (
                row.metric,
                _fmt(row.before),
                _fmt(row.after),
                "" if change is None else f"{change:+.3f}",
            )
            for j, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if j:
                    item.setTextAlignment(Qt.AlignRight | Qt.AlignVCenter)
                self.table.setItem(i, j, item)
        self.table.setToolTip(f"base vs fine-tuned best checkpoint, {outcome.split} split")
        self.table.setVisible(True)

    def _on_crash(self, exc: Exception) -> None:
        """A bug in the panel's own worker (the training process's errors are outcomes)."""
        self._set_status("Fine-tuning stopped by an error in the panel", error=True)
        self._show_error(f"{type(exc).__name__}: {exc}")

    def _show_error(self, text: str) -> None:
        """Shows a long error text (a traceback, a log's tail) under the status line."""
        self.error.setPlainText(text)
        self.error.setVisible(True)

    def _set_status(self, text: str, *, error: bool = False) -> None:
        self.status.setText(error_html(text) if error else text)

    def _on_finished(self) -> None:
        if self.bar.maximum() == 0:
            self.bar.setRange(0, _BAR_UNITS)
        self.worker = None
        self._update_buttons()


def _fmt(value: float | None) -> str:
    """Returns a metric for the table ("–" when undefined)."""
    return "–" if value is None else f"{value:.3f}"
