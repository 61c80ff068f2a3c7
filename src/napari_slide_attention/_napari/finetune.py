"""Fine-tuning from the GUI, without Qt: the training command, its event stream, the run's
log and the before/after evaluation.

The Fine-tune panel never trains inside the viewer. It runs
``slide-attention train grid|dual ... --init BASE --events`` as a separate process, so an
out-of-memory kill or a crash in training ends that process and not napari, and follows
the JSON lines the process prints (``{"stage", "done", "total", "message", "data"}``).
When the run finishes, ``slide-attention evaluate --model BASE --model NEW --json`` (one
more process) gives the metrics of both checkpoints on the cohort's validation split.

``fine_tune`` is the whole job as a generator of events returning a ``FineTuneOutcome``:
the panel drives it in a thread worker, tests drive it directly. ``ProcessJob`` holds the
process that runs now, so Stop (from the GUI thread) reaches it: SIGINT, which the CLI
turns into a clean stop at its next progress event (status 130, checkpoints kept), then
SIGTERM and a kill for a process that does not end.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from ..jobs import current_job
from ..slide.tissue import TissueParams

__all__ = [
    "EXIT_STOPPED",
    "FineTuneOutcome",
    "FineTuneRequest",
    "MetricRow",
    "ProcessJob",
    "Stopped",
    "default_out_folder",
    "epoch_row",
    "evaluate_command",
    "evaluation_split",
    "fine_tune",
    "parse_evaluation",
    "parse_event",
    "read_log",
    "slide_options",
    "train_command_kind",
]

EXIT_STOPPED = 130  # the CLI's status for a run ended by SIGINT/SIGTERM (128 + SIGINT)
CLI = (sys.executable, "-m", "napari_slide_attention.cli")

# Lines of a failed process's stderr log shown in the panel.
_TAIL_LINES = 40
# A progress line of ``evaluate``: "grid-attention (run): [3/4] slide.tif: ...".
_EVALUATE_PROGRESS = re.compile(r"\[(\d+)/(\d+)\]")


def train_command_kind(kind: str) -> str:
    """Returns the ``train`` model (``grid`` or ``dual``) that fine-tunes a checkpoint kind.

    Args:
        kind: the checkpoint's kind, from its header.

    Raises:
        ValueError: a sliding-window checkpoint (its training has no ``--init``) or a kind
            this plugin does not train.
    """
    from ..models.registry import model_kind

    try:
        entry = model_kind(kind)
    except ValueError:
        entry = None
    if entry is not None and entry.fine_tunes:
        return entry.train_name
    if kind == "sliding-window":
        raise ValueError(
            "a sliding-window checkpoint cannot be fine-tuned: its training has no --init "
            "(train a new one on the corrected cohort instead); choose a grid- or "
            "dual-attention checkpoint"
        )
    raise ValueError(f"cannot fine-tune a {kind!r} checkpoint (grid or dual attention only)")


def default_out_folder(base: str | os.PathLike, now: datetime | None = None) -> Path:
    """Returns a new run folder for a fine-tune, ``<base run>/finetune-YYYYmmdd-HHMMSS``.

    The base run is the folder of ``base`` (``run/best.safetensors``), or the one above
    it for a per-epoch checkpoint (``run/checkpoints/epoch-0003.safetensors``). A folder
    that already exists (two starts within a second) gets a ``-2``, ``-3``... suffix, so
    a fine-tune never resumes another by accident.

    Args:
        base: the checkpoint the fine-tune starts from.
        now: the time in the name (default: now).
    """
    folder = Path(base).parent
    if folder.name == "checkpoints":
        folder = folder.parent
    stem = f"finetune-{(now or datetime.now()):%Y%m%d-%H%M%S}"
    out, n = folder / stem, 1
    while out.exists():
        n += 1
        out = folder / f"{stem}-{n}"
    return out


@dataclass
class FineTuneRequest:
    """What a fine-tune runs: the base checkpoint, the cohort and the training settings.

    Attributes:
        cohort: the cohort CSV.
        base: the checkpoint to start from (grid or dual attention).
        out: the new run's folder; None = ``default_out_folder(base)``, fixed when the
            request is made.
        labels: a label store whose corrections apply to the cohort (None: the CSV's
            labels as they are).
        epochs: epochs of the fine-tune.
        lr: its initial learning rate.
        trainable_blocks: trunk stages that train (grid attention; 1 = the last
            residual stage, the paper's choice).
        device: "auto", "cpu" or "cuda".
        tissue: the tissue detection the Slide panel shows (None: the defaults); training
            and the before/after evaluation find tissue with it.
        mpp: µm per pixel for every slide of the cohort (None: the files' own).
        tile_labels: dual attention: what the sampled tiles are labelled with, "slide"
            (the paper) or "regions" (the cohort's lesion boxes, replaced by the label
            store's regions: a tile relabelled in the Review panel trains the glimpse
            model); ignored for grid attention.
        extra_args: more ``train`` options, appended last (so they win).
    """

    cohort: Path
    base: Path
    out: Path | None = None
    labels: Path | None = None
    epochs: int = 10
    lr: float = 1e-4
    trainable_blocks: int = 1
    device: str = "auto"
    tissue: TissueParams | None = None
    mpp: float | None = None
    tile_labels: str = "slide"
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.cohort = Path(self.cohort)
        self.base = Path(self.base)
        self.labels = Path(self.labels) if self.labels else None
        self.out = Path(self.out) if self.out else default_out_folder(self.base)
        self.extra_args = tuple(self.extra_args)
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"the learning rate must be positive, got {self.lr}")
        if not 1 <= self.trainable_blocks <= 5:
            raise ValueError(f"trainable blocks must be 1 to 5, got {self.trainable_blocks}")
        if self.tile_labels not in ("slide", "regions"):
            raise ValueError(f"tile labels are 'slide' or 'regions', got {self.tile_labels!r}")
        if self.mpp is not None and not 0 < self.mpp < math.inf:
            raise ValueError(f"the pixel size must be a positive number of µm, got {self.mpp}")

    def slide_options(self) -> list[str]:
        """Returns the options that make ``train`` and ``evaluate`` read the slides as the
        viewer does: ``--tissue NAME=VALUE`` per changed tissue parameter, ``--mpp``."""
        return slide_options(self.tissue, self.mpp)

    @property
    def run_dir(self) -> Path:
        """Returns the new run's folder."""
        assert self.out is not None  # set in __post_init__
        return self.out

    def base_header(self):
        """Returns the base checkpoint's header (kind, config; no weights are read).

        Raises:
            CheckpointError: not a checkpoint of this plugin (the message names it).
        """
        from ..models.checkpoint import read_checkpoint

        return read_checkpoint(self.base, tensors=False)

    def command(self, header=None) -> list[str]:
        """Returns the argv of the training process (``python -m ... train ... --events``).

        The model (grid or dual) and the class order come from the base checkpoint's
        header; ``train --init`` takes the settings that shape the model from the
        checkpoint itself.

        Args:
            header: the base's header when already read (else it is read here).

        Raises:
            ValueError: the base is a sliding-window checkpoint, or no checkpoint
                (``CheckpointError``, a ``ValueError``).
        """
        header = header if header is not None else self.base_header()
        model = train_command_kind(header.kind)
        config = header.config
        argv = [*CLI, "train", model, "--cohort", str(self.cohort), "--out", str(self.run_dir)]
        argv += ["--init", str(self.base), "--events"]
        if config.get("classes"):
            # the base's risk order, not the order labels first appear in the CSV
            argv += ["--classes", ",".join(config["classes"])]
        if self.labels is not None:
            argv += ["--labels", str(self.labels)]
        argv += ["--epochs", str(self.epochs), "--lr", repr(float(self.lr))]
        if model == "grid":  # the dual model's parts all train
            argv += ["--trainable-blocks", str(self.trainable_blocks)]
        else:  # the label store's regions (with --labels) label the dual model's tiles
            argv += ["--tile-labels", self.tile_labels]
        argv += ["--device", self.device, *self.slide_options()]
        return argv + list(self.extra_args)


def parse_event(line: str) -> dict[str, Any] | None:
    """Returns one progress event of ``train --events``, or None for any other line.

    A process's stdout may carry more than events (a library's print, a warning sent
    to the wrong stream): whatever is not a JSON object with a ``stage`` is skipped.

    Args:
        line: one line of the process's output.

    Returns:
        ``{"stage", "done", "total", "message", "data"}`` with defaults filled in (0,
        0, "", {}); other keys are kept.
    """
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        event = json.loads(text)
    except ValueError:
        return None
    if not isinstance(event, dict) or not isinstance(event.get("stage"), str):
        return None
    for key in ("done", "total"):
        value = event.get(key)
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        event[key] = int(value) if ok and math.isfinite(value) else 0
    if not isinstance(event.get("message"), str):
        event["message"] = ""
    if not isinstance(event.get("data"), dict):
        event["data"] = {}
    return event


def epoch_row(event: dict[str, Any]) -> dict[str, Any]:
    """Returns the log row an "epoch" event carries (``data.row``, or ``data`` itself)."""
    data = event.get("data") or {}
    row = data.get("row")
    return dict(row) if isinstance(row, dict) else dict(data)


def _number(text: str) -> Any:
    """Returns a CSV cell as an int or float where it is one, else the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_log(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Returns a run's log, one dict per finished epoch (empty before the first).

    ``log.json`` holds every column (the validation metrics as a nested dict too);
    ``log.csv`` is the fallback. Both are replaced atomically after each epoch, so a
    running process never shows a half-written log.
    """
    run_dir = Path(run_dir)
    try:
        rows = json.loads((run_dir / "log.json").read_text())
        if isinstance(rows, list):
            return [r for r in rows if isinstance(r, dict)]
    except (OSError, ValueError):
        pass
    try:
        with open(run_dir / "log.csv", newline="") as handle:
            return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(handle)]
    except OSError:
        return []


def evaluation_split(cohort: str | os.PathLike) -> str:
    """Returns the split the before/after table is computed on: "val", or "test" when the
    cohort has no validation slides.

    Raises:
        CohortError: the CSV cannot be read.
    """
    from ..train.cohort import read_cohort

    entries = read_cohort(cohort, check_files=False).entries
    return "val" if any(e.split == "val" for e in entries) else "test"


def evaluate_command(
    base: str | os.PathLike,
    new: str | os.PathLike,
    cohort: str | os.PathLike,
    split: str,
    *,
    device: str = "auto",
    classes: Sequence[str] | None = None,
    labels: str | os.PathLike | None = None,
    options: Sequence[str] = (),
) -> list[str]:
    """Returns the argv of ``slide-attention evaluate`` on the base and the new checkpoint
    (in that order) with ``--json``.

    Args:
        base: the checkpoint the fine-tune started from ("before").
        new: the fine-tune's checkpoint ("after").
        cohort: the cohort CSV.
        split: "train", "val" or "test".
        device: where the models run.
        classes: the class order (the base's), so the cohort's labels map to it.
        labels: a label store whose corrected slide labels are the truth (the
            annotators' corrections judge both checkpoints).
        options: more options, e.g. ``FineTuneRequest.slide_options()``.
    """
    argv = [*CLI, "evaluate", "--model", str(base), "--model", str(new)]
    argv += ["--cohort", str(cohort), "--split", split, "--device", device, "--json"]
    if classes:
        argv += ["--classes", ",".join(classes)]
    if labels:
        argv += ["--labels", str(labels)]
    return argv + list(options)


def slide_options(tissue: TissueParams | None, mpp: float | None) -> list[str]:
    """Returns ``--tissue NAME=VALUE`` for each tissue parameter that differs from the
    defaults, and ``--mpp`` when given: what another process needs to read the slides
    and find their tissue as the viewer does."""
    argv: list[str] = []
    for name, value in (tissue.changed() if tissue is not None else {}).items():
        argv += ["--tissue", f"{name}={json.dumps(value)}"]
    if mpp is not None:
        argv += ["--mpp", repr(float(mpp))]
    return argv


class MetricRow(NamedTuple):
    """One line of the before/after table (None where a metric is undefined, e.g. the
    AUROC of a class absent from the split)."""

    metric: str
    before: float | None
    after: float | None

    @property
    def change(self) -> float | None:
        """Returns after - before, or None when either is undefined."""
        if self.before is None or self.after is None:
            return None
        return self.after - self.before


def _metric_rows(metrics: dict[str, Any]) -> list[tuple[str, float | None]]:
    """Returns (name, value) of one model's ``Metrics.to_dict()``, in the table's order."""
    mean = metrics.get("mean") or {}
    rows: list[tuple[str, float | None]] = [
        ("mean F1", mean.get("f1")),
        ("mean accuracy", mean.get("accuracy")),
        ("mean precision", mean.get("precision")),
        ("mean recall", mean.get("recall")),
        ("accuracy", metrics.get("accuracy")),
        ("AUROC", metrics.get("auroc")),
    ]
    per_class = metrics.get("per_class") or {}
    auroc = metrics.get("auroc_per_class") or {}
    for name in metrics.get("classes", []):
        rows.append((f"F1 {name}", (per_class.get(name) or {}).get("f1")))
    for name in metrics.get("classes", []):
        rows.append((f"AUROC {name}", auroc.get(name)))
    return [(k, None if v is None else float(v)) for k, v in rows]


def parse_evaluation(text: str) -> list[MetricRow]:
    """Returns the before/after rows of ``evaluate --json`` run on two checkpoints.

    The first model in the output is "before" (the base), the second "after".

    Args:
        text: the command's stdout.

    Raises:
        ValueError: not the JSON of ``evaluate`` on two models.
    """
    start = text.find("{")
    try:
        report = json.loads(text[start:] if start >= 0 else text)
        before, after = (m["metrics"] for m in report["models"].values())
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"not the JSON of `evaluate` on two models ({exc})") from exc
    after_values = dict(_metric_rows(after))
    return [MetricRow(name, value, after_values.get(name)) for name, value in _metric_rows(before)]


