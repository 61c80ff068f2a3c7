"""The result of running a whole-slide model on one slide, and its storage on disk.

``SlideResult`` is the one object the command line, the napari layers and the tests share.
It holds the slide-level call (class probabilities, the predicted class, how the tissue
pieces were aggregated into it) and one ``PieceResult`` per tissue piece with the piece's
probabilities and, for attention models, its attention maps over the piece's tile grid.
Models that need more than that (tile probabilities of a sliding-window baseline, the
second attention branch of a dual-attention model) put named arrays into ``arrays`` and
JSON-able extras into ``info``; the storage format carries those without changes.

Storage is a directory::

    result.json    scalars, class names, per-piece metadata, format version, and an
                   index of every array (zarr path -> shape, dtype)
    arrays.zarr/   zarr 3 group: pieces/<i>/maps, pieces/<i>/scores, pieces/<i>/tissue,
                   pieces/<i>/arrays/<name>, arrays/<name>

where ``<i>`` is the piece's position in ``SlideResult.pieces`` (its ``index`` is in the
JSON). ``save`` writes into a temporary sibling directory and renames it into place, so
an interrupted save never leaves a half-written result where a complete one was (a save
killed between the two renames that replace a result leaves the old one aside, and the
next ``save`` or ``load`` puts it back).

Coordinates are level-0 pixels, ``x``/``y`` = column/row, as everywhere in this package.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import zarr

__all__ = [
    "RESULT_FORMAT_VERSION",
    "PieceResult",
    "ResultError",
    "SlideResult",
    "check_result_target",
    "is_result_directory",
]

RESULT_FORMAT_VERSION = 1
# Written into result.json so that a JSON file from elsewhere is recognised as not ours.
RESULT_FORMAT_NAME = "napari-slide-attention/slide-result"
JSON_NAME = "result.json"
ARRAYS_NAME = "arrays.zarr"

# Array names become zarr path segments: keep them to characters that are safe on every
# filesystem, and away from zarr's own metadata file name.
_ARRAY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_RESERVED_NAMES = frozenset({"zarr.json"})
# dtype kinds zarr 3 stores natively: bool, signed/unsigned int, float, complex.
_ARRAY_KINDS = frozenset("biufc")
# Generic arrays up to this size are stored as one chunk; larger ones get zarr's chunking.
_ONE_CHUNK_BYTES = 16 * 2**20
# Pieces listed one per line in summary(); the rest are counted.
_SUMMARY_PIECES = 8


class ResultError(ValueError):
    """A result directory that cannot be saved or loaded; the message names the path and problem.

    Attributes:
        path: The result directory (or file in it) concerned.
        problem: What is wrong, in words.
    """

    def __init__(self, path: str | os.PathLike[str], problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


# ----------------------------------------------------------------------------------------------
# Validation helpers: each returns the normalised value or raises ValueError naming `what`.


def _int(value: Any, what: str, minimum: int | None = None) -> int:
    """Returns ``value`` as a Python int, checked against ``minimum``."""
    # bool is an Integral, but True as a tile size or class index is always a mistake.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    return value


def _int_tuple(value: Any, n: int, what: str, minimum: int | None = None) -> tuple[int, ...]:
    """Returns ``value`` as a tuple of ``n`` Python ints, each checked against ``minimum``."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != n:
        raise ValueError(f"{what} must be {n} integers, got {value!r}")
    return tuple(_int(v, f"{what}[{i}]", minimum) for i, v in enumerate(value))


