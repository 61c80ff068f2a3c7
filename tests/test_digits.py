"""Digit benchmarks: IDX files, scikit-learn digits, megapixel and cluttered generators.

``digits.py`` is a benchmark helper (``benchmarks/digits.py``), not part of the package:
the benchmarks folder goes on ``sys.path`` here, as the scripts put their own folder.
"""

from __future__ import annotations

import gzip
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from digits import (  # noqa: E402
    NOISE_PATTERNS,
    ClutteredDigit,
    DigitsError,
    MegapixelDigit,
    as_arrays,
    cluttered_digits,
    downscale,
    megapixel_digits,
    read_idx,
    read_mnist,
    sklearn_digits,
    write_idx,
)


@pytest.fixture(scope="module")
def source() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits at MNIST's 28 x 28, loaded once (the import is slow)."""
    return sklearn_digits()


def _overlap(a: np.ndarray, b: np.ndarray) -> bool:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah


def _inside(box: np.ndarray, size: int) -> bool:
    x, y, w, h = box
    return x >= 0 and y >= 0 and x + w <= size and y + h <= size


def test_import_stays_light() -> None:
    # Benchmark scripts and data-loader workers import this module: numpy only.
    code = (
        f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); import digits; "
        "print(sorted(m for m in ('torch', 'sklearn', 'skimage', 'scipy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------------------
# IDX
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("shape", [(7,), (3, 4, 5), (2, 1, 3, 2)])
@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
def test_idx_round_trip(tmp_path: Path, dtype: str, shape: tuple[int, ...], compress: bool) -> None:
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    if info is None:
        array = rng.normal(size=shape).astype(dtype)
    else:
        array = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    # The name never says gzip: it is detected by its magic bytes.
    path = write_idx(tmp_path / "data-idx", array, compress=compress)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") is compress
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype)
    assert back.shape == shape
    np.testing.assert_array_equal(back, array)


def test_idx_reads_the_mnist_layout_byte_for_byte(tmp_path: Path) -> None:
    # As in t10k-labels-idx1-ubyte: magic 0x00000801, count, then the bytes.
    labels = tmp_path / "labels-idx1-ubyte"
    labels.write_bytes(struct.pack(">II", 0x801, 4) + bytes([7, 2, 1, 0]))
    np.testing.assert_array_equal(read_idx(labels), [7, 2, 1, 0])
    # Big-endian int32 data, gzipped under a plain name.
    ints = tmp_path / "ints"
    ints.write_bytes(gzip.compress(struct.pack(">BBBBIIii", 0, 0, 0x0C, 2, 1, 2, -1, 258)))
    back = read_idx(ints)
    assert back.dtype == np.int32 and back.dtype.isnative
    np.testing.assert_array_equal(back, [[-1, 258]])
    # The writer gives the same header as the MNIST files.
    out = write_idx(tmp_path / "images.gz", np.zeros((2, 28, 28), np.uint8), compress=False)
    assert out.read_bytes()[:16] == struct.pack(">IIII", 0x803, 2, 28, 28)


_GOOD = struct.pack(">BBBBII", 0, 0, 0x08, 2, 2, 3) + bytes(6)

_BAD_FILES: dict[str, tuple[bytes | None, str]] = {
    "missing": (None, "cannot read"),
    "empty": (b"", "too short"),
    "bad magic": (b"\x89PNG" + bytes(20), "not an IDX file"),
    "unknown type": (struct.pack(">BBBBI", 0, 0, 0x0A, 1, 3) + bytes(3), "unknown IDX type code"),
    "no dims": (bytes([0, 0, 8, 0]), "no dimensions"),
    "truncated header": (bytes([0, 0, 8, 3]) + struct.pack(">I", 2), "truncated IDX header"),
    "truncated data": (_GOOD[:-1], "truncated data"),
    "trailing garbage": (_GOOD + b"\x00\x00", "trailing garbage"),
    "corrupt gzip": (gzip.compress(_GOOD)[:-6], "gzip"),
}


