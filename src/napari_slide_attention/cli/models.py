"""Commands about models: ``train``, ``predict``, ``evaluate``.

This is the one place where the command line calls into training and inference
(:func:`_trainer`, :func:`cmd_predict`, :func:`cmd_evaluate`): the jobs they make are run
by the driver (``driver.run_job``), which SIGINT and SIGTERM stop at the next event.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..jobs import Progress, Stopped
from .driver import EXIT_STOPPED, EventPrinter, ProgressPrinter, run_job
from .parser import tissue_params
from .slides import open_slide

__all__ = ["cmd_evaluate", "cmd_predict", "cmd_train"]


# -- settings and cohorts ----------------------------------------------------------------
def _parse_sets(pairs: Sequence[str]) -> dict[str, Any]:
    """Returns the ``--set KEY=VALUE`` pairs as a dict (JSON values, else strings)."""
    values: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE, got {pair!r}")
        try:
            values[key.strip().replace("-", "_")] = json.loads(text)
        except json.JSONDecodeError:
            values[key.strip().replace("-", "_")] = text
    return values


_TRAIN_OPTIONS = (
    "epochs",
    "lr",
    "samples_per_step",
    "n_maps",
    "tile_um",
    "input_px",
    "chunk_tiles",
    "trainable_blocks",
    "weights",
    "device",
    "seed",
    "batch_size",
    "mode",
    "sampler",
    "n_tiles",
    "tile_labels",
)
# dual attention's sharper soft attention: options that go into the model's ``soft`` settings
_SOFT_OPTIONS = {"attention_temperature": "temperature", "attention_top_k": "top_k"}


def _settings(cls, args: argparse.Namespace):
    """Returns the training settings ``cls`` made of the options and ``--set`` pairs (a
    model setting given flat, ``--n-maps`` or ``--set kernel=5``, goes into ``model``)."""
    from dataclasses import fields

    known = {f.name for f in fields(cls)} | set(cls.model_keys())
    values = {k: getattr(args, k) for k in _TRAIN_OPTIONS if getattr(args, k, None) is not None}
    soft = {
        v: getattr(args, k) for k, v in _SOFT_OPTIONS.items() if getattr(args, k, None) is not None
    }
    if (soft or "tile_labels" in values) and "tile_labels" not in known:
        raise ValueError(
            "--tile-labels, --attention-temperature and --attention-top-k are settings of "
            "train dual"
        )
    if "crop_um" in known and "tile_um" in values:  # the crop classifier's tile edge
        values["crop_um"] = values.pop("tile_um")
    values = {k: v for k, v in values.items() if k in known}
    stain = getattr(args, "stain", None)
    if stain is not None:
        if "refine" not in known:
            raise ValueError("--stain sets dual attention's tile sampling: a setting of train dual")
        from ..models.dual_attention import STAIN_SAMPLING

        values = {**STAIN_SAMPLING[stain], **values}
    if getattr(args, "amp", None):
        values["amp"] = True
    values.update(_parse_sets(args.set))
    if soft:  # into the soft attention's settings, beside any --set soft={...}
        values["soft"] = {**(values.get("soft") or {}), **soft}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"unknown setting(s) for this model: {', '.join(unknown)}; known: "
            f"{', '.join(sorted(known))}"
        )
    return cls.from_dict(values)


def _cohort(args: argparse.Namespace):
    """Returns the cohort of ``--cohort`` with the classes of ``--classes``."""
    from ..train.cohort import read_cohort

    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    return read_cohort(args.cohort, classes).with_mpp(getattr(args, "mpp", None))


def _labelled_cohort(args: argparse.Namespace, cohort, events: EventPrinter | None, file=None):
    """Returns the cohort with the labels of ``--labels`` applied; says what was applied
    (as an event, or a line on ``file``, stdout by default)."""
    from dataclasses import asdict

    from ..labels import LabelStore, LabelStoreError
    from ..train.labels import apply_labels_with_summary

    path = Path(args.labels)
    if not path.is_file():
        # opening would create an empty store: a typo must not train on the cohort's labels
        raise LabelStoreError(path, "no such label store")
    with LabelStore(path, read_only=True) as store:  # reading labels never migrates a store
        cohort, applied = apply_labels_with_summary(cohort, store)
    message = f"labels from {path}: {applied.summary()}"
    if events is not None:
        events.emit("labels", message=message, data={"store": str(path), **asdict(applied)})
    else:
        print(message, file=file or sys.stdout, flush=True)
    return cohort


def _absolute(path: str | os.PathLike | None) -> str | None:
    """Returns an event's path, absolute: the program reading the events may run elsewhere."""
    return None if path is None else str(Path(path).absolute())


