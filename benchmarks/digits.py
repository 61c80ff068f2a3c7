"""Digit benchmarks for the two halves of the dual attention model, built from any digit source.

Two standard tasks test attention outside slides:

* **Megapixel digits** (Katharopoulos & Fleuret 2019, "megapixel MNIST"), the benchmark of
  attention sampling: a large black canvas (1500 x 1500) holds five digits at their native
  size, three of the label's class and two of other classes, plus fifty thin line-noise
  patches that look like strokes from afar. The digits are too small to read in the
  low-resolution view (:func:`downscale`, x0.12 in the paper), so a model has to pick where
  to look at full resolution.
* **Cluttered translated digits** (Mnih et al. 2014), the benchmark of the recurrent attention
  model: one digit at a random position in a 60 x 60 canvas, plus four 8 x 8 pieces cut from
  other digits.

Both generators take any source of digit images and labels: real MNIST read from its IDX
files (:func:`read_mnist`), or scikit-learn's bundled 8 x 8 digits upscaled to MNIST's size
(:func:`sklearn_digits`), which needs no download and is what the tests use.

Every record is a pure function of the arguments and its index: record ``i`` draws from its
own random stream seeded by ``(seed, i)``, so generators can be indexed in any order (as a
data loader with workers does), a longer run starts with the records of a shorter one, and
the noise of a megapixel image does not move its digits (the same seed with ``noise=0``
gives the same digits at the same places).
"""

from __future__ import annotations

import gzip
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Generic, TypeVar, overload

import numpy as np

__all__ = [
    "NOISE_PATTERNS",
    "ClutteredDigit",
    "ClutteredDigits",
    "DigitsError",
    "MegapixelDigit",
    "MegapixelDigits",
    "as_arrays",
    "cluttered_digits",
    "downscale",
    "megapixel_digits",
    "read_idx",
    "read_mnist",
    "sklearn_digits",
    "source_digits",
    "write_idx",
]

# IDX type codes (LeCun's MNIST page): the data that follow the header are big-endian.
_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"

# Size of the bank of line-noise patterns a megapixel generator draws its noise patches from;
# Katharopoulos & Fleuret make 50 patterns per data set.
NOISE_PATTERNS = 50

# Stream keys of the per-record random generators. Keys always have three entries: numpy's
# SeedSequence pads with zeros, so [seed, k] and [seed, k, 0] would give the same stream.
_LAYOUT, _NOISE, _BANK, _ORDER = 1, 2, 3, 4

# Attempts to place one digit without overlap before starting the layout again, and layouts
# tried before giving up: only a canvas that the digits nearly fill ever gets this far.
_PLACE_TRIES = 1000
_LAYOUT_TRIES = 20


class DigitsError(ValueError):
    """A digit file cannot be read: missing, not IDX, truncated, or inconsistent."""