@pytest.mark.parametrize("case", list(_BAD_FILES))
def test_idx_errors_name_the_file_and_the_problem(tmp_path: Path, case: str) -> None:
    content, problem = _BAD_FILES[case]
    path = tmp_path / f"{case.replace(' ', '-')}.idx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DigitsError, match=problem) as info:
        read_idx(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_write_idx_rejects_what_idx_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        write_idx(tmp_path / "x", np.zeros(3, np.uint16))
    with pytest.raises(ValueError, match="dimensions"):
        write_idx(tmp_path / "x", np.uint8(3))


def test_read_mnist_checks_the_pair(tmp_path: Path) -> None:
    images = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4)
    img_path = write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    lab_path = write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([3, 0, 9], np.uint8))
    got_images, got_labels = read_mnist(img_path, lab_path)
    np.testing.assert_array_equal(got_images, images)
    assert got_labels.dtype == np.int64
    np.testing.assert_array_equal(got_labels, [3, 0, 9])

    two = write_idx(tmp_path / "two-labels", np.array([1, 2], np.uint8))
    with pytest.raises(DigitsError, match=r"3 images but .* 2 labels") as info:
        read_mnist(img_path, two)
    assert str(img_path) in str(info.value) and str(two) in str(info.value)

    eleven = write_idx(tmp_path / "bad-labels", np.array([1, 11, 2], np.uint8))
    with pytest.raises(DigitsError, match="0-9") as info:
        read_mnist(img_path, eleven)
    assert str(eleven) in str(info.value)

    with pytest.raises(DigitsError, match=r"\(n, h, w\) uint8") as info:
        read_mnist(lab_path, lab_path)
    assert str(lab_path) in str(info.value)


# ----------------------------------------------------------------------------------------
# scikit-learn digits
# ----------------------------------------------------------------------------------------


def test_sklearn_digits_look_like_mnist(source: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = source
    assert images.shape == (1797, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (1797,) and labels.dtype == np.int64
    assert set(np.unique(labels)) == set(range(10))
    assert images.max() == 255
    # A black border of 4 pixels around the 20-pixel box, as in MNIST.
    assert not images[:, :4].any() and not images[:, -4:].any()
    assert not images[:, :, :4].any() and not images[:, :, -4:].any()
    small, _ = sklearn_digits(size=14)
    assert small.shape == (1797, 14, 14)
    with pytest.raises(ValueError, match="size"):
        sklearn_digits(size=4)


# ----------------------------------------------------------------------------------------
# Megapixel digits
# ----------------------------------------------------------------------------------------


def test_megapixel_is_deterministic_by_seed_and_index(
    source: tuple[np.ndarray, np.ndarray],
) -> None:
    images, labels = source
    kwargs = {"size": 200, "noise": 10}
    a = as_arrays(megapixel_digits(images, labels, 4, seed=3, **kwargs))
    b = as_arrays(megapixel_digits(images, labels, 4, seed=3, **kwargs))
    c = as_arrays(megapixel_digits(images, labels, 4, seed=4, **kwargs))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["image"], c["image"])
    assert not np.array_equal(a["boxes"], c["boxes"])
    # Any access order gives the same records, and a longer run starts with a shorter one.
    longer = megapixel_digits(images, labels, 10, seed=3, **kwargs)
    np.testing.assert_array_equal(longer[2].image, a["image"][2])
    np.testing.assert_array_equal(longer[-8].image, a["image"][2])
    assert [r.label for r in longer[:4]] == a["label"].tolist()


def test_megapixel_follows_the_recipe(source: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = source
    size = 300
    clean = megapixel_digits(images, labels, 12, size=size, noise=0, seed=1)
    noisy = megapixel_digits(images, labels, 12, size=size, noise=50, seed=1)
    seen_labels = set()
    for r0, r in zip(clean, noisy, strict=True):
        assert isinstance(r, MegapixelDigit)
        assert r.image.shape == (size, size) and r.image.dtype == np.uint8
        # The noise does not move the digits.
        assert r.label == r0.label
        np.testing.assert_array_equal(r.boxes, r0.boxes)
        np.testing.assert_array_equal(r.sources, r0.sources)
        seen_labels.add(r.label)

        assert r.boxes.shape == (5, 4) and r.digit_labels.shape == (5,)
        np.testing.assert_array_equal(r.digit_labels, labels[r.sources])
        assert (r.digit_labels == r.label).sum() == 3
        assert (r.digit_labels[:3] == r.label).all() and (r.digit_labels[3:] != r.label).all()
        for j, box in enumerate(r.boxes):
            assert tuple(box[2:]) == (28, 28) and _inside(box, size)
            assert not any(_overlap(box, other) for other in r.boxes[j + 1 :])
            x, y, w, h = box
            # Without noise each box holds exactly its source digit...
            np.testing.assert_array_equal(r0.image[y : y + h, x : x + w], images[r.sources[j]])
        # ... and nothing else is drawn.
        outside = np.ones((size, size), bool)
        for x, y, w, h in r.boxes:
            outside[y : y + h, x : x + w] = False
        assert not r0.image[outside].any()

        # Noise only ever adds (maximum), inside its own patches, and is bright.
        assert (r.image >= r0.image).all()
        assert r.noise_boxes.shape == (50, 4)
        assert all(_inside(box, size) for box in r.noise_boxes)
        in_noise = np.zeros((size, size), bool)
        for x, y, w, h in r.noise_boxes:
            in_noise[y : y + h, x : x + w] = True
        changed = r.image != r0.image
        assert not changed[~in_noise].any()
        assert changed.any() and r.image[changed].min() >= 204
        # Fifty patches of about 65 stroke pixels each light up the blank canvas.
        assert (r.image[outside] >= 204).sum() > 1000
    assert len(seen_labels) > 3


def test_megapixel_defaults_are_the_paper_s(source: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = source
    records = megapixel_digits(images, labels, 1)
    r = records[0]
    assert r.image.shape == (1500, 1500)
    assert r.boxes.shape == (5, 4) and r.noise_boxes.shape == (50, 4)
    assert records.noise_patterns.shape == (NOISE_PATTERNS, 28, 28)
    low = downscale(r.image, 0.12)
    assert low.shape == (180, 180) and low.dtype == np.uint8
    # In the low-resolution view a 28-pixel digit is a faint 3-pixel smudge.
    assert 0 < low.max() < 255


def test_megapixel_other_settings(source: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = source
    r = megapixel_digits(images, labels, 1, size=120, digits=3, same=2, noise=0, seed=5)[0]
    assert (r.digit_labels == r.label).sum() == 2 and len(r.boxes) == 3
    # A single class is fine when every digit carries the label.
    one = labels == 7
    r = megapixel_digits(images[one], labels[one], 1, size=100, digits=2, same=2)[0]
    assert r.label == 7 and (r.digit_labels == 7).all()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"size": 27}, "too small"),
        ({"size": 56, "digits": 5}, "too small"),
        ({"same": 2}, "more than half"),
        ({"same": 6}, "same must be <= 5"),
        ({"noise": -1}, "noise must be >= 0"),
        ({"n": -1}, "n must be >= 0"),
        ({"seed": 1.5}, "seed must be an integer"),
    ],
)
def test_megapixel_rejects_bad_settings(
    source: tuple[np.ndarray, np.ndarray], change: dict[str, object], message: str
) -> None:
    images, labels = source
    kwargs: dict[str, object] = {"n": 2, **change}
    with pytest.raises(ValueError, match=message):
        megapixel_digits(images, labels, **kwargs)  # type: ignore[arg-type]


