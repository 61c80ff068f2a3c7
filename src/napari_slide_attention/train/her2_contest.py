"""The HER2 scoring contest's criteria: agreement points, weighted confidence, combined points.

Raza et al. (Table I) score HER2 predictions "as in the HER2 scoring contest" (Qaiser et
al. 2018, Histopathology 72:227-238, doi:10.1111/his.13333) with three criteria, each
computed per case (one HER2 score 0, 1+, 2+ or 3+ per case) and summed over the cases:

* **Agreement points**: the points of a case come from a table indexed by (ground-truth
  score, predicted score), at most 15 per case.
* **Weighted confidence**: each prediction's confidence (in [0, 1], reported by the
  method), weighted; here by a second table indexed like the points, because the
  contest's exact weighting is not verified (see below).
* **Combined points**: per case, the agreement points times the confidence.

What we could verify, and from where:

* Raza et al., section IV-A3: the three criteria; "a total of 15 points were awarded
  based on the variation between the ground truth HER2 labels and the predicted HER2
  scores for each case"; weighted confidence weighs "each predicted score with a
  corresponding confidence value"; combined points are "a product of the two
  preceding criteria for each case". Their Table I totals over 28 test cases stay below
  28 × 15 = 420 and move in steps of 2.5 points.
* The contest's submission page (warwick.ac.uk/fac/cross_fac/tia/data/her2contest/
  submission/) names the three methods "Point based evaluation", "Confidence
  Assessment (confidence reported by algorithm)" and "Weighted assessment", and links
  the organisers' Matlab evaluation code (not available to us).

What we could **not** verify: the values of the contest's 4 × 4 points table and the
exact weighting of the weighted confidence, presumably given in the contest paper,
which we could not read (only its abstract). So this module ships **no default
values**: the points (and the weights of the weighted confidence) are data that the
caller gives, as a mapping (:func:`points_table`) or a JSON file
(:func:`load_points_table`) that names its source.

Table I also suggests that the weighting is not simply the points rescaled: were the
weighted confidence Σ c·points/15 and the combined points Σ c·points, the latter would
be 15 times the former, which most rows of Table I are not (Team Indus: 18.45 × 15 =
276.75, combined 321.4; two rows, FSUJena and UC-CCSE, do match).

"Product of the two preceding criteria" can be read as points × confidence (what
:func:`combined_points` computes by default) or points × weighted confidence (give it
``weights``); with the contest's definitions unknown, both are offered.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "HER2_SCORES",
    "ContestScores",
    "PointsTable",
    "PointsTableError",
    "agreement_points",
    "case_points",
    "check_her2_classes",
    "combined_points",
    "format_her2_table",
    "load_points_table",
    "points_table",
    "score_contest",
    "weighted_confidence",
]

HER2_SCORES: tuple[str, ...] = ("0", "1+", "2+", "3+")


class PointsTableError(ValueError):
    """A points table cannot be used; the message names the file (if any) and the problem."""

    def __init__(self, problem: str, path: str | os.PathLike | None = None):
        super().__init__(f"{path}: {problem}" if path is not None else problem)
        self.path = None if path is None else str(path)
        self.problem = problem


@dataclass(frozen=True, eq=False)
class PointsTable:
    """A value for every (ground-truth score, predicted score) pair of HER2 scores.

    Attributes:
        values: ``(4, 4)`` float64, read-only; ``values[t, p]`` is the value of a case of
            ground truth ``HER2_SCORES[t]`` predicted as ``HER2_SCORES[p]``.
        source: Where the values come from (a paper and its table, or "illustrative").
        name: Short name of the table.
        verified: True only when the values were checked against their source.
    """

    values: np.ndarray
    source: str
    name: str = ""
    verified: bool = False

    def __post_init__(self) -> None:
        values = np.array(self.values, dtype=np.float64)  # a copy, made read-only
        if values.shape != (4, 4):
            raise PointsTableError(f"a points table is 4 x 4, got shape {values.shape}")
        if not np.isfinite(values).all():
            raise PointsTableError("a points table holds NaN or infinite values")
        values.flags.writeable = False
        object.__setattr__(self, "values", values)

    def lookup(self, truth: int | str, predicted: int | str) -> float:
        """Returns the value of one (ground truth, prediction) pair of scores."""
        t = _score_index(truth, "truth")
        p = _score_index(predicted, "predicted")
        return float(self.values[t, p])

    def to_dict(self) -> dict[str, Any]:
        """Returns the table in the JSON layout of :func:`load_points_table`."""
        return {
            "name": self.name,
            "source": self.source,
            "verified": self.verified,
            "points": {
                t: {p: float(self.values[i, j]) for j, p in enumerate(HER2_SCORES)}
                for i, t in enumerate(HER2_SCORES)
            },
        }


def points_table(
    points: Mapping[str, Mapping[str, float]] | Sequence[Sequence[float]] | np.ndarray,
    *,
    source: str,
    name: str = "",
    verified: bool = False,
    allow_negative: bool = False,
) -> PointsTable:
    """Returns a validated table from a nested mapping or a 4 × 4 array.

    Args:
        points: ``{truth: {predicted: value}}`` with exactly the score names
            ``"0", "1+", "2+", "3+"`` as keys at both levels, or 4 rows of 4 values,
            rows = ground truth and columns = prediction, in that score order.
        source: Where the values come from; required, so that a table never travels
            without its provenance.
        name: Short name of the table.
        verified: Whether the values were checked against their source.
        allow_negative: Accept negative values (e.g. weights that penalise wrong
            predictions); points are non-negative.

    Returns:
        The table.

    Raises:
        PointsTableError: If the table is not 4 × 4, names other scores, holds a value
            that is not a finite number, or a negative one when not allowed, or if
            ``source`` is empty.
    """
    return _build(points, source, name, verified, allow_negative, path=None)


def load_points_table(path: str | os.PathLike, *, allow_negative: bool = False) -> PointsTable:
    """Returns the table in a JSON file.

    The file holds an object with ``"source"`` (required: where the values come from),
    ``"points"`` (as for :func:`points_table`: a nested mapping by score name, or 4 rows
    of 4 values in the order of ``"scores"`` when given, else 0, 1+, 2+, 3+), and
    optionally ``"name"``, ``"verified"`` and any notes. Example::

        {"name": "illustrative", "source": "made up for a test", "verified": false,
         "points": {"0": {"0": 15, "1+": 10, "2+": 5, "3+": 0}, "1+": {...}, ...}}

    Args:
        path: The JSON file.
        allow_negative: Accept negative values (for weights; points are non-negative).

    Returns:
        The table.

    Raises:
        PointsTableError: Naming the file and the problem, when it cannot be read, is
            not JSON, or does not hold a valid table.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PointsTableError("no such points-table file", path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PointsTableError(f"cannot read the file ({exc})", path) from exc
    except json.JSONDecodeError as exc:
        raise PointsTableError(f"not valid JSON ({exc.msg}, line {exc.lineno})", path) from exc
    if not isinstance(data, dict):
        raise PointsTableError(
            f"expected a JSON object with 'source' and 'points', got {type(data).__name__}", path
        )
    if "points" not in data:
        raise PointsTableError("no 'points' in the file", path)
    points = data["points"]
    if "scores" in data and not isinstance(points, dict):
        points = _reorder_rows(points, data["scores"], path)
    verified = data.get("verified", False)
    if not isinstance(verified, bool):
        raise PointsTableError(f"'verified' must be true or false, got {verified!r}", path)
    source = data.get("source", "")
    name = data.get("name", "")
    if not isinstance(source, str) or not isinstance(name, str):
        raise PointsTableError("'source' and 'name' must be strings", path)
    return _build(points, source, name, verified, allow_negative, path=path)


def check_her2_classes(classes: Sequence[str]) -> None:
    """Checks that every class name is a HER2 score, before a long run scores them.

    Args:
        classes: the class names of a cohort or a model.

    Raises:
        ValueError: naming the classes that are not HER2 scores.
    """
    unknown = [c for c in classes if str(c).strip() not in HER2_SCORES]
    if unknown:
        raise ValueError(
            f"the HER2 contest's criteria need classes that are HER2 scores "
            f"{list(HER2_SCORES)}; {unknown} are not (the classes: {list(classes)})"
        )


def case_points(truth: Any, predicted: Any, table: PointsTable) -> np.ndarray:
    """Returns the agreement points of each case, shape ``(n,)``.

    Args:
        truth: Ground-truth score of each case: names ("0", "1+", "2+", "3+") or
            indices 0-3.
        predicted: Predicted score of each case, like ``truth``.
        table: The points table.

    Raises:
        ValueError: If the lengths differ, there are no cases, or a score is unknown.
    """
    t, p = _scores(truth, predicted)
    return table.values[t, p]


def agreement_points(truth: Any, predicted: Any, table: PointsTable) -> float:
    """Returns the agreement points summed over the cases (see :func:`case_points`)."""
    return float(case_points(truth, predicted, table).sum())


def weighted_confidence(truth: Any, predicted: Any, confidence: Any, weights: PointsTable) -> float:
    """Returns Σ over cases of ``weights[truth, predicted] × confidence``.

    The weights are data, like the points: the contest's are not verified here (see the
    module docstring). The identity table, for example, sums the confidence of the
    right predictions.

    Args:
        truth: Ground-truth score of each case (names or indices 0-3).
        predicted: Predicted score of each case.
        confidence: Confidence of each prediction, in [0, 1].
        weights: Weight of each (truth, predicted) pair; may be negative.

    Raises:
        ValueError: If the lengths differ, there are no cases, a score is unknown or a
            confidence is not in [0, 1].
    """
    t, p = _scores(truth, predicted)
    conf = _confidence(confidence, t.size)
    return float((weights.values[t, p] * conf).sum())


def combined_points(
    truth: Any,
    predicted: Any,
    confidence: Any,
    table: PointsTable,
    *,
    weights: PointsTable | None = None,
) -> float:
    """Returns Σ over cases of agreement points × confidence.

    Args:
        truth: Ground-truth score of each case (names or indices 0-3).
        predicted: Predicted score of each case.
        confidence: Confidence of each prediction, in [0, 1].
        table: The points table.
        weights: When given, each case's confidence is first weighted by
            ``weights[truth, predicted]`` (points × weighted confidence, the literal
            reading of Raza et al.'s "product of the two preceding criteria").

    Raises:
        ValueError: As :func:`weighted_confidence`.
    """
    t, p = _scores(truth, predicted)
    conf = _confidence(confidence, t.size)
    factor = conf if weights is None else weights.values[t, p] * conf
    return float((table.values[t, p] * factor).sum())


@dataclass(frozen=True, eq=False)
class ContestScores:
    """Returned by :func:`score_contest`: the three criteria per case and in total.

    Attributes:
        points: Agreement points of each case.
        weighted: Weighted confidence of each case; None when no weights were given.
        combined: Agreement points × confidence of each case.
    """

    points: np.ndarray
    weighted: np.ndarray | None
    combined: np.ndarray

    @property
    def n(self) -> int:
        """Number of cases."""
        return int(self.points.size)

    @property
    def total_points(self) -> float:
        """Agreement points summed over the cases."""
        return float(self.points.sum())

    @property
    def total_weighted_confidence(self) -> float | None:
        """Weighted confidence summed over the cases; None without weights."""
        return None if self.weighted is None else float(self.weighted.sum())

    @property
    def total_combined(self) -> float:
        """Combined points summed over the cases."""
        return float(self.combined.sum())


def score_contest(
    truth: Any,
    predicted: Any,
    confidence: Any,
    *,
    points: PointsTable,
    weights: PointsTable | None = None,
) -> ContestScores:
    """Returns agreement points, weighted confidence and combined points of each case.

    The combined points are points × confidence; for points × weighted confidence, use
    :func:`combined_points` with ``weights``.

    Args:
        truth: Ground-truth score of each case (names or indices 0-3).
        predicted: Predicted score of each case.
        confidence: Confidence of each prediction, in [0, 1].
        points: The points table.
        weights: The weights of the weighted confidence; None leaves it out.

    Raises:
        ValueError: As :func:`weighted_confidence`.
    """
    t, p = _scores(truth, predicted)
    conf = _confidence(confidence, t.size)
    per_case = points.values[t, p]
    weighted = None if weights is None else weights.values[t, p] * conf
    return ContestScores(points=per_case, weighted=weighted, combined=per_case * conf)


def format_her2_table(results: Mapping[str, ContestScores]) -> str:
    """Returns the methods' totals in the layout of Table I of Raza et al.

    Columns: method, agreement points (1 decimal), weighted confidence (2 decimals,
    "n/a" without weights), combined points (1 decimal), number of cases.

    Args:
        results: Scores from :func:`score_contest`, by method name, in row order.

    Returns:
        The table, lines joined by newlines (no trailing newline).

    Raises:
        ValueError: If ``results`` is empty.
    """
    if not results:
        raise ValueError("no methods to tabulate")
    header = ("Method", "Points", "W.C.", "C.Pts", "n")
    rows = []
    for method, s in results.items():
        wc = s.total_weighted_confidence
        rows.append(
            (
                method,
                f"{s.total_points:.1f}",
                "n/a" if wc is None else f"{wc:.2f}",
                f"{s.total_combined:.1f}",
                str(s.n),
            )
        )
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = f"{cells[0]:<{widths[0]}}"
        rest = (f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    head = line(header)
    return "\n".join([head, "-" * len(head), *(line(r) for r in rows)])


def _build(
    points: Any,
    source: Any,
    name: str,
    verified: bool,
    allow_negative: bool,
    path: str | os.PathLike | None,
) -> PointsTable:
    """Returns the validated table; errors name ``path`` when given."""
    if not isinstance(source, str) or not source.strip():
        raise PointsTableError(
            "a points table needs a 'source' saying where its values come from", path
        )
    if isinstance(points, Mapping):
        values = _from_mapping(points, path)
    else:
        values = _from_rows(points, path)
    if not allow_negative and (values < 0).any():
        t, p = np.argwhere(values < 0)[0]
        raise PointsTableError(
            f"points must be non-negative, got {values[t, p]:g} for truth "
            f"{HER2_SCORES[t]!r}, predicted {HER2_SCORES[p]!r}",
            path,
        )
    try:
        return PointsTable(values=values, source=source, name=name, verified=verified)
    except PointsTableError as exc:
        raise PointsTableError(exc.problem, path) from None


def _from_mapping(points: Mapping[str, Any], path: str | os.PathLike | None) -> np.ndarray:
    """Returns the 4 × 4 values of a ``{truth: {predicted: value}}`` mapping."""
    _check_names(points.keys(), "ground-truth scores (rows)", path)
    values = np.empty((4, 4))
    for i, t in enumerate(HER2_SCORES):
        row = points[t]
        if not isinstance(row, Mapping):
            raise PointsTableError(
                f"row {t!r} must map predicted scores to values, got {row!r}", path
            )
        _check_names(row.keys(), f"predicted scores (columns) of row {t!r}", path)
        for j, p in enumerate(HER2_SCORES):
            values[i, j] = _number(row[p], f"truth {t!r}, predicted {p!r}", path)
    return values


def _from_rows(points: Any, path: str | os.PathLike | None) -> np.ndarray:
    """Returns the values of 4 rows of 4 numbers."""
    if isinstance(points, str | bytes) or not isinstance(points, Sequence | np.ndarray):
        raise PointsTableError(
            "points must be a mapping {truth: {predicted: value}} or 4 rows of 4 values, "
            f"got {type(points).__name__}",
            path,
        )
    rows = list(points)
    if len(rows) != 4 or any(
        isinstance(r, str | bytes) or not isinstance(r, Sequence | np.ndarray) or len(r) != 4
        for r in rows
    ):
        shape = [len(r) if isinstance(r, Sequence | np.ndarray) else "?" for r in rows]
        raise PointsTableError(
            f"a points table is 4 x 4 (rows: truth 0, 1+, 2+, 3+), got {len(rows)} rows "
            f"of lengths {shape}",
            path,
        )
    return np.array(
        [
            [
                _number(v, f"truth {HER2_SCORES[i]!r}, predicted {HER2_SCORES[j]!r}", path)
                for j, v in enumerate(row)
            ]
            for i, row in enumerate(rows)
        ]
    )


def _reorder_rows(points: Any, scores: Any, path: str | os.PathLike) -> Any:
    """Returns 4 × 4 rows given in the order ``scores`` as rows in HER2_SCORES order."""
    if not isinstance(scores, list):
        raise PointsTableError(
            f"'scores' must be a list of the 4 score names, got {scores!r}", path
        )
    _check_names(scores, "'scores'", path)
    values = _from_rows(points, path)
    order = [scores.index(s) for s in HER2_SCORES]
    return values[np.ix_(order, order)]


def _check_names(names: Any, what: str, path: str | os.PathLike | None) -> None:
    """Raises unless ``names`` are exactly the four HER2 score names."""
    given = list(names)
    if len(given) != 4 or set(given) != set(HER2_SCORES):
        missing = [s for s in HER2_SCORES if s not in given]
        extra = [s for s in given if s not in HER2_SCORES]
        raise PointsTableError(
            f"{what} must be exactly {list(HER2_SCORES)}; missing {missing}, unknown {extra}",
            path,
        )


def _number(value: Any, where: str, path: str | os.PathLike | None) -> float:
    """Returns ``value`` as a finite float; raises naming the cell otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise PointsTableError(f"the value for {where} must be a number, got {value!r}", path)
    value = float(value)
    if not math.isfinite(value):
        raise PointsTableError(f"the value for {where} is not finite ({value})", path)
    return value


def _score_index(value: Any, what: str) -> int:
    """Returns the index 0-3 of a HER2 score given by name or index."""
    if isinstance(value, str):
        name = value.strip()
        if name in HER2_SCORES:
            return HER2_SCORES.index(name)
    elif (
        isinstance(value, numbers.Integral) and not isinstance(value, bool) and 0 <= int(value) <= 3
    ):
        return int(value)
    raise ValueError(
        f"{what} score {value!r} is not a HER2 score: give one of {list(HER2_SCORES)} or "
        "an index 0-3"
    )


def _scores(truth: Any, predicted: Any) -> tuple[np.ndarray, np.ndarray]:
    """Returns the ground-truth and predicted score indices, checked to match in length."""
    t = np.array([_score_index(v, "truth") for v in _as_list(truth, "truth")], dtype=np.int64)
    p = np.array(
        [_score_index(v, "predicted") for v in _as_list(predicted, "predicted")], dtype=np.int64
    )
    if t.size != p.size:
        raise ValueError(f"{t.size} ground-truth scores but {p.size} predicted scores")
    if t.size == 0:
        raise ValueError("no cases to score")
    return t, p


def _confidence(confidence: Any, n: int) -> np.ndarray:
    """Returns the confidences as floats, checked: ``n`` of them, finite, in [0, 1]."""
    conf = np.asarray(_as_list(confidence, "confidence"), dtype=np.float64)
    if conf.shape != (n,):
        raise ValueError(f"{n} cases but {conf.size} confidence values")
    if not np.isfinite(conf).all() or (conf < 0).any() or (conf > 1).any():
        raise ValueError(
            "confidence values must be finite and in [0, 1], got values in "
            f"[{conf.min():.4g}, {conf.max():.4g}]"
        )
    return conf


def _as_list(values: Any, what: str) -> list[Any]:
    """Returns a 1-D sequence of per-case values as a list."""
    if isinstance(values, str | bytes):
        raise ValueError(f"{what} must be one value per case, got the string {values!r}")
    arr = values if not isinstance(values, np.ndarray) else values.tolist()
    try:
        out = list(arr)
    except TypeError:
        raise ValueError(f"{what} must be one value per case, got {values!r}") from None
    if any(isinstance(v, list | tuple) for v in out):
        raise ValueError(f"{what} must be 1-D: one value per case")
    return out
