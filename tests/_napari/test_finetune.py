"""Fine-tuning from the GUI: the command line, the event stream, the run's log and the
before/after table without Qt; the Fine-tune panel in a viewer against the real CLI
(a one-epoch fine-tune, Stop mid-run, a crashing run)."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from napari_slide_attention._napari.finetune import (
    EXIT_STOPPED,
    FineTuneRequest,
    ProcessJob,
    Stopped,
    default_out_folder,
    epoch_row,
    evaluate_command,
    evaluation_split,
    fine_tune,
    parse_evaluation,
    parse_event,
    read_log,
    slide_options,
    train_command_kind,
)
from napari_slide_attention.cli import build_parser
from napari_slide_attention.cli.parser import tissue_params
from napari_slide_attention.jobs import run_to_end
from napari_slide_attention.slide.tissue import TissueParams
from napari_slide_attention.train.cohort import write_cohort
from napari_slide_attention.train.metrics import evaluate

CLASSES = ["normal", "low-grade", "high-grade", "carcinoma"]
CLI = [sys.executable, "-m", "napari_slide_attention.cli"]


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _sets(argv: list[str]) -> dict[str, object]:
    pairs = [argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--set"]
    return {k: json.loads(v) for k, v in pairs}


# -- the command line ------------------------------------------------------------------
def test_grid_command_takes_the_model_from_the_base_checkpoint(tiny_grid_model, tmp_path):
    request = FineTuneRequest(
        cohort=tmp_path / "cohort.csv",
        base=tiny_grid_model,
        out=tmp_path / "ft",
        labels=tmp_path / "cohort.labels.sqlite",
        epochs=3,
        lr=2.5e-5,
        trainable_blocks=2,
        device="cpu",
        tissue=TissueParams(method="od", closing_radius_um=8.0, smooth_sigma_um=4.0),
        extra_args=("--chunk-tiles", "32", "--set", "lr_decay=0.9"),
    )
    argv = request.command()
    assert argv[:5] == [*CLI, "train", "grid"]
    assert _option(argv, "--init") == str(tiny_grid_model)
    assert _option(argv, "--out") == str(tmp_path / "ft")
    assert _option(argv, "--labels") == str(tmp_path / "cohort.labels.sqlite")
    assert _option(argv, "--classes") == ",".join(CLASSES)  # the base's risk order
    assert float(_option(argv, "--lr")) == 2.5e-5
    assert _option(argv, "--epochs") == "3" and _option(argv, "--trainable-blocks") == "2"
    assert "--events" in argv and _option(argv, "--device") == "cpu"
    # the settings that shape the model come from the checkpoint itself (train --init)
    for option in ("--tile-um", "--input-px", "--n-maps"):
        assert option not in argv
    assert _sets(argv[:-4]) == {}
    # extra options come last, so they win
    assert argv[-4:] == ["--chunk-tiles", "32", "--set", "lr_decay=0.9"]
    args = build_parser().parse_args(argv[3:])
    assert args.events and args.init == str(tiny_grid_model) and args.set[-1] == "lr_decay=0.9"
    # the Slide panel's tissue detection reaches the training process
    assert tissue_params(args) == request.tissue


def test_dual_command_names_the_model_and_has_no_trainable_blocks(tmp_path):
    header = SimpleNamespace(
        kind="dual-attention",
        config={"classes": ["a", "b"], "tile_um": 128.0, "n_tiles": 8, "soft": {"pool": 4}},
    )
    request = FineTuneRequest(tmp_path / "c.csv", tmp_path / "run" / "last.safetensors", mpp=0.25)
    argv = request.command(header)
    assert argv[3:5] == ["train", "dual"] and "--trainable-blocks" not in argv
    assert "--n-tiles" not in argv and _sets(argv) == {}  # the checkpoint brings them
    assert _option(argv, "--mpp") == "0.25" and "--tissue" not in argv  # default tissue
    args = build_parser().parse_args(argv[3:])
    assert args.model == "dual" and args.classes == "a,b" and args.mpp == 0.25


def test_dual_command_rebuilds_the_base_model_for_init(tmp_path):
    """The settings the CLI makes of the command, with the checkpoint's model settings
    (what ``train --init`` does), build a model the base's weights fit."""
    from napari_slide_attention.cli.models import _settings
    from napari_slide_attention.models.checkpoint import read_checkpoint, save_checkpoint
    from napari_slide_attention.models.dual_attention import DualAttention
    from napari_slide_attention.train.dual import CPU_PRESET, DualTrainSettings

    base = DualAttention(DualTrainSettings.from_dict(CPU_PRESET).model_config(("a", "b", "c")))
    base.set_normalisation([0.8, 0.6, 0.7], [0.1, 0.1, 0.1])
    path = save_checkpoint(
        tmp_path / "run" / "best.safetensors",
        base.config.kind,
        base.config.to_dict(),
        base.state_dict(),
        {},
    )
    argv = FineTuneRequest(tmp_path / "c.csv", path).command()
    settings = _settings(DualTrainSettings, build_parser().parse_args(argv[3:]))
    settings = settings.with_model(read_checkpoint(path, tensors=False).config)
    again = DualAttention(settings.model_config(("a", "b", "c")))
    again.load_state_dict(base.state_dict(), strict=True)  # what --init does
    assert settings.model["tile_um"] == 128.0 and settings.model["hard"]["glimpses"] == 4