# -- train -------------------------------------------------------------------------------
Trainer = Callable[[Any, Path], Generator[Progress, None, Any]]


def _trainer(args: argparse.Namespace, tissue) -> Trainer:
    """Returns ``(cohort, run folder) -> training job`` for ``args.model``: the trainer and
    its settings from the model-kind table, checked now (an unknown ``--set`` fails
    before any work)."""
    from ..models.registry import kind_named

    kind = kind_named(args.model)
    settings = _settings(kind.load("settings"), args)
    train = kind.load("train")
    options: dict[str, Any] = {"resume": not args.no_resume, "tissue": tissue}
    if args.init:
        if not kind.fine_tunes:
            raise ValueError(f"--init: a {kind.name} model cannot start from a checkpoint")
        options["init"] = args.init
    return lambda cohort, out: train(cohort, out, settings, **options)


@dataclass
class _RunState:
    """What a stopped training says: the run folder being trained, whether a checkpoint of
    this run exists there (written by it or resumed from) and the epochs done.

    Attributes:
        run_dir: the run folder (a fold's, with ``--folds``).
        own_checkpoint: its ``last.safetensors`` belongs to this run.
        epochs_done: epochs completed in it so far.
        fold: the fold being trained (from 1; 0 without ``--folds``).
        folds: the number of folds (0 without ``--folds``).
    """

    run_dir: Path
    own_checkpoint: bool = False
    epochs_done: int = 0
    fold: int = 0
    folds: int = 0

    def start(self, run_dir: Path, fold: int) -> None:
        """A new run folder: nothing of it is known yet."""
        self.run_dir, self.own_checkpoint, self.epochs_done, self.fold = run_dir, False, 0, fold


def _watched(work: Generator[Progress, None, Any], state: _RunState):
    """Returns the training's result; passes its events on, noting epochs in ``state``.

    Every event is noted, also the one the driver drops when a stop comes while it is
    made (its checkpoint is on disk by then).
    """
    try:
        while True:
            try:
                event = next(work)
            except StopIteration as end:
                return end.value
            # "resume": the run goes on from the last.safetensors an earlier run left
            if event.stage in ("epoch", "resume"):
                state.own_checkpoint, state.epochs_done = True, event.done
            yield event
    finally:
        work.close()


def _train_folds(fold_cohorts: list, run: Path, train: Trainer, state: _RunState):
    """Returns each fold's training summary; trains the folds one after the other."""
    from ..train.crossval import fold_directory

    summaries = []
    for i, fold in enumerate(fold_cohorts):
        out = fold_directory(run, i)
        state.start(out, i + 1)
        n = {split: len(fold.split(split)) for split in ("train", "val", "test")}
        yield Progress(
            "fold",
            i + 1,
            len(fold_cohorts),
            f"{out}: training on {n['train']} slides, validating on {n['val']} "
            f"(testing on {n['test']} with evaluate --folds)",
            {"fold": i + 1, "folds": len(fold_cohorts), "run_dir": _absolute(out), **n},
        )
        summaries.append((yield from _watched(train(fold, out), state)))
    return summaries


def cmd_train(args: argparse.Namespace) -> int:
    """Trains a model (or one per fold with ``--folds``); returns the exit status."""
    events = EventPrinter() if args.events else None
    cohort = _cohort(args)
    if args.labels:
        cohort = _labelled_cohort(args, cohort, events)
    train = _trainer(args, tissue_params(args))
    printer = events if events is not None else ProgressPrinter(args.quiet)
    run_dir = Path(args.out)
    state = _RunState(run_dir)
    if args.folds is None:
        work = _watched(train(cohort, run_dir), state)
    else:
        from ..train.crossval import write_fold_cohorts

        fold_cohorts = write_fold_cohorts(
            cohort,
            run_dir,
            args.folds,
            seed=args.fold_seed,
            val_fraction=args.val_fraction,
            replace_existing=args.no_resume,
        )
        state.folds = len(fold_cohorts)
        work = _train_folds(fold_cohorts, run_dir, train, state)
    try:
        summary = run_job(work, printer)
    except Stopped as stop:
        return _stopped(stop.reason, state, events, printer)
    if args.folds is not None:
        return _trained_folds(args, summary, events)
    if events is not None:
        events.emit(
            "done",
            summary.epochs_done,
            summary.epochs_done,
            "training finished",
            {
                "best": _absolute(summary.best),
                "last": _absolute(summary.last),
                "epochs_done": summary.epochs_done,
                "stopped": summary.stopped_early,
                "run_dir": _absolute(run_dir),
                "log": _absolute(run_dir / "log.csv"),
            },
        )
        return 0
    print(f"best: {summary.best}\nlast: {summary.last}\nlog: {run_dir / 'log.csv'}")
    return 0


