"""Tests of k-fold cross-validation by case and the mean ± std table (Raza et al., Table II)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from napari_slide_attention.train.cohort import Cohort, CohortEntry
from napari_slide_attention.train.crossval import (
    FOLD_COHORT,
    Fold,
    MeanStd,
    fold_cohort,
    fold_directory,
    format_mmr_table,
    kfold_splits,
    read_fold_cohorts,
    summarise_folds,
    write_fold_cohorts,
)

MMR = ("intact", "loss")


def _cohort(cases: dict[str, tuple[int, int]], *, lesion: bool = False) -> Cohort:
    """A cohort with, per class name, (number of cases, slides per case); case ids set."""
    entries = []
    for label, (n_cases, per_case) in cases.items():
        for c in range(n_cases):
            for s in range(per_case):
                entries.append(
                    CohortEntry(
                        slide=Path(f"/slides/{label}-{c:02d}-{s}.tif"),
                        label=MMR.index(label),
                        split="train",
                        case=f"{label}-{c:02d}",
                        lesions=[((0, 0, 10, 10), 0)] if lesion else None,
                    )
                )
    return Cohort(classes=MMR, entries=entries)


def _auroc_by_pairs(positives: list[float], negatives: list[float]) -> float:
    """AUROC as the share of (positive, negative) pairs ranked right, ties counting 1/2."""
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def _f1_by_counts(truth: list[int], pred: list[int], c: int) -> float:
    tp = sum(t == c and p == c for t, p in zip(truth, pred, strict=True))
    fp = sum(t != c and p == c for t, p in zip(truth, pred, strict=True))
    fn = sum(t == c and p != c for t, p in zip(truth, pred, strict=True))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


# --- folds -------------------------------------------------------------------------------


def test_every_slide_is_tested_once_and_splits_are_disjoint() -> None:
    cohort = _cohort({"intact": (20, 2), "loss": (6, 3)})
    folds = kfold_splits(cohort, k=5, seed=3)
    assert [f.index for f in folds] == list(range(5))
    tested = Counter(i for f in folds for i in f.test)
    assert sorted(tested) == list(range(len(cohort))) and set(tested.values()) == {1}
    for f in folds:
        parts = [set(f.train), set(f.val), set(f.test)]
        assert sum(map(len, parts)) == len(cohort) == len(set().union(*parts))
        assert f.val, "a validation set is held out by default"


def test_no_case_is_split_within_or_across_folds() -> None:
    cohort = _cohort({"intact": (15, 3), "loss": (7, 2)})
    folds = kfold_splits(cohort, k=5, seed=1)
    test_fold_of_case: dict[str, set[int]] = {}
    for f in folds:
        splits = f.splits()
        by_case: dict[str, set[str]] = {}
        for i, entry in enumerate(cohort.entries):
            by_case.setdefault(entry.case, set()).add(splits[i])
            if splits[i] == "test":
                test_fold_of_case.setdefault(entry.case, set()).add(f.index)
        assert all(len(s) == 1 for s in by_case.values()), "a case in two splits"
    assert all(len(s) == 1 for s in test_fold_of_case.values()), "a case in two test folds"
    assert len(test_fold_of_case) == 22


def test_slides_without_case_id_are_their_own_cases() -> None:
    cohort = _cohort({"intact": (10, 1), "loss": (5, 1)})
    for e in cohort.entries:
        e.case = ""
    folds = kfold_splits(cohort, k=5, seed=0)
    assert sorted(i for f in folds for i in f.test) == list(range(15))


def test_stratification_keeps_class_proportions() -> None:
    labels = ["intact"] * 40 + ["loss"] * 10
    folds = kfold_splits(labels, k=5, seed=7)
    for f in folds:
        test = [labels[i] for i in f.test]
        assert len(test) == 10 and test.count("loss") == 2
        rest = [labels[i] for i in (*f.train, *f.val)]
        assert rest.count("loss") / len(rest) == pytest.approx(0.2)
        val = [labels[i] for i in f.val]
        assert abs(val.count("loss") / len(val) - 0.2) <= 0.15


def test_groups_keep_cases_together_when_labels_are_given() -> None:
    labels = [0] * 24 + [1] * 12
    groups = [f"p{i // 2}" for i in range(36)]  # two slides per case
    folds = kfold_splits(labels, k=3, groups=groups, seed=0)
    for f in folds:
        splits = f.splits()
        for i in range(0, 36, 2):
            assert splits[i] == splits[i + 1]


def test_same_seed_same_folds_other_seed_other_folds() -> None:
    cohort = _cohort({"intact": (20, 2), "loss": (8, 1)})
    a = kfold_splits(cohort, k=4, seed=11)
    b = kfold_splits(cohort, k=4, seed=11)
    c = kfold_splits(cohort, k=4, seed=12)
    assert a == b
    assert a != c


def test_too_few_cases_of_a_class_is_a_clear_error() -> None:
    # Nine slides of class "loss", but only three cases: it is cases that count.
    cohort = _cohort({"intact": (20, 1), "loss": (3, 3)})
    with pytest.raises(ValueError, match=r"class 'loss' has only 3 case\(s\), fewer than k=5"):
        kfold_splits(cohort, k=5)
    assert len(kfold_splits(cohort, k=3)) == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 1}, "k must be an integer >= 2"),
        ({"val_fraction": 0.7}, "val_fraction must lie in"),
        ({"groups": ["a"] * 30}, "groups cannot be given with a cohort"),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        kfold_splits(_cohort({"intact": (20, 1), "loss": (10, 1)}), **kwargs)


def test_too_few_cases_for_the_validation_split_is_a_clear_error() -> None:
    labels = [0] * 4 + [1] * 4  # 3 cases per class outside each test fold
    with pytest.raises(ValueError, match=r"fold 0: cannot hold out 1/5 of the 6 cases"):
        kfold_splits(labels, k=4)
    assert all(len(f.val) == 3 for f in kfold_splits(labels, k=4, val_fraction=0.5))


def test_no_validation_set_when_val_fraction_is_zero() -> None:
    folds = kfold_splits([0] * 10 + [1] * 10, k=5, val_fraction=0)
    assert all(f.val == () and len(f.train) == 16 for f in folds)


def test_fold_cohort_rewrites_splits_without_touching_the_input() -> None:
    cohort = _cohort({"intact": (10, 2), "loss": (5, 1)}, lesion=True)
    before = [(e.slide, e.label, e.split, e.case, e.lesions) for e in cohort.entries]
    fold = kfold_splits(cohort, k=5, seed=2)[3]
    copy = fold_cohort(cohort, fold)
    assert [(e.slide, e.label, e.split, e.case, e.lesions) for e in cohort.entries] == before
    assert copy.classes == cohort.classes and copy.path is None
    assert [e.split for e in copy.entries] == fold.splits()
    assert [e.slide for e in copy.split("test")] == [cohort.entries[i].slide for i in fold.test]
    assert copy.entries[0] is not cohort.entries[0]
    assert copy.entries[0].lesions == cohort.entries[0].lesions
    assert copy.entries[0].lesions is not cohort.entries[0].lesions
    assert sum(copy.counts()["test"].values()) == len(fold.test)


def test_fold_cohort_refuses_a_fold_of_another_cohort() -> None:
    cohort = _cohort({"intact": (10, 1), "loss": (5, 1)})
    with pytest.raises(ValueError, match="made from another cohort"):
        fold_cohort(cohort, Fold(index=0, train=(0, 1), val=(), test=(2,)))


# --- metrics over folds --------------------------------------------------------------------

# Three folds of a binary problem, "loss" (index 1) positive; hand-made predictions.
TRUTH = [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1, 0], [0, 1, 0, 0]]
P_LOSS = [
    [0.1, 0.6, 0.3, 0.8, 0.4],
    [0.2, 0.1, 0.9, 0.7, 0.3, 0.5],
    [0.3, 0.2, 0.6, 0.1],
]


def _pred(p: list[float]) -> list[int]:
    return [int(v > 0.5) for v in p]


def test_binary_f1_and_auroc_mean_std_match_numpy() -> None:
    s = summarise_folds(TRUTH, None, [np.array(p) for p in P_LOSS], MMR)
    f1 = [_f1_by_counts(t, _pred(p), 1) for t, p in zip(TRUTH, P_LOSS, strict=True)]
    auroc = [
        _auroc_by_pairs(
            [v for v, y in zip(p, t, strict=True) if y == 1],
            [v for v, y in zip(p, t, strict=True) if y == 0],
        )
        for t, p in zip(TRUTH, P_LOSS, strict=True)
    ]
    # By hand: fold 0 TP 1, FP 1, FN 1 -> F1 1/2; fold 1 TP 2, FN 1 -> 4/5; fold 2 -> 0.
    assert f1 == pytest.approx([0.5, 0.8, 0.0])
    assert [r.f1 for r in s.folds] == pytest.approx(f1)
    assert [r.auroc for r in s.folds] == pytest.approx(auroc)
    assert s.f1.mean == pytest.approx(np.mean(f1)) and s.f1.std == pytest.approx(np.std(f1))
    assert s.auroc.mean == pytest.approx(np.mean(auroc))
    assert s.auroc.std == pytest.approx(np.std(auroc))
    assert s.positive == "loss" and [r.n for r in s.folds] == [5, 6, 4]


def test_two_column_probabilities_and_given_predictions_agree() -> None:
    two_col = [np.stack([1 - np.array(p), np.array(p)], axis=1) for p in P_LOSS]
    a = summarise_folds(TRUTH, [_pred(p) for p in P_LOSS], two_col, MMR)
    b = summarise_folds(TRUTH, None, P_LOSS, MMR)
    assert a.f1.values == pytest.approx(b.f1.values)
    assert a.auroc.values == pytest.approx(b.auroc.values)


def test_positive_class_can_be_chosen() -> None:
    # 1-D probabilities are those of the positive class, here "intact".
    p_intact = [1 - np.array(p) for p in P_LOSS]
    s = summarise_folds(TRUTH, None, p_intact, MMR, positive="intact")
    f1 = [_f1_by_counts(t, _pred(p), 0) for t, p in zip(TRUTH, P_LOSS, strict=True)]
    assert s.positive == "intact" and s.f1.values == pytest.approx(f1)
    # With probabilities that sum to 1, the AUROC of either class is the same.
    assert s.auroc.values == pytest.approx(summarise_folds(TRUTH, None, P_LOSS, MMR).auroc.values)


def test_a_fold_without_positives_has_no_auroc_and_is_left_out() -> None:
    truth = [*TRUTH, [0, 0, 0]]
    probs = [*P_LOSS, [0.2, 0.7, 0.1]]
    s = summarise_folds(truth, None, probs, MMR)
    last = s.folds[-1]
    assert last.auroc is None and "absent" in last.auroc_note
    assert len(s.auroc.values) == 3 and s.auroc.n_folds == 4
    assert len(s.f1.values) == 4 and s.f1.values[-1] == 0.0
    assert "(3/4 folds)" in s.auroc.format()


def test_multiclass_uses_macro_f1_and_handles_an_absent_class() -> None:
    classes = ("a", "b", "c")
    truth = [[0, 1, 2, 0, 1, 2], [0, 0, 1, 1]]  # the second fold has no "c"
    pred = [[0, 1, 1, 0, 2, 2], [0, 1, 1, 1]]
    rng = np.random.default_rng(0)
    probs = [rng.dirichlet(np.ones(3), size=len(t)) for t in truth]
    s = summarise_folds(truth, pred, probs, classes)
    macro = [
        np.mean([_f1_by_counts(t, p, c) for c in range(3)])
        for t, p in zip(truth, pred, strict=True)
    ]
    assert s.positive is None and s.f1.values == pytest.approx(macro)
    assert s.folds[0].auroc is not None
    assert s.folds[1].auroc is None and "'c'" in s.folds[1].auroc_note
    assert s.auroc.mean == pytest.approx(s.folds[0].auroc)
    with pytest.raises(ValueError, match="only for 2 classes"):
        summarise_folds(truth, pred, probs, classes, positive="a")


def test_ddof_and_undefined_std() -> None:
    s = summarise_folds(TRUTH, None, P_LOSS, MMR, ddof=1)
    assert s.f1.std == pytest.approx(np.std(s.f1.values, ddof=1))
    assert MeanStd((0.5,), 1, ddof=1).format() == "0.50 ± n/a"
    assert MeanStd((), 3).format() == "n/a"


def test_fold_errors_name_the_fold() -> None:
    with pytest.raises(ValueError, match="fold 1: "):
        summarise_folds([[0, 1], [0, 1]], [[0, 1], [0, 7]], None, MMR)
    with pytest.raises(ValueError, match="2 folds of truth but 1 of predictions"):
        summarise_folds([[0, 1], [0, 1]], [[0, 1]], None, MMR)


def test_mmr_table_lists_methods_and_numbers() -> None:
    proposed = summarise_folds(TRUTH, None, P_LOSS, MMR)
    random = summarise_folds(TRUTH, None, [[0.5] * len(t) for t in TRUTH], MMR)
    no_probs = summarise_folds(TRUTH, [_pred(p) for p in P_LOSS], None, MMR)
    table = format_mmr_table(
        {"Proposed Method": proposed, "Random Sampling": random, "Sliding Window": no_probs}
    )
    lines = table.splitlines()
    assert lines[0].split("  ")[0] == "Method"
    assert "F1 (mean ± std)" in lines[0] and "AUROC (mean ± std)" in lines[0]
    assert set(lines[1]) == {"-"} and len(lines) == 5
    row = lines[2]
    assert row.startswith("Proposed Method")
    assert f"{proposed.f1.mean:.2f} ± {proposed.f1.std:.2f}" in row
    assert f"{proposed.auroc.mean:.2f} ± {proposed.auroc.std:.2f}" in row
    assert lines[3].startswith("Random Sampling") and "0.50 ± 0.00" in lines[3]
    assert lines[4].startswith("Sliding Window") and lines[4].endswith("n/a")
    assert "0.433 ±" in format_mmr_table({"p": proposed}, decimals=3)
    with pytest.raises(ValueError, match="no methods"):
        format_mmr_table({})


# --- k-fold runs on disk -------------------------------------------------------------------


def _cohort_on_disk(tmp_path: Path) -> Cohort:
    """A cohort whose slide files exist (empty files: only the paths matter here)."""
    cohort = _cohort({"intact": (6, 2), "loss": (4, 1)}, lesion=True)
    for entry in cohort.entries:
        entry.slide = tmp_path / "slides" / entry.slide.name
        entry.slide.parent.mkdir(exist_ok=True)
        entry.slide.touch()
    return cohort


def test_fold_cohorts_are_written_read_back_and_match_the_folds(tmp_path) -> None:
    cohort = _cohort_on_disk(tmp_path)
    run = tmp_path / "run"
    written = write_fold_cohorts(cohort, run, 3, seed=4, val_fraction=0)
    folds = kfold_splits(cohort, k=3, seed=4, val_fraction=0)
    assert [fold_directory(run, i).name for i in range(3)] == ["fold-1", "fold-2", "fold-3"]
    for fold, fold_set in zip(folds, written, strict=True):
        assert fold_set.path == run / f"fold-{fold.index + 1}" / FOLD_COHORT
        assert fold_set.classes == cohort.classes
        assert [e.split for e in fold_set.entries] == fold.splits()
        assert [e.slide for e in fold_set.entries] == [e.slide for e in cohort.entries]
        assert [e.case for e in fold_set.entries] == [e.case for e in cohort.entries]
        assert fold_set.entries[0].lesions == cohort.entries[0].lesions
    again = read_fold_cohorts(run, 3, cohort.classes)
    assert [[e.split for e in c.entries] for c in again] == [f.splits() for f in folds]
    # the same folds may be written again (a resumed run); other folds may not
    write_fold_cohorts(cohort, run, 3, seed=4, val_fraction=0)
    with pytest.raises(ValueError, match="holds another fold"):
        write_fold_cohorts(cohort, run, 3, seed=5, val_fraction=0)
    write_fold_cohorts(cohort, run, 3, seed=5, val_fraction=0, replace_existing=True)
    assert [[e.split for e in c.entries] for c in read_fold_cohorts(run, 3)] == [
        f.splits() for f in kfold_splits(cohort, k=3, seed=5, val_fraction=0)
    ]


def test_reading_fold_cohorts_checks_the_number_of_folds(tmp_path) -> None:
    cohort = _cohort_on_disk(tmp_path)
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="no such run folder"):
        read_fold_cohorts(run, 3)
    write_fold_cohorts(cohort, run, 3, val_fraction=0)
    with pytest.raises(ValueError, match=r"no fold-4/cohort.csv; not a run of `train --folds 4`"):
        read_fold_cohorts(run, 4)
    with pytest.raises(ValueError, match="holds more than 2 folds"):
        read_fold_cohorts(run, 2)