def test_megapixel_rejects_bad_sources(source: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = source
    with pytest.raises(ValueError, match="1797 images but 10 labels"):
        megapixel_digits(images, labels[:10], 1)
    with pytest.raises(ValueError, match="uint8"):
        megapixel_digits(images / 255.0, labels, 1)
    with pytest.raises(ValueError, match="at least 2 classes"):
        megapixel_digits(images[labels == 1], labels[labels == 1], 1)


def test_megapixel_too_tight_a_canvas_fails_clearly() -> None:
    # Four 10-pixel digits fit a 20-pixel canvas only as an exact 2 x 2 tiling, which random
    # placement essentially never finds.
    images = np.full((4, 10, 10), 200, np.uint8)
    records = megapixel_digits(images, np.array([0, 0, 0, 1]), 1, size=20, digits=4, same=3)
    with pytest.raises(ValueError, match="could not place"):
        records[0]


# ----------------------------------------------------------------------------------------
# Cluttered digits
# ----------------------------------------------------------------------------------------


def test_cluttered_follows_the_recipe(source: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = source
    plain = cluttered_digits(images, labels, 20, clutter=0, seed=2)
    cluttered = cluttered_digits(images, labels, 20, seed=2)
    extra_pixels = []
    for r0, r in zip(plain, cluttered, strict=True):
        assert isinstance(r, ClutteredDigit)
        assert r.image.shape == (60, 60) and r.image.dtype == np.uint8
        assert r.label == labels[r.source]
        assert r.source == r0.source
        np.testing.assert_array_equal(r.box, r0.box)
        x, y, w, h = r.box
        assert (w, h) == (28, 28) and _inside(r.box, 60)
        digit = images[r.source]
        # Translated only: the digit and nothing else.
        np.testing.assert_array_equal(r0.image[y : y + h, x : x + w], digit)
        assert r0.image.sum() == digit.sum(dtype=np.int64)
        # Clutter adds (saturating) and never darkens the digit.
        assert (r.image[y : y + h, x : x + w] >= digit).all()
        assert (r.image >= r0.image).all()
        assert r.clutter_boxes.shape == (4, 4)
        assert all(tuple(b[2:]) == (8, 8) and _inside(b, 60) for b in r.clutter_boxes)
        in_clutter = np.zeros((60, 60), bool)
        for cx, cy, cw, ch in r.clutter_boxes:
            in_clutter[cy : cy + ch, cx : cx + cw] = True
        assert not (r.image != r0.image)[~in_clutter].any()
        extra_pixels.append(int((r.image > 0).sum() - (r0.image > 0).sum()))
    # Some pieces fall on blank corners of their digit, but clutter shows on most images.
    assert sum(e > 0 for e in extra_pixels) >= 15

    more = as_arrays(cluttered_digits(images, labels, 20, clutter=12, seed=2))
    few = as_arrays(cluttered)
    assert (more["image"] > 0).sum() > (few["image"] > 0).sum()


def test_cluttered_is_deterministic_and_uses_every_digit_once_per_pass() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    labels = np.arange(30) % 10
    a = as_arrays(cluttered_digits(images, labels, 60, seed=1))
    b = as_arrays(cluttered_digits(images, labels, 60, seed=1))
    c = as_arrays(cluttered_digits(images, labels, 60, seed=2))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["image"], c["image"])
    assert sorted(a["source"][:30]) == list(range(30))
    assert sorted(a["source"][30:]) == list(range(30))
    assert not np.array_equal(a["source"][:30], a["source"][30:])
    np.testing.assert_array_equal(a["label"], labels[a["source"]])


def test_cluttered_pieces_come_from_other_digits() -> None:
    # Two digits, one black and one white: every piece must come from the other one.
    images = np.stack([np.zeros((28, 28), np.uint8), np.full((28, 28), 255, np.uint8)])
    labels = np.array([0, 1])
    for r in cluttered_digits(images, labels, 6, seed=0):
        if r.source == 0:
            assert r.image.sum() > 0  # white pieces on the black digit
        else:
            assert (r.image > 0).sum() == 28 * 28  # black pieces add nothing


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"size": 20}, "too small"),
        ({"piece": 29}, "larger than"),
        ({"clutter": -1}, "clutter must be >= 0"),
        ({"piece": 0}, "piece must be >= 1"),
    ],
)
def test_cluttered_rejects_bad_settings(
    source: tuple[np.ndarray, np.ndarray], change: dict[str, object], message: str
) -> None:
    images, labels = source
    with pytest.raises(ValueError, match=message):
        cluttered_digits(images, labels, 2, **change)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 2 source images"):
        cluttered_digits(images[:1], labels[:1], 2)
    with pytest.raises(ValueError, match="labels"):
        cluttered_digits(images, labels[:, None], 2)