def test_sliding_window_checkpoints_are_refused(tmp_path):
    import torch

    from napari_slide_attention.models.checkpoint import save_checkpoint

    with pytest.raises(ValueError, match="sliding-window checkpoint cannot be fine-tuned"):
        train_command_kind("sliding-window")
    with pytest.raises(ValueError, match="'hard-attention'"):
        train_command_kind("hard-attention")
    base = save_checkpoint(
        tmp_path / "sw" / "best.safetensors",
        "sliding-window",
        {"classes": ["a", "b"]},
        {"w": torch.zeros(1)},
        {},
    )
    request = FineTuneRequest(tmp_path / "c.csv", base, out=tmp_path / "ft")
    with pytest.raises(ValueError, match="no --init"):
        request.command()
    job = ProcessJob()
    outcome = run_to_end(fine_tune(request, job))
    assert outcome.status == "failed" and "sliding-window" in outcome.error
    assert job.process is None and not (tmp_path / "ft").exists()  # nothing started


def test_a_missing_base_checkpoint_fails_with_its_name(tmp_path):
    missing = tmp_path / "gone.safetensors"
    outcome = run_to_end(fine_tune(FineTuneRequest(tmp_path / "c.csv", missing), ProcessJob()))
    assert outcome.status == "failed" and str(missing) in outcome.error


def test_default_out_folder_sits_in_the_base_run(tmp_path):
    now = datetime(2025, 1, 2, 3, 4, 5)
    run = tmp_path / "run"
    assert default_out_folder(run / "best.safetensors", now) == run / "finetune-20250102-030405"
    epoch = run / "checkpoints" / "epoch-0003.safetensors"
    assert default_out_folder(epoch, now) == run / "finetune-20250102-030405"
    (run / "finetune-20250102-030405").mkdir(parents=True)
    assert default_out_folder(epoch, now) == run / "finetune-20250102-030405-2"
    request = FineTuneRequest(tmp_path / "c.csv", run / "best.safetensors")
    assert request.run_dir.parent == run and request.run_dir.name.startswith("finetune-")
    assert request.run_dir == request.run_dir  # fixed once, not a new time per call
    assert FineTuneRequest("c.csv", "b.safetensors", out="x").run_dir == Path("x")


def test_request_checks_its_numbers(tmp_path):
    for bad in ({"epochs": 0}, {"lr": 0.0}, {"trainable_blocks": 6}, {"trainable_blocks": 0}):
        with pytest.raises(ValueError):
            FineTuneRequest(tmp_path / "c.csv", tmp_path / "b.safetensors", **bad)


