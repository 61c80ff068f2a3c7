"""TileStream: same pixels as Slide.read_region, in order, with bounded prefetch."""

from __future__ import annotations

import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_slide_attention.slide.reader import SlideError, open_slide
from napari_slide_attention.slide.stream import TileBatch, TileStream

TILE = 128
# Partial edge tiles on both axes at every level.
HEIGHT, WIDTH = 1000, 1300


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients plus texture: realistic (not constant) tiles."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            128 + 80 * np.sin(xx / 97.0) * np.cos(yy / 131.0),
            128 + 60 * np.cos((xx + yy) / 53.0),
            160 + 50 * np.sin(yy / 71.0),
        ],
        axis=-1,
    )
    noise = rng.normal(0, 12, size=(height, width, 3)).astype(np.float32)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _write(path: Path, image: np.ndarray, compression: str | None, levels: int = 3) -> Path:
    kwargs = {"tile": (TILE, TILE), "photometric": "rgb", "compression": compression}
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, subifds=levels - 1, **kwargs)
        for i in range(1, levels):
            tif.write(image[:: 2**i, :: 2**i], subfiletype=1, **kwargs)
    return path


def _open(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no mpp in these files
        return open_slide(path)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return _image(HEIGHT, WIDTH)


@pytest.fixture(scope="module", params=["zlib", "jpeg", None])
def slide_path(request, tmp_path_factory, image) -> Path:
    name = request.param or "raw"
    return _write(tmp_path_factory.mktemp(name) / f"{name}.tif", image, request.param)


@pytest.fixture
def slide(slide_path):
    slide = _open(slide_path)
    yield slide
    slide.close()


def _grid(slide, level: int, size0: int, *, margin: int = 0) -> np.ndarray:
    """Level-0 boxes of `size0` covering the slide, `margin` boxes beyond each edge."""
    height0, width0 = slide.level_info[0].shape
    ys = range(-margin * size0, height0 + margin * size0, size0)
    xs = range(-margin * size0, width0 + margin * size0, size0)
    return np.array([(x, y, size0, size0) for y in ys for x in xs], dtype=np.int64)


def _expected(slide, level: int, boxes: np.ndarray) -> np.ndarray:
    return np.stack([slide.read_region(level, *map(int, box)) for box in boxes])


def _collect(stream: TileStream) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    batches = list(stream)
    assert all(isinstance(b, TileBatch) for b in batches)
    return (
        np.concatenate([b.pixels for b in batches]),
        np.concatenate([b.boxes for b in batches]),
        np.concatenate([b.indices for b in batches]),
    )


def _stream_threads(stream: TileStream) -> list[threading.Thread]:
    prefix = f"tilestream-{id(stream):x}"
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


# -- pixels -------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [0, 1])
def test_aligned_tiles_are_decoded_directly_and_match_read_region(slide, level):
    size0 = TILE * 2**level
    # One ring of boxes outside the slide, so edge tiles and all-glass boxes are covered.
    boxes = _grid(slide, level, size0, margin=1)
    stream = TileStream(slide, level, boxes, batch_size=7, workers=2)
    assert stream.stats.direct == len(boxes) == stream.stats.fast
    assert stream.stats.general == stream.stats.assembled == stream.stats.banded == 0
    assert stream.stats.fast_path == "" and stream.cache_nbytes == 0
    pixels, out_boxes, indices = _collect(stream)
    assert pixels.shape == (len(boxes), TILE, TILE, 3) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, _expected(slide, level, boxes))
    np.testing.assert_array_equal(out_boxes, boxes)
    np.testing.assert_array_equal(indices, np.arange(len(boxes)))
    # The outside ring really is glass.
    assert (pixels[0] == slide.fill_value).all()


def test_multi_tile_boxes_are_decoded_directly(slide):
    boxes = _grid(slide, 1, 2 * TILE * 2)  # 2x2 stored tiles per box at level 1
    stream = TileStream(slide, 1, boxes, batch_size=3)
    assert stream.stats.direct == len(boxes)
    pixels, _, _ = _collect(stream)
    assert pixels.shape[1:] == (2 * TILE, 2 * TILE, 3)
    np.testing.assert_array_equal(pixels, _expected(slide, 1, boxes))


