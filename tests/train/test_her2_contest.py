"""Tests of the HER2 contest criteria on ILLUSTRATIVE tables (not the contest's values).

The contest's points table (Qaiser et al. 2018) could not be verified, so no default is
shipped and these tests define their own tables. ILLUSTRATIVE_POINTS below is made up
for the tests (15 points minus 5 per score of distance); it is NOT the contest's table.
"""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest

from napari_slide_attention.train import her2_contest
from napari_slide_attention.train.her2_contest import (
    HER2_SCORES,
    PointsTableError,
    agreement_points,
    case_points,
    check_her2_classes,
    combined_points,
    format_her2_table,
    load_points_table,
    points_table,
    score_contest,
    weighted_confidence,
)

ILLUSTRATIVE_SOURCE = "illustrative, made up for the tests; NOT the contest's table"
# Rows = ground truth, columns = prediction: 15 - 5 * |truth - predicted|.
ILLUSTRATIVE_POINTS = {
    "0": {"0": 15, "1+": 10, "2+": 5, "3+": 0},
    "1+": {"0": 10, "1+": 15, "2+": 10, "3+": 5},
    "2+": {"0": 5, "1+": 10, "2+": 15, "3+": 10},
    "3+": {"0": 0, "1+": 5, "2+": 10, "3+": 15},
}
POINTS = points_table(ILLUSTRATIVE_POINTS, source=ILLUSTRATIVE_SOURCE, name="illustrative")
# Illustrative weights: the confidence counts only for right predictions.
RIGHT_ONLY = points_table(np.eye(4), source=ILLUSTRATIVE_SOURCE)
# Illustrative signed weights: +confidence when right, -confidence when wrong.
SIGNED = points_table(2 * np.eye(4) - 1, source=ILLUSTRATIVE_SOURCE, allow_negative=True)

# Five cases; points by hand from the table: 15, 10, 15, 5, 10.
TRUTH = ["0", "1+", "2+", "3+", "2+"]
PRED = ["0", "2+", "2+", "1+", "3+"]
CONF = [0.9, 0.6, 0.8, 0.5, 0.7]