def _stopped(reason: str, state: _RunState, events: EventPrinter | None, printer) -> int:
    """Says where a stopped training got to (the last checkpoint); returns the status."""
    last = state.run_dir / "last.safetensors"
    last = last if state.own_checkpoint and last.exists() else None
    fold = f" (fold {state.fold} of {state.folds})" if state.folds else ""
    if events is not None:
        data = {"last": _absolute(last), "epochs_done": state.epochs_done, "signal": reason}
        if state.folds:
            data.update(fold=state.fold, folds=state.folds)
        events.emit("stopped", state.epochs_done, 0, f"stopped by {reason}{fold}", data)
    else:
        printer.end_live_line()
        print(
            f"stopped by {reason} after {state.epochs_done} epoch(s){fold}\n"
            + (
                f"last: {last} (run the same command again to resume)"
                if last
                else "last: none (no epoch of this run finished)"
            )
        )
    return EXIT_STOPPED


def _trained_folds(args: argparse.Namespace, summaries: list, events: EventPrinter | None) -> int:
    """Says what the folds' runs left; returns the status."""
    rows = [
        {
            "fold": i,
            "best": _absolute(s.best),
            "last": _absolute(s.last),
            "epochs_done": s.epochs_done,
            "stopped": s.stopped_early,
            "run_dir": _absolute(s.run_dir),
            "log": _absolute(Path(s.run_dir) / "log.csv"),
        }
        for i, s in enumerate(summaries, 1)
    ]
    command = (
        f"slide-attention evaluate --folds {args.folds} --cohort {args.cohort} --model {args.out}"
    )
    if events is not None:
        events.emit(
            "done",
            len(rows),
            len(rows),
            "training finished",
            {"run_dir": _absolute(args.out), "folds": rows, "evaluate": command},
        )
        return 0
    for s, row in zip(summaries, rows, strict=True):
        print(f"fold {row['fold']}: best: {s.best}\n        last: {s.last}")
    print(f"cross-validated scores: {command}")
    return 0


# -- predict -----------------------------------------------------------------------------
def cmd_predict(args: argparse.Namespace) -> int:
    """Runs a model on a slide and saves the result; returns the exit status."""
    from ..results import check_result_target

    check_result_target(args.out)  # now, not after the whole inference run
    from ..inference import predict

    slide = open_slide(args.slide, args.mpp)
    with slide:
        options: dict[str, Any] = {"device": args.device, "tissue": tissue_params(args)}
        if args.aggregation:
            options["aggregation"] = args.aggregation
        if args.amp:
            options["amp"] = True
        result = run_job(predict(args.model, slide, **options), ProgressPrinter(args.quiet))
    path = result.save(args.out)
    if args.json:
        print(json.dumps(result.to_json_dict(), indent=2))
    else:
        print(result.summary())
        print(f"saved: {path}")
    return 0


