"""k-fold cross-validation by case, and the mean ± std table of Raza et al. (Table II).

The MMR experiments of Raza et al. use five-fold cross-validation "to create our
training, validation and testing datasets", the same folds for every method, and report
F1 and AUROC as mean ± std over the folds. The paper gives no more detail; what follows
are our choices.

Folds (:func:`kfold_splits`):

* Stratified by class and grouped by case with scikit-learn's ``StratifiedGroupKFold``:
  all slides of a case (the cohort's ``case`` column; a slide without one is its own
  case) fall in the same fold, so no patient is both trained on and tested on.
* Fold ``i`` is the test set of the ``i``-th split; the remaining cases are split once
  more, stratified and grouped the same way, into train and validation.
* Every class needs at least ``k`` cases, otherwise some test folds would lack it; this
  is an error rather than scikit-learn's warning.

Metrics (:func:`summarise_folds`), each fold computed by :func:`.metrics.evaluate`:

* **F1**: with two classes, the F1 score of the positive class; with more, the macro F1
  (unweighted mean of the per-class F1 scores, a class never predicted or absent
  counting 0, as in :mod:`.metrics`).
* **AUROC**: with two classes, ``roc_auc_score`` on the positive class's probability;
  with more, the one-vs-rest macro AUROC. A fold whose test set lacks a class has no
  AUROC (it is ``None`` with the reason, never a crash); the mean ± std is then taken
  over the folds that have one, and the table says how many.
* The std is the population std over folds (``ddof=0``, numpy's and the usual
  ``scores.std()`` of scikit-learn's cross-validation); the paper does not say which.

Runs (:func:`write_fold_cohorts`, :func:`read_fold_cohorts`): a k-fold run of one method
is a folder with ``fold-1`` ... ``fold-K``, each a training run whose ``cohort.csv`` is
its fold (the cohort with that fold's splits). ``slide-attention train --folds K`` writes
them and trains each; ``slide-attention evaluate --folds K`` evaluates them
(:func:`.evaluate.evaluate_folds`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from .cohort import Cohort, read_cohort, write_cohort
from .metrics import Metrics, evaluate

__all__ = [
    "FOLD_COHORT",
    "CrossValSummary",
    "Fold",
    "FoldResult",
    "MeanStd",
    "fold_cohort",
    "fold_directory",
    "format_mmr_table",
    "kfold_splits",
    "read_fold_cohorts",
    "summarise_folds",
    "write_fold_cohorts",
]

# A fold's cohort (its splits) inside its run folder.
FOLD_COHORT = "cohort.csv"

# scikit-learn warns, and carries on, when a class has fewer groups than splits. For the
# test folds we raise instead (see kfold_splits); for the validation split of the
# remainder a class may legitimately be too small to appear in every split.
_FEW_MEMBERS = r"The least populated class in y has only"


@dataclass(frozen=True)
class Fold:
    """One fold of a cross-validation: sample positions of its train, val and test sets.

    Positions index the cohort's entries (or the labels given to :func:`kfold_splits`);
    each tuple is sorted and the three are disjoint and cover all samples.

    Attributes:
        index: Fold number, from 0.
        train: Positions of the training samples.
        val: Positions of the validation samples (empty when ``val_fraction`` is 0).
        test: Positions of the test samples.
    """

    index: int
    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]

    @property
    def n_samples(self) -> int:
        """Number of samples the fold assigns."""
        return len(self.train) + len(self.val) + len(self.test)

    def splits(self) -> list[str]:
        """Returns the split name ("train", "val" or "test") of each sample, by position."""
        out = [""] * self.n_samples
        for name, positions in (("train", self.train), ("val", self.val), ("test", self.test)):
            for i in positions:
                out[i] = name
        return out


def kfold_splits(
    cohort_or_labels: Cohort | Sequence[Any] | np.ndarray,
    k: int = 5,
    *,
    groups: Sequence[Any] | np.ndarray | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
) -> list[Fold]:
    """Returns ``k`` stratified folds that keep every case in one fold.

    Fold ``i`` tests on the ``i``-th of ``k`` stratified group splits of all cases;
    its other cases are split into train and validation by a second stratified group
    split into ``m = round(1 / val_fraction)`` parts, the first part being the
    validation set (so the validation share is ``1/m`` of the remaining cases, 0.2 by
    default). A class with fewer than ``m`` cases in the remainder may be missing from
    a validation set.

    Args:
        cohort_or_labels: A :class:`.cohort.Cohort` (labels and case ids from its
            entries; a slide without a case id is its own case), or the label of each
            sample (class indices or names).
        k: Number of folds, at least 2.
        groups: Case id of each sample when labels are given (None or "" = the sample
            is its own case). Not allowed with a cohort, which brings its own.
        seed: Seed of the shuffling; the same inputs and seed give the same folds.
        val_fraction: Share of the non-test cases to hold out for validation, in
            ``[0, 0.5]``; 0 gives no validation set.

    Returns:
        The folds, in order; every sample is in exactly one test set.

    Raises:
        ValueError: If ``k < 2``, ``val_fraction`` is out of range, ``groups`` does not
            match the labels or comes with a cohort, a class has fewer than ``k`` cases
            (the message names it), or the remainder of a fold has too few cases for
            the validation split.
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 2:
        raise ValueError(f"k must be an integer >= 2, got {k!r}")
    if not 0.0 <= val_fraction <= 0.5:
        raise ValueError(
            f"val_fraction must lie in [0, 0.5] (0 = no validation set), got {val_fraction!r}"
        )
    labels, names, case_codes = _labels_and_cases(cohort_or_labels, groups)
    n = labels.size
    if n == 0:
        raise ValueError("no samples to split")

    # Every class needs k cases, or some test fold goes without it.
    for j, name in enumerate(names):
        n_cases = np.unique(case_codes[labels == j]).size
        if 0 < n_cases < k:
            raise ValueError(
                f"class {name!r} has only {n_cases} case(s), fewer than k={k}: stratified "
                f"{k}-fold cross-validation needs at least {k} cases of every class "
                "(lower k or gather more cases)"
            )

    outer = StratifiedGroupKFold(n_splits=int(k), shuffle=True, random_state=seed)
    dummy = np.zeros((n, 1))
    folds = []
    for i, (rest, test) in enumerate(outer.split(dummy, labels, case_codes)):
        train, val = _split_validation(rest, labels, case_codes, val_fraction, seed, i)
        folds.append(
            Fold(
                index=i,
                train=tuple(int(p) for p in np.sort(train)),
                val=tuple(int(p) for p in np.sort(val)),
                test=tuple(int(p) for p in np.sort(test)),
            )
        )
    return folds


