"""Classification metrics of Tomita et al. 2019 (Table 2), computed with scikit-learn.

The paper reports, for each class, the metrics of the binary problem "this class vs the
rest" (one-vs-rest), then a "Mean" row with their unweighted means over the classes:

* **Accuracy** of the binary problem: ``(TP + TN) / N``. It is not the multiclass
  accuracy (kept separately as :attr:`Metrics.accuracy`): a class that is rare and never
  predicted still gets a high one-vs-rest accuracy.
* **Precision** ``TP / (TP + FP)``, **Recall** ``TP / (TP + FN)`` and **F1 score** of the
  class. When a denominator is 0 (the class is never predicted, or absent from the truth)
  the value is 0 (scikit-learn's ``zero_division=0``), so an absent or ignored class pulls
  the mean down rather than vanishing from it.

On top of the paper's table, :class:`Metrics` holds the confusion matrix (rows = truth,
columns = prediction) and the one-vs-rest AUROC from the predicted probabilities (macro
and per class), which is undefined (``None``, with the reason) for a class absent from the
truth or when no probabilities were given.

Everything is computed by scikit-learn (``multilabel_confusion_matrix``,
``precision_recall_fscore_support``, ``confusion_matrix``, ``roc_auc_score``); this
module only validates the inputs, maps class names to indices and lays out the results.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

__all__ = [
    "ClassMetrics",
    "Metrics",
    "evaluate",
    "format_confusion",
    "format_table2",
    "slide_log_loss",
]

# Rows of the probabilities may be off 1 by this much (float32 softmax, rounding on
# disk); they are renormalised before scikit-learn sees them, whose own check is far
# tighter (np.allclose) and would reject float32 outputs of many classes.
_PROB_TOL = 1e-3
# The four metrics of Table 2, in the paper's order: (attribute, row label).
_TABLE_METRICS = (
    ("accuracy", "Accuracy"),
    ("recall", "Recall"),
    ("precision", "Precision"),
    ("f1", "F1 Score"),
)


@dataclass(frozen=True)
class ClassMetrics:
    """One-vs-rest metrics of one class (or their means over the classes).

    Attributes:
        accuracy: ``(TP + TN) / N`` of the binary problem "this class vs the rest".
        precision: ``TP / (TP + FP)``; 0 when the class is never predicted.
        recall: ``TP / (TP + FN)``; 0 when the class is absent from the truth.
        f1: Harmonic mean of precision and recall; 0 when both are 0.
        support: Number of samples of the class in the truth (for the mean row: all
            samples).
    """

    accuracy: float
    precision: float
    recall: float
    f1: float
    support: int

    def to_dict(self) -> dict[str, float | int]:
        """Returns the metrics as a JSON-ready dict of plain floats and an int support."""
        return {
            "accuracy": float(self.accuracy),
            "precision": float(self.precision),
            "recall": float(self.recall),
            "f1": float(self.f1),
            "support": int(self.support),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClassMetrics:
        """Returns the metrics written by :meth:`to_dict`.

        Args:
            data: Mapping with the keys of :meth:`to_dict`.

        Returns:
            The metrics.
        """
        return cls(
            accuracy=float(data["accuracy"]),
            precision=float(data["precision"]),
            recall=float(data["recall"]),
            f1=float(data["f1"]),
            support=int(data["support"]),
        )


@dataclass(frozen=True, eq=False)
class Metrics:
    """Returned by :func:`evaluate`: Table-2 metrics, confusion matrix and AUROC of a model.

    Attributes:
        classes: Class names, in index order.
        per_class: One-vs-rest metrics of each class, by name.
        mean: Unweighted means of accuracy, precision, recall and F1 over all classes (the
            paper's "Mean" row); its ``support`` is the number of samples.
        confusion: ``(C, C)`` int64 counts, rows = truth, columns = prediction.
        accuracy: Multiclass accuracy (fraction of samples predicted right).
        n: Number of samples.
        auroc: Macro one-vs-rest AUROC (mean of the per-class AUROCs), or None.
        auroc_per_class: One-vs-rest AUROC of each class, by name; None where undefined.
        auroc_note: Why (some) AUROC is None; None when all are defined.
    """

    classes: tuple[str, ...]
    per_class: dict[str, ClassMetrics]
    mean: ClassMetrics
    confusion: np.ndarray
    accuracy: float
    n: int
    auroc: float | None
    auroc_per_class: dict[str, float | None]
    auroc_note: str | None = None

    # Equality through to_dict(): the default dataclass __eq__ would compare the
    # confusion arrays with ==, whose truth value is ambiguous.
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Metrics):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]  # mutable dict fields

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict (lists, floats, ints, None for undefined AUROC).

        ``json.dumps`` of it works as is, and :meth:`from_dict` rebuilds an equal
        :class:`Metrics`.
        """
        return {
            "classes": list(self.classes),
            "n": int(self.n),
            "accuracy": float(self.accuracy),
            "per_class": {name: self.per_class[name].to_dict() for name in self.classes},
            "mean": self.mean.to_dict(),
            "confusion": np.asarray(self.confusion, dtype=np.int64).tolist(),
            "auroc": _none_if_nan(self.auroc),
            "auroc_per_class": {
                name: _none_if_nan(self.auroc_per_class.get(name)) for name in self.classes
            },
            "auroc_note": self.auroc_note,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Metrics:
        """Returns the metrics written by :meth:`to_dict` (e.g. after a JSON round trip).

        Args:
            data: Mapping with the keys of :meth:`to_dict`.

        Returns:
            The metrics.

        Raises:
            ValueError: If the confusion matrix is not ``(C, C)`` for the ``C`` classes.
        """
        classes = tuple(str(c) for c in data["classes"])
        confusion = np.asarray(data["confusion"], dtype=np.int64).reshape(-1, len(classes))
        if confusion.shape != (len(classes), len(classes)):
            raise ValueError(
                f"confusion matrix of shape {confusion.shape} for {len(classes)} classes"
            )
        confusion.flags.writeable = False
        auroc_per_class = data.get("auroc_per_class") or {}
        return cls(
            classes=classes,
            per_class={c: ClassMetrics.from_dict(data["per_class"][c]) for c in classes},
            mean=ClassMetrics.from_dict(data["mean"]),
            confusion=confusion,
            accuracy=float(data["accuracy"]),
            n=int(data["n"]),
            auroc=_none_if_nan(data.get("auroc")),
            auroc_per_class={c: _none_if_nan(auroc_per_class.get(c)) for c in classes},
            auroc_note=data.get("auroc_note"),
        )


def evaluate(
    y_true: Sequence[int | str] | np.ndarray,
    y_pred: Sequence[int | str] | np.ndarray | None = None,
    probabilities: np.ndarray | Sequence[Sequence[float]] | None = None,
    *,
    classes: Sequence[str],
) -> Metrics:
    """Returns the Table-2 metrics, confusion matrix and AUROC of predictions.

    Args:
        y_true: True class of each sample, as class indices (``0 .. C-1``) or class names
            (elements of ``classes``); both may be mixed in a list.
        y_pred: Predicted class of each sample, like ``y_true``. None: the argmax of
            ``probabilities`` (first class on ties).
        probabilities: ``(n, C)`` predicted class probabilities (softmax outputs, rows
            summing to 1 within 1e-3), column ``j`` for ``classes[j]``. Needed for the
            AUROC, which is None without them.
        classes: The ``C >= 2`` distinct class names, in index order.

    Returns:
        The metrics. A class absent from ``y_true`` (or the only one present) has no
        AUROC, and then neither has the macro AUROC; ``auroc_note`` says why.

    Raises:
        ValueError: If there are no samples, lengths differ, a label is neither a class
            index nor a class name (the message names it), neither ``y_pred`` nor
            ``probabilities`` is given, or ``probabilities`` has the wrong shape or is not
            probabilities (negative, non-finite, rows not summing to 1).
    """
    names = _check_classes(classes)
    n_classes = len(names)
    truth = _to_indices(y_true, names, "y_true")
    if truth.size == 0:
        raise ValueError("no samples: y_true is empty")
    probs = (
        None if probabilities is None else _check_probabilities(probabilities, truth.size, names)
    )
    if y_pred is None:
        if probs is None:
            raise ValueError("give y_pred or probabilities (y_pred is their argmax)")
        pred = np.argmax(probs, axis=1)
    else:
        pred = _to_indices(y_pred, names, "y_pred")
        if pred.size != truth.size:
            raise ValueError(f"y_true has {truth.size} samples but y_pred has {pred.size}")

    labels = list(range(n_classes))
    # Per class, [[TN, FP], [FN, TP]] of the binary problem "this class vs the rest".
    binary = multilabel_confusion_matrix(truth, pred, labels=labels)
    ovr_accuracy = (binary[:, 0, 0] + binary[:, 1, 1]) / truth.size
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, pred, labels=labels, average=None, zero_division=0
    )
    per_class = {
        name: ClassMetrics(
            accuracy=float(ovr_accuracy[j]),
            precision=float(precision[j]),
            recall=float(recall[j]),
            f1=float(f1[j]),
            support=int(support[j]),
        )
        for j, name in enumerate(names)
    }
    mean = ClassMetrics(
        accuracy=float(np.mean(ovr_accuracy)),
        precision=float(np.mean(precision)),
        recall=float(np.mean(recall)),
        f1=float(np.mean(f1)),
        support=int(truth.size),
    )
    confusion = confusion_matrix(truth, pred, labels=labels).astype(np.int64)
    confusion.flags.writeable = False
    auroc, auroc_per_class, note = _auroc(truth, probs, names)
    return Metrics(
        classes=names,
        per_class=per_class,
        mean=mean,
        confusion=confusion,
        accuracy=float(accuracy_score(truth, pred)),
        n=int(truth.size),
        auroc=auroc,
        auroc_per_class=auroc_per_class,
        auroc_note=note,
    )


def format_table2(results: Mapping[str, Metrics]) -> str:
    """Returns the models' metrics as plain text in the layout of Table 2 of the paper.

    Rows: for each class its Accuracy, Recall, Precision and F1 Score, then the same four
    for the Mean, then AUROC (macro) and n. One column per model, values with 2 decimals.
    In each metric row, the best value (highest at the shown precision, ties included) is
    marked with ``*``, unless all shown values are equal; an undefined AUROC is ``n/a``.
    Rows follow the class order of the first model.

    Args:
        results: Metrics by model name, in column order.

    Returns:
        The table, lines joined by newlines (no trailing newline).

    Raises:
        ValueError: If ``results`` is empty or the models do not share the same classes.
    """
    if not results:
        raise ValueError("no models to tabulate")
    models = list(results)
    classes = results[models[0]].classes
    for model in models[1:]:
        if set(results[model].classes) != set(classes):
            raise ValueError(
                f"models {models[0]!r} and {model!r} have different classes: "
                f"{list(classes)} vs {list(results[model].classes)}"
            )

    # One (class or "Mean", metric) label pair and one list of cells per row.
    labels: list[tuple[str, str]] = []
    body: list[list[str]] = []
    groups = [(name, [results[m].per_class[name] for m in models]) for name in classes]
    groups.append(("Mean", [results[m].mean for m in models]))
    for group, per_model in groups:
        for i, (attr, label) in enumerate(_TABLE_METRICS):
            labels.append((group if i == 0 else "", label))
            body.append(_cells([getattr(cm, attr) for cm in per_model]))
    labels.append(("AUROC (macro)", ""))
    body.append(_cells([results[m].auroc for m in models]))
    labels.append(("n", ""))
    body.append([str(results[m].n) for m in models])

    group_w = max(len(g) for g, _ in labels)
    metric_w = max(len(m) for _, m in labels)
    # Numbers are right-aligned with the "*" of the best hanging after them (a blank
    # elsewhere), so that the decimal points of a column stay aligned.
    widths = [
        max(len(model), *(len(row[k].rstrip("*")) for row in body))
        for k, model in enumerate(models)
    ]

    def line(group: str, metric: str, cells: Sequence[str], header: bool = False) -> str:
        parts = [f"{group:<{group_w}}  {metric:<{metric_w}}"]
        for cell, width in zip(cells, widths, strict=True):
            star = "*" if not header and cell.endswith("*") else " "
            text = cell if header else cell.rstrip("*")
            parts.append(f"{text:>{width}}{star}")
        return "  ".join(parts).rstrip()

    lines = [line(g, m, cells) for (g, m), cells in zip(labels, body, strict=True)]
    header = line("", "", models, header=True)
    return "\n".join([header, "-" * max(map(len, [header, *lines])), *lines])


def format_confusion(metrics: Metrics) -> str:
    """Returns the confusion matrix as plain text, rows = truth, columns = prediction.

    Args:
        metrics: Metrics from :func:`evaluate`.

    Returns:
        A header of predicted class names and one row of counts per true class, headed by
        its name; lines joined by newlines (no trailing newline).
    """
    names = list(metrics.classes)
    counts = np.asarray(metrics.confusion)
    corner = "truth \\ predicted"
    row_w = max(len(corner), *(len(name) for name in names))
    col_w = [max(len(name), len(str(int(counts[:, j].max())))) for j, name in enumerate(names)]
    out = [
        f"{corner:<{row_w}}  " + "  ".join(f"{n:>{w}}" for n, w in zip(names, col_w, strict=True))
    ]
    for i, name in enumerate(names):
        cells = "  ".join(f"{int(c):>{w}}" for c, w in zip(counts[i], col_w, strict=True))
        out.append(f"{name:<{row_w}}  {cells}")
    return "\n".join(out)


def _check_classes(classes: Sequence[str]) -> tuple[str, ...]:
    """Returns the class names as a tuple after checking they are >= 2 distinct strings."""
    if isinstance(classes, str):
        raise ValueError(f"classes must be a sequence of names, got the string {classes!r}")
    names = tuple(classes)
    if len(names) < 2:
        raise ValueError(f"need at least 2 classes, got {list(names)}")
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"class names must be strings, got {name!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"class names must be distinct, got {list(names)}")
    return names


def _to_indices(y: Any, names: tuple[str, ...], what: str) -> np.ndarray:
    """Returns the labels ``y`` as an int64 array of class indices.

    Args:
        y: 1-D labels: class indices, class names, or a mix of both.
        names: The class names, in index order.
        what: Name of the argument, for error messages.

    Returns:
        The class indices, shape ``(n,)``.

    Raises:
        ValueError: If ``y`` is not 1-D or a label is neither an index nor a name.
    """
    arr = np.asarray(y)
    # numpy turns a list mixing names and ints into strings ("1"); keep the ints as ints.
    if arr.dtype.kind in "US" and not isinstance(y, np.ndarray):
        arr = np.asarray(y, dtype=object)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D (one label per sample), got shape {arr.shape}")
    n_classes = len(names)
    if arr.dtype.kind in "iu":
        bad = (arr < 0) | (arr >= n_classes)
        if bad.any():
            raise ValueError(
                f"unknown label {arr[bad][0].item()!r} in {what}: "
                f"not a class index 0..{n_classes - 1} of {list(names)}"
            )
        return arr.astype(np.int64)
    if arr.dtype.kind not in "OU" and arr.size:
        # Floats or booleans: most likely probabilities or masks passed as labels.
        raise ValueError(
            f"{what} must hold class indices or class names, got dtype {arr.dtype} "
            f"(first label {arr.flat[0].item()!r})"
        )
    index = {name: j for j, name in enumerate(names)}
    out = np.empty(arr.size, dtype=np.int64)
    for k, label in enumerate(arr.tolist()):
        if isinstance(label, str) and label in index:
            out[k] = index[label]
        elif (
            isinstance(label, numbers.Integral)
            and not isinstance(label, bool)
            and 0 <= label < n_classes
        ):
            out[k] = int(label)
        else:
            raise ValueError(
                f"unknown label {label!r} in {what}: neither a class name of {list(names)} "
                f"nor a class index 0..{n_classes - 1}"
            )
    return out


def _check_probabilities(probabilities: Any, n: int, names: tuple[str, ...]) -> np.ndarray:
    """Returns ``probabilities`` as float64 ``(n, C)`` rows renormalised to sum to 1.

    Raises:
        ValueError: If the shape is not ``(n, C)`` or the values are not probabilities.
    """
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.shape != (n, len(names)):
        raise ValueError(
            f"probabilities must have shape (n samples, n classes) = ({n}, {len(names)}), "
            f"got {probs.shape}"
        )
    if not np.isfinite(probs).all():
        raise ValueError("probabilities hold NaN or infinite values")
    if (probs < -_PROB_TOL).any() or (probs > 1 + _PROB_TOL).any():
        raise ValueError(
            f"probabilities must lie in [0, 1], got values in [{probs.min():.4g}, "
            f"{probs.max():.4g}]: these are not probabilities (logits? apply a softmax)"
        )
    sums = probs.sum(axis=1)
    if (np.abs(sums - 1.0) > _PROB_TOL).any():
        raise ValueError(
            f"rows of probabilities sum to {sums.min():.4g}..{sums.max():.4g}, not 1: "
            "these are not probabilities (scores? apply a softmax)"
        )
    return np.clip(probs, 0.0, None) / sums[:, None]


def _auroc(
    truth: np.ndarray, probs: np.ndarray | None, names: tuple[str, ...]
) -> tuple[float | None, dict[str, float | None], str | None]:
    """Returns the macro AUROC, the per-class AUROCs and why some are None (or None)."""
    if probs is None:
        return None, dict.fromkeys(names), "no probabilities given"
    per_class: dict[str, float | None] = {}
    undefined: list[str] = []
    for j, name in enumerate(names):
        positives = truth == j
        # The one-vs-rest ROC needs both positives and negatives.
        if positives.all() or not positives.any():
            per_class[name] = None
            undefined.append(name)
        else:
            per_class[name] = float(roc_auc_score(positives, probs[:, j]))
    if undefined:
        absent = [name for name in undefined if not (truth == names.index(name)).any()]
        if absent:
            note = f"class(es) absent from y_true: {absent}"
        else:
            note = f"only class {undefined[0]!r} present in y_true"
        return None, per_class, note
    if len(names) == 2:
        # scikit-learn takes the binary case as the score of the positive class.
        macro = roc_auc_score(truth, probs[:, 1])
    else:
        macro = roc_auc_score(
            truth, probs, multi_class="ovr", average="macro", labels=list(range(len(names)))
        )
    return float(macro), per_class, None


def _none_if_nan(value: float | None) -> float | None:
    """Returns ``value`` as a float, or None when it is None or NaN."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _cells(values: Sequence[float | None]) -> list[str]:
    """Returns the values as 2-decimal strings, the best one(s) suffixed with ``*``.

    The best is judged on the shown (rounded) values so that the mark agrees with what
    the reader sees; nothing is marked when fewer than two values differ.
    """
    shown = [None if v is None else f"{v:.2f}" for v in values]
    present = {float(s) for s in shown if s is not None}
    best = max(present) if len(present) > 1 else None
    return [
        "n/a" if s is None else (s + "*" if best is not None and float(s) == best else s)
        for s in shown
    ]


def slide_log_loss(truth: Sequence[int], probabilities: np.ndarray) -> float:
    """Mean cross-entropy of slide probabilities (rows renormalised) and class indices.

    Probabilities are clipped at 1e-7, so one confidently wrong slide counts at most
    ln(1e7) ≈ 16 instead of infinity.
    """
    labels = np.asarray(truth, dtype=np.int64)
    probs = np.array(probabilities, dtype=np.float64)
    probs /= probs.sum(1, keepdims=True)
    picked = np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0)
    return float(-np.log(picked).mean())