# -- the event stream and the log --------------------------------------------------------
ROW = {"epoch": 0, "train_loss": 0.34, "val_loss": 1.6, "val_mean_f1": 0.25}
STEP = {"stage": "step", "done": 1, "total": 4, "message": "epoch 1/2 step 1/4"}
DONE = {"best": "r/best.safetensors", "last": "r/last.safetensors", "epochs_done": 2}
# What the training process's stdout may carry: events between noise, a torn line, JSON
# that is no event.
RECORDED = [
    json.dumps({"stage": "labels", "message": "labels: 1 changed", "data": {"changed": 1}}),
    "/venv/lib/python3.11/site-packages/torch/cuda/__init__.py:129: UserWarning: no CUDA",
    json.dumps({"stage": "prepare", "done": 1, "total": 4, "message": "train: a.tif"}),
    json.dumps({**STEP, "data": {"epoch": 0, "loss": 0.84, "lr": 1e-4}}),
    json.dumps({**STEP, "done": 2, "data": {"epoch": 0, "loss": 0.81, "lr": 1e-4}}),
    json.dumps({"stage": "epoch", "done": 1, "total": 2, "data": {"row": ROW, "checkpoint": "c"}}),
    json.dumps({**STEP, "done": 3})[:40],
    "[1, 2, 3]",
    '{"done": 3}',
    '{"stage": 7}',
    "null",
    "",
    json.dumps({"stage": "done", "done": 2, "total": 2, "data": {**DONE, "stopped": False}}),
]


def test_parse_event_reads_a_recorded_stream_and_skips_everything_else():
    events = [e for e in map(parse_event, RECORDED) if e is not None]
    assert [e["stage"] for e in events] == ["labels", "prepare", "step", "step", "epoch", "done"]
    step = events[2]
    assert (step["done"], step["total"], step["data"]["loss"]) == (1, 4, 0.84)
    assert events[0]["done"] == 0 and events[0]["data"] == {"changed": 1}
    assert events[-1]["data"]["best"] == "r/best.safetensors"
    assert epoch_row(events[4]) == ROW
    # a flat row in data works too, and missing fields get defaults
    flat = parse_event('{"stage": "epoch", "data": {"epoch": 1, "val_loss": 0.5}}')
    assert (flat["done"], flat["total"], flat["message"]) == (0, 0, "")
    assert epoch_row(flat) == {"epoch": 1, "val_loss": 0.5}
    odd = parse_event('{"stage": "step", "done": NaN, "total": 4.0, "message": 3, "data": [1]}')
    assert (odd["done"], odd["total"], odd["message"], odd["data"]) == (0, 4, "", {})


def test_read_log_from_json_then_csv(tiny_grid_model, tmp_path):
    rows = read_log(Path(tiny_grid_model).parent)
    assert len(rows) == 1 and rows[0]["epoch"] == 0
    assert {"train_loss", "val_loss", "val_mean_f1"} <= set(rows[0])
    assert read_log(tmp_path) == []  # before the first epoch
    (tmp_path / "log.csv").write_text("epoch,train_loss,note\n0,0.5,a\n1,0.25,b\n")
    assert read_log(tmp_path) == [
        {"epoch": 0, "train_loss": 0.5, "note": "a"},
        {"epoch": 1, "train_loss": 0.25, "note": "b"},
    ]
    (tmp_path / "log.json").write_text("[{")  # unreadable: the CSV still answers
    assert len(read_log(tmp_path)) == 2


# -- evaluation ----------------------------------------------------------------------------
def _report(*models) -> str:
    return json.dumps(
        {
            "split": "val",
            "cohort": "c.csv",
            "models": {name: {"metrics": m.to_dict(), "slides": []} for name, m in models},
        }
    )