def fold_cohort(cohort: Cohort, fold: Fold) -> Cohort:
    """Returns a copy of the cohort whose split fields are those of one fold.

    The input cohort is not changed. The copy has no ``path`` (it was not read from a
    file, and the CSV of the input has other splits); write it with
    :func:`.cohort.write_cohort` to keep it.

    Args:
        cohort: The cohort the fold was made from (:func:`kfold_splits` on it).
        fold: One of the folds.

    Returns:
        A new cohort with the same classes and slides, each entry's ``split`` set to
        "train", "val" or "test".

    Raises:
        ValueError: If the fold does not assign exactly the cohort's entries.
    """
    positions = sorted((*fold.train, *fold.val, *fold.test))
    if positions != list(range(len(cohort.entries))):
        raise ValueError(
            f"fold {fold.index} assigns {fold.n_samples} samples but the cohort has "
            f"{len(cohort.entries)} entries: it was made from another cohort"
        )
    splits = fold.splits()
    entries = [
        replace(
            entry,
            split=splits[i],
            lesions=None if entry.lesions is None else list(entry.lesions),
        )
        for i, entry in enumerate(cohort.entries)
    ]
    return Cohort(classes=tuple(cohort.classes), entries=entries, path=None)


def fold_directory(run: str | os.PathLike, index: int) -> Path:
    """Returns the folder of fold ``index`` (from 0) of a k-fold run: ``run/fold-<index+1>``."""
    return Path(run) / f"fold-{index + 1}"


def write_fold_cohorts(
    cohort: Cohort,
    run: str | os.PathLike,
    k: int,
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
    replace_existing: bool = False,
) -> list[Cohort]:
    """Returns the ``k`` folds of a cohort as cohorts, each written to its fold folder.

    Fold ``i`` goes to ``run/fold-<i+1>/cohort.csv`` (:data:`FOLD_COHORT`), where its
    training run goes too. A fold folder that already holds a cohort with other splits
    (a run of another cohort, ``k``, ``seed`` or ``val_fraction``) is an error, so that
    resuming never trains a fold on another fold's slides, unless ``replace_existing``.

    Args:
        cohort: the cohort (its split column is not used).
        run: the k-fold run's folder.
        k: the number of folds.
        seed: seed of the fold shuffle (:func:`kfold_splits`).
        val_fraction: share of the non-test cases held out for validation.
        replace_existing: overwrite fold cohorts with other splits (a run started over).

    Returns:
        The fold cohorts, read back from their files (their ``path`` set).

    Raises:
        ValueError: as :func:`kfold_splits`, or a fold folder holding other splits.
    """
    folds = kfold_splits(cohort, k, seed=seed, val_fraction=val_fraction)
    out = []
    for fold in folds:
        fold_set = fold_cohort(cohort, fold)
        path = fold_directory(run, fold.index) / FOLD_COHORT
        if path.exists() and not replace_existing:
            previous = read_cohort(path, cohort.classes, check_files=False)
            if _splits_by_slide(previous) != _splits_by_slide(fold_set):
                raise ValueError(
                    f"{path}: holds another fold of {len(previous)} slides (made from another "
                    "cohort, number of folds, fold seed or validation share); choose another "
                    "--out, or pass --no-resume to start over"
                )
        write_cohort(path, fold_set)
        out.append(read_cohort(path, cohort.classes, check_files=False))
    return out