def _tail(path: Path, lines: int = _TAIL_LINES) -> str:
    """Returns the last lines of a text file (empty when it cannot be read)."""
    try:
        with open(path, errors="replace") as handle:
            return "".join(deque(handle, maxlen=lines)).rstrip()
    except OSError:
        return ""


def _exit_reason(code: int) -> str:
    """Returns what an exit status means, in words."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (the system may have run out of memory)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    return f"exit status {code}"


class Stopped(Exception):
    """Raised by ``ProcessJob.popen`` when Stop came before the process started."""


class ProcessJob:
    """The process a fine-tune runs now, and Stop for it from any thread.

    Args:
        grace: seconds between SIGINT and SIGTERM, and between SIGTERM and a kill.

    Attributes:
        stop_requested: Stop was pressed (a job stopped once starts nothing more).
        process: the latest process started (None before the first).
    """

    def __init__(self, grace: float = 15.0) -> None:
        self.grace = grace
        self.stop_requested = False
        self.process: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def popen(self, argv: Sequence[str], *, stdout: Any, stderr: Any) -> subprocess.Popen:
        """Returns a started process (text, line-buffered) that ``stop`` reaches.

        The process runs in its own session: Ctrl-C in the terminal napari runs in
        reaches napari alone, and the panel's Stop alone reaches the process.

        Raises:
            Stopped: Stop came first.
            OSError: the program could not start.
        """
        with self._lock:
            if self.stop_requested:
                raise Stopped
            # events must arrive as they happen, not when a pipe buffer fills
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            self.process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                text=True,
                bufsize=1,
                env=env,
                start_new_session=os.name != "nt",
            )
            return self.process

    def stop(self) -> None:
        """Ends the running process cleanly: SIGINT now, SIGTERM and then a kill for one
        that is still running ``grace`` seconds later. Returns at once."""
        with self._lock:
            self.stop_requested = True
            process = self.process
        if process is None or process.poll() is not None:
            return
        if os.name == "nt":  # no SIGINT to a child on Windows; checkpoints are atomic
            process.terminate()
            return
        process.send_signal(signal.SIGINT)
        threading.Thread(target=self._escalate, args=(process,), daemon=True).start()

    def _escalate(self, process: subprocess.Popen) -> None:
        for end in (process.terminate, process.kill):
            try:
                process.wait(self.grace)
                return
            except subprocess.TimeoutExpired:
                end()


@dataclass
class FineTuneOutcome:
    """How a fine-tune ended.

    Attributes:
        status: "done", "stopped" or "failed".
        out: the run's folder.
        best, last: its best and last checkpoints (None where none was written).
        epochs_done: epochs finished.
        returncode: the training process's exit status (None when it never started).
        error: why it failed: the message, or the tail of the process's stderr log.
        log: the training process's stderr log file.
        split: the split of the before/after table.
        evaluation: the before/after rows (empty when not evaluated).
        evaluation_error: why the evaluation gave no table (None when it did, or when it
            did not run).
    """

    status: str
    out: Path
    best: Path | None = None
    last: Path | None = None
    epochs_done: int = 0
    returncode: int | None = None
    error: str | None = None
    log: Path | None = None
    split: str | None = None
    evaluation: list[MetricRow] = field(default_factory=list)
    evaluation_error: str | None = None


def _existing(path: Any) -> Path | None:
    """Returns ``path`` as a Path when it names an existing file, else None."""
    return Path(path) if path and Path(path).is_file() else None


def _follow(lines: Iterable[str]) -> Generator[dict[str, Any], None, None]:
    """Yields the events among a process's output lines."""
    for line in lines:
        event = parse_event(line)
        if event is not None:
            yield event


