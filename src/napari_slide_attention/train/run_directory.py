"""A training run's directory: its settings record, checkpoints, training state and log,
and resuming from them (``RunDirectory``); what a run produced (``TrainSummary``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..files import atomic_copy, atomic_write_text, is_temporary
from ..jobs import Progress
from ..models.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_fits,
    read_checkpoint,
    save_checkpoint,
)
from ..models.preact_resnet import WeightsReport
from ..models.training_state import holds_weights, load_training_state, save_training_state

if TYPE_CHECKING:
    from .loop import SettingsRecord

__all__ = ["RunDirectory", "TrainSummary", "restore_normalisation"]


@dataclass
class TrainSummary:
    """What a training run produced."""

    run_dir: Path
    best: Path | None
    last: Path | None
    epochs_done: int
    log: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False


class RunDirectory:
    """A training run's directory: settings record, checkpoints, training state and log.

    Creating one creates the directory, decides whether the run resumes and writes
    ``settings.json``. ``restore`` then loads a resumed run's model, optimiser state and
    log; ``save_epoch`` writes what an epoch leaves behind.

    Attributes:
        path: the directory.
        settings_file, state_file, last, best: ``settings.json``,
            ``training-state.safetensors``, ``last.safetensors``, ``best.safetensors``.
        resuming: a run found in the directory continues.
        log: the log rows so far (one per epoch).
        start_epoch: the first epoch still to train.
        best_score: the best epoch's score so far (what ``validate`` scored, e.g. the
            validation mean F1 or minus the validation loss; minus the training loss
            without validation).
        best_epoch: the epoch ``best`` holds (None before the first).

    ``save_epoch`` writes the epoch's checkpoint, ``last`` and ``best``, then the training
    state, which holds the weights, optimiser state, epoch, best score and log rows in
    one file: renaming it into place is the moment the epoch counts as done. A run
    killed at any moment resumes from the last complete training state, and ``restore``
    puts ``last``, ``best`` and the log files back to that state (a kill between the
    files may have left them an epoch ahead of it).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        record: dict[str, Any],
        *,
        resume: bool,
        need_last: bool = False,
        settings_type: type[SettingsRecord] | None = None,
    ) -> None:
        """Open (create) a run directory and write its settings record.

        Args:
            path: the directory.
            record: what ``settings.json`` holds; its "settings" and "classes" must equal
                a resumed run's.
            resume: continue a run found in the directory (training state and settings
                present).
            need_last: resume only when ``last.safetensors`` is there too.
            settings_type: the settings' class: a resumed run's record is read through
                its ``from_dict``, so a run written before a settings change that keeps
                its meaning (model settings nested under ``model``) still resumes.

        Raises:
            ValueError: resuming a run with other settings or classes.
        """
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.settings_file = self.path / "settings.json"
        self.state_file = self.path / "training-state.safetensors"
        self.last = self.path / "last.safetensors"
        self.best = self.path / "best.safetensors"
        self.resuming = (
            resume
            and self.state_file.exists()
            and self.settings_file.exists()
            and (self.last.exists() or not need_last)
        )
        for folder in (self.path, self.path / "checkpoints"):
            _remove_temporaries(folder)
        if self.resuming:
            try:
                previous = json.loads(self.settings_file.read_text())
                if not isinstance(previous, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as exc:
                raise ValueError(
                    f"{self.settings_file}: cannot be read ({exc}); pass --no-resume to start "
                    "over there, or choose another --out"
                ) from None
            settings = previous.get("settings")
            if settings_type is not None and isinstance(settings, dict):
                try:
                    settings = settings_type.from_dict(settings).to_dict()
                except (ValueError, TypeError) as exc:
                    raise ValueError(
                        f"{self.path}: holds a run whose settings this version cannot read "
                        f"({exc}); pass --no-resume to start over there, or choose another "
                        "--out"
                    ) from exc
            same = settings == record["settings"]
            if not same or previous.get("classes") != list(record["classes"]):
                raise ValueError(
                    f"{self.path}: holds a run with other settings or classes; resume it "
                    "with the same settings, or choose another --out (or pass --no-resume "
                    "to start over)"
                )
        atomic_write_text(self.settings_file, json.dumps(record, indent=1))
        self.log: list[dict[str, Any]] = []
        self.start_epoch = 0
        self.best_score = -math.inf
        self.best_epoch: int | None = None

    def restore(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, epochs: int
    ) -> Generator[Progress, None, None]:
        """When resuming: the weights, normalisation and optimiser state of the last
        complete epoch, the epoch to start at, the best score and the earlier log rows;
        ``last``, ``best`` and the log files are put back to that epoch where a kill left
        them ahead of it. Nothing when not resuming.

        Args:
            model: the model (with ``set_normalisation``).
            optimizer: its optimiser.
            epochs: the run's epochs (for the event).

        Yields:
            Progress: "resume" once, when resuming.

        Raises:
            CheckpointError: the training state is damaged or does not fit the model.
        """
        if not self.resuming:
            return
        header = read_checkpoint(self.state_file, tensors=False)
        if holds_weights(header):
            state = load_training_state(self.state_file, optimizer, model)
            epoch = _state_epoch(self.state_file, state)
            restore_normalisation(model, state.get("model_config") or {})
        else:  # written before the training state kept the weights
            state = load_training_state(self.state_file, optimizer)
            epoch = _state_epoch(self.state_file, state)
            weights = self._checkpoint_of(epoch)
            check_fits(weights, model.state_dict())
            model.load_state_dict(weights.tensors, strict=True)
            restore_normalisation(model, weights.config)
        self.start_epoch = epoch + 1
        self.best_score = float(state.get("best_score", -math.inf))
        best_epoch = state.get("best_epoch")
        self.best_epoch = best_epoch if isinstance(best_epoch, int) else None
        rows = state.get("log")
        if not isinstance(rows, list):
            log_file = self.path / "log.json"
            rows = json.loads(log_file.read_text()) if log_file.exists() else []
        self.log = [
            r for r in rows if isinstance(r, dict) and r.get("epoch", -1) < self.start_epoch
        ]
        self._repair(epoch)
        yield Progress(
            "resume", self.start_epoch, epochs, f"resuming after epoch {self.start_epoch}"
        )

    def _epoch_file(self, epoch: int) -> Path:
        return self.path / "checkpoints" / f"epoch-{epoch + 1:04d}.safetensors"

    def _checkpoint_of(self, epoch: int) -> Checkpoint:
        """The weights of ``epoch`` for an older training state: ``last`` if it is of that
        epoch (a kill may have left it one ahead), else the epoch's own checkpoint."""
        for candidate in (self.last, self._epoch_file(epoch)):
            if _epoch_of(candidate) == epoch:
                return read_checkpoint(candidate)
        raise CheckpointError(
            self.state_file,
            f"is the training state after epoch {epoch + 1}, but neither {self.last.name} "
            f"nor {self._epoch_file(epoch).name} holds that epoch's weights; pass "
            "--no-resume to start over",
        )

    def _repair(self, epoch: int) -> None:
        """``last``, ``best`` and the log files as the training state of ``epoch`` has
        them (each from the epoch's own checkpoint, where it is there)."""
        wanted = [(self.last, epoch)]
        if self.best_epoch is not None:
            wanted.append((self.best, self.best_epoch))
        for target, of in wanted:
            source = self._epoch_file(of)
            if _epoch_of(target) != of and _epoch_of(source) == of:
                atomic_copy(source, target)
        _write_log(self.path, self.log)

    def save_epoch(
        self,
        epoch: int,
        row: dict[str, Any],
        score: float,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        extra: dict[str, Any],
    ) -> Path:
        """Log an epoch and write its checkpoint, ``last``, ``best`` (when ``score`` beats
        the best so far), the training state and the log files.

        Args:
            epoch: the epoch (from 0).
            row: its log row.
            score: its score (higher is better).
            model: the model (with a ``config`` that has ``kind`` and ``to_dict``).
            optimizer: its optimiser.
            extra: the checkpoint's extras, to which the epoch and the row's scalar
                metrics are added.

        Returns:
            The epoch's checkpoint.
        """
        self.log.append(row)
        extra = {
            **extra,
            "epoch": epoch,
            "metrics": {k: v for k, v in row.items() if not isinstance(v, dict)},
        }
        config = model.config
        path = save_checkpoint(
            self.path / "checkpoints" / f"epoch-{epoch + 1:04d}.safetensors",
            config.kind,
            config.to_dict(),
            model.state_dict(),
            extra,
        )
        atomic_copy(path, self.last)
        if score > self.best_score:
            self.best_score, self.best_epoch = score, epoch
            atomic_copy(path, self.best)
        # the epoch is done once this file is in place (see the class's docstring)
        save_training_state(
            self.state_file,
            optimizer,
            {
                "epoch": epoch,
                "best_score": self.best_score,
                "best_epoch": self.best_epoch,
                "log": self.log,
                "model_config": config.to_dict(),
            },
            model.state_dict(),
        )
        _write_log(self.path, self.log)
        return path

    def checkpoint_extra(
        self, cohort: str | None, settings: SettingsRecord, report: WeightsReport | None
    ) -> dict[str, Any]:
        """The extras every checkpoint of the run carries: cohort, settings and, where
        pretrained weights were loaded, what was loaded."""
        extra: dict[str, Any] = {"cohort": cohort, "settings": settings.to_dict()}
        if report is not None:
            extra["weights"] = {
                "path": report.path,
                "loaded": len(report.loaded),
                "missing": len(report.missing),
            }
        return extra

    def summary(self, stopped_early: bool) -> TrainSummary:
        """The run's summary (best and last checkpoints where they exist)."""
        return TrainSummary(
            self.path,
            self.best if self.best.exists() else None,
            self.last if self.last.exists() else None,
            (self.log[-1]["epoch"] + 1) if self.log else self.start_epoch,
            self.log,
            stopped_early,
        )


def restore_normalisation(model: torch.nn.Module, config: dict[str, Any]) -> None:
    """A checkpoint config's normalisation into ``model`` (its weights already loaded)."""
    mean, std = config.get("mean"), config.get("std")
    if mean is None and isinstance(config.get("hard"), dict):
        # the dual model keeps its normalisation with its hard-attention part
        mean, std = config["hard"].get("mean"), config["hard"].get("std")
    if mean is not None:
        model.set_normalisation(mean, std)


def _write_log(run_dir: Path, log: list[dict[str, Any]]) -> None:
    """``log.json`` and ``log.csv`` (scalar columns, in order of appearance), atomically."""
    atomic_write_text(run_dir / "log.json", json.dumps(log, indent=1))
    keys: list[str] = []
    for row in log:
        keys += [k for k in row if k not in keys and not isinstance(row[k], dict | list)]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(log)
    atomic_write_text(run_dir / "log.csv", text.getvalue())


def _epoch_of(path: Path) -> int | None:
    """The epoch a checkpoint's header names, or None (missing, unreadable, none)."""
    try:
        epoch = read_checkpoint(path, tensors=False).extra.get("epoch")
    except CheckpointError:
        return None
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None


def _state_epoch(path: Path, state: dict[str, Any]) -> int:
    """The epoch a training state completed (checked: a whole number >= 0)."""
    epoch = state.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise CheckpointError(path, f"damaged training state (epoch {str(epoch)[:20]!r})")
    return epoch


def _remove_temporaries(folder: Path) -> None:
    """Delete what interrupted atomic writes left in a run's folder (hidden temporary
    files no reader takes; older versions named theirs ``log.json.tmp`` and
    ``.best.safetensors.tmp``)."""
    if not folder.is_dir():
        return
    older = {"log.json.tmp", "log.csv.tmp", ".last.safetensors.tmp", ".best.safetensors.tmp"}
    for path in folder.iterdir():
        if (is_temporary(path) or path.name in older) and path.is_file():
            path.unlink(missing_ok=True)
