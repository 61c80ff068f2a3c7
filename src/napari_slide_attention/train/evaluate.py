"""Evaluating trained models on a cohort: one generator for every driver.

:func:`evaluate_models` runs one or more models on the slides of a cohort split, one
slide at a time, and returns the Table-2 metrics (:mod:`.metrics`) and the per-slide
predictions of each. It is a job generator (:mod:`napari_slide_attention.jobs`): it
passes on the prediction's own events (tiles, pieces) and yields ``Progress("slide",
done, total)`` after every slide, ``done``/``total`` counting the slides of all models,
with the slide's row and its ``SlideResult`` in ``data``. The ``evaluate`` command, the
Fine-tune panel (which runs that command) and the benchmarks all go through it.

:func:`evaluate_folds` is the cross-validation of Raza et al. (Table II): each fold's
model of one or more k-fold runs (``train --folds``, :func:`.crossval.write_fold_cohorts`)
on that fold's test slides, and F1 and AUROC as mean ± std over the folds
(:func:`.crossval.summarise_folds`). :func:`her2_scores` adds the HER2 contest's
criteria (:mod:`.her2_contest`) to an evaluation.

By default a slide is predicted with ``inference.predict(model, slide, device=...,
tissue=..., mpp=...)``; ``predict_slide`` replaces that for callers that need other
options per slide (the dual benchmark's sampler and seed).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..jobs import Progress
from .cohort import Cohort, CohortEntry
from .crossval import CrossValSummary, read_fold_cohorts, summarise_folds
from .metrics import Metrics, evaluate

__all__ = [
    "CrossValidationReport",
    "EvaluationReport",
    "FoldsOfModel",
    "ModelEvaluation",
    "SlidePredictor",
    "SlideRow",
    "evaluate_folds",
    "evaluate_models",
    "her2_scores",
    "model_name",
]

# (model, entry, position of the entry in the split) -> the prediction's job generator
SlidePredictor = Callable[[Any, CohortEntry, int], Generator[Progress, None, Any]]
# What a model is given as: a checkpoint path or a loaded module.
ModelSource = str | os.PathLike | Any


@dataclass(frozen=True)
class SlideRow:
    """One slide's prediction.

    Attributes:
        slide: the slide's path.
        truth: its true class (the cohort's label).
        predicted: the predicted class.
        confidence: the probability of the predicted class.
        probabilities: the class probabilities, in the classes' order.
    """

    slide: str
    truth: str
    predicted: str
    confidence: float
    probabilities: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        """Returns the row as a JSON-ready dict (all fields)."""
        return {
            "slide": self.slide,
            "truth": self.truth,
            "predicted": self.predicted,
            "confidence": self.confidence,
            "probabilities": list(self.probabilities),
        }


@dataclass(frozen=True, eq=False)
class ModelEvaluation:
    """One model's evaluation on a split.

    Attributes:
        name: the model's name in reports ("kind (run folder)" for a checkpoint).
        kind: the model kind ("grid-attention" ...; the class name for a bare module).
        checkpoint: the checkpoint's path; None for a module given as such.
        extra: the checkpoint's extras (epoch, metrics, settings); empty for a module.
        metrics: the Table-2 metrics, confusion matrix and AUROC.
        slides: the per-slide rows, in the split's order.
    """

    name: str
    kind: str
    checkpoint: str | None
    extra: dict[str, Any]
    metrics: Metrics
    slides: tuple[SlideRow, ...]

    def to_json_dict(self) -> dict[str, Any]:
        """Returns the model's part of ``evaluate --json``: ``{"metrics", "slides"}``, each
        slide as ``{"slide", "truth", "predicted", "confidence"}`` (programs parse this
        layout: the Fine-tune panel's before/after table)."""
        return {
            "metrics": self.metrics.to_dict(),
            "slides": [
                {
                    "slide": r.slide,
                    "truth": r.truth,
                    "predicted": r.predicted,
                    "confidence": r.confidence,
                }
                for r in self.slides
            ],
        }


@dataclass(frozen=True, eq=False)
class EvaluationReport:
    """Returned by :func:`evaluate_models`.

    Attributes:
        split: the split evaluated.
        cohort: the cohort's CSV (None for a cohort made in memory).
        n_slides: slides in the split.
        models: each model's evaluation, by name, in the order given.
    """

    split: str
    cohort: str | None
    n_slides: int
    models: dict[str, ModelEvaluation]

    @property
    def metrics(self) -> dict[str, Metrics]:
        """Returns each model's metrics by name (what ``format_table2`` takes)."""
        return {name: m.metrics for name, m in self.models.items()}

    def to_json_dict(self) -> dict[str, Any]:
        """Returns the report as ``evaluate --json`` prints it."""
        return {
            "split": self.split,
            "cohort": self.cohort,
            "models": {name: m.to_json_dict() for name, m in self.models.items()},
        }


def model_name(kind: str, path: str | os.PathLike) -> str:
    """Returns a checkpoint's name in reports: its kind and its run folder (or file stem)."""
    path = Path(path)
    return f"{kind} ({path.parent.name or path.stem})"


def evaluate_models(
    models: Sequence[ModelSource] | Mapping[str, ModelSource],
    cohort: Cohort,
    split: str = "test",
    *,
    device: str = "auto",
    tissue: Any = None,
    mpp: float | None = None,
    predict_slide: SlidePredictor | None = None,
) -> Generator[Progress, None, EvaluationReport]:
    """Evaluates models on the slides of a cohort split, one slide at a time.

    Args:
        models: checkpoint paths (named by :func:`model_name`, a repeated name getting a
            ``'``), or models by name (checkpoint paths or loaded modules).
        cohort: the cohort; its labels are the truth, its classes must be the models'.
        split: "train", "val" or "test".
        device: where the models run ("auto", "cpu", "cuda").
        tissue: ``TissueParams`` for the prediction (None: its defaults).
        mpp: override of the slides' µm per pixel (None: the cohort's, where its entries
            have one, else the slides' own).
        predict_slide: ``(model, entry, index) -> job generator returning a SlideResult``
            instead of ``inference.predict(model, entry.slide, device=, tissue=, mpp=)``.

    Yields:
        The prediction's events, and ``Progress("model", i, n_models)`` before a model is
        loaded and ``Progress("slide", done, total, message, data)`` after each slide,
        counting the slides of all models; ``message`` is "NAME: [n/N] SLIDE: PREDICTED
        (truth TRUTH)" and ``data`` holds "model", "index" (n), "slides" (N), "row" (the
        row's dict), "entry" and "result" (the ``SlideResult``).

    Returns:
        The report.

    Raises:
        ValueError: the split has no slides, or a model's classes differ from the
            cohort's; ``CheckpointError`` (a ValueError) for an unreadable checkpoint.
    """
    entries = cohort.split(split)
    if not entries:
        where = cohort.path if cohort.path is not None else "the cohort"
        raise ValueError(f"{where}: the {split!r} split has no slides")
    if isinstance(models, str | os.PathLike):
        models = [models]
    sources = list(models.items()) if isinstance(models, Mapping) else [(None, m) for m in models]
    if predict_slide is None:
        predict_slide = _default_predictor(device, tissue, mpp)
    total = len(sources) * len(entries)
    done = 0
    evaluations: dict[str, ModelEvaluation] = {}
    for i, (given_name, source) in enumerate(sources):
        yield Progress("model", i, len(sources), f"loading {_describe(source)}")
        model, kind, checkpoint, extra, classes = _load(source, device)
        if classes is not None and tuple(classes) != tuple(cohort.classes):
            raise ValueError(
                f"{checkpoint or kind}: the model's classes {list(classes)} differ from the "
                f"cohort's {list(cohort.classes)} (pass --classes in the model's order)"
            )
        name = given_name or model_name(kind, checkpoint or kind)
        while name in evaluations:
            name += "'"
        rows: list[SlideRow] = []
        for n, entry in enumerate(entries, 1):
            result = yield from predict_slide(model, entry, n - 1)
            probabilities = np.asarray(result.probabilities, dtype=np.float64)
            row = SlideRow(
                slide=str(entry.slide),
                truth=cohort.classes[entry.label],
                predicted=cohort.classes[int(result.predicted)],
                confidence=float(result.confidence),
                probabilities=tuple(float(p) for p in probabilities),
            )
            rows.append(row)
            done += 1
            yield Progress(
                "slide",
                done,
                total,
                f"{name}: [{n}/{len(entries)}] {entry.slide.name}: {row.predicted} "
                f"(truth {row.truth})",
                {
                    "model": name,
                    "index": n,
                    "slides": len(entries),
                    "row": row.to_dict(),
                    "entry": entry,
                    "result": result,
                },
            )
        evaluations[name] = ModelEvaluation(
            name=name,
            kind=kind,
            checkpoint=checkpoint,
            extra=extra,
            metrics=_metrics(rows, cohort.classes),
            slides=tuple(rows),
        )
    return EvaluationReport(
        split=split,
        cohort=None if cohort.path is None else str(cohort.path),
        n_slides=len(entries),
        models=evaluations,
    )


# -- cross-validation --------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class FoldsOfModel:
    """One method's k-fold cross-validation: each fold's model on its test slides.

    Attributes:
        name: the method's name ("kind (run folder)").
        run: the run folder (``fold-1`` ... ``fold-K`` inside).
        folds: each fold's evaluation, in fold order.
        summary: F1 and AUROC per fold and their mean ± std.
    """

    name: str
    run: str
    folds: tuple[ModelEvaluation, ...]
    summary: CrossValSummary

    def to_json_dict(self) -> dict[str, Any]:
        """Returns the method's part of ``evaluate --folds K --json``."""
        s = self.summary
        return {
            "run": self.run,
            "f1": _mean_std_dict(s.f1),
            "auroc": _mean_std_dict(s.auroc),
            "folds": [
                {
                    "fold": r.index + 1,
                    "checkpoint": evaluation.checkpoint,
                    "n": r.n,
                    "f1": r.f1,
                    "auroc": r.auroc,
                    "auroc_note": r.auroc_note,
                    **evaluation.to_json_dict(),
                }
                for r, evaluation in zip(s.folds, self.folds, strict=True)
            ],
        }


@dataclass(frozen=True, eq=False)
class CrossValidationReport:
    """Returned by :func:`evaluate_folds`.

    Attributes:
        k: the number of folds.
        cohort: the cohort's CSV (None for a cohort made in memory).
        n_slides: slides in the cohort (each tested once).
        models: each method's folds, by name, in the order given.
    """

    k: int
    cohort: str | None
    n_slides: int
    models: dict[str, FoldsOfModel]

    @property
    def summaries(self) -> dict[str, CrossValSummary]:
        """Returns each method's summary by name (what ``format_mmr_table`` takes)."""
        return {name: m.summary for name, m in self.models.items()}

    def to_json_dict(self) -> dict[str, Any]:
        """Returns the report as ``evaluate --folds K --json`` prints it."""
        return {
            "folds": self.k,
            "cohort": self.cohort,
            "slides": self.n_slides,
            "models": {name: m.to_json_dict() for name, m in self.models.items()},
        }


def evaluate_folds(
    runs: Sequence[str | os.PathLike],
    cohort: Cohort,
    k: int,
    *,
    device: str = "auto",
    tissue: Any = None,
    mpp: float | None = None,
    predict_slide: SlidePredictor | None = None,
) -> Generator[Progress, None, CrossValidationReport]:
    """Evaluates k-fold runs: each fold's best checkpoint on that fold's test slides.

    Every run (one per method) must hold the same ``k`` folds (their ``cohort.csv``, as
    :func:`.crossval.write_fold_cohorts` writes them) and their test sets must cover the
    cohort, each slide once: Table II compares methods on the same folds, and a slide a
    model trained on must never count as tested. Everything is checked before the
    first model runs. The truth is the cohort's labels.

    Args:
        runs: the run folders, one per method.
        cohort: the cohort the folds were made from.
        k: the number of folds.
        device, tissue, mpp, predict_slide: as :func:`evaluate_models`.

    Yields:
        The events of :func:`evaluate_models` for each fold, with the "slide" events'
        ``done``/``total`` counting the slides of all folds and methods.

    Returns:
        The report.

    Raises:
        ValueError: a run lacks a fold or its best checkpoint, the runs' folds differ,
            or the folds are not a partition of the cohort.
    """
    from ..models.checkpoint import read_checkpoint

    if not runs:
        raise ValueError("no runs to evaluate")
    by_slide = {Path(e.slide).resolve(): e for e in cohort.entries}
    where = cohort.path if cohort.path is not None else "the cohort"
    tests: list[list[CohortEntry]] | None = None
    first = None
    checkpoints: dict[str, list[Path]] = {}
    names: dict[str, str] = {}
    for run in runs:
        fold_cohorts = read_fold_cohorts(run, k, cohort.classes)
        sets = [frozenset(Path(e.slide).resolve() for e in c.split("test")) for c in fold_cohorts]
        if tests is None:
            seen: set[Path] = set()
            for i, test in enumerate(sets):
                foreign = sorted(test - by_slide.keys())
                if foreign:
                    raise ValueError(
                        f"{Path(run) / f'fold-{i + 1}'}: tests on {foreign[0]}, which {where} "
                        "does not list (the run was made from another cohort)"
                    )
                seen |= test
            untested = sorted(by_slide.keys() - seen)
            if untested:
                raise ValueError(
                    f"{where}: {len(untested)} slide(s) are in no test fold of {run} (e.g. "
                    f"{untested[0]}): the run was made from another cohort"
                )
            tests = [[by_slide[p] for p in sorted(test)] for test in sets]
            first = run
        elif sets != [frozenset(Path(e.slide).resolve() for e in t) for t in tests]:
            raise ValueError(
                f"{run}: its folds differ from those of {first}; methods are compared on the "
                "same folds: train them with the same cohort, --folds and --fold-seed"
            )
        paths = [Path(run) / f"fold-{i + 1}" / "best.safetensors" for i in range(k)]
        for i, path in enumerate(paths):
            if not path.is_file():
                raise ValueError(
                    f"{path}: no such checkpoint (fold {i + 1} has not finished an epoch; "
                    "run the same `train --folds` command again to resume)"
                )
        name = f"{read_checkpoint(paths[0], tensors=False).kind} ({Path(run).name})"
        while name in checkpoints:
            name += "'"
        checkpoints[name] = paths
        names[name] = str(run)
    assert tests is not None

    total = len(checkpoints) * len(by_slide)
    done = 0
    per_fold: dict[str, list[ModelEvaluation]] = {name: [] for name in checkpoints}
    for i, test in enumerate(tests):
        fold = Cohort(
            tuple(cohort.classes),
            [replace(e, split="test") for e in test],
            cohort.path,
        )
        labels = {f"{name} fold {i + 1}/{k}": name for name in checkpoints}
        work = evaluate_models(
            {label: checkpoints[name][i] for label, name in labels.items()},
            fold,
            "test",
            device=device,
            tissue=tissue,
            mpp=mpp,
            predict_slide=predict_slide,
        )
        while True:
            try:
                event = next(work)
            except StopIteration as end:
                report: EvaluationReport = end.value
                break
            if event.stage == "slide":
                done += 1
                event = replace(event, done=done, total=total)
            yield event
        for label, evaluation in report.models.items():
            per_fold[labels[label]].append(evaluation)

    methods = {}
    for name, evaluations in per_fold.items():
        summary = summarise_folds(
            [[r.truth for r in e.slides] for e in evaluations],
            [[r.predicted for r in e.slides] for e in evaluations],
            [np.array([r.probabilities for r in e.slides]) for e in evaluations],
            cohort.classes,
        )
        methods[name] = FoldsOfModel(name, names[name], tuple(evaluations), summary)
    return CrossValidationReport(
        k=k,
        cohort=None if cohort.path is None else str(cohort.path),
        n_slides=len(by_slide),
        models=methods,
    )


# -- HER2 contest --------------------------------------------------------------------------
def her2_scores(report: EvaluationReport, points: Any, weights: Any = None) -> dict[str, Any]:
    """Returns the HER2 contest's criteria of each model of an evaluation, by name.

    Args:
        report: an evaluation on a cohort whose classes are HER2 scores (0, 1+, 2+, 3+).
        points: the points table (:func:`.her2_contest.load_points_table`).
        weights: the weights of the weighted confidence; None leaves it out.

    Returns:
        ``ContestScores`` by model name (agreement points, weighted confidence, combined
        points per case and in total), the cases being the report's slides.

    Raises:
        ValueError: a class is not a HER2 score.
    """
    from .her2_contest import score_contest

    return {
        name: score_contest(
            [r.truth for r in m.slides],
            [r.predicted for r in m.slides],
            [min(1.0, max(0.0, r.confidence)) for r in m.slides],  # float32 rounding
            points=points,
            weights=weights,
        )
        for name, m in report.models.items()
    }


# -- helpers -------------------------------------------------------------------------------
def _default_predictor(device: str, tissue: Any, mpp: float | None) -> SlidePredictor:
    """Returns the predictor that runs ``inference.predict`` with the given options."""
    options: dict[str, Any] = {"device": device}
    if tissue is not None:
        options["tissue"] = tissue
    if mpp is not None:
        options["mpp"] = mpp

    def predict_slide(model: Any, entry: CohortEntry, index: int):
        from ..inference import predict

        if entry.mpp is not None and "mpp" not in options:  # the cohort's override
            return predict(model, entry.slide, **options, mpp=entry.mpp)
        return predict(model, entry.slide, **options)

    return predict_slide


def _describe(source: ModelSource) -> str:
    """Returns what a model source is, in a few words."""
    if isinstance(source, str | os.PathLike):
        return str(source)
    return type(source).__name__


def _load(
    source: ModelSource, device: str
) -> tuple[Any, str, str | None, dict[str, Any], tuple[str, ...] | None]:
    """Returns (model, kind, checkpoint path, extras, classes) of a path or a module."""
    if isinstance(source, str | os.PathLike):
        from ..models.checkpoint import load_model
        from ..models.device import resolve_device

        model, checkpoint = load_model(source, resolve_device(device))
        classes = checkpoint.config.get("classes")
        return (
            model,
            checkpoint.kind,
            str(source),
            dict(checkpoint.extra),
            None if classes is None else tuple(classes),
        )
    config = getattr(source, "config", None)
    kind = getattr(config, "kind", None) or type(source).__name__
    classes = getattr(config, "classes", None)
    return source, kind, None, {}, None if classes is None else tuple(classes)


def _metrics(rows: Sequence[SlideRow], classes: Sequence[str]) -> Metrics:
    """Returns the metrics of the rows (probabilities renormalised per slide)."""
    p = np.array([r.probabilities for r in rows], dtype=np.float64)
    return evaluate(
        [r.truth for r in rows],
        [r.predicted for r in rows],
        p / p.sum(1, keepdims=True),
        classes=tuple(classes),
    )


def _mean_std_dict(value: Any) -> dict[str, Any]:
    """Returns a ``MeanStd`` as JSON: mean, std, the folds' values and how many folds."""
    return {
        "mean": value.mean,
        "std": value.std,
        "values": list(value.values),
        "n_folds": value.n_folds,
    }