def fine_tune(
    request: FineTuneRequest, job: ProcessJob | None = None
) -> Generator[dict[str, Any], None, FineTuneOutcome]:
    """Returns how the fine-tune ended, after yielding its events.

    Driven by a ``jobs.Job``, the job's stop reaches the processes (``ProcessJob.stop``:
    SIGINT, then SIGTERM and a kill) and the fine-tune winds down: the training process
    keeps its last checkpoint and the outcome says "stopped".

    Trains in a separate process (``request.command()``), its stderr kept in
    ``<out>/train.log``; when it finishes, evaluates the base and the new best
    checkpoint on the cohort's validation split (test without one) in another process
    (``evaluate.json``, ``evaluate.log``).

    Yields:
        The training process's events (an "epoch" event also carries ``log``, the
        run's log so far), and the job's own: "launch" (``data.command``, ``data.out``,
        ``data.log``) before each process and "evaluate" (``done``/``total`` slides)
        while evaluating.
    """
    job = job if job is not None else ProcessJob()
    driver = current_job()
    if driver is not None:
        driver.on_stop(job.stop)
    out = request.run_dir
    try:
        header = request.base_header()
        argv = request.command(header)
        out.mkdir(parents=True, exist_ok=True)
    except (ValueError, OSError) as exc:
        return FineTuneOutcome("failed", out, error=str(exc))
    log = out / "train.log"
    yield {
        "stage": "launch",
        "done": 0,
        "total": request.epochs,
        "message": f"training in {out}",
        "data": {"command": argv, "out": str(out), "log": str(log)},
    }
    final: dict[str, Any] = {}
    epochs_done = 0
    try:
        with open(log, "w") as stderr:
            process = job.popen(argv, stdout=subprocess.PIPE, stderr=stderr)
            with process.stdout:  # type: ignore[union-attr]
                for event in _follow(process.stdout):  # type: ignore[arg-type]
                    if event["stage"] == "epoch":
                        epochs_done = max(epochs_done, event["done"])
                        event["log"] = read_log(out)
                    elif event["stage"] in ("done", "stopped"):
                        final = event
                    yield event
            code = process.wait()
    except Stopped:
        return FineTuneOutcome("stopped", out, log=log)
    except OSError as exc:
        return FineTuneOutcome("failed", out, error=f"could not start training: {exc}", log=log)
    data = final.get("data", {})
    epochs_done = int(data.get("epochs_done") or epochs_done)
    best = _existing(data.get("best")) or _existing(out / "best.safetensors")
    last = _existing(data.get("last")) or _existing(out / "last.safetensors")
    if code != 0:
        if code == EXIT_STOPPED or final.get("stage") == "stopped" or job.stop_requested:
            return FineTuneOutcome("stopped", out, best, last, epochs_done, code, log=log)
        error = f"training ended: {_exit_reason(code)}"
        tail = _tail(log)
        return FineTuneOutcome(
            "failed", out, best, last, epochs_done, code, f"{error}\n{tail}".strip(), log
        )
    outcome = FineTuneOutcome("done", out, best, last, epochs_done, code, log=log)
    if best is None:
        outcome.evaluation_error = "the run wrote no best checkpoint"
        return outcome
    yield from _evaluate(request, header.config.get("classes"), job, outcome)
    return outcome