# -- evaluate ----------------------------------------------------------------------------
def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluates models on a cohort split (or k-fold runs with ``--folds``); prints the
    tables or JSON; returns the exit status."""
    from ..train.evaluate import evaluate_models
    from ..train.metrics import format_confusion, format_table2

    if args.her2_weights and not args.her2_points:
        raise ValueError("--her2-weights goes with --her2-points")
    if args.folds is not None and args.her2_points:
        raise ValueError("--her2-points scores one split; it does not combine with --folds")
    cohort = _cohort(args)
    if args.labels:  # with --json, stdout is the JSON alone
        cohort = _labelled_cohort(args, cohort, None, sys.stderr if args.json else None)
    tables = _her2_tables(args, cohort.classes) if args.her2_points else None
    printer = ProgressPrinter(args.quiet)

    def show(event: Progress) -> None:
        if event.stage == "slide":  # "NAME: [n/N] SLIDE: ..." (the Fine-tune panel counts)
            printer.line(event.message)

    if args.folds is not None:
        return _evaluate_folds(args, cohort, show)
    report = run_job(
        evaluate_models(
            args.model, cohort, args.split, device=args.device, tissue=tissue_params(args)
        ),
        show,
    )
    her2 = None
    if tables is not None:
        from ..train.evaluate import her2_scores

        her2 = her2_scores(report, *tables)
    if args.json:
        out = report.to_json_dict()
        if her2 is not None:
            out["her2"] = _her2_json(args, tables, her2, report)
        print(json.dumps(out, indent=2))
        return 0
    print(f"{args.split} split of {cohort.path}: {report.n_slides} slides\n")
    print(format_table2(report.metrics))
    for name, metrics in report.metrics.items():
        print(f"\n{name}: confusion (rows truth, columns prediction)")
        print(format_confusion(metrics))
    if her2 is not None:
        from ..train.her2_contest import format_her2_table

        points, weights = tables
        print(f"\nHER2 contest criteria over {report.n_slides} cases")
        print(_table_source("points", args.her2_points, points))
        if weights is not None:
            print(_table_source("weights", args.her2_weights, weights))
        print(format_her2_table(her2))
    return 0


def _her2_tables(args: argparse.Namespace, classes: Sequence[str]):
    """Returns the points table (and the weights, or None), checked before any work."""
    from ..train.her2_contest import check_her2_classes, load_points_table

    check_her2_classes(classes)
    points = load_points_table(args.her2_points)
    weights = (
        load_points_table(args.her2_weights, allow_negative=True) if args.her2_weights else None
    )
    return points, weights


def _table_source(what: str, path: str, table) -> str:
    """Returns one line saying where a points or weights table comes from."""
    name = f"{table.name} " if table.name else ""
    verified = "verified" if table.verified else "not verified"
    return f"  {what}: {name}({path}; {verified}; source: {table.source})"


def _her2_json(args: argparse.Namespace, tables, scores: dict, report) -> dict[str, Any]:
    """Returns the ``"her2"`` part of ``evaluate --json``: totals and per-case values."""
    points, weights = tables
    models = {}
    for name, s in scores.items():
        slides = report.models[name].slides
        models[name] = {
            "points": s.total_points,
            "weighted_confidence": s.total_weighted_confidence,
            "combined": s.total_combined,
            "n": s.n,
            "cases": [
                {
                    "slide": row.slide,
                    "points": float(s.points[i]),
                    "weighted_confidence": None if s.weighted is None else float(s.weighted[i]),
                    "combined": float(s.combined[i]),
                }
                for i, row in enumerate(slides)
            ],
        }
    return {
        "points": {"file": args.her2_points, **points.to_dict()},
        "weights": None if weights is None else {"file": args.her2_weights, **weights.to_dict()},
        "models": models,
    }


def _evaluate_folds(args: argparse.Namespace, cohort, show: Callable[[Progress], None]) -> int:
    """``evaluate --folds K``: Table II of the runs' folds; returns the exit status."""
    from ..train.crossval import format_mmr_table
    from ..train.evaluate import evaluate_folds

    report = run_job(
        evaluate_folds(
            args.model, cohort, args.folds, device=args.device, tissue=tissue_params(args)
        ),
        show,
    )
    if args.json:
        print(json.dumps(report.to_json_dict(), indent=2))
        return 0
    print(
        f"{report.k}-fold cross-validation on {cohort.path}: {report.n_slides} slides, "
        "each tested once by the model of the fold that left it out\n"
    )
    print(format_mmr_table(report.summaries))
    for name, method in report.models.items():
        print(f"\n{name}: per fold ({method.run})")
        rows = [
            (
                str(r.index + 1),
                str(r.n),
                f"{r.f1:.2f}",
                "n/a" if r.auroc is None else f"{r.auroc:.2f}",
                r.auroc_note or "",
            )
            for r in method.summary.folds
        ]
        header = ("fold", "slides", "F1", "AUROC", "")
        widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]
        for row in [header, *rows]:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return 0