def read_fold_cohorts(
    run: str | os.PathLike, k: int, classes: Sequence[str] | None = None
) -> list[Cohort]:
    """Returns the ``k`` fold cohorts a k-fold run holds (see :func:`write_fold_cohorts`).

    Args:
        run: the k-fold run's folder.
        k: the number of folds it must hold.
        classes: the class names, in order (None: as the files list them).

    Raises:
        ValueError: no such folder, a fold missing, more than ``k`` folds, or a fold
            cohort that cannot be read (``CohortError``).
    """
    run = Path(run)
    if not run.is_dir():
        raise ValueError(f"{run}: no such run folder")
    cohorts = []
    for i in range(k):
        path = fold_directory(run, i) / FOLD_COHORT
        if not path.is_file():
            raise ValueError(
                f"{run}: no {path.relative_to(run).as_posix()}; not a run of `train --folds "
                f"{k}` (a run of fewer folds, or of one model?)"
            )
        cohorts.append(read_cohort(path, classes))
    if (fold_directory(run, k) / FOLD_COHORT).exists():
        raise ValueError(f"{run}: holds more than {k} folds (a run of another --folds)")
    return cohorts


def _splits_by_slide(cohort: Cohort) -> dict[Path, str]:
    """Returns each slide's split, by resolved path."""
    return {Path(e.slide).resolve(): e.split for e in cohort.entries}


@dataclass(frozen=True)
class MeanStd:
    """Mean and std of a metric over the folds where it is defined.

    Attributes:
        values: The metric of each fold where it is defined, in fold order.
        n_folds: Number of folds in all (``len(values)`` may be smaller).
        ddof: Delta degrees of freedom of the std (0: population std).
    """

    values: tuple[float, ...]
    n_folds: int
    ddof: int = 0

    @property
    def mean(self) -> float | None:
        """Mean over the defined folds; None when there are none."""
        return float(np.mean(self.values)) if self.values else None

    @property
    def std(self) -> float | None:
        """Std over the defined folds; None when there are too few for ``ddof``."""
        if len(self.values) <= self.ddof:
            return None
        return float(np.std(self.values, ddof=self.ddof))

    def format(self, decimals: int = 2) -> str:
        """Returns "mean ± std", "n/a" when undefined, and "(j/k folds)" when partial."""
        if self.mean is None:
            return "n/a"
        std = "n/a" if self.std is None else f"{self.std:.{decimals}f}"
        text = f"{self.mean:.{decimals}f} ± {std}"
        if len(self.values) < self.n_folds:
            text += f" ({len(self.values)}/{self.n_folds} folds)"
        return text


@dataclass(frozen=True, eq=False)
class FoldResult:
    """F1 and AUROC of one fold's test set.

    Attributes:
        index: Fold number, from 0.
        n: Number of test samples.
        f1: Positive-class F1 (two classes) or macro F1 (more).
        auroc: Positive-class AUROC (two classes) or one-vs-rest macro AUROC (more);
            None where undefined.
        auroc_note: Why the AUROC is None; None when it is defined.
        metrics: All metrics of the fold (per class, confusion matrix).
    """

    index: int
    n: int
    f1: float
    auroc: float | None
    auroc_note: str | None
    metrics: Metrics


@dataclass(frozen=True, eq=False)
class CrossValSummary:
    """Returned by :func:`summarise_folds`: per-fold results and their mean ± std.

    Attributes:
        classes: Class names, in index order.
        positive: The positive class of a binary problem; None with more classes.
        folds: The result of each fold, in order.
        f1: F1 over the folds.
        auroc: AUROC over the folds where it is defined.
    """

    classes: tuple[str, ...]
    positive: str | None
    folds: tuple[FoldResult, ...]
    f1: MeanStd
    auroc: MeanStd