# ----------------------------------------------------------------------------------------
# Arrays and the low-resolution view
# ----------------------------------------------------------------------------------------


def test_as_arrays_stacks_sequences_and_plain_iterables(
    source: tuple[np.ndarray, np.ndarray],
) -> None:
    images, labels = source
    records = megapixel_digits(images, labels, 3, size=100, digits=3, same=2, noise=4)
    stacked = as_arrays(records)
    assert stacked["image"].shape == (3, 100, 100) and stacked["image"].dtype == np.uint8
    assert stacked["label"].shape == (3,) and stacked["label"].dtype == np.int64
    assert stacked["boxes"].shape == (3, 3, 4) and stacked["noise_boxes"].shape == (3, 4, 4)
    from_iter = as_arrays(r for r in records)
    for key in stacked:
        np.testing.assert_array_equal(stacked[key], from_iter[key])
    with pytest.raises(ValueError, match="at least one record"):
        as_arrays(records[:0])


@pytest.mark.parametrize("make", [lambda a: a, lambda a: a.astype(np.float32)])
def test_downscale_averages_areas(make: Callable[[np.ndarray], np.ndarray]) -> None:
    flat = make(np.full((50, 50), 100, np.uint8))
    np.testing.assert_allclose(downscale(flat, 0.12), 100, atol=1e-4)
    blocks = make(np.arange(16, dtype=np.uint8).reshape(4, 4) * 10)
    np.testing.assert_allclose(downscale(blocks, 0.5), [[25, 45], [105, 125]], atol=1e-4)
    stack = make(np.zeros((3, 100, 60), np.uint8))
    assert downscale(stack, 0.3).shape == (3, 30, 18)
    # Odd factors keep the mass: a one-pixel line is spread, not dropped or aliased.
    line = np.zeros((150, 150), np.float32)
    line[:, 77] = 255.0
    low = downscale(line, 0.12)
    assert low.shape == (18, 18)
    np.testing.assert_allclose(low.sum() / 0.12**2, line.sum(), rtol=1e-4)
    assert low.max() < 255 / 4
    with pytest.raises(ValueError, match="scale"):
        downscale(flat, 1.5)


def test_source_digits_splits_disjointly_by_seed_and_needs_both_files(tmp_path):
    from digits import source_digits

    (train_x, train_y), (test_x, test_y) = source_digits(test_fraction=0.25, seed=3)
    assert len(test_x) == round(0.25 * 1797) and len(train_x) + len(test_x) == 1797
    assert len(train_y) == len(train_x) and len(test_y) == len(test_x)
    again = source_digits(test_fraction=0.25, seed=3)
    np.testing.assert_array_equal(again[1][0], test_x)
    with pytest.raises(ValueError, match="go together"):
        source_digits(tmp_path / "images.idx", None)