def _str(value: Any, what: str, empty: bool = False) -> str:
    """Returns ``value`` as a str (path-likes converted), rejecting the empty string."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {value!r}")
    if not empty and not value:
        raise ValueError(f"{what} must not be empty")
    return value


def _array(value: Any, what: str) -> np.ndarray:
    """Returns ``value`` as a native-byte-order numpy array of a dtype zarr stores."""
    arr = np.asarray(value)
    if arr.dtype.kind not in _ARRAY_KINDS:
        raise ValueError(
            f"{what} must be a bool or numeric array, got dtype {arr.dtype} "
            "(strings and objects are not stored)"
        )
    # The array index records dtype names, which carry no byte order.
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def _float32(value: Any, what: str, ndim: int, finite: bool) -> np.ndarray:
    """Returns ``value`` as a float32 array of ``ndim`` dimensions, checked for NaN/inf."""
    arr = _array(value, what)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{what} must be real-valued, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{what} must be {ndim}-D, got shape {arr.shape}")
    arr = arr.astype(np.float32, copy=False)
    if finite and not np.isfinite(arr).all():
        raise ValueError(
            f"{what} must be finite, has {np.count_nonzero(~np.isfinite(arr))} NaN/inf"
        )
    return arr


def _probabilities(value: Any, what: str) -> np.ndarray:
    """Returns ``value`` as a (C,) float32 array of probabilities in [0, 1]."""
    arr = _float32(value, what, 1, finite=True)
    if arr.size == 0:
        raise ValueError(f"{what} must not be empty")
    if ((arr < 0) | (arr > 1)).any():
        raise ValueError(f"{what} must lie in [0, 1], got {arr.tolist()}")
    return arr


def _named_arrays(value: Any, what: str) -> dict[str, np.ndarray]:
    """Returns ``value`` as a dict of checked names to checked arrays."""
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a dict of name -> array, got {type(value).__name__}")
    out = {}
    for name, arr in value.items():
        if not isinstance(name, str) or not _ARRAY_NAME.match(name) or name in _RESERVED_NAMES:
            raise ValueError(
                f"{what}: array name {name!r} must start with a letter or digit and contain "
                "only letters, digits, '_', '.' and '-' (it becomes a zarr path)"
            )
        out[name] = _array(arr, f"{what}[{name!r}]")
    return out


def _jsonable(value: Any, what: str) -> Any:
    """Returns a plain-JSON copy of ``value``: numpy scalars to Python, tuples to lists.

    Checking (and normalising) at construction rather than at save time means a result that
    was built is a result that can be saved, and compares equal to itself after a round trip.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        if not math.isfinite(value):
            # NaN/Infinity are not JSON; other readers of result.json would choke on them.
            raise ValueError(f"{what} is {value}, which JSON cannot hold")
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                # json.dumps would turn the key into a string and the round trip would differ.
                raise ValueError(f"{what} has the non-string key {k!r}")
            out[k] = _jsonable(v, f"{what}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{what}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return _jsonable(value.item(), what)
    raise ValueError(
        f"{what} holds {type(value).__name__} {value!r}, which is not JSON "
        "(put arrays into `arrays`)"
    )


def _json_dict(value: Any, what: str) -> dict[str, Any]:
    """Returns ``value`` as a plain-JSON dict (see ``_jsonable``)."""
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a dict, got {type(value).__name__}")
    return _jsonable(value, what)


def _float32_list(arr: np.ndarray) -> list[float]:
    """Returns float32 values as the shortest decimal floats that convert back exactly."""
    # str(np.float32) is the shortest repr that round-trips through float32, so the JSON
    # reads 0.1 rather than 0.10000000149011612 and still reloads bit-identical.
    return [float(str(v)) for v in np.asarray(arr, dtype=np.float32)]


def _utc_now() -> str:
    """Returns the current time as an ISO-8601 UTC timestamp, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _array_meta(arr: np.ndarray) -> dict[str, Any]:
    """Returns the array-index entry of ``arr``: its shape and dtype name."""
    return {"shape": list(arr.shape), "dtype": arr.dtype.name}


# ----------------------------------------------------------------------------------------------
# Results


@dataclass(eq=False)
class PieceResult:
    """The model's output for one tissue piece of a slide.

    Arrays are normalised on construction: probabilities, maps and scores to float32,
    every array to native byte order. ``eq=False``: compare fields with numpy.testing.

    Attributes:
        index: Tissue piece number in the slide.
        box: Level-0 (x, y, w, h) of the piece's bounding box.
        probabilities: (C,) float32 class probabilities for the piece.
        grid_origin: Level-0 (x, y) of the top-left tile of the piece's tile grid.
        tile_size: Tile edge in level-0 px.
        level: Pyramid level the tiles were read at.
        maps: (m, H', W') float32 attention maps (softmax over tissue positions, 0 off
            tissue), or None.
        scores: (m, H', W') float32 raw attention scores (NaN off tissue allowed), or None.
        tissue: (H', W') bool, the grid positions that are tissue, or None.
        arrays: Other named arrays of the piece (e.g. tile probabilities).
        info: JSON-able extras.
    """

    index: int
    box: tuple[int, int, int, int]
    probabilities: np.ndarray
    grid_origin: tuple[int, int]
    tile_size: int
    level: int = 0
    maps: np.ndarray | None = None
    scores: np.ndarray | None = None
    tissue: np.ndarray | None = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        what = f"piece {self.index!r}"
        self.index = _int(self.index, "piece index", 0)
        what = f"piece {self.index}"
        self.box = _int_tuple(self.box, 4, f"{what} box (x, y, w, h)", 0)
        if self.box[2] == 0 or self.box[3] == 0:
            raise ValueError(f"{what} box (x, y, w, h) must have w, h > 0, got {self.box}")
        self.probabilities = _probabilities(self.probabilities, f"{what} probabilities")
        self.grid_origin = _int_tuple(self.grid_origin, 2, f"{what} grid_origin (x, y)", 0)
        self.tile_size = _int(self.tile_size, f"{what} tile_size", 1)
        self.level = _int(self.level, f"{what} level", 0)
        if self.maps is not None:
            self.maps = _float32(self.maps, f"{what} maps (m, H', W')", 3, finite=True)
        if self.scores is not None:
            self.scores = _float32(self.scores, f"{what} scores (m, H', W')", 3, finite=False)
        if self.tissue is not None:
            self.tissue = self._check_tissue(self.tissue, f"{what} tissue (H', W')")
        self._check_grid_shapes(what)
        self.arrays = _named_arrays(self.arrays, f"{what} arrays")
        self.info = _json_dict(self.info, f"{what} info")

    @staticmethod
    def _check_tissue(value: Any, what: str) -> np.ndarray:
        """Returns the tissue mask as a 2-D bool array; 0/1 integers are accepted."""
        arr = _array(value, what)
        if arr.ndim != 2:
            raise ValueError(f"{what} must be 2-D, got shape {arr.shape}")
        if arr.dtype != np.bool_:
            # A 0/1 integer mask is unambiguous; anything else probably is not a mask.
            if arr.dtype.kind not in "iu" or not np.isin(arr, (0, 1)).all():
                raise ValueError(f"{what} must be bool, got dtype {arr.dtype}")
            arr = arr.astype(np.bool_)
        return arr

    def _check_grid_shapes(self, what: str) -> None:
        """Raises ValueError unless maps, scores and tissue describe the same grid."""
        shapes = {
            name: arr.shape[-2:]
            for name, arr in (("maps", self.maps), ("scores", self.scores), ("tissue", self.tissue))
            if arr is not None
        }
        if len(set(shapes.values())) > 1:
            found = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
            raise ValueError(
                f"{what}: maps, scores and tissue disagree on the grid (H', W'): {found}"
            )
        if (
            self.maps is not None
            and self.scores is not None
            and self.maps.shape != self.scores.shape
        ):
            raise ValueError(
                f"{what}: maps {self.maps.shape} and scores {self.scores.shape} "
                "must have the same shape (m, H', W')"
            )

    def __repr__(self) -> str:
        grid = "x".join(map(str, self.grid_shape)) if self.grid_shape else "none"
        return (
            f"PieceResult(index={self.index}, box={self.box}, predicted={self.predicted}, "
            f"grid={grid}, tile_size={self.tile_size}, level={self.level}, "
            f"maps={None if self.maps is None else self.maps.shape}, "
            f"arrays={sorted(self.arrays)})"
        )

    @property
    def grid_shape(self) -> tuple[int, int] | None:
        """(H', W') of the piece's tile grid, from tissue, maps or scores; None without them."""
        for arr in (self.tissue, self.maps, self.scores):
            if arr is not None:
                return int(arr.shape[-2]), int(arr.shape[-1])
        return None

    @property
    def predicted(self) -> int:
        """Index of the piece's most probable class."""
        return int(np.argmax(self.probabilities))

    def tile_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """Returns the level-0 (x, y, w, h) of grid cell (row, col).

        Args:
            row: Grid row, 0 = the top row of the piece's grid.
            col: Grid column, 0 = the left column.

        Raises:
            IndexError: (row, col) lies outside the grid (or is negative, without a grid).
        """
        row, col = _int(row, "row"), _int(col, "col")
        rows, cols = self.grid_shape or (None, None)
        if row < 0 or col < 0 or (rows is not None and (row >= rows or col >= cols)):
            raise IndexError(
                f"piece {self.index}: cell ({row}, {col}) is outside the grid {rows}x{cols}"
            )
        x, y = self.grid_origin
        return x + col * self.tile_size, y + row * self.tile_size, self.tile_size, self.tile_size

    def _named_arrays(self) -> dict[str, np.ndarray]:
        """Returns the piece's arrays keyed by their path below pieces/<i>/."""
        out = {
            name: arr
            for name, arr in (("maps", self.maps), ("scores", self.scores), ("tissue", self.tissue))
            if arr is not None
        }
        out.update({f"arrays/{name}": arr for name, arr in self.arrays.items()})
        return out

    def to_json_dict(self) -> dict[str, Any]:
        """Returns the piece's metadata as plain JSON (no arrays; see ``SlideResult``)."""
        return {
            "index": self.index,
            "box": list(self.box),
            "probabilities": _float32_list(self.probabilities),
            "predicted": self.predicted,
            "grid_origin": list(self.grid_origin),
            "tile_size": self.tile_size,
            "level": self.level,
            "grid_shape": None if self.grid_shape is None else list(self.grid_shape),
            "info": self.info,
        }


@dataclass(eq=False)
class SlideResult:
    """The result of running a whole-slide model on one slide.

    ``eq=False``: compare fields with numpy.testing.

    Attributes:
        slide: Path of the slide as given.
        model_kind: "grid-attention", "sliding-window", "dual-attention", ...
        classes: Class names, in the order of the probabilities.
        probabilities: (C,) float32 slide-level class probabilities.
        predicted: Index of the slide's class.
        aggregation: How the pieces became the slide call, e.g. "highest-risk".
        pieces: One result per tissue piece.
        timings: Seconds per stage (read, model, total, ...).
        model: Checkpoint path, configuration summary (JSON-able).
        slide_info: mpp, shape, vendor, ... (JSON-able).
        arrays: Slide-level named arrays.
        info: JSON-able extras.
        created: ISO-8601 UTC time the result was made.
        version: Result format version it was made for or loaded from.
    """

    slide: str
    model_kind: str
    classes: tuple[str, ...]
    probabilities: np.ndarray
    predicted: int
    aggregation: str
    pieces: list[PieceResult]
    timings: dict[str, float]
    model: dict[str, Any]
    slide_info: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=_utc_now)
    version: int = RESULT_FORMAT_VERSION

    def __post_init__(self) -> None:
        self.slide = _str(self.slide, "slide")
        self.model_kind = _str(self.model_kind, "model_kind")
        if isinstance(self.classes, str) or not isinstance(self.classes, (list, tuple)):
            raise ValueError(f"classes must be a sequence of names, got {self.classes!r}")
        self.classes = tuple(_str(c, f"class {i}") for i, c in enumerate(self.classes))
        if not self.classes:
            raise ValueError("classes must name at least one class")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"class names must be unique, got {list(self.classes)}")
        self.probabilities = _probabilities(self.probabilities, "slide probabilities")
        n = len(self.classes)
        if len(self.probabilities) != n:
            raise ValueError(
                f"slide probabilities has {len(self.probabilities)} values for {n} classes "
                f"{list(self.classes)}"
            )
        self.predicted = _int(self.predicted, "predicted", 0)
        if self.predicted >= n:
            raise ValueError(f"predicted class {self.predicted} is out of range for {n} classes")
        self.aggregation = _str(self.aggregation, "aggregation")
        if not isinstance(self.pieces, (list, tuple)):
            raise ValueError(
                f"pieces must be a list of PieceResult, got {type(self.pieces).__name__}"
            )
        self.pieces = list(self.pieces)
        seen: set[int] = set()
        for i, piece in enumerate(self.pieces):
            if not isinstance(piece, PieceResult):
                raise ValueError(f"pieces[{i}] must be a PieceResult, got {type(piece).__name__}")
            if len(piece.probabilities) != n:
                raise ValueError(
                    f"piece {piece.index} has {len(piece.probabilities)} probabilities "
                    f"for {n} classes"
                )
            if piece.index in seen:
                raise ValueError(f"piece index {piece.index} occurs more than once")
            seen.add(piece.index)
        if not isinstance(self.timings, dict):
            raise ValueError(f"timings must be a dict, got {type(self.timings).__name__}")
        self.timings = {
            _str(k, "timing name"): self._seconds(v, f"timing {k!r}")
            for k, v in self.timings.items()
        }
        self.model = _json_dict(self.model, "model")
        self.slide_info = _json_dict(self.slide_info, "slide_info")
        self.arrays = _named_arrays(self.arrays, "slide arrays")
        self.info = _json_dict(self.info, "info")
        self.created = _str(self.created, "created")
        try:
            datetime.fromisoformat(self.created)
        except ValueError:
            raise ValueError(f"created must be an ISO-8601 time, got {self.created!r}") from None
        self.version = _int(self.version, "version", 1)
        if self.version > RESULT_FORMAT_VERSION:
            raise ValueError(
                f"result format version {self.version} is newer than this package reads "
                f"({RESULT_FORMAT_VERSION})"
            )

    @staticmethod
    def _seconds(value: Any, what: str) -> float:
        """Returns a duration as a finite, non-negative float."""
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{what} must be a number of seconds, got {value!r}")
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{what} must be finite and >= 0 seconds, got {value}")
        return value

    def __repr__(self) -> str:
        return (
            f"SlideResult(slide={self.slide!r}, model_kind={self.model_kind!r}, "
            f"predicted={self.predicted_class!r}, confidence={self.confidence:.4f}, "
            f"pieces={len(self.pieces)}, arrays={sorted(self.arrays)})"
        )

    @property
    def predicted_class(self) -> str:
        """Name of the slide's class."""
        return self.classes[self.predicted]

    @property
    def confidence(self) -> float:
        """Probability of the slide's class."""
        return float(self.probabilities[self.predicted])

    # ------------------------------------------------------------------------------------------
    # JSON

    def _named_arrays(self) -> dict[str, np.ndarray]:
        """Returns every array of the result keyed by its path in arrays.zarr."""
        out = {}
        for i, piece in enumerate(self.pieces):
            out.update({f"pieces/{i}/{k}": v for k, v in piece._named_arrays().items()})
        out.update({f"arrays/{name}": arr for name, arr in self.arrays.items()})
        return out

    def to_json_dict(self) -> dict[str, Any]:
        """Returns everything but the arrays as plain JSON, with an index of the arrays.

        ``predicted_class`` and ``confidence`` (and each piece's ``predicted`` and
        ``grid_shape``) are there for people and other programs reading the file; loading
        recomputes them.
        """
        return {
            "format": RESULT_FORMAT_NAME,
            # The layout written is always the current one, whatever version it was read from.
            "version": RESULT_FORMAT_VERSION,
            "created": self.created,
            "slide": self.slide,
            "model_kind": self.model_kind,
            "classes": list(self.classes),
            "probabilities": _float32_list(self.probabilities),
            "predicted": self.predicted,
            "predicted_class": self.predicted_class,
            "confidence": _float32_list(self.probabilities[[self.predicted]])[0],
            "aggregation": self.aggregation,
            "timings": dict(self.timings),
            "model": self.model,
            "slide_info": self.slide_info,
            "info": self.info,
            "pieces": [piece.to_json_dict() for piece in self.pieces],
            "array_index": {k: _array_meta(v) for k, v in self._named_arrays().items()},
        }

    # ------------------------------------------------------------------------------------------
    # Saving

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Returns the result directory after writing the result into it atomically.

        The result is written into a temporary sibling directory, which is renamed to
        ``directory`` once complete. An existing result there is replaced only then; a
        failure before leaves it untouched and removes the temporary directory.

        Args:
            directory: The result directory; its parents are created. An existing
                directory is replaced if it is a result directory or empty.

        Returns:
            The result directory.

        Raises:
            ResultError: ``directory`` exists and is a file or a non-empty directory that
                is not a result.
        """
        target = Path(directory)
        _recover(target)
        _check_replaceable(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        # A sibling, so the final rename stays on one filesystem and is atomic.
        tmp = _temp_dir(target)
        try:
            self._write(tmp)
            _move_into_place(tmp, target)
        except BaseException:
            # Also on KeyboardInterrupt: no half-written sibling is left behind.
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    def _write(self, directory: Path) -> None:
        """Writes arrays.zarr, then result.json, into an empty ``directory``."""
        group = zarr.open_group(directory / ARRAYS_NAME, mode="w", zarr_format=3)
        for key, arr in self._named_arrays().items():
            _write_array(group, key, arr)
        text = json.dumps(self.to_json_dict(), indent=2, allow_nan=False)
        with open(directory / JSON_NAME, "w", encoding="utf-8") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())

    # ------------------------------------------------------------------------------------------
    # Loading

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> SlideResult:
        """Returns the result stored in ``directory``, with all arrays read into memory.

        Args:
            directory: A directory written by ``save``.

        Returns:
            The result, equal field by field to the one saved.

        Raises:
            ResultError: The directory, result.json or arrays.zarr is missing or damaged,
                was written by a newer format version, or describes an inconsistent result.
        """
        directory = Path(directory)
        _recover(directory)
        if not directory.is_dir():
            problem = "is not a directory" if directory.exists() else "does not exist"
            raise ResultError(directory, f"result directory {problem}")
        meta = _read_json(directory / JSON_NAME)
        zarr_path = directory / ARRAYS_NAME
        if not zarr_path.is_dir():
            raise ResultError(zarr_path, "arrays missing: the result directory has no arrays.zarr")
        try:
            group = zarr.open_group(zarr_path, mode="r", zarr_format=3)
        except Exception as exc:
            raise ResultError(zarr_path, f"cannot open the zarr group: {exc}") from exc
        arrays = _read_arrays(group, zarr_path, meta["array_index"])
        try:
            return cls._from_json(meta, arrays)
        except (KeyError, TypeError, ValueError) as exc:
            problem = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ResultError(directory / JSON_NAME, f"inconsistent result: {problem}") from exc

    @classmethod
    def _from_json(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> SlideResult:
        """Returns the result described by ``meta`` with its ``arrays`` (keyed by zarr path)."""
        pieces = []
        for i, p in enumerate(meta["pieces"]):
            prefix = f"pieces/{i}/"
            mine = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
            extra = {k[len("arrays/") :]: v for k, v in mine.items() if k.startswith("arrays/")}
            pieces.append(
                PieceResult(
                    index=p["index"],
                    box=p["box"],
                    probabilities=np.asarray(p["probabilities"], dtype=np.float32),
                    grid_origin=p["grid_origin"],
                    tile_size=p["tile_size"],
                    level=p["level"],
                    maps=mine.get("maps"),
                    scores=mine.get("scores"),
                    tissue=mine.get("tissue"),
                    arrays=extra,
                    info=p["info"],
                )
            )
        slide_arrays = {
            k[len("arrays/") :]: v for k, v in arrays.items() if k.startswith("arrays/")
        }
        return cls(
            slide=meta["slide"],
            model_kind=meta["model_kind"],
            classes=tuple(meta["classes"]),
            probabilities=np.asarray(meta["probabilities"], dtype=np.float32),
            predicted=meta["predicted"],
            aggregation=meta["aggregation"],
            pieces=pieces,
            timings=meta["timings"],
            model=meta["model"],
            slide_info=meta["slide_info"],
            arrays=slide_arrays,
            info=meta["info"],
            created=meta["created"],
            version=meta["version"],
        )

    # ------------------------------------------------------------------------------------------
    # Text

    def summary(self) -> str:
        """Returns a few lines for people: the call, the class probabilities, pieces, timings."""
        n = len(self.pieces)
        lines = [
            f"{self.slide}: {self.predicted_class} {self.confidence:.1%} "
            f"({self.model_kind}, {self.aggregation} over {n} tissue piece{'s' * (n != 1)})",
            "  classes: "
            + ", ".join(
                f"{c} {p:.1%}" for c, p in zip(self.classes, self.probabilities, strict=True)
            ),
        ]
        for piece in self.pieces[:_SUMMARY_PIECES]:
            line = (
                f"  piece {piece.index}: {self.classes[piece.predicted]} "
                f"{piece.probabilities[piece.predicted]:.1%}, box {piece.box}"
            )
            if piece.grid_shape is not None:
                rows, cols = piece.grid_shape
                line += f", {rows}x{cols} tiles of {piece.tile_size} px"
                if piece.tissue is not None:
                    line += f", {int(np.count_nonzero(piece.tissue))} on tissue"
            lines.append(line)
        if n > _SUMMARY_PIECES:
            lines.append(f"  ... and {n - _SUMMARY_PIECES} more pieces")
        if self.timings:
            lines.append("  time: " + ", ".join(f"{k} {v:.2f} s" for k, v in self.timings.items()))
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Storage helpers


def _chunks(key: str, arr: np.ndarray) -> tuple[int, ...] | str:
    """Returns the zarr chunk shape for the array stored at ``key``."""
    # zarr chunks must be >= 1 even along empty axes.
    whole = tuple(max(1, s) for s in arr.shape)
    leaf = key.rsplit("/", 1)[-1]
    if leaf in ("maps", "scores") and "/arrays/" not in key:
        # One chunk per attention map: the napari layers show one map at a time.
        return (1, *whole[1:])
    if arr.nbytes <= _ONE_CHUNK_BYTES:
        return whole
    return "auto"


def _write_array(group: zarr.Group, key: str, arr: np.ndarray) -> None:
    """Writes ``arr`` at path ``key`` (e.g. "pieces/0/maps") below ``group``."""
    parent, _, name = key.rpartition("/")
    target = group.require_group(parent) if parent else group
    target.create_array(name, data=np.ascontiguousarray(arr), chunks=_chunks(key, arr))


def _is_result_dir(path: Path) -> bool:
    """Returns whether ``path`` looks like a result directory written by ``save``."""
    return (path / JSON_NAME).is_file() or (path / ARRAYS_NAME).is_dir()


def is_result_directory(path: str | os.PathLike[str]) -> bool:
    """Returns whether ``path`` is a directory holding a result written by ``save``.

    Stricter than the check ``save`` makes before replacing a directory: result.json must
    be there and name this package's result format. Never raises (readers ask this about
    any folder a user drops).
    """
    try:
        json_path = Path(path) / JSON_NAME
        if not json_path.is_file():
            return False
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, TypeError):
        return False
    return isinstance(meta, dict) and meta.get("format") == RESULT_FORMAT_NAME


def check_result_target(directory: str | os.PathLike[str]) -> Path:
    """Returns the result directory after checking, before any work, that ``save`` can
    write there: absent, empty or a result, under a folder that exists or can be made
    and that this user may write in.

    Raises:
        ResultError: the reason a result could not be saved there.
    """
    target = Path(directory)
    _check_replaceable(target)
    parent = target.absolute().parent
    while not parent.exists() and parent != parent.parent:  # the first folder that exists
        parent = parent.parent
    if not parent.is_dir():
        raise ResultError(target, f"cannot be made: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ResultError(target, f"cannot be written: no permission to write in {parent}")
    return target


def _check_replaceable(target: Path) -> None:
    """Raises ResultError unless ``target`` is absent, empty or a result directory."""
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir():
        raise ResultError(target, "exists and is not a directory; not replacing it")
    # Replacing means deleting: never do that to a directory that is not one of ours.
    if any(target.iterdir()) and not _is_result_dir(target):
        raise ResultError(
            target, "exists and is not a result directory (no result.json); not replacing it"
        )


def _temp_dir(target: Path) -> Path:
    """A new empty hidden sibling of ``target`` for ``save`` to write into, created as a
    plain ``mkdir`` would (``tempfile.mkdtemp`` gives 0700, and the renamed result would
    be unreadable to the group and others where every other folder is not)."""
    while True:
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            tmp.mkdir(0o777)
            return tmp
        except FileExistsError:
            continue


def _set_aside(target: Path) -> list[Path]:
    """Earlier results of ``target`` that ``_move_into_place`` moved aside, newest first."""
    if not target.parent.is_dir():
        return []
    prefix = f".{target.name}.old-"
    found = [p for p in target.parent.iterdir() if p.name.startswith(prefix) and p.is_dir()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def _recover(target: Path) -> None:
    """Undo what a save killed between its two renames left: with no result at
    ``target``, the newest result moved aside goes back there; with one, results moved
    aside (a save killed before deleting them) are deleted."""
    try:
        aside = _set_aside(target)
    except OSError:  # a folder that cannot be listed: nothing to recover from there
        return
    if not aside:
        return
    if not target.exists() and not target.is_symlink() and _is_result_dir(aside[0]):
        os.replace(aside.pop(0), target)
    if target.is_dir():
        for old in aside:
            shutil.rmtree(old, ignore_errors=True)


def _move_into_place(tmp: Path, target: Path) -> None:
    """Renames the complete result ``tmp`` to ``target``, replacing a result there.

    Replacing takes two renames (a directory cannot be renamed over a non-empty one): the
    old result is moved aside, the new one takes its place, the old one is deleted. A
    kill between the renames leaves the old result aside, where ``_recover`` (at the next
    ``save`` or ``load``) finds it and puts it back.
    """
    _check_replaceable(target)  # again: it may have changed while the arrays were written
    if not target.exists():
        os.replace(tmp, target)
        return
    # Directories cannot be renamed over non-empty ones: move the old result aside first,
    # and put it back if the new one cannot take its place.
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:12]}")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _read_json(path: Path) -> dict[str, Any]:
    """Returns the checked contents of result.json."""
    if not path.is_file():
        raise ResultError(path, "missing: the result directory has no result.json")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultError(path, f"cannot be read as JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != RESULT_FORMAT_NAME:
        raise ResultError(path, f'is not a slide result (no "format": "{RESULT_FORMAT_NAME}")')
    version = meta.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ResultError(path, f"has no valid format version (got {version!r})")
    if version > RESULT_FORMAT_VERSION:
        raise ResultError(
            path,
            f"was written in result format version {version}, newer than the version "
            f"{RESULT_FORMAT_VERSION} this napari-slide-attention reads; update the package",
        )
    index = meta.get("array_index")
    if not isinstance(index, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("shape"), list) and isinstance(v.get("dtype"), str)
        for v in index.values()
    ):
        raise ResultError(path, "has no valid array_index (path -> {shape, dtype})")
    pieces = meta.get("pieces")
    if not isinstance(pieces, list) or not all(isinstance(p, dict) for p in pieces):
        raise ResultError(path, "has no valid list of pieces")
    pattern = re.compile(r"^(?:pieces/(\d+)/(?:maps|scores|tissue|arrays/[^/]+)|arrays/[^/]+)$")
    for key in index:
        m = pattern.match(key)
        if m is None or (m.group(1) is not None and int(m.group(1)) >= len(pieces)):
            raise ResultError(path, f"array_index names an unexpected array {key!r}")
    return meta


def _read_arrays(
    group: zarr.Group, zarr_path: Path, index: dict[str, Any]
) -> dict[str, np.ndarray]:
    """Returns every array listed in ``index``, read from ``group`` and checked against it."""
    out = {}
    for key, meta in index.items():
        try:
            arr = np.asarray(group[key][...])
        except Exception as exc:
            # zarr reports a missing or damaged array in many ways (KeyError, FileNotFoundError,
            # codec errors); the user needs to know which array and where.
            raise ResultError(zarr_path / key, f"cannot read array {key!r}: {exc!r}") from exc
        want_shape, want_dtype = tuple(meta["shape"]), meta["dtype"]
        if arr.shape != want_shape or arr.dtype.name != want_dtype:
            raise ResultError(
                zarr_path / key,
                f"array {key!r} is {arr.dtype.name} {arr.shape}, result.json says "
                f"{want_dtype} {want_shape}",
            )
        out[key] = arr
    return out