def test_evaluate_command_and_its_before_after_rows(tmp_path):
    tissue = TissueParams(min_piece_area_um2=1000.0)
    options = slide_options(tissue, 0.5)
    argv = evaluate_command(
        "a.safetensors", "b.safetensors", "c.csv", "val", classes=CLASSES, options=options
    )
    args = build_parser().parse_args(argv[3:])
    assert argv[:4] == [*CLI, "evaluate"]
    assert args.model == ["a.safetensors", "b.safetensors"] and args.split == "val"
    assert args.json and args.classes == ",".join(CLASSES) and args.device == "auto"
    # the before/after evaluation finds tissue and reads pixels as the training did
    assert tissue_params(args) == tissue and args.mpp == 0.5

    truth = [0, 1, 2, 3]
    flat = np.full((4, 4), 0.25)
    before = evaluate(truth, [2, 2, 2, 2], flat, classes=CLASSES)
    sure = np.eye(4) * 0.9 + 0.025
    after = evaluate(truth, [0, 1, 2, 2], sure, classes=CLASSES)
    text = "a warning on stdout\n" + _report(("grid (run)", before), ("grid (ft)", after))
    rows = {r.metric: r for r in parse_evaluation(text)}
    assert list(rows)[:6] == [
        "mean F1",
        "mean accuracy",
        "mean precision",
        "mean recall",
        "accuracy",
        "AUROC",
    ]
    assert rows["accuracy"].before == 0.25 and rows["accuracy"].after == 0.75
    assert rows["mean F1"].before == pytest.approx(before.mean.f1)
    assert rows["mean F1"].after == pytest.approx(after.mean.f1)
    assert rows["mean F1"].change == pytest.approx(after.mean.f1 - before.mean.f1)
    assert rows["F1 carcinoma"].after == 0.0 and "AUROC normal" in rows
    # an AUROC that is undefined (a class absent from the split) stays None
    absent = evaluate([0, 0, 1, 1], [0, 0, 1, 1], np.eye(4)[[0, 0, 1, 1]], classes=CLASSES)
    rows = {r.metric: r for r in parse_evaluation(_report(("a", absent), ("b", absent)))}
    assert rows["AUROC carcinoma"].before is None and rows["AUROC carcinoma"].change is None
    for bad in ("", "{}", _report(("only one", before)), "not json at all"):
        with pytest.raises(ValueError, match="evaluate"):
            parse_evaluation(bad)


def test_evaluation_split_is_val_else_test(tiny_cohort, tmp_path):
    assert evaluation_split(tiny_cohort.path) == "val"
    entries = [e for e in tiny_cohort.entries if e.split != "val"]
    no_val = write_cohort(tmp_path / "no-val.csv", replace(tiny_cohort, entries=entries))
    assert evaluation_split(no_val) == "test"


# -- the process and Stop --------------------------------------------------------------
# A stand-in for the CLI: one event per 0.1 s; on SIGINT a "stopped" event and status 130
# (as the CLI does), or, told to, ignores SIGINT and SIGTERM (a hung process).
FAKE = textwrap.dedent(
    """
    import json, signal, sys, time
    stop = []
    if sys.argv[1] == "stubborn":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGINT, lambda *a: stop.append(1))
    print("not an event", flush=True)
    for n in range(1, 600):
        print(json.dumps({"stage": "step", "done": n, "total": 600}), flush=True)
        if stop:
            print(json.dumps({"stage": "stopped", "data": {"last": None}}), flush=True)
            sys.exit(130)
        time.sleep(0.1)
    """
)


def _fake(mode: str) -> list[str]:
    return [sys.executable, "-c", FAKE, mode]