def summarise_folds(
    per_fold_truth: Sequence[Sequence[Any] | np.ndarray],
    per_fold_pred: Sequence[Sequence[Any] | np.ndarray | None] | None,
    per_fold_prob: Sequence[np.ndarray | Sequence[Any] | None] | None,
    classes: Sequence[str],
    *,
    positive: str | int | None = None,
    ddof: int = 0,
) -> CrossValSummary:
    """Returns the F1 and AUROC of each fold's test set and their mean ± std.

    Args:
        per_fold_truth: For each fold, the true class of its test samples (indices or
            names).
        per_fold_pred: For each fold, the predicted classes, or None (for all folds or
            one) to take the argmax of the probabilities.
        per_fold_prob: For each fold, the ``(n, C)`` class probabilities, or with two
            classes also the ``(n,)`` probabilities of the positive class; None (for all
            folds or one) where there are none, which leaves the AUROC undefined.
        classes: The class names, in index order.
        positive: The positive class (name or index) of a binary problem; default the
            second class (index 1, scikit-learn's ``pos_label=1``). Only for 2 classes.
        ddof: Delta degrees of freedom of the std over folds (0: population std).

    Returns:
        The summary.

    Raises:
        ValueError: If there are no folds, the per-fold lists differ in length,
            ``positive`` is given for more than 2 classes or is not a class, or a fold's
            inputs are invalid (see :func:`.metrics.evaluate`, whose message is
            prefixed with the fold number).
    """
    names = tuple(classes)
    n_folds = len(per_fold_truth)
    if n_folds == 0:
        raise ValueError("no folds to summarise")
    preds = [None] * n_folds if per_fold_pred is None else list(per_fold_pred)
    probs = [None] * n_folds if per_fold_prob is None else list(per_fold_prob)
    if len(preds) != n_folds or len(probs) != n_folds:
        raise ValueError(
            f"{n_folds} folds of truth but {len(preds)} of predictions and "
            f"{len(probs)} of probabilities"
        )
    pos = _positive_index(positive, names)

    results = []
    for i, (truth, pred, prob) in enumerate(zip(per_fold_truth, preds, probs, strict=True)):
        try:
            class_probs = _class_probabilities(prob, len(names), pos)
            metrics = evaluate(truth, pred, class_probs, classes=names)
        except ValueError as exc:
            raise ValueError(f"fold {i}: {exc}") from exc
        if pos is not None:
            f1 = metrics.per_class[names[pos]].f1
            auroc = metrics.auroc_per_class[names[pos]]
        else:
            f1 = metrics.mean.f1
            auroc = metrics.auroc
        note = None if auroc is not None else (metrics.auroc_note or "undefined")
        results.append(FoldResult(i, metrics.n, float(f1), auroc, note, metrics))

    return CrossValSummary(
        classes=names,
        positive=None if pos is None else names[pos],
        folds=tuple(results),
        f1=MeanStd(tuple(r.f1 for r in results), n_folds, ddof),
        auroc=MeanStd(tuple(r.auroc for r in results if r.auroc is not None), n_folds, ddof),
    )


def format_mmr_table(results: Mapping[str, CrossValSummary], *, decimals: int = 2) -> str:
    """Returns the methods' cross-validated F1 and AUROC in the layout of Table II.

    One row per method: its name, F1 "mean ± std" and AUROC "mean ± std" over folds.
    An AUROC defined in only some folds is followed by "(j/k folds)"; one defined in
    none is "n/a".

    Args:
        results: Summaries from :func:`summarise_folds`, by method name, in row order.
        decimals: Decimals of the means and stds (the paper shows 2).

    Returns:
        The table, lines joined by newlines (no trailing newline).

    Raises:
        ValueError: If ``results`` is empty.
    """
    if not results:
        raise ValueError("no methods to tabulate")
    header = ("Method", "F1 (mean ± std)", "AUROC (mean ± std)")
    rows = [
        (method, s.f1.format(decimals), s.auroc.format(decimals)) for method, s in results.items()
    ]
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(3)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(f"{c:<{w}}" for c, w in zip(cells, widths, strict=True)).rstrip()

    head = line(header)
    return "\n".join([head, "-" * len(head), *(line(row) for row in rows)])


