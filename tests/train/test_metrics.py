"""Tests of the Table-2 metrics: hand-computed one-vs-rest values, AUROC, JSON, tables."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from napari_slide_attention.train.metrics import (
    ClassMetrics,
    Metrics,
    evaluate,
    format_confusion,
    format_table2,
)

CLASSES = ("a", "b", "c")
# 3 classes, 10 samples; the expected values below are worked out by hand.
Y_TRUE = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
Y_PRED = [0, 0, 1, 2, 1, 1, 0, 2, 2, 1]
# Per class: (accuracy, precision, recall, f1) of "this class vs the rest".
#   a: TP 2, FN 2, FP 1, TN 5 -> (7/10, 2/3, 2/4, 4/7)
#   b: TP 2, FN 1, FP 2, TN 5 -> (7/10, 2/4, 2/3, 4/7)
#   c: TP 2, FN 1, FP 1, TN 6 -> (8/10, 2/3, 2/3, 2/3)
EXPECTED = {
    "a": (0.7, 2 / 3, 0.5, 4 / 7, 4),
    "b": (0.7, 0.5, 2 / 3, 4 / 7, 3),
    "c": (0.8, 2 / 3, 2 / 3, 2 / 3, 3),
}


def _counts(y_true: list[int], y_pred: list[int], c: int) -> tuple[int, int, int, int]:
    """Returns TP, FP, FN, TN of class ``c`` vs the rest, counted one sample at a time."""
    tp = sum(t == c and p == c for t, p in zip(y_true, y_pred, strict=True))
    fp = sum(t != c and p == c for t, p in zip(y_true, y_pred, strict=True))
    fn = sum(t == c and p != c for t, p in zip(y_true, y_pred, strict=True))
    return tp, fp, fn, len(y_true) - tp - fp - fn


def _probabilities(n: int, n_classes: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.ones(n_classes), size=n)


def test_per_class_one_vs_rest_matches_hand_computation() -> None:
    m = evaluate(Y_TRUE, Y_PRED, classes=CLASSES)
    for j, name in enumerate(CLASSES):
        tp, fp, fn, tn = _counts(Y_TRUE, Y_PRED, j)
        precision, recall = tp / (tp + fp), tp / (tp + fn)
        by_hand = (
            (tp + tn) / 10,
            precision,
            recall,
            2 * precision * recall / (precision + recall),
            tp + fn,
        )
        assert by_hand == pytest.approx(EXPECTED[name])
        cm = m.per_class[name]
        got = (cm.accuracy, cm.precision, cm.recall, cm.f1, cm.support)
        assert got == pytest.approx(EXPECTED[name])
    assert m.n == 10
    # Multiclass accuracy is not the one-vs-rest accuracy: 6 of 10 right.
    assert m.accuracy == pytest.approx(0.6)
    np.testing.assert_array_equal(m.confusion, [[2, 1, 1], [1, 2, 0], [0, 1, 2]])
    assert m.auroc is None and m.auroc_per_class == dict.fromkeys(CLASSES)
    assert m.auroc_note == "no probabilities given"


def test_mean_row_is_unweighted_mean_of_classes() -> None:
    m = evaluate(Y_TRUE, Y_PRED, classes=CLASSES)
    for attr in ("accuracy", "precision", "recall", "f1"):
        values = [getattr(m.per_class[c], attr) for c in CLASSES]
        assert getattr(m.mean, attr) == pytest.approx(sum(values) / 3)
    assert m.mean.accuracy == pytest.approx((0.7 + 0.7 + 0.8) / 3)
    assert m.mean.support == 10


def test_zero_division_gives_zero() -> None:
    # "c" is never in the truth nor predicted; "b" is never predicted.
    m = evaluate(["a", "a", "b"], ["a", "a", "a"], classes=CLASSES)
    assert m.per_class["b"] == ClassMetrics(2 / 3, 0.0, 0.0, 0.0, 1)
    assert m.per_class["c"] == ClassMetrics(1.0, 0.0, 0.0, 0.0, 0)
    assert m.per_class["a"].precision == pytest.approx(2 / 3)
    assert m.mean.recall == pytest.approx(1 / 3)


def test_names_indices_and_mixed_labels_agree() -> None:
    by_index = evaluate(Y_TRUE, Y_PRED, classes=CLASSES)
    names_true = [CLASSES[i] for i in Y_TRUE]
    names_pred = np.array([CLASSES[i] for i in Y_PRED])
    assert evaluate(names_true, names_pred, classes=CLASSES) == by_index
    mixed = [CLASSES[i] if k % 2 else i for k, i in enumerate(Y_TRUE)]
    assert evaluate(mixed, np.array(Y_PRED, dtype=np.uint8), classes=CLASSES) == by_index
    # The same metrics for other predictions differ: equality is not vacuous.
    assert evaluate(Y_TRUE, Y_TRUE, classes=CLASSES) != by_index


def test_prediction_defaults_to_argmax_of_probabilities() -> None:
    probs = _probabilities(10, 3, seed=1)
    m = evaluate(Y_TRUE, probabilities=probs, classes=CLASSES)
    assert m == evaluate(Y_TRUE, probs.argmax(axis=1), probabilities=probs, classes=CLASSES)


def test_auroc_equals_sklearn() -> None:
    probs = _probabilities(10, 3, seed=2)
    m = evaluate(Y_TRUE, Y_PRED, probabilities=probs, classes=CLASSES)
    y = np.array(Y_TRUE)
    assert m.auroc == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    for j, name in enumerate(CLASSES):
        assert m.auroc_per_class[name] == pytest.approx(roc_auc_score(y == j, probs[:, j]))
    assert m.auroc_note is None
    # Perfectly ranked probabilities give AUROC 1.
    perfect = np.eye(3)[Y_TRUE] * 0.8 + 0.2 / 3
    assert evaluate(Y_TRUE, probabilities=perfect, classes=CLASSES).auroc == pytest.approx(1.0)


def test_binary_auroc_equals_sklearn() -> None:
    y = [0, 1, 1, 0, 1, 0, 0, 1]
    probs = _probabilities(8, 2, seed=3)
    m = evaluate(y, probabilities=probs, classes=["neg", "pos"])
    assert m.auroc == pytest.approx(roc_auc_score(y, probs[:, 1]))
    assert m.auroc_per_class["pos"] == pytest.approx(m.auroc)


def test_auroc_is_none_with_a_class_absent_from_the_truth() -> None:
    y = [0, 0, 1, 1, 0, 1]
    probs = _probabilities(6, 3, seed=4)
    m = evaluate(y, probabilities=probs, classes=CLASSES)
    assert m.auroc is None
    assert m.auroc_per_class["c"] is None
    assert "c" in m.auroc_note and "absent" in m.auroc_note
    # The classes present still get their AUROC.
    assert m.auroc_per_class["a"] == pytest.approx(roc_auc_score(np.array(y) == 0, probs[:, 0]))


def test_float32_softmax_rows_are_accepted() -> None:
    logits = np.random.default_rng(5).normal(size=(10, 3)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    probs[:, 0] += np.float32(5e-4)  # rounding of stored outputs
    assert evaluate(Y_TRUE, probabilities=probs, classes=CLASSES).auroc is not None


def test_round_trip_through_json() -> None:
    probs = _probabilities(6, 3, seed=6)
    for m in (
        evaluate(Y_TRUE, Y_PRED, probabilities=_probabilities(10, 3), classes=CLASSES),
        evaluate([0, 0, 1, 1, 0, 1], probabilities=probs, classes=CLASSES),  # AUROC None
    ):
        text = json.dumps(m.to_dict(), allow_nan=False)
        back = Metrics.from_dict(json.loads(text))
        assert back == m
        assert back.classes == m.classes
        assert back.per_class == m.per_class and back.mean == m.mean
        np.testing.assert_array_equal(back.confusion, m.confusion)
        assert back.confusion.dtype == np.int64
        assert (back.auroc, back.auroc_per_class, back.auroc_note) == (
            m.auroc,
            m.auroc_per_class,
            m.auroc_note,
        )


@pytest.mark.parametrize(
    ("y_true", "y_pred", "probabilities", "match"),
    [
        (Y_TRUE, Y_PRED[:-1], None, "10 samples but y_pred has 9"),
        (Y_TRUE, None, _probabilities(9, 3), r"shape .*\(10, 3\)"),
        (Y_TRUE, None, _probabilities(10, 2), r"shape .*\(10, 3\)"),
        (["a", "b", "zebra"], None, _probabilities(3, 3), "unknown label 'zebra' in y_true"),
        (Y_TRUE, [*Y_PRED[:-1], 3], None, "unknown label 3 in y_pred"),
        (Y_TRUE, [*Y_PRED[:-1], -1], None, "unknown label -1 in y_pred"),
        ([], [], None, "empty"),
        (Y_TRUE, None, None, "y_pred or probabilities"),
        (Y_TRUE, None, _probabilities(10, 3) * 2, "not probabilities"),
        (Y_TRUE, None, np.full((10, 3), 0.3), "not probabilities"),
        (Y_TRUE, np.array(Y_PRED, dtype=float) + 0.5, None, "class indices or class names"),
    ],
)
def test_invalid_inputs_raise(y_true, y_pred, probabilities, match) -> None:
    with pytest.raises(ValueError, match=match):
        evaluate(y_true, y_pred, probabilities, classes=CLASSES)


def test_invalid_classes_raise() -> None:
    with pytest.raises(ValueError, match="distinct"):
        evaluate([0, 1], [0, 1], classes=["a", "a"])
    with pytest.raises(ValueError, match="at least 2"):
        evaluate([0], [0], classes=["a"])


def _cell(table: str, group: str, metric: str, column: int) -> str:
    """Returns the cell of ``column`` in the row of ``metric`` under ``group``."""
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(group))
    row = next(line for line in lines[start:] if metric in line)
    return row.split(metric, 1)[1].split()[column]


def test_format_table2_columns_and_best_marks() -> None:
    good = evaluate(Y_TRUE, Y_TRUE, probabilities=np.eye(3)[Y_TRUE], classes=CLASSES)
    fair = evaluate(Y_TRUE, Y_PRED, probabilities=_probabilities(10, 3), classes=CLASSES)
    table = format_table2({"attention": fair, "sliding window": good})
    lines = table.splitlines()
    assert "attention" in lines[0] and "sliding window" in lines[0]
    assert lines[0].index("attention") < lines[0].index("sliding window")
    # 3 classes + Mean, 4 metrics each, then AUROC and n, after a header and a rule.
    assert len(lines) == 2 + 4 * 4 + 2
    for group in (*CLASSES, "Mean"):
        for metric in ("Accuracy", "Recall", "Precision", "F1 Score"):
            assert _cell(table, group, metric, 1) == "1.00*"
    assert _cell(table, "a", "Accuracy", 0) == "0.70"
    assert _cell(table, "c", "Accuracy", 0) == "0.80"
    assert _cell(table, "Mean", "F1 Score", 0) == f"{(4 / 7 + 4 / 7 + 2 / 3) / 3:.2f}"
    assert _cell(table, "AUROC", "(macro)", 1) == "1.00*"
    assert _cell(table, "n", "n", 0) == "10"
    # The best can be in either column.
    swapped = format_table2({"sliding window": good, "attention": fair})
    assert _cell(swapped, "Mean", "Recall", 0) == "1.00*"
    assert _cell(swapped, "Mean", "Recall", 1) == f"{(0.5 + 2 / 3 + 2 / 3) / 3:.2f}"


def test_format_table2_ties_and_missing_auroc() -> None:
    m = evaluate(Y_TRUE, Y_PRED, classes=CLASSES)
    table = format_table2({"x": m, "y": m})
    assert "*" not in table  # all equal: no best
    assert _cell(table, "AUROC", "(macro)", 0) == "n/a"


def test_format_table2_needs_same_classes() -> None:
    m = evaluate(Y_TRUE, Y_PRED, classes=CLASSES)
    other = evaluate(Y_TRUE, Y_PRED, classes=("a", "b", "d"))
    with pytest.raises(ValueError, match="different classes"):
        format_table2({"x": m, "y": other})
    with pytest.raises(ValueError, match="no models"):
        format_table2({})


def test_format_confusion_rows_are_truth() -> None:
    text = format_confusion(evaluate(Y_TRUE, Y_PRED, classes=CLASSES))
    lines = text.splitlines()
    assert lines[0].split()[-3:] == list(CLASSES)
    assert [line.split() for line in lines[1:]] == [
        ["a", "2", "1", "1"],
        ["b", "1", "2", "0"],
        ["c", "0", "1", "2"],
    ]
