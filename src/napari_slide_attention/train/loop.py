"""What the trainers share: the run directory, the model's set-up and the epoch loop.

``train_grid`` and ``train_sliding_window`` differ in their data and in what one epoch of
training and validation does; the rest is here, once:

``RunDirectory``   (``run_directory.py``) ``settings.json`` (and the check that a
                   resumed run has the same settings and classes), resuming from
                   ``training-state.safetensors`` (weights, optimiser state, epoch, best
                   score and log rows: one file, one moment), and per epoch the
                   checkpoint, ``last``/``best`` copies, training state and
                   ``log.csv``/``log.json``
``init_settings``, ``load_init``  ``--init``: the checkpoint's model settings and weights,
                   checked against the model before they are used
``initialise``     pretrained trunk weights, normalisation statistics, BN calibration
``run_epochs``     per-epoch random streams and learning rate, the log row, the "epoch"
                   event and the time limit
``SettingsRecord`` the settings classes' ``to_dict``/``from_dict``; ``adam``,
                   ``class_weights`` and ``on_device`` the optimiser, the loss's class
                   weights and the model's placement
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import asdict, fields, replace
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np
import torch

from ..jobs import Progress
from ..models.checkpoint import CheckpointError, check_fits, model_config, read_checkpoint
from ..models.preact_resnet import WeightsReport, load_weights
from ..slide.sampling import tissue_statistics
from .run_directory import RunDirectory, TrainSummary, restore_normalisation

__all__ = [
    "RunDirectory",
    "SettingsRecord",
    "TrainSummary",
    "adam",
    "class_weights",
    "init_settings",
    "initialise",
    "load_init",
    "on_device",
    "run_epochs",
]


_S = TypeVar("_S", bound="SettingsRecord")


class SettingsRecord:
    """``to_dict`` and ``from_dict`` for a settings dataclass (the trainers' settings), and
    the model settings nested in them.

    A trainer's settings hold the model's own as ``model``: the fields of its model config
    (``model_type``) that shape the model, i.e. all but the class names, their risk order
    and the normalisation, which come from the cohort. They are not declared again here,
    so a model setting has one name, one default and one check (the config's). A flat
    key that names a model setting (``--set n_maps=8``, or a run folder written before
    the settings nested it) goes into ``model``.
    """

    model_type: ClassVar[type | None] = None
    # Model settings that shape no tensor: a fine-tune (``--init``) keeps its own.
    fine_tunable: ClassVar[tuple[str, ...]] = ("trainable_blocks", "dropout")
    # Config fields that are not the model's shape: they come from the cohort.
    _NOT_MODEL: ClassVar[tuple[str, ...]] = ("classes", "risk_order", "mean", "std", "kind")

    @classmethod
    def model_keys(cls) -> tuple[str, ...]:
        """The model settings ``model`` holds, in the config's field order."""
        if cls.model_type is None:
            return ()
        return tuple(
            f.name for f in fields(cls.model_type) if f.init and f.name not in cls._NOT_MODEL
        )

    def _check_model(self) -> None:
        """Complete ``model`` with the config's defaults and check it through the config
        (for ``__post_init__``).

        Raises:
            ValueError: an unknown model setting, or a value the config refuses.
        """
        model = dict(self.model or {})
        unknown = sorted(set(model) - set(self.model_keys()))
        if unknown:
            kind = self.model_type.__dataclass_fields__["kind"].default
            raise ValueError(f"unknown {kind} model settings: {', '.join(unknown)}")
        probe = self.model_type(classes=("a", "b"), **model).to_dict()
        self.model = {k: probe[k] for k in self.model_keys()}

    def model_config(self, classes: tuple[str, ...]) -> Any:
        """The model's config for these class names."""
        return self.model_type(classes=tuple(classes), **self.model)

    def with_model(self: _S, config: dict[str, Any]) -> _S:
        """These settings with the model settings of a checkpoint's config (``--init``:
        the checkpoint decides the model's shape; ``fine_tunable`` ones stay these).

        Raises:
            ValueError: a model setting given here (other than its default) differs from
                the checkpoint's.
        """
        defaults = type(self)().model if self.model_type is not None else {}
        theirs = {
            k: config[k] for k in self.model_keys() if k in config and k not in self.fine_tunable
        }
        clashes = [
            f"{k}={self.model[k]!r} (the checkpoint's: {theirs[k]!r})"
            for k in theirs
            if self.model[k] != defaults.get(k) and not _agrees(self.model[k], theirs[k])
        ]
        if clashes:
            raise ValueError(
                "--init takes the model's settings from the checkpoint; these differ from "
                f"it: {', '.join(clashes)} (leave them out)"
            )
        return replace(self, model={**self.model, **theirs})

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-able values (tuples as lists), in field order."""
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls: type[_S], data: dict[str, Any]) -> _S:
        """Settings from ``to_dict``'s output (or part of it: the rest keep defaults); flat
        model settings go into ``model``.

        Raises:
            ValueError: a name that is no setting, or a model setting given twice.
        """
        data = dict(data)
        if cls.model_type is not None:
            model = dict(data.pop("model", None) or {})
            for key in cls.model_keys():
                if key in data:
                    value = data.pop(key)
                    if key in model and _jsonable(model[key]) != _jsonable(value):
                        raise ValueError(f"model setting {key} given twice, differently")
                    model[key] = value
            data["model"] = model
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(unknown)}")
        return cls(**data)


def _jsonable(value: Any) -> Any:
    """Tuples as lists, all the way down (what a JSON round trip gives)."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


class _Settings(Protocol):
    """The settings ``run_epochs`` and ``initialise`` read (both trainers' have them)."""

    epochs: int
    seed: int
    max_hours: float
    weight_decay: float
    weights: str | None
    calibrate_bn: bool | None
    normalise_tiles: int

    def learning_rate(self, epoch: int) -> float: ...

    def to_dict(self) -> dict[str, Any]: ...


def init_settings(settings: _S, init: str | os.PathLike) -> _S:
    """``settings`` with the model settings of the ``--init`` checkpoint
    (``SettingsRecord.with_model``), its header checked first.

    Raises:
        CheckpointError: the checkpoint cannot be read, its config is damaged or does not
            describe its tensors, or a model setting given here disagrees with it (naming
            the file and the setting).
    """
    header = read_checkpoint(init, tensors=False)
    kind, config = model_config(header)
    with torch.device("meta"):  # its tensors fit its config: checked before any work
        check_fits(header, kind.build(config).state_dict())
    try:
        return settings.with_model(header.config)
    except ValueError as exc:
        raise CheckpointError(init, str(exc)) from None


def load_init(
    model: torch.nn.Module, init: str | os.PathLike, kind: str, classes: Sequence[str]
) -> None:
    """Start ``model`` from a checkpoint (fine-tuning): its weights and normalisation.

    Raises:
        CheckpointError: the checkpoint holds another kind of model or other classes, a
            damaged config, or weights that do not fit ``model`` (naming the tensor and
            the settings behind its shape).
    """
    base = read_checkpoint(init, tensors=False)
    if base.kind != kind or tuple(base.config.get("classes", ())) != tuple(classes):
        raise CheckpointError(init, f"is not a {kind} model for this cohort's classes")
    model_config(base)  # every setting of its type and in range
    check_fits(base, model.state_dict())
    model.load_state_dict(read_checkpoint(init).tensors, strict=True)
    restore_normalisation(model, base.config)


def initialise(
    model: torch.nn.Module,
    settings: _Settings,
    train: Sequence[Any],
    sample_tiles: Callable[[Sequence[Any], int], Iterable[np.ndarray]],
    device: torch.device,
    *,
    calibrate: bool = True,
) -> Generator[Progress, None, WeightsReport | None]:
    """A new model's start: pretrained trunk weights (``settings.weights``), the
    normalisation statistics of the training slides' tissue and, where asked (by default
    when no weights were given), the frozen trunk's batch-norm statistics.

    Args:
        model: the model (with ``trunk``, ``set_normalisation`` and
            ``calibrate_frozen_batchnorm``).
        settings: the training settings.
        train: the training slides, as ``sample_tiles`` takes them.
        sample_tiles: (slides, per slide) -> RGB tiles of those slides.
        device: where the calibration runs (the model is moved there when it does).
        calibrate: whether the model has frozen batch-norm statistics to calibrate.

    Yields:
        Progress: "weights" when weights were loaded, "calibrate" when calibrated.

    Returns:
        What loading the weights did, or None without weights.
    """
    report = None
    if settings.weights:
        report = load_weights(model.trunk, settings.weights)
        yield Progress("weights", 1, 1, report.summary())
    mean, std = tissue_statistics(sample_tiles(train, settings.normalise_tiles))
    model.set_normalisation(mean, std)
    wanted = settings.calibrate_bn if settings.calibrate_bn is not None else not settings.weights
    if calibrate and wanted:
        batches = [
            torch.from_numpy(np.stack(list(sample_tiles([s], settings.normalise_tiles))))
            for s in train
        ]
        n = model.to(device).calibrate_frozen_batchnorm(batches)
        yield Progress("calibrate", 1, 1, f"frozen trunk BN statistics from {n} tiles")
    return report


def on_device(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` moved to ``device`` (channels-last on CUDA)."""
    model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def class_weights(
    rule: str, counts: np.ndarray, device: torch.device | None = None
) -> torch.Tensor | None:
    """Cross-entropy class weights: "balanced" (inverse frequency of ``counts``, 0 for
    absent classes) or None for "none"."""
    if rule != "balanced":
        return None
    w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / (counts > 0).sum(), 0.0)
    return torch.tensor(w, dtype=torch.float32, device=device)


def adam(model: torch.nn.Module, settings: _Settings) -> torch.optim.Adam:
    """Adam over the trainable parameters at the first epoch's learning rate."""
    return torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad],
        lr=settings.learning_rate(0),
        weight_decay=settings.weight_decay,
    )


TrainEpoch = Callable[[int, np.random.Generator, float], Generator[Progress, None, dict[str, Any]]]
Validate = Callable[[], tuple[dict[str, Any], float] | None]


def run_epochs(
    run: RunDirectory,
    settings: _Settings,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_epoch: TrainEpoch,
    validate: Validate,
    extra: dict[str, Any],
    score_name: str,
    score_key: str | None = None,
) -> Generator[Progress, None, bool]:
    """Train from ``run.start_epoch`` to ``settings.epochs``, saving every epoch.

    Each epoch draws from its own random streams (numpy ``[seed, epoch]``, torch and
    Python's ``random`` ``seed * 100003 + epoch``), so a resumed run draws what the
    uninterrupted one would,
    and sets the schedule's learning rate. Its log row holds "epoch", "lr", what
    ``train_epoch`` returned, "seconds" (training time) and what ``validate`` returned.

    Args:
        run: the run directory (restored where resuming).
        settings: the training settings.
        model: the model.
        optimizer: its optimiser.
        train_epoch: (epoch, rng, lr) -> a generator of "step" events returning the
            row's training entries (with "train_loss").
        validate: () -> the row's validation entries and the epoch's score, or None
            without validation data (the score is then minus the training loss).
        extra: the checkpoints' extras (see ``RunDirectory.checkpoint_extra``).
        score_name: how the "epoch" event's message names the validation score.
        score_key: the log entry the message shows under ``score_name`` (e.g. the loss,
            when the score is minus the loss); None = the score itself.

    Yields:
        Progress: what ``train_epoch`` yields, and "epoch" per epoch (data: the log row
        and the checkpoint).

    Returns:
        Whether the run stopped early (``settings.max_hours`` passed).
    """
    t_start = time.perf_counter()
    (run.path / "checkpoints").mkdir(exist_ok=True)
    for epoch in range(run.start_epoch, settings.epochs):
        t_epoch = time.perf_counter()
        # per-epoch random streams, so a resumed run draws what the uninterrupted one would
        rng = np.random.default_rng([settings.seed, epoch])
        torch.manual_seed(settings.seed * 100_003 + epoch)  # CPU and CUDA
        random.seed(settings.seed * 100_003 + epoch)
        lr = settings.learning_rate(epoch)
        for group in optimizer.param_groups:
            # a group may run at a fixed multiple of the schedule (the dual model's parts)
            group["lr"] = lr * group.get("lr_scale", 1.0)
        trained = yield from train_epoch(epoch, rng, lr)
        row: dict[str, Any] = {
            "epoch": epoch,
            "lr": lr,
            **trained,
            "seconds": time.perf_counter() - t_epoch,
        }
        validated = validate()
        if validated is None:
            score = -row["train_loss"]
            shown = ""
        else:
            entries, score = validated
            row.update(entries)
            value = score if score_key is None else row[score_key]
            shown = f", {score_name} {value:.{3 if score_key else 2}f}"
        path = run.save_epoch(epoch, row, score, model, optimizer, extra)
        yield Progress(
            "epoch",
            epoch + 1,
            settings.epochs,
            f"epoch {epoch + 1}: loss {row['train_loss']:.3f}{shown}",
            {"row": row, "checkpoint": str(path)},
        )
        if settings.max_hours and (time.perf_counter() - t_start) / 3600 > settings.max_hours:
            return True
    return False


def _agrees(mine: Any, theirs: Any) -> bool:
    """Whether a model setting given for ``--init`` agrees with the checkpoint's value.

    A part's settings (a dict, e.g. the dual model's ``hard``) agree when every key given
    here has the checkpoint's value: the checkpoint also holds what training added to the
    part (the tile normalisation's ``mean`` and ``std``), which nobody gives by hand.
    """
    if isinstance(mine, dict) and isinstance(theirs, dict):
        return all(k in theirs and _agrees(v, theirs[k]) for k, v in mine.items())
    return mine == _jsonable(theirs)