def _write(tmp_path, data, name="table.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_per_case_points_and_total_by_hand() -> None:
    assert case_points(TRUTH, PRED, POINTS).tolist() == [15, 10, 15, 5, 10]
    assert agreement_points(TRUTH, PRED, POINTS) == 55
    # Scores may be given as indices 0-3 as well as names.
    assert agreement_points([0, 1, 2, 3, 2], np.array([0, 2, 2, 1, 3]), POINTS) == 55
    assert POINTS.lookup("3+", 0) == 0 and POINTS.lookup(1, "1+") == 15


def test_weighted_confidence_weighs_each_case_by_its_table_entry() -> None:
    # Right predictions: cases 0 and 2 -> 0.9 + 0.8.
    assert weighted_confidence(TRUTH, PRED, CONF, RIGHT_ONLY) == pytest.approx(1.7)
    # Signed: 0.9 - 0.6 + 0.8 - 0.5 - 0.7.
    assert weighted_confidence(TRUTH, PRED, CONF, SIGNED) == pytest.approx(-0.1)


def test_combined_points_multiply_points_and_confidence_per_case() -> None:
    # 15*0.9 + 10*0.6 + 15*0.8 + 5*0.5 + 10*0.7
    assert combined_points(TRUTH, PRED, CONF, POINTS) == pytest.approx(41.0)
    # Points x weighted confidence: only the right cases, 15*0.9 + 15*0.8.
    assert combined_points(TRUTH, PRED, CONF, POINTS, weights=RIGHT_ONLY) == pytest.approx(25.5)
    # Full confidence everywhere gives back the agreement points.
    assert combined_points(TRUTH, PRED, [1.0] * 5, POINTS) == 55


def test_score_contest_gives_per_case_values_and_totals() -> None:
    s = score_contest(TRUTH, PRED, CONF, points=POINTS, weights=RIGHT_ONLY)
    assert s.n == 5 and s.points.tolist() == [15, 10, 15, 5, 10]
    assert s.weighted.tolist() == pytest.approx([0.9, 0, 0.8, 0, 0])
    assert s.combined.tolist() == pytest.approx([13.5, 6.0, 12.0, 2.5, 7.0])
    assert (s.total_points, s.total_combined) == (55, pytest.approx(41.0))
    assert s.total_weighted_confidence == pytest.approx(1.7)
    assert score_contest(TRUTH, PRED, CONF, points=POINTS).total_weighted_confidence is None


def test_table_lists_methods_and_totals() -> None:
    a = score_contest(TRUTH, PRED, CONF, points=POINTS, weights=RIGHT_ONLY)
    b = score_contest(TRUTH, TRUTH, [1.0] * 5, points=POINTS)
    lines = format_her2_table({"Proposed": a, "Oracle": b}).splitlines()
    assert lines[0].split() == ["Method", "Points", "W.C.", "C.Pts", "n"]
    assert lines[2].split() == ["Proposed", "55.0", "1.70", "41.0", "5"]
    assert lines[3].split() == ["Oracle", "75.0", "n/a", "75.0", "5"]
    with pytest.raises(ValueError, match="no methods"):
        format_her2_table({})


@pytest.mark.parametrize(
    ("truth", "pred", "conf", "message"),
    [
        (["0", "4+"], ["0", "0"], [0.5, 0.5], r"truth score '4\+' is not a HER2 score"),
        (["0", "1+"], ["0", True], [0.5, 0.5], "predicted score True is not a HER2 score"),
        (["0", "1+"], ["0"], [0.5, 0.5], "2 ground-truth scores but 1 predicted"),
        (["0", "1+"], ["0", "1+"], [0.5], "2 cases but 1 confidence"),
        (["0", "1+"], ["0", "1+"], [0.5, 1.5], r"in \[0, 1\]"),
        (["0", "1+"], ["0", "1+"], [0.5, float("nan")], "finite"),
        ([], [], [], "no cases"),
        ("0", "0", [1.0], "one value per case"),
    ],
)
def test_bad_case_inputs_are_rejected(truth, pred, conf, message) -> None:
    with pytest.raises(ValueError, match=message):
        combined_points(truth, pred, conf, POINTS)


def test_load_points_table_from_json(tmp_path) -> None:
    path = _write(
        tmp_path,
        {
            "name": "illustrative",
            "source": ILLUSTRATIVE_SOURCE,
            "verified": False,
            "notes": "extra keys are kept out of the table",
            "points": ILLUSTRATIVE_POINTS,
        },
    )
    table = load_points_table(path)
    np.testing.assert_array_equal(table.values, POINTS.values)
    assert (table.source, table.name, table.verified) == (
        ILLUSTRATIVE_SOURCE,
        "illustrative",
        False,
    )
    with pytest.raises(ValueError):
        table.values[0, 0] = 1  # read-only
    # The JSON layout round-trips.
    again = load_points_table(_write(tmp_path, table.to_dict(), "again.json"))
    np.testing.assert_array_equal(again.values, table.values)


def test_rows_may_be_given_in_another_score_order(tmp_path) -> None:
    order = ["3+", "2+", "1+", "0"]
    rows = [[ILLUSTRATIVE_POINTS[t][p] for p in order] for t in order]
    path = _write(tmp_path, {"source": ILLUSTRATIVE_SOURCE, "scores": order, "points": rows})
    np.testing.assert_array_equal(load_points_table(path).values, POINTS.values)
    # Without "scores", rows are in the order 0, 1+, 2+, 3+.
    plain = [[ILLUSTRATIVE_POINTS[t][p] for p in HER2_SCORES] for t in HER2_SCORES]
    np.testing.assert_array_equal(
        points_table(plain, source=ILLUSTRATIVE_SOURCE).values, POINTS.values
    )


def _with(**changes):
    data = {"source": ILLUSTRATIVE_SOURCE, "points": json.loads(json.dumps(ILLUSTRATIVE_POINTS))}
    data.update(changes)
    return data


def _cell(t, p, value):
    points = json.loads(json.dumps(ILLUSTRATIVE_POINTS))
    points[t][p] = value
    return _with(points=points)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("{not json", "not valid JSON"),
        ([1, 2], "expected a JSON object"),
        ({"source": "x"}, "no 'points'"),
        (_with(source=""), "needs a 'source'"),
        (_with(points=[[15, 10, 5, 0]] * 3), "4 x 4"),
        (_with(points=[[15, 10, 5]] * 4), "4 x 4"),
        (_cell("0", "3+", -1), r"non-negative, got -1 for truth '0', predicted '3\+'"),
        (_cell("1+", "2+", "ten"), r"'1\+', predicted '2\+' must be a number"),
        (_cell("2+", "0", None), "must be a number"),
        ("NaN_CELL", "not finite"),
        (_with(points={**ILLUSTRATIVE_POINTS, "4+": {}}), r"unknown \['4\+'\]"),
        (
            _with(points={k: v for k, v in ILLUSTRATIVE_POINTS.items() if k != "0"}),
            r"missing \['0'\]",
        ),
        (_with(scores=["0", "1+", "2+", "2+"], points=[[1] * 4] * 4), r"missing \['3\+'\]"),
        (_with(verified="yes"), "'verified' must be true or false"),
    ],
)
def test_invalid_tables_give_clear_errors(tmp_path, data, message) -> None:
    if data == "NaN_CELL":
        text = json.dumps(_with()).replace('"3+": 15}}', '"3+": NaN}}')
        path = _write(tmp_path, text)
    else:
        path = _write(tmp_path, data)
    with pytest.raises(PointsTableError, match=message) as info:
        load_points_table(path)
    assert str(path) in str(info.value)


def test_missing_file_and_negative_weights(tmp_path) -> None:
    with pytest.raises(PointsTableError, match="no such points-table file"):
        load_points_table(tmp_path / "absent.json")
    signed = _write(tmp_path, {"source": ILLUSTRATIVE_SOURCE, "points": SIGNED.values.tolist()})
    with pytest.raises(PointsTableError, match="non-negative"):
        load_points_table(signed)
    np.testing.assert_array_equal(
        load_points_table(signed, allow_negative=True).values, SIGNED.values
    )


def test_no_default_table_is_shipped() -> None:
    # The contest's values are unverified: every criterion needs a table from the caller.
    for func, arg in [
        (case_points, "table"),
        (agreement_points, "table"),
        (weighted_confidence, "weights"),
        (combined_points, "table"),
        (score_contest, "points"),
    ]:
        assert inspect.signature(func).parameters[arg].default is inspect.Parameter.empty
    assert not [name for name in vars(her2_contest) if "DEFAULT" in name.upper()]


def test_check_her2_classes_names_the_classes_that_are_not_scores() -> None:
    check_her2_classes(HER2_SCORES)
    check_her2_classes(["0", "3+"])  # a subset of the scores is fine
    with pytest.raises(ValueError, match=r"\['negative', 'positive'\] are not"):
        check_her2_classes(["negative", "positive"])
    with pytest.raises(ValueError, match=r"\['4\+'\] are not"):
        check_her2_classes(["0", "1+", "4+"])