# ----------------------------------------------------------------------------------------
# IDX files
# ----------------------------------------------------------------------------------------


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Return the array stored in an IDX file (the MNIST format), plain or gzipped.

    The header is two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, then each dimension as a big-endian
    32-bit integer; the data follow, big-endian, in C order. A gzipped file is recognised by
    its magic bytes, whatever its name.

    Args:
        path: The file.

    Returns:
        The array, in native byte order.

    Raises:
        DigitsError: If the file is missing or unreadable, not gzip or IDX, has an unknown
            type code, or holds fewer or more bytes than its header announces. The message
            names the file.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DigitsError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DigitsError(f"{path}: corrupt or truncated gzip data ({exc})") from exc
    if len(raw) < 4:
        raise DigitsError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    if raw[:2] != b"\x00\x00":
        raise DigitsError(
            f"{path}: not an IDX file (magic {raw[:4].hex()}; expected 0000 then type and ndim)"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise DigitsError(f"{path}: unknown IDX type code 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise DigitsError(f"{path}: IDX header declares no dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DigitsError(
            f"{path}: truncated IDX header ({len(raw)} bytes, {header} needed for {ndim} dims)"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    actual = len(raw) - header
    if actual < expected:
        raise DigitsError(
            f"{path}: truncated data: {actual} bytes after the header, {expected} expected "
            f"for shape {shape} of {dtype.name}"
        )
    if actual > expected:
        raise DigitsError(
            f"{path}: {actual - expected} bytes of trailing garbage after the data of "
            f"shape {shape} of {dtype.name}"
        )
    data = np.frombuffer(raw, dtype=dtype, count=math.prod(shape), offset=header)
    return data.reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(
    path: str | os.PathLike[str], array: np.ndarray, *, compress: bool | None = None
) -> Path:
    """Write an array as an IDX file, the inverse of :func:`read_idx`.

    Args:
        path: Where to write.
        array: At least one dimension, dtype uint8, int8, int16, int32, float32 or float64.
        compress: Gzip the file; default: when the name ends in ``.gz``.

    Returns:
        The path written.

    Raises:
        ValueError: If the array has no dimension, too many, or a dtype IDX cannot hold.
    """
    path = Path(path)
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in _IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise ValueError(f"IDX cannot hold dtype {array.dtype}; expected one of {list(codes)}")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"IDX needs 1 to 255 dimensions, got {array.ndim}")
    code = codes[native]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    if compress is None:
        compress = path.name.lower().endswith(".gz")
    if compress:
        # mtime=0: the same array always gives the same bytes.
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path


def read_mnist(
    images_path: str | os.PathLike[str], labels_path: str | os.PathLike[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Return MNIST-style images and labels read from a pair of IDX files.

    Args:
        images_path: IDX file of ``(n, h, w)`` uint8 images (e.g. ``train-images-idx3-ubyte``,
            gzipped or not).
        labels_path: IDX file of ``n`` labels in 0-9 (e.g. ``train-labels-idx1-ubyte``).

    Returns:
        ``(images, labels)``: ``(n, h, w)`` uint8 and ``(n,)`` int64.

    Raises:
        DigitsError: If a file cannot be read, has the wrong shape or type, the counts
            differ, or a label is outside 0-9.
    """
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DigitsError(
            f"{images_path}: expected (n, h, w) uint8 images, got shape {images.shape} "
            f"of {images.dtype}"
        )
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DigitsError(
            f"{labels_path}: expected (n,) integer labels, got shape {labels.shape} "
            f"of {labels.dtype}"
        )
    if len(images) != len(labels):
        raise DigitsError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    bad = (labels < 0) | (labels > 9)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DigitsError(
            f"{labels_path}: labels must be digits 0-9; label {i} is {labels[i]} "
            f"({int(bad.sum())} out of range)"
        )
    return images, labels.astype(np.int64)


# ----------------------------------------------------------------------------------------
# scikit-learn's digits
# ----------------------------------------------------------------------------------------


def source_digits(
    images: str | os.PathLike | None = None,
    labels: str | os.PathLike | None = None,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(train, test) source digits for the generators: MNIST IDX files when both paths
    are given (``read_mnist``), else scikit-learn's digits (``sklearn_digits``), split at
    random by ``seed`` with ``test_fraction`` (at least one image) held out.

    Raises:
        ValueError: only one of ``images`` and ``labels`` given, or a bad fraction.
    """
    if (images is None) != (labels is None):
        raise ValueError("the images and labels files go together: give both or neither")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if images is not None:
        digits, classes = read_mnist(images, labels)
    else:
        digits, classes = sklearn_digits()
    order = np.random.default_rng(seed).permutation(len(digits))
    n_test = max(1, round(test_fraction * len(digits)))
    test, train = order[:n_test], order[n_test:]
    return (digits[train], classes[train]), (digits[test], classes[test])


def sklearn_digits(size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Return scikit-learn's 1797 bundled 8 x 8 digits, upscaled to look like MNIST.

    Each digit is scaled (bilinear) into a centred box of ``round(20 * size / 28)`` pixels,
    leaving a black border as MNIST's 20-pixel box in its 28-pixel images does; intensities
    0-16 become 0-255. The data ship with scikit-learn, so nothing is downloaded.

    Args:
        size: Side of the output images, at least 8.

    Returns:
        ``(images, labels)``: ``(1797, size, size)`` uint8 and ``(1797,)`` int64.
    """
    _check_int("size", size, minimum=8)
    from sklearn.datasets import load_digits  # heavy import, only needed here

    bunch = load_digits()
    small = np.asarray(bunch.images, dtype=np.float64)  # (n, 8, 8), values 0-16
    inner = max(1, round(20 * size / 28))
    weights = _linear_weights(small.shape[-1], inner)  # (inner, 8)
    scaled = weights @ small @ weights.T  # (n, inner, inner)
    images = np.zeros((len(small), size, size), dtype=np.uint8)
    top = (size - inner) // 2
    images[:, top : top + inner, top : top + inner] = np.clip(
        np.rint(scaled * (255.0 / 16.0)), 0, 255
    ).astype(np.uint8)
    return images, np.asarray(bunch.target, dtype=np.int64)


# ----------------------------------------------------------------------------------------
# Records and generators
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class MegapixelDigit:
    """One megapixel-digits image and its ground truth.

    Attributes:
        image: ``(size, size)`` uint8 canvas, 0 background.
        label: The class of the ``same`` digits; no other class appears as often.
        boxes: ``(digits, 4)`` int64 ``(x, y, w, h)`` of each digit (x is the column); the
            first ``same`` rows are the label's digits.
        digit_labels: ``(digits,)`` int64 class of each digit.
        sources: ``(digits,)`` int64 index of each digit in the source images.
        noise_boxes: ``(noise, 4)`` int64 ``(x, y, w, h)`` of each line-noise patch.
    """

    image: np.ndarray
    label: int
    boxes: np.ndarray
    digit_labels: np.ndarray
    sources: np.ndarray
    noise_boxes: np.ndarray


@dataclass(frozen=True, eq=False)
class ClutteredDigit:
    """One cluttered-translated-digits image and its ground truth.

    Attributes:
        image: ``(size, size)`` uint8 canvas, 0 background.
        label: Class of the digit.
        box: ``(4,)`` int64 ``(x, y, w, h)`` of the digit (x is the column).
        source: Index of the digit in the source images.
        clutter_boxes: ``(clutter, 4)`` int64 ``(x, y, w, h)`` of each clutter piece.
    """

    image: np.ndarray
    label: int
    box: np.ndarray
    source: int
    clutter_boxes: np.ndarray


R = TypeVar("R", MegapixelDigit, ClutteredDigit)


class _Records(Sequence[R], Generic[R]):
    """A lazily generated, indexable sequence of ``n`` records."""

    def __init__(self, n: int, seed: int) -> None:
        _check_int("n", n, minimum=0)
        _check_int("seed", seed, minimum=0)
        self.n = int(n)
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.n

    @overload
    def __getitem__(self, index: int) -> R: ...

    @overload
    def __getitem__(self, index: slice) -> list[R]: ...

    def __getitem__(self, index: int | slice) -> R | list[R]:
        if isinstance(index, slice):
            return [self._record(i) for i in range(*index.indices(self.n))]
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"indices must be integers or slices, got {type(index).__name__}")
        i = int(index) + self.n if index < 0 else int(index)
        if not 0 <= i < self.n:
            raise IndexError(f"index {index} out of range for {self.n} records")
        return self._record(i)

    def __iter__(self) -> Iterator[R]:
        for i in range(self.n):
            yield self._record(i)

    def _rng(self, stream: int, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, stream, i])

    def _record(self, i: int) -> R:
        raise NotImplementedError


class MegapixelDigits(_Records[MegapixelDigit]):
    """The megapixel-digits records of :func:`megapixel_digits`, made on access."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        n: int,
        *,
        size: int = 1500,
        digits: int = 5,
        same: int = 3,
        noise: int = 50,
        seed: int = 0,
    ) -> None:
        super().__init__(n, seed)
        self.images, self.labels = _check_source(images, labels)
        _check_int("size", size, minimum=1)
        _check_int("digits", digits, minimum=1)
        _check_int("same", same, minimum=1, maximum=digits)
        _check_int("noise", noise, minimum=0)
        if same <= digits - same:
            # Otherwise another class could appear as often as the label's.
            raise ValueError(
                f"same={same} must be more than half of digits={digits}, so the label is "
                "the class that appears most often"
            )
        self.classes = np.unique(self.labels)
        if len(self.classes) < 2 and same < digits:
            raise ValueError(
                f"megapixel digits need labels of at least 2 classes for the "
                f"{digits - same} digit(s) not of the label's class; got only "
                f"{self.classes.tolist()}"
            )
        h, w = self.images.shape[1:]
        if size < max(h, w) or (size // h) * (size // w) < digits:
            raise ValueError(
                f"size={size} is too small for {digits} non-overlapping {h} x {w} digits"
            )
        self.size, self.digits, self.same = int(size), int(digits), int(same)
        self.noise = int(noise)
        self._of_class = {int(c): np.flatnonzero(self.labels == c) for c in self.classes}
        self._not_class = {int(c): np.flatnonzero(self.labels != c) for c in self.classes}
        self.noise_patterns = _line_noise_patterns(self._rng(_BANK, 0), h, w, NOISE_PATTERNS)

    def _record(self, i: int) -> MegapixelDigit:
        rng = self._rng(_LAYOUT, i)
        label = int(self.classes[rng.integers(len(self.classes))])
        # As in the original, the digits are drawn with replacement; the others may share
        # a class with each other but never with the label.
        sources = np.concatenate(
            [
                rng.choice(self._of_class[label], size=self.same),
                rng.choice(self._not_class[label], size=self.digits - self.same),
            ]
        ).astype(np.int64)
        h, w = self.images.shape[1:]
        boxes = _place_apart(rng, self.size, h, w, self.digits)
        image = np.zeros((self.size, self.size), dtype=np.uint8)
        for (x, y, _, _), k in zip(boxes, sources, strict=True):
            image[y : y + h, x : x + w] = self.images[k]

        rng = self._rng(_NOISE, i)
        patterns = rng.integers(len(self.noise_patterns), size=self.noise)
        noise_boxes = np.zeros((self.noise, 4), dtype=np.int64)
        noise_boxes[:, 0] = rng.integers(self.size - w + 1, size=self.noise)
        noise_boxes[:, 1] = rng.integers(self.size - h + 1, size=self.noise)
        noise_boxes[:, 2:] = (w, h)
        for (x, y, _, _), p in zip(noise_boxes, patterns, strict=True):
            # max, unlike the original's paste, so a noise patch never erases a digit.
            window = image[y : y + h, x : x + w]
            np.maximum(window, self.noise_patterns[p], out=window)
        return MegapixelDigit(
            image=image,
            label=label,
            boxes=boxes,
            digit_labels=self.labels[sources],
            sources=sources,
            noise_boxes=noise_boxes,
        )


class ClutteredDigits(_Records[ClutteredDigit]):
    """The cluttered-digits records of :func:`cluttered_digits`, made on access."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        n: int,
        *,
        size: int = 60,
        clutter: int = 4,
        piece: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__(n, seed)
        self.images, self.labels = _check_source(images, labels)
        _check_int("clutter", clutter, minimum=0)
        _check_int("piece", piece, minimum=1)
        h, w = self.images.shape[1:]
        _check_int("size", size, minimum=1)
        if size < max(h, w):
            raise ValueError(f"size={size} is too small for {h} x {w} digits")
        if piece > min(h, w):
            raise ValueError(f"piece={piece} is larger than the {h} x {w} digits it is cut from")
        if clutter and len(self.images) < 2:
            raise ValueError("clutter needs at least 2 source images (pieces of other digits)")
        self.size, self.clutter, self.piece = int(size), int(clutter), int(piece)

    def _record(self, i: int) -> ClutteredDigit:
        n_src = len(self.images)
        h, w = self.images.shape[1:]
        # Digits follow a fresh random order on each pass over the source, as DeepMind's
        # generator does, so a run of len(images) records uses every digit once.
        order = self._rng(_ORDER, i // n_src).permutation(n_src)
        source = int(order[i % n_src])

        rng = self._rng(_LAYOUT, i)
        x, y = (int(v) for v in rng.integers(self.size - np.array([w, h]) + 1))
        # uint16: the overlapping strokes saturate at 255 only once everything is added.
        canvas = np.zeros((self.size, self.size), dtype=np.uint16)
        canvas[y : y + h, x : x + w] = self.images[source]
        p = self.piece
        others = rng.integers(n_src - 1, size=self.clutter)
        others += others >= source  # pieces of other digits, never of this one
        clutter_boxes = np.zeros((self.clutter, 4), dtype=np.int64)
        for j, k in enumerate(others):
            sy, sx = rng.integers(np.array([h, w]) - p + 1)
            ty, tx = rng.integers(self.size - p + 1, size=2)
            canvas[ty : ty + p, tx : tx + p] += self.images[k, sy : sy + p, sx : sx + p]
            clutter_boxes[j] = (tx, ty, p, p)
        return ClutteredDigit(
            image=np.minimum(canvas, 255).astype(np.uint8),
            label=int(self.labels[source]),
            box=np.array([x, y, w, h], dtype=np.int64),
            source=source,
            clutter_boxes=clutter_boxes,
        )


def megapixel_digits(
    images: np.ndarray,
    labels: np.ndarray,
    n: int,
    *,
    size: int = 1500,
    digits: int = 5,
    same: int = 3,
    noise: int = 50,
    seed: int = 0,
) -> MegapixelDigits:
    """Return ``n`` megapixel-digits images (Katharopoulos & Fleuret 2019), made on access.

    Each image is a black ``size`` x ``size`` canvas with ``digits`` source digits at their
    native size and at uniformly random, non-overlapping positions (touching is allowed, as
    in the original). The label is drawn uniformly from the classes present; ``same`` digits
    are of the label's class and the rest of any other class, each drawn at random (with
    replacement) from the source. Then ``noise`` line-noise patches, each a digit-sized pattern
    of two thin straight strokes of intensity 204-254 drawn from a bank of
    :data:`NOISE_PATTERNS` patterns, go at uniformly random positions fully inside the
    canvas, combined with the digits by maximum.

    The defaults are the paper's: 1500 x 1500, 5 digits of which 3 carry the label, 50 noise
    patches. Two departures from its code (``make_mnist.py``): noise is combined by maximum
    where the original pastes whole patches, zeros included, which can blank part of a digit;
    noise positions are uniform over the canvas where the original keeps them off the top and
    left 28 pixels.

    Args:
        images: ``(N, h, w)`` uint8 source digits.
        labels: ``(N,)`` integer labels, at least two classes unless ``same == digits``.
        n: Number of images.
        size: Side of the canvas in pixels.
        digits: Digits per image.
        same: Digits of the label's class, more than half of ``digits``.
        noise: Line-noise patches per image.
        seed: Seed; record ``i`` depends only on the arguments and ``i``.

    Returns:
        A sequence of :class:`MegapixelDigit` (iterate, index, or :func:`as_arrays`).

    Raises:
        ValueError: If an argument is out of range, images and labels disagree, or the canvas
            is too small for the digits.
    """
    return MegapixelDigits(
        images, labels, n, size=size, digits=digits, same=same, noise=noise, seed=seed
    )


def cluttered_digits(
    images: np.ndarray,
    labels: np.ndarray,
    n: int,
    *,
    size: int = 60,
    clutter: int = 4,
    piece: int = 8,
    seed: int = 0,
) -> ClutteredDigits:
    """Return ``n`` cluttered translated digits (Mnih et al. 2014), made on access.

    Each image is a black ``size`` x ``size`` canvas with one source digit at a uniformly
    random position fully inside it, plus ``clutter`` pieces: ``piece`` x ``piece`` windows
    cut at random from random other source images and placed at random positions. The
    defaults are the paper's 60 x 60 task, with 4 pieces of 8 x 8 (its 100 x 100 task uses 8);
    ``clutter=0`` gives its translated-digits task. Digits are taken in a random order that
    uses every source digit once per pass, and everything is added and saturated at 255, as
    DeepMind's ``mnist_cluttered.lua`` does; the digit's pixels are therefore never darkened.

    Args:
        images: ``(N, h, w)`` uint8 source digits.
        labels: ``(N,)`` integer labels.
        n: Number of images.
        size: Side of the canvas in pixels.
        clutter: Clutter pieces per image.
        piece: Side of a clutter piece in pixels.
        seed: Seed; record ``i`` depends only on the arguments and ``i``.

    Returns:
        A sequence of :class:`ClutteredDigit` (iterate, index, or :func:`as_arrays`).

    Raises:
        ValueError: If an argument is out of range or images and labels disagree.
    """
    return ClutteredDigits(images, labels, n, size=size, clutter=clutter, piece=piece, seed=seed)


def as_arrays(records: Iterable[MegapixelDigit] | Iterable[ClutteredDigit]) -> dict[str, Any]:
    """Return the fields of many records stacked into arrays, one per field.

    When ``records`` has a length (the generators' sequences do), each array is allocated
    once and filled in place, so memory holds the result and one record.

    Args:
        records: Records of one kind, e.g. ``megapixel_digits(...)`` or a slice of it.

    Returns:
        ``{field: array}`` with a leading record axis, e.g. ``image`` ``(n, size, size)``
        uint8 and ``label`` ``(n,)`` int64.

    Raises:
        ValueError: If there are no records (their shapes are unknown).
    """
    count = len(records) if isinstance(records, Sequence) else None
    out: dict[str, np.ndarray] = {}
    if count is None:
        records = list(records)
        count = len(records)
    for i, record in enumerate(records):
        for field in fields(record):
            value = np.asarray(getattr(record, field.name))
            if i == 0:
                dtype = np.int64 if value.dtype.kind in "iu" and value.ndim == 0 else value.dtype
                out[field.name] = np.empty((count, *value.shape), dtype=dtype)
            out[field.name][i] = value
    if not out:
        raise ValueError("as_arrays needs at least one record")
    return out


# ----------------------------------------------------------------------------------------
# Low-resolution view
# ----------------------------------------------------------------------------------------


def downscale(image: np.ndarray, scale: float = 0.12) -> np.ndarray:
    """Return an anti-aliased, reduced view of an image or a stack of images.

    Each output pixel is the exact area average of the input pixels it covers, so thin
    strokes fade rather than alias. 0.12 is the scale of attention sampling's low-resolution
    view (1500 -> 180 pixels), where a 28-pixel digit becomes about 3 pixels.

    Args:
        image: ``(..., H, W)`` array; the last two axes are reduced.
        scale: Output side over input side, in (0, 1]; sides are rounded, at least 1.

    Returns:
        ``(..., round(H * scale), round(W * scale))``: uint8 (rounded) for uint8 input,
        float32 otherwise.
    """
    image = np.asarray(image)
    if image.ndim < 2:
        raise ValueError(f"downscale needs an (..., H, W) array, got shape {image.shape}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)):
        raise ValueError(f"scale must be a number, got {scale!r}")
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    rows, cols = image.shape[-2:]
    wy = _area_weights(rows, max(1, round(rows * scale)))  # (h, H)
    wx = _area_weights(cols, max(1, round(cols * scale)))  # (w, W)
    out = wy @ image.astype(np.float32) @ wx.T  # (..., h, w)
    if image.dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out


# ----------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------


def _check_int(
    name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")


def _check_source(images: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"images must be an (N, h, w) uint8 array, got shape {images.shape} of "
            f"{images.dtype} (scale floats in [0, 1] by 255 and convert)"
        )
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be an (N,) integer array, got shape {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"got {len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise ValueError("images is empty")
    if min(images.shape[1:]) == 0:
        raise ValueError(f"images have an empty side: shape {images.shape}")
    return images, labels.astype(np.int64)


def _place_apart(rng: np.random.Generator, size: int, h: int, w: int, count: int) -> np.ndarray:
    """Return ``(count, 4)`` int64 ``(x, y, w, h)`` boxes inside the canvas, none overlapping."""
    high = np.array([size - w + 1, size - h + 1])
    for _ in range(_LAYOUT_TRIES):
        boxes = np.zeros((count, 4), dtype=np.int64)
        boxes[:, 2:] = (w, h)
        placed = 0
        for _ in range(_PLACE_TRIES * count):
            x, y = rng.integers(high)
            prev = boxes[:placed]
            # Half-open boxes overlap when both their column and row ranges intersect.
            if np.any((np.abs(prev[:, 0] - x) < w) & (np.abs(prev[:, 1] - y) < h)):
                continue
            boxes[placed, :2] = (x, y)
            placed += 1
            if placed == count:
                return boxes
    raise ValueError(
        f"could not place {count} non-overlapping {h} x {w} digits on a {size} x {size} "
        "canvas; use a larger size or fewer digits"
    )


def _line_noise_patterns(rng: np.random.Generator, h: int, w: int, count: int) -> np.ndarray:
    """Return ``(count, h, w)`` uint8 patterns of two thin strokes, as in megapixel MNIST.

    Each pattern is the union of a straight stroke from the top-left corner at an angle of
    0 to 72 degrees from the vertical and the stroke of another pattern, mirrored left-right
    4 times in 9; stroke pixels have intensity 204-254 (0.8-1 of full scale).
    """
    slopes = np.tan(rng.random(count) * np.pi / 2.5)  # columns per row
    lines = np.zeros((count, h, w), dtype=bool)
    for k, slope in enumerate(slopes):
        length = min(h - 0.51, (w - 0.51) / slope)
        r = np.linspace(0.0, length, 2 * max(h, w))
        lines[k, np.rint(r).astype(int), np.rint(slope * r).astype(int)] = True
    partners = lines[rng.permutation(count)]
    # The original draws two flips of p = 1/3 but applies both to the same (column) axis,
    # so a partner ends up mirrored when exactly one of them is drawn (p = 4/9).
    flip = (rng.random(count) < 1 / 3) ^ (rng.random(count) < 1 / 3)
    partners[flip] = partners[flip, :, ::-1]
    strokes = lines | partners
    intensity = 0.8 + 0.2 * rng.random((count, h, w))
    # Truncated to uint8 as in the original: 204-254.
    return np.where(strokes, 255 * intensity, 0).astype(np.uint8)


def _linear_weights(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` bilinear resampling matrix (pixel centres aligned, edges clamped)."""
    centres = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    centres = np.clip(centres, 0, n_in - 1)
    left = np.floor(centres).astype(int)
    right = np.minimum(left + 1, n_in - 1)
    frac = centres - left
    weights = np.zeros((n_out, n_in))
    np.add.at(weights, (np.arange(n_out), left), 1 - frac)
    np.add.at(weights, (np.arange(n_out), right), frac)
    return weights


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` float32 area-averaging matrix: rows sum to 1."""
    step = n_in / n_out
    lo = (np.arange(n_out) * step)[:, None]
    hi = lo + step
    left = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, left + 1) - np.maximum(lo, left), 0, None)
    return (overlap / step).astype(np.float32)