def test_stop_ends_the_process_at_its_next_event():
    job = ProcessJob(grace=10)
    process = job.popen(_fake("clean"), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    lines = iter(process.stdout)
    assert parse_event(next(lines)) is None
    assert parse_event(next(lines))["stage"] == "step"
    start = time.perf_counter()
    job.stop()
    stages = [e["stage"] for e in map(parse_event, lines) if e]
    assert process.wait(10) == EXIT_STOPPED and stages[-1] == "stopped"
    assert time.perf_counter() - start < 5
    process.stdout.close()
    with pytest.raises(Stopped):  # a stopped job starts nothing more
        job.popen(_fake("clean"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_stop_escalates_to_a_kill_for_a_process_that_ignores_signals():
    job = ProcessJob(grace=0.5)
    process = job.popen(_fake("stubborn"), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    next(iter(process.stdout))  # running, its handlers set
    next(iter(process.stdout))
    job.stop()
    assert process.wait(10) == -signal.SIGKILL
    process.stdout.close()
    job.stop()  # again, on an ended process: nothing happens


def test_a_failing_training_reports_its_stderr(tmp_path, tiny_grid_model):
    request = FineTuneRequest(tmp_path / "no-such.csv", tiny_grid_model, out=tmp_path / "ft")
    events: list[dict] = []
    outcome = run_to_end(fine_tune(request, ProcessJob()), events.append)
    assert events[0]["stage"] == "launch" and events[0]["data"]["command"] == request.command()
    assert outcome.status == "failed" and outcome.returncode == 2
    assert "exit status 2" in outcome.error and "no such cohort file" in outcome.error
    assert outcome.log == tmp_path / "ft" / "train.log" and outcome.log.is_file()
    assert outcome.best is None and outcome.evaluation == []


# -- the panel -----------------------------------------------------------------------------
@pytest.fixture
def panel_in_viewer(make_napari_viewer):
    """The Fine-tune panel docked in a viewer (its runs stopped at the end)."""
    viewer = make_napari_viewer()
    _, panel = viewer.window.add_plugin_dock_widget("napari-slide-attention", "Fine-tune")
    yield viewer, panel
    for job in panel._jobs:
        job.stop()


def _fill(panel, cohort, out, *, epochs=1, extra="--chunk-tiles 32") -> None:
    panel.cohort.setText(str(cohort))
    panel.out.setText(str(out))
    panel.epochs.setValue(epochs)
    panel.device.setCurrentText("cpu")
    panel.extra.setText(extra)


def _log(run: Path) -> str:
    log = run / "ft" / "train.log"
    return log.read_text() if log.is_file() else "(no train.log)"


class _Ticks:
    """The longest gap between ticks of a 20 ms timer: how long the GUI thread stalled."""

    def __init__(self):
        from qtpy.QtCore import QTimer

        self.times: list[float] = []
        self.timer = QTimer()
        self.timer.setInterval(20)
        self.timer.timeout.connect(lambda: self.times.append(time.perf_counter()))
        self.timer.start()

    def longest(self) -> float:
        self.timer.stop()
        return max(np.diff(self.times)) if len(self.times) > 1 else 0.0


@pytest.mark.gui
def test_panel_fine_tunes_one_epoch_and_offers_the_checkpoint(
    panel_in_viewer, qtbot, tiny_cohort, tiny_grid_model, tmp_path
):
    from napari_slide_attention._napari.session import session_for

    viewer, panel = panel_in_viewer
    session = session_for(viewer)
    cohort = write_cohort(tmp_path / "cohort.csv", tiny_cohort)
    session.open_cohort(cohort)
    # the fields come from the session: cohort, its label store, the newest checkpoint
    assert panel.cohort.text() == str(cohort)
    assert panel.labels.text() == str(session.labels.path)
    session.add_checkpoint(tiny_grid_model)
    assert panel.base.currentText() == str(tiny_grid_model)
    # one corrected label, which the training must apply
    train_slide = next(e.slide for e in tiny_cohort.entries if e.split == "train")
    session.labels.set_slide_label(train_slide, "carcinoma")
    _fill(panel, cohort, tmp_path / "ft")
    assert panel.lr.text() == "1e-04" and panel.blocks.value() == 1
    assert "last residual stage" in panel.blocks.toolTip()

    ticks = _Ticks()
    started = time.perf_counter()
    panel.start()
    events: list[dict] = []
    panel.worker.yielded.connect(events.append)
    assert panel.running and not panel.start_button.isEnabled()
    qtbot.waitUntil(lambda: not panel.running, timeout=300_000)
    seconds = time.perf_counter() - started
    stall = ticks.longest()

    outcome = panel.outcome
    assert outcome is not None, panel.error.toPlainText()
    assert outcome.status == "done", panel.error.toPlainText()
    assert outcome.returncode == 0 and outcome.epochs_done == 1
    best = tmp_path / "ft" / "best.safetensors"
    assert outcome.best == best and best.is_file()
    assert session.checkpoints[-1] == str(best)  # offered in the Model panel
    assert panel.base.findText(str(best)) >= 0
    assert str(best) in panel.status.text()
    labels = next(e for e in events if e["stage"] == "labels")
    assert labels["data"]["changed"] == 1
    # the plot: the loss of every step, the validation loss and mean F1 of the epoch
    xs, _ = panel.loss_plot.series("train loss (step)")
    steps = [e for e in events if e["stage"] == "step"]
    assert len(xs) == len(steps) > 0 and xs[-1] == pytest.approx(1.0)
    assert panel.loss_plot.series("val loss")[0] == [1.0]
    assert panel.metric_plot.series("val mean F1")[0] == [1.0]
    # the before/after table on the validation split
    assert outcome.split == "val" and panel.table.isVisibleTo(panel)
    cells = {
        panel.table.item(r, 0).text(): [panel.table.item(r, c).text() for c in (1, 2)]
        for r in range(panel.table.rowCount())
    }
    assert {"mean F1", "mean accuracy", "AUROC", "accuracy"} <= set(cells)
    for before, after in cells.values():
        assert before == "–" or 0 <= float(before) <= 1
        assert after == "–" or 0 <= float(after) <= 1
    assert (tmp_path / "ft" / "evaluate.json").is_file()
    assert panel.bar.value() == panel.bar.maximum()
    assert panel.start_button.isEnabled() and not panel.stop_button.isEnabled()
    print(f"fine-tune of one epoch + evaluation: {seconds:.1f} s; GUI stall {stall:.3f} s")
    assert stall < 1.5, f"the GUI thread stalled {stall:.2f} s"


@pytest.mark.gui
def test_stop_mid_run_keeps_the_last_checkpoint(
    panel_in_viewer, qtbot, tiny_cohort, tiny_grid_model, tmp_path
):
    _, panel = panel_in_viewer
    panel.base.addItem(str(tiny_grid_model))
    panel.base.setCurrentText(str(tiny_grid_model))
    _fill(panel, tiny_cohort.path, tmp_path / "ft", epochs=50)
    panel.start()
    # wait for the first finished epoch, so there is a checkpoint to keep
    qtbot.waitUntil(lambda: bool(panel._rows) or not panel.running, timeout=240_000)
    assert panel.running, panel.error.toPlainText()
    panel.stop()
    assert not panel.stop_button.isEnabled() and "Stopping" in panel.status.text()
    qtbot.waitUntil(lambda: not panel.running, timeout=120_000)
    outcome = panel.outcome
    assert outcome.status == "stopped", panel.error.toPlainText()
    assert outcome.returncode == EXIT_STOPPED == panel.process.process.returncode
    assert 1 <= outcome.epochs_done < 50
    last = tmp_path / "ft" / "last.safetensors"
    assert outcome.last == last and last.is_file()
    assert "last checkpoint" in panel.status.text() and str(last) in panel.status.text()
    assert not panel.table.isVisibleTo(panel)  # no evaluation of a stopped run
    assert panel.start_button.isEnabled()


@pytest.mark.gui
def test_a_crashing_run_shows_its_error_and_the_viewer_goes_on(
    panel_in_viewer, qtbot, tiny_grid_model, tmp_path
):
    viewer, panel = panel_in_viewer
    panel.start()  # nothing chosen yet: said, nothing started
    assert panel.worker is None and "choose a cohort" in panel.status.text()
    panel.base.addItem(str(tiny_grid_model))
    panel.base.setCurrentText(str(tiny_grid_model))
    missing = tmp_path / "missing.csv"
    _fill(panel, missing, tmp_path / "ft")
    panel.start()
    qtbot.waitUntil(lambda: not panel.running, timeout=120_000)
    outcome = panel.outcome
    assert outcome.status == "failed" and outcome.returncode == 2
    assert panel.error.isVisibleTo(panel)
    assert "no such cohort file" in panel.error.toPlainText()
    assert str(tmp_path / "ft" / "train.log") in panel.error.toPlainText()
    assert "Fine-tuning failed" in panel.status.text()
    assert panel.start_button.isEnabled() and not panel.table.isVisibleTo(panel)
    layer = viewer.add_image(np.zeros((8, 8), np.uint8))  # the viewer still works
    assert layer in viewer.layers


@pytest.mark.gui
def test_closing_the_panel_mid_run_stops_its_training(
    make_napari_viewer, qtbot, tiny_cohort, tiny_grid_model, tmp_path
):
    from qtpy.QtWidgets import QApplication

    viewer = make_napari_viewer()
    dock, panel = viewer.window.add_plugin_dock_widget("napari-slide-attention", "Fine-tune")
    panel.base.addItem(str(tiny_grid_model))
    panel.base.setCurrentText(str(tiny_grid_model))
    _fill(panel, tiny_cohort.path, tmp_path / "ft", epochs=50)
    panel.start()
    job, worker = panel.process, panel.worker
    events: list[dict] = []
    worker.yielded.connect(events.append)
    # the CLI is under way (a signal while Python starts ends it in other ways)
    qtbot.waitUntil(lambda: any(e["stage"] != "launch" for e in events), timeout=60_000)
    viewer.window.remove_dock_widget(dock)  # the dock's close button: out of the window
    QApplication.processEvents()
    assert job.stop_requested
    qtbot.waitUntil(lambda: job.process.poll() is not None, timeout=60_000)
    assert job.process.returncode == EXIT_STOPPED, _log(tmp_path)
    qtbot.waitUntil(lambda: not worker.is_running, timeout=30_000)  # the worker ends too
    viewer.add_image(np.zeros((8, 8), np.uint8))


@pytest.mark.gui
def test_panel_request_reads_the_fields(panel_in_viewer, tmp_path):
    _, panel = panel_in_viewer
    panel.cohort.setText(str(tmp_path / "c.csv"))
    panel.base.setCurrentText(str(tmp_path / "run" / "best.safetensors"))
    panel.lr.setValue(3e-5)
    panel.blocks.setValue(2)
    panel.extra.setText("--set lr_decay=1 --set 'note=a b'")
    request = panel.request()
    assert request.labels is None and request.lr == pytest.approx(3e-5)
    assert request.run_dir.parent == tmp_path / "run"  # the default: next to the base run
    assert request.trainable_blocks == 2
    assert request.extra_args == ("--set", "lr_decay=1", "--set", "note=a b")
    assert shlex.split(panel.extra.text()) == list(request.extra_args)


@pytest.mark.gui
def test_learning_rate_box_shows_and_steps_scientific_values(qtbot):
    from napari_slide_attention._napari.widgets.finetune_panel import ScientificSpinBox

    box = ScientificSpinBox()
    qtbot.addWidget(box)
    box.setValue(1e-4)
    assert box.text() == "1e-04"
    seen = []
    for _ in range(4):
        box.stepBy(1)
        seen.append(box.value())
    assert seen == pytest.approx([2e-4, 5e-4, 1e-3, 2e-3])
    box.stepBy(-5)
    assert box.value() == pytest.approx(5e-5) and box.text() == "5e-05"
    assert box.valueFromText("2.5e-4") == pytest.approx(2.5e-4)
    assert box.validate("1e-", 3)[0] != box.validate("abc", 3)[0]


@pytest.mark.gui
def test_line_plot_keeps_its_series_and_draws(qtbot):
    from napari_slide_attention._napari.widgets.plot import LinePlot

    plot = LinePlot("loss", "epoch")
    qtbot.addWidget(plot)
    plot.resize(300, 160)
    empty = plot.grab()  # "no data yet"
    plot.set_series("train", [0.5, 1.0, 1.5], [1.0, None, 0.5])
    plot.set_series("val", [1.0], [0.7], markers=True)
    assert plot.names == ["train", "val"]
    assert plot.series("train") == ([0.5, 1.5], [1.0, 0.5])  # None left out
    plot.set_series("train", [0.5], [float("nan")])
    assert plot.series("train") == ([], []) and plot.names == ["train", "val"]
    drawn = plot.grab()
    assert drawn.width() == 300 and drawn.toImage() != empty.toImage()
    plot.clear()
    assert plot.names == []
    with pytest.raises(KeyError):
        plot.series("train")