def _evaluate(
    request: FineTuneRequest,
    classes: Sequence[str] | None,
    job: ProcessJob,
    outcome: FineTuneOutcome,
) -> Generator[dict[str, Any], None, None]:
    """Fills ``outcome``'s before/after table (or its ``evaluation_error``), yielding
    "launch" and per-slide "evaluate" events."""
    out = outcome.out
    try:
        split = outcome.split = evaluation_split(request.cohort)
    except (ValueError, OSError) as exc:
        outcome.evaluation_error = f"cannot read the cohort: {exc}"
        return
    assert outcome.best is not None
    argv = evaluate_command(
        request.base,
        outcome.best,
        request.cohort,
        split,
        device=request.device,
        classes=classes,
        labels=request.labels,
        options=request.slide_options(),
    )
    report, log = out / "evaluate.json", out / "evaluate.log"
    yield {
        "stage": "launch",
        "done": 0,
        "total": 0,
        "message": f"evaluating before and after on the {split} split",
        "data": {"command": argv, "out": str(out), "log": str(log)},
    }
    done = 0
    try:
        with open(report, "w") as stdout, open(log, "w") as stderr_log:
            process = job.popen(argv, stdout=stdout, stderr=subprocess.PIPE)
            with process.stderr:  # type: ignore[union-attr]
                for line in process.stderr:  # type: ignore[union-attr]
                    stderr_log.write(line)
                    stderr_log.flush()
                    match = _EVALUATE_PROGRESS.search(line)
                    if match:
                        done += 1
                        total = 2 * int(match.group(2))  # two models, one pass each
                        yield {
                            "stage": "evaluate",
                            "done": done,
                            "total": total,
                            "message": f"evaluating on the {split} split: {done}/{total}",
                            "data": {},
                        }
            code = process.wait()
    except Stopped:
        outcome.evaluation_error = "stopped before the evaluation"
        return
    except OSError as exc:
        outcome.evaluation_error = f"could not evaluate: {exc}"
        return
    if code != 0:
        reason = "stopped" if job.stop_requested else _exit_reason(code)
        outcome.evaluation_error = f"evaluation ended: {reason}\n{_tail(log)}".strip()
        return
    try:
        outcome.evaluation = parse_evaluation(report.read_text())
    except (ValueError, OSError) as exc:
        outcome.evaluation_error = str(exc)