@pytest.mark.parametrize("level", [0, 1])
def test_unaligned_boxes_are_assembled_from_stored_tiles(slide, level):
    size0 = 100 * 2**level
    boxes = _grid(slide, level, size0) + np.array([-30, 17, 0, 0])  # partly outside too
    stream = TileStream(slide, level, boxes, batch_size=16)
    assert stream.stats.assembled == len(boxes) == stream.stats.fast
    assert stream.stats.direct == stream.stats.general == 0
    pixels, _, indices = _collect(stream)
    np.testing.assert_array_equal(pixels, _expected(slide, level, boxes))
    np.testing.assert_array_equal(indices, np.arange(len(boxes)))


def test_mixed_paths_keep_order_and_indices(slide):
    rng = np.random.default_rng(1)
    aligned = _grid(slide, 0, TILE, margin=1)
    # Shifted boxes in the top rows only: the aligned boxes below share no stored tile
    # with them and are decoded directly; the ones above are assembled with them.
    shifted = aligned[aligned[:, 1] < 2 * TILE] + np.array([5, -3, 0, 0])
    boxes = np.concatenate([aligned, shifted])[rng.permutation(len(aligned) + len(shifted))]
    stream = TileStream(slide, 0, boxes.tolist(), batch_size=10, workers=3, prefetch=1)
    # The shifted boxes overlap stored tile rows 0 and 1 (the ones at y = -131 nothing).
    x, y = aligned[:, 0], aligned[:, 1]
    shared = np.count_nonzero((y >= 0) & (y < 2 * TILE) & (x >= 0) & (x < WIDTH))
    assert stream.stats.direct == len(aligned) - shared
    assert stream.stats.assembled == len(shifted) + shared
    assert len(stream) == -(-len(boxes) // 10) and stream.n_tiles == len(boxes)
    batches = list(stream)
    assert [len(b) for b in batches] == [10] * (len(boxes) // 10) + (
        [len(boxes) % 10] if len(boxes) % 10 else []
    )
    pixels = np.concatenate([b.pixels for b in batches])
    np.testing.assert_array_equal(
        np.concatenate([b.indices for b in batches]), np.arange(len(boxes))
    )
    np.testing.assert_array_equal(np.concatenate([b.boxes for b in batches]), boxes)
    np.testing.assert_array_equal(pixels, _expected(slide, 0, boxes))


def test_lossless_fast_path_returns_the_written_pixels(tmp_path, image):
    slide = _open(_write(tmp_path / "z.tif", image, "zlib"))
    boxes = _grid(slide, 0, TILE)
    pixels, _, _ = _collect(TileStream(slide, 0, boxes, batch_size=64))
    for tile, (x, y, _, _) in zip(pixels, boxes, strict=True):
        part = image[y : y + TILE, x : x + TILE]
        np.testing.assert_array_equal(tile[: part.shape[0], : part.shape[1]], part)
        # Past the slide's edge: glass, not the stored tile's padding.
        assert (tile[part.shape[0] :] == 255).all() and (tile[:, part.shape[1] :] == 255).all()
    slide.close()


def test_missing_tiles_read_as_fill(tmp_path, image):
    path = _write(tmp_path / "sparse.tif", image, "zlib", levels=1)
    with tifffile.TiffFile(path, mode="r+b") as tif:
        page = tif.pages[0]
        offsets = list(page.dataoffsets)
        counts = list(page.databytecounts)
        offsets[3], counts[3] = 0, 0
        page.tags["TileOffsets"].overwrite(offsets)
        page.tags["TileByteCounts"].overwrite(counts)
    slide = _open(path)
    boxes = _grid(slide, 0, TILE)
    pixels, _, _ = _collect(TileStream(slide, 0, boxes))
    assert (pixels[3] == 255).all()
    np.testing.assert_array_equal(pixels, _expected(slide, 0, boxes))
    slide.close()


def test_virtual_level_uses_general_path(tmp_path):
    # Single-level slides get virtual levels (computed by the reader): no stored tiles.
    image = np.full((2304, 2304, 3), 200, dtype=np.uint8)
    image[::7] = 30
    slide = _open(_write(tmp_path / "single.tif", image, "zlib", levels=1))
    assert slide.level_info[1].virtual
    boxes = _grid(slide, 1, 512)[:6]
    stream = TileStream(slide, 1, boxes)
    assert stream.stats.fast == 0 and "virtual" in stream.stats.fast_path
    pixels, _, _ = _collect(stream)
    np.testing.assert_array_equal(pixels, _expected(slide, 1, boxes))
    slide.close()


# -- damaged files ------------------------------------------------------------------------


def _tile_offsets(path: Path) -> tuple[list[int], list[int]]:
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        return list(page.dataoffsets), list(page.databytecounts)


@pytest.mark.parametrize("compression", ["jpeg", "zlib"])
def test_truncated_file_names_the_tile(tmp_path, image, compression):
    path = _write(tmp_path / "cut.tif", image, compression, levels=1)
    offsets, counts = _tile_offsets(path)
    cut = 40  # tiles 0..39 survive (tile 40 is cut in the middle)
    data = path.read_bytes()
    path.write_bytes(data[: offsets[cut] + counts[cut] // 2])
    slide = _open(path)
    boxes = _grid(slide, 0, TILE)
    stream = TileStream(slide, 0, boxes, batch_size=8)
    assert stream.stats.fast == len(boxes)
    seen = []
    with pytest.raises(SlideError) as info:
        for batch in stream:
            seen.append(batch.indices)
    across = -(-WIDTH // TILE)
    message = str(info.value)
    assert str(path) in message and "truncated" in message and "level 0" in message
    assert f"tile (row {cut // across}, column {cut % across})" in message
    # Batches before the one holding the cut tile were delivered first.
    assert len(seen) == cut // 8
    assert not _stream_threads(stream)
    slide.close()


@pytest.mark.parametrize("compression", ["jpeg", "zlib"])
def test_corrupt_tile_names_the_tile(tmp_path, image, compression):
    path = _write(tmp_path / "bad.tif", image, compression, levels=1)
    offsets, counts = _tile_offsets(path)
    bad = 13
    data = bytearray(path.read_bytes())
    data[offsets[bad] : offsets[bad] + counts[bad]] = bytes(counts[bad])
    path.write_bytes(bytes(data))
    slide = _open(path)
    boxes = _grid(slide, 0, TILE)
    stream = TileStream(slide, 0, boxes, batch_size=4)
    assert stream.stats.fast == len(boxes)
    with pytest.raises(SlideError) as info:
        list(stream)
    across = -(-WIDTH // TILE)
    message = str(info.value)
    assert "corrupt" in message and "level 0" in message
    assert f"tile (row {bad // across}, column {bad % across})" in message
    slide.close()


# -- prefetching, closing, errors ---------------------------------------------------------


def test_prefetch_bounds_batches_ahead_of_a_slow_consumer(slide):
    done = []
    lock = threading.Lock()

    def count(pixels: np.ndarray) -> np.ndarray:
        with lock:
            done.append(threading.current_thread().name)
        return pixels

    boxes = _grid(slide, 0, TILE)[:24]
    prefetch = 2
    stream = TileStream(
        slide, 0, boxes, batch_size=2, workers=2, prefetch=prefetch, transform=count
    )
    ahead = []
    for received, _batch in enumerate(stream, start=1):
        time.sleep(0.03)  # a slow model: the pool has time to run ahead if it were allowed
        with lock:
            ahead.append(len(done) - received)
    assert max(ahead) == prefetch
    assert min(ahead) >= 0
    # The transform ran on the pool, not in the consumer.
    assert all(name.startswith("tilestream-") for name in done)


def test_dropped_batches_are_refilled_and_kept_ones_are_not(slide):
    boxes = _grid(slide, 0, TILE, margin=1)
    expected = _expected(slide, 0, boxes)
    stream = TileStream(slide, 0, boxes, batch_size=4, workers=2, prefetch=1)
    arrays, copies = set(), []
    for batch in stream:
        arrays.add(id(batch.pixels))
        copies.append(batch.pixels.copy())
    np.testing.assert_array_equal(np.concatenate(copies), expected)
    if sys.implementation.name == "cpython":
        assert len(arrays) < len(stream)  # arrays were reused...
    kept = list(stream)
    views = [batch.pixels[:, :1] for batch in stream]  # ...but never under a holder
    assert len({id(b.pixels) for b in kept}) == len(stream)
    np.testing.assert_array_equal(np.concatenate([b.pixels for b in kept]), expected)
    np.testing.assert_array_equal(np.concatenate(views), expected[:, :1])


def test_jpeg_batch_rows_stay_off_simd_boundaries(tmp_path, image):
    # libjpeg-turbo writes a row starting on a 16/32-byte boundary with non-temporal
    # stores, around the cache (20 % slower decoding in benchmarks/io.py). No row of any
    # batch may start there, and reused arrays keep the placement.
    slide = _open(_write(tmp_path / "jpeg.tif", image, "jpeg"))
    boxes = _grid(slide, 0, TILE)
    expected = _expected(slide, 0, boxes)
    stream = TileStream(slide, 0, boxes, batch_size=3, workers=2, prefetch=1)
    assert stream.stats.fast == len(boxes)
    got = []
    for batch in stream:
        pixels = batch.pixels
        rows = pixels.ctypes.data + np.arange(pixels.shape[0] * pixels.shape[1]) * pixels.strides[1]
        assert not np.any(rows % 16 == 0)
        got.append(pixels.copy())
    np.testing.assert_array_equal(np.concatenate(got), expected)
    slide.close()


def test_prefetch_zero_decodes_on_demand(slide):
    calls = []
    boxes = _grid(slide, 0, TILE)[:9]
    stream = TileStream(
        slide, 0, boxes, batch_size=3, prefetch=0, transform=lambda p: calls.append(1) or p
    )
    for received, _ in enumerate(stream, start=1):
        time.sleep(0.02)
        assert len(calls) == received


def test_transform_result_becomes_pixels(slide):
    boxes = _grid(slide, 0, TILE)[:10]
    stream = TileStream(slide, 0, boxes, batch_size=4, transform=lambda p: p.mean(axis=(1, 2, 3)))
    means = np.concatenate([b.pixels for b in stream])
    np.testing.assert_allclose(means, _expected(slide, 0, boxes).mean(axis=(1, 2, 3)))


def test_transform_error_is_raised_at_its_batch(slide):
    def fail_on_third(pixels, calls=[0]):  # noqa: B006 - a counter
        calls[0] += 1
        if calls[0] == 3:
            raise ZeroDivisionError("boom")
        return pixels

    stream = TileStream(
        slide, 0, _grid(slide, 0, TILE)[:20], batch_size=2, workers=1, transform=fail_on_third
    )
    received = 0
    with pytest.raises(ZeroDivisionError):
        for _ in stream:
            received += 1
    assert received == 2
    assert not _stream_threads(stream)


def test_break_stops_the_workers(slide):
    stream = TileStream(slide, 0, _grid(slide, 0, TILE, margin=2), batch_size=2, workers=2)
    for _ in stream:
        assert _stream_threads(stream)
        break
    assert not _stream_threads(stream)


def test_close_and_context_manager_stop_the_workers(slide):
    boxes = _grid(slide, 0, TILE, margin=2)
    with TileStream(slide, 0, boxes, batch_size=2, workers=2) as stream:
        iterator = iter(stream)
        next(iterator)
        assert _stream_threads(stream)
        stream.close()
        assert not _stream_threads(stream)
        assert list(iterator) == []  # a closed pass yields nothing more
        iterator = iter(stream)
        next(iterator)  # a fresh pass
    assert not _stream_threads(stream)
    assert list(iterator) == []


def test_iterating_again_restarts_and_concurrent_passes_fail(slide):
    boxes = _grid(slide, 0, TILE)[:12]
    stream = TileStream(slide, 0, boxes, batch_size=5)
    first = np.concatenate([b.pixels for b in stream])
    second = np.concatenate([b.pixels for b in stream])
    np.testing.assert_array_equal(first, second)
    iterator = iter(stream)
    next(iterator)
    with pytest.raises(RuntimeError, match="already being iterated"):
        next(iter(stream))
    stream.close()


# -- arguments ----------------------------------------------------------------------------


def test_empty_box_list_yields_nothing(slide):
    for boxes in ([], np.zeros((0, 4), dtype=np.int64)):
        stream = TileStream(slide, 0, boxes)
        assert len(stream) == 0 and stream.n_tiles == 0
        assert list(stream) == []
        assert stream.stats.tiles == 0


def test_bad_arguments(slide):
    with pytest.raises(ValueError, match="same size"):
        TileStream(slide, 0, [(0, 0, 128, 128), (0, 0, 128, 64)])
    with pytest.raises(ValueError, match="level 7 does not exist"):
        TileStream(slide, 7, [(0, 0, 128, 128)])
    with pytest.raises(ValueError, match="level -1 does not exist"):
        TileStream(slide, -1, [(0, 0, 128, 128)])
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        TileStream(slide, 0, [(0, 0, 128)])
    with pytest.raises(ValueError, match="positive"):
        TileStream(slide, 0, [(0, 0, 0, 128)])
    with pytest.raises(ValueError, match="tile_size"):
        TileStream(slide, 1, [(0, 0, 256, 256)], tile_size=256)
    assert TileStream(slide, 1, [(0, 0, 256, 256)], tile_size=128).tile_shape == (128, 128)
    with pytest.raises(ValueError, match="batch_size"):
        TileStream(slide, 0, [(0, 0, 128, 128)], batch_size=0)
    with pytest.raises(ValueError, match="workers"):
        TileStream(slide, 0, [(0, 0, 128, 128)], workers=0)