def _labels_and_cases(
    cohort_or_labels: Cohort | Sequence[Any] | np.ndarray,
    groups: Sequence[Any] | np.ndarray | None,
) -> tuple[np.ndarray, tuple[str, ...], np.ndarray]:
    """Returns the label codes, class names and case codes of the samples."""
    if isinstance(cohort_or_labels, Cohort):
        if groups is not None:
            raise ValueError("groups cannot be given with a cohort: its entries carry case ids")
        entries = cohort_or_labels.entries
        names = tuple(cohort_or_labels.classes)
        labels = np.asarray([e.label for e in entries], dtype=np.int64)
        cases = [f"case:{e.case}" if e.case else f"slide:{e.slide}" for e in entries]
        return labels, names, _codes(cases)

    raw = list(cohort_or_labels)
    keys = [str(v) if isinstance(v, str) else v for v in raw]
    try:
        names_sorted = sorted(set(keys), key=lambda v: (isinstance(v, str), v))
    except TypeError as exc:  # e.g. lists as labels
        raise ValueError(f"labels must be class indices or names ({exc})") from exc
    lookup = {v: j for j, v in enumerate(names_sorted)}
    labels = np.asarray([lookup[v] for v in keys], dtype=np.int64)
    names = tuple(str(v) for v in names_sorted)
    if groups is None:
        cases = [f"sample:{i}" for i in range(len(raw))]
    else:
        groups = list(groups)
        if len(groups) != len(raw):
            raise ValueError(f"{len(raw)} labels but {len(groups)} groups")
        cases = [
            f"sample:{i}" if g is None or (isinstance(g, str) and not g) else f"case:{g}"
            for i, g in enumerate(groups)
        ]
    return labels, names, _codes(cases)


def _codes(values: Sequence[str]) -> np.ndarray:
    """Returns an integer code per value, in order of first appearance."""
    index: dict[str, int] = {}
    return np.asarray([index.setdefault(v, len(index)) for v in values], dtype=np.int64)


def _split_validation(
    rest: np.ndarray,
    labels: np.ndarray,
    case_codes: np.ndarray,
    val_fraction: float,
    seed: int,
    fold: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (train, val) positions: a stratified group split of the non-test samples."""
    if val_fraction == 0:
        return rest, rest[:0]
    parts = max(2, round(1 / val_fraction))
    n_cases = np.unique(case_codes[rest]).size
    if n_cases < parts:
        raise ValueError(
            f"fold {fold}: {n_cases} cases outside the test fold, too few to hold out "
            f"1/{parts} of them for validation (lower val_fraction, or 0 for none)"
        )
    # A seed per fold, derived from the user's seed, so that folds differ but repeat.
    inner_seed = int(np.random.default_rng([seed, fold]).integers(2**31 - 1))
    inner = StratifiedGroupKFold(n_splits=parts, shuffle=True, random_state=inner_seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_FEW_MEMBERS, category=UserWarning)
        try:
            train, val = next(inner.split(np.zeros((rest.size, 1)), labels[rest], case_codes[rest]))
        except ValueError as exc:  # every class has fewer cases than parts
            raise ValueError(
                f"fold {fold}: cannot hold out 1/{parts} of the {n_cases} cases outside the "
                f"test fold for validation, stratified by class ({exc}); lower val_fraction, "
                "or 0 for none"
            ) from exc
    return rest[train], rest[val]


def _positive_index(positive: str | int | None, names: tuple[str, ...]) -> int | None:
    """Returns the index of the positive class (binary), or None with more classes."""
    if len(names) != 2:
        if positive is not None:
            raise ValueError(
                f"positive is only for 2 classes; with {len(names)} the F1 and AUROC are "
                "macro averages"
            )
        return None
    if positive is None:
        return 1
    if isinstance(positive, str):
        if positive not in names:
            raise ValueError(f"positive class {positive!r} is not one of {list(names)}")
        return names.index(positive)
    if isinstance(positive, bool) or positive not in (0, 1):
        raise ValueError(f"positive must be a class name or index 0/1, got {positive!r}")
    return int(positive)


def _class_probabilities(prob: Any, n_classes: int, pos: int | None) -> np.ndarray | None:
    """Returns ``(n, C)`` probabilities; a binary ``(n,)`` is P(positive) per sample."""
    if prob is None:
        return None
    arr = np.asarray(prob, dtype=np.float64)
    if arr.ndim == 1:
        if pos is None:
            raise ValueError(
                f"probabilities of shape {arr.shape}: 1-D probabilities (of the positive "
                f"class) are only for 2 classes, give (n, {n_classes}) ones"
            )
        if not np.isfinite(arr).all() or (arr < 0).any() or (arr > 1).any():
            raise ValueError("positive-class probabilities must be finite and in [0, 1]")
        out = np.empty((arr.size, 2))
        out[:, pos] = arr
        out[:, 1 - pos] = 1.0 - arr
        return out
    return arr
