"""TileStream: same pixels as Slide.read_region, in order, with bounded prefetch."""

from __future__ import annotations

import math
import sys
import threading
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_slide_attention.slide import stream as stream_module
from napari_slide_attention.slide.reader import SlideError, open_slide
from napari_slide_attention.slide.stored_tiles import SharedPieces, StoredLevel
from napari_slide_attention.slide.stream import TileBatch, TileStream
from slide_files import write_ome_zarr

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


def _write(
    path: Path, image: np.ndarray, compression: str | None, levels: int = 3, tile: int = TILE
) -> Path:
    kwargs = {"tile": (tile, tile), "photometric": "rgb", "compression": compression}
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


def _grid_from(slide, size0: int, origin: tuple[int, int]) -> np.ndarray:
    """Level-0 boxes of ``size0`` from ``origin`` until past the slide's far edges."""
    height0, width0 = slide.level_info[0].shape
    xs = range(origin[0], width0 + size0, size0)
    ys = range(origin[1], height0 + size0, size0)
    return np.array([(x, y, size0, size0) for y in ys for x in xs], dtype=np.int64)


def _box_tiles(slide, level: int, boxes: np.ndarray, tile: int) -> list[list[int]]:
    """The stored tiles (row-major indices) each box overlaps at a level, row-major."""
    height, width = slide.level_info[level].shape
    sy, sx = slide.level_info[0].shape[0] / height, slide.level_info[0].shape[1] / width
    across = -(-width // tile)
    found = []
    for x, y, w, h in boxes.tolist():
        ly, lx = math.floor(y / sy), math.floor(x / sx)
        y0, y1 = max(ly, 0), min(ly + max(1, round(h / sy)), height)
        x0, x1 = max(lx, 0), min(lx + max(1, round(w / sx)), width)
        found.append(
            [
                r * across + c
                for r in range(y0 // tile, (y1 - 1) // tile + 1 if y0 < y1 else 0)
                for c in range(x0 // tile, (x1 - 1) // tile + 1 if x0 < x1 else 0)
            ]
        )
    return found


@pytest.fixture
def decodes(monkeypatch) -> list[tuple[int, int, int]]:
    """(level, row, column) of every stored tile TileStream decodes, in order."""
    seen: list[tuple[int, int, int]] = []
    decode = StoredLevel.decode

    def counting(self, data, dest, r, c, index):
        seen.append((self.level, r, c))
        return decode(self, data, dest, r, c, index)

    monkeypatch.setattr(StoredLevel, "decode", counting)
    return seen


@pytest.fixture
def caches(monkeypatch) -> list[SharedPieces]:
    """The tile and band caches TileStream passes make, in order."""
    made: list[SharedPieces] = []

    class Recorded(SharedPieces):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(stream_module, "SharedPieces", Recorded)
    return made


@pytest.fixture
def region_reads(monkeypatch):
    """Count a slide's Slide.read_region calls: ``region_reads(slide)`` -> the list."""

    def watch(slide) -> list[tuple[int, ...]]:
        calls: list[tuple[int, ...]] = []
        read = slide.read_region

        def counting(level, x, y, w, h):
            calls.append((level, x, y, w, h))
            return read(level, x, y, w, h)

        monkeypatch.setattr(slide, "read_region", counting)
        return calls

    return watch


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


def test_lossless_direct_reads_return_the_written_pixels(tmp_path, image):
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


def test_missing_tiles_read_as_fill_in_assembled_boxes(tmp_path, image):
    path = _write(tmp_path / "sparse.tif", image, "zlib", levels=1)
    with tifffile.TiffFile(path, mode="r+b") as tif:
        page = tif.pages[0]
        offsets = list(page.dataoffsets)
        counts = list(page.databytecounts)
        # Sparse tiles: offset and byte count 0, or a byte count of 0 at any offset (an
        # offset of 0 with bytes to read is a damaged directory: refused at open).
        offsets[3], counts[3], counts[12] = 0, 0, 0
        page.tags["TileOffsets"].overwrite(offsets)
        page.tags["TileByteCounts"].overwrite(counts)
    slide = _open(path)
    boxes = _grid_from(slide, 200, (-50, 70))
    stream = TileStream(slide, 0, boxes, batch_size=4, workers=2)
    assert stream.stats.assembled == len(boxes)
    np.testing.assert_array_equal(_collect(stream)[0], _expected(slide, 0, boxes))
    slide.close()


# -- any grid on stored tiles: assembled, each stored tile decoded once per pass ----------

PAPER_TILE = 256
# (box size in level-0 px, grid origin, level): the paper's 492 px tiles on 256 px
# stored tiles, on and off the tile lattice, a multiple of the stored tile off the
# lattice, and 246 px level-1 boxes.
PAPER_GRIDS = [
    (492, (0, 0), 0),
    (492, (-37, 101), 0),
    (512, (100, 60), 0),
    (492, (-13, 7), 1),
]


@pytest.fixture(scope="module", params=["jpeg", None])
def paper_path(request, tmp_path_factory) -> Path:
    name = request.param or "raw"
    image = _image(1100, 1400, seed=3)
    directory = tmp_path_factory.mktemp(f"paper-{name}")
    return _write(directory / f"{name}.tif", image, request.param, levels=2, tile=PAPER_TILE)


@pytest.fixture
def paper_slide(paper_path):
    slide = _open(paper_path)
    yield slide
    slide.close()


@pytest.mark.parametrize(("size0", "origin", "level"), PAPER_GRIDS)
def test_any_grid_matches_read_region_with_each_stored_tile_decoded_once(
    paper_slide, decodes, size0, origin, level
):
    boxes = _grid_from(paper_slide, size0, origin)
    expected = _expected(paper_slide, level, boxes)
    stream = TileStream(paper_slide, level, boxes, batch_size=5, workers=3, prefetch=1)
    assert stream.stats.assembled == len(boxes) and stream.stats.direct == 0
    touched = {t for tiles in _box_tiles(paper_slide, level, boxes, PAPER_TILE) for t in tiles}
    assert stream.stats.stored_tiles == len(touched)
    for _ in range(2):  # each pass decodes every stored tile it needs once
        decodes.clear()
        pixels, out_boxes, indices = _collect(stream)
        np.testing.assert_array_equal(pixels, expected)
        np.testing.assert_array_equal(out_boxes, boxes)
        np.testing.assert_array_equal(indices, np.arange(len(boxes)))
        counts = Counter(decodes)
        assert set(counts.values()) == {1}
        across = -(-paper_slide.level_info[level].shape[1] // PAPER_TILE)
        assert {r * across + c for _, r, c in counts} == touched
    assert not _stream_threads(stream)


def test_aligned_multiples_are_decoded_once_straight_into_the_batch(paper_slide, decodes):
    boxes = _grid_from(paper_slide, 2 * PAPER_TILE, (0, 0))
    stream = TileStream(paper_slide, 0, boxes, batch_size=3, workers=2)
    assert stream.stats.direct == len(boxes) and stream.cache_nbytes == 0
    np.testing.assert_array_equal(_collect(stream)[0], _expected(paper_slide, 0, boxes))
    assert len(decodes) == len(set(decodes)) == stream.stats.stored_tiles


def test_tiles_shared_by_aligned_and_other_boxes_are_decoded_once(paper_slide, decodes):
    aligned = _grid_from(paper_slide, PAPER_TILE, (0, 0))
    boxes = np.concatenate([aligned, aligned[::3] + np.array([60, -40, 0, 0])])
    stream = TileStream(paper_slide, 0, boxes, batch_size=4, workers=2)
    assert stream.stats.direct > 0 and stream.stats.assembled > 0
    np.testing.assert_array_equal(_collect(stream)[0], _expected(paper_slide, 0, boxes))
    assert len(decodes) == len(set(decodes)) == stream.stats.stored_tiles


def test_cache_holds_shared_tiles_until_their_last_box(tmp_path, decodes, caches):
    slide = _open(_write(tmp_path / "wide.tif", _image(1536, 2560), None, 1, PAPER_TILE))
    boxes = _grid_from(slide, 492, (-37, 101))
    stream = TileStream(slide, 0, boxes, batch_size=2, workers=1)
    tile_nbytes = PAPER_TILE * PAPER_TILE * 3
    across = 2560 // PAPER_TILE
    # Row-major boxes: about one row of stored tiles across the grid, plus the tiles of
    # the run of boxes being read (a batch of 2 here), not the slide's 60 tiles.
    assert 0 < stream.cache_nbytes <= (across + 2 * 9) * tile_nbytes
    assert stream.stats.stored_tiles == 60
    np.testing.assert_array_equal(_collect(stream)[0], _expected(slide, 0, boxes))
    (cache,) = caches
    assert cache.peak_nbytes <= stream.cache_nbytes
    assert cache.nbytes == 0  # every tile dropped after its last box
    assert len(decodes) == stream.stats.stored_tiles
    slide.close()


@pytest.mark.parametrize("cache_tiles", [0, 3])
def test_a_small_cache_bounds_memory_for_shuffled_boxes(paper_slide, caches, cache_tiles):
    rng = np.random.default_rng(4)
    boxes = _grid_from(paper_slide, 300, (-90, -20))
    boxes = boxes[rng.permutation(len(boxes))]
    tile_nbytes = PAPER_TILE * PAPER_TILE * 3
    workers = 2
    stream = TileStream(
        paper_slide, 0, boxes, batch_size=3, workers=workers, cache_bytes=cache_tiles * tile_nbytes
    )
    assert stream.cache_nbytes <= cache_tiles * tile_nbytes
    np.testing.assert_array_equal(_collect(stream)[0], _expected(paper_slide, 0, boxes))
    (cache,) = caches
    # On top of the limit: the tiles of the runs of boxes being assembled.
    run_tiles = stream_module._RUN * 4
    assert cache.peak_nbytes <= (cache_tiles + workers * run_tiles) * tile_nbytes


def test_grayscale_and_16_bit_tiles_are_assembled(tmp_path):
    data = np.random.default_rng(2).integers(0, 60000, (700, 900), dtype=np.uint16)
    path = tmp_path / "gray.tif"
    tifffile.imwrite(path, data, tile=(128, 128), photometric="minisblack", compression="zlib")
    slide = _open(path)
    boxes = _grid_from(slide, 150, (-20, 33))
    stream = TileStream(slide, 0, boxes, batch_size=4, workers=2)
    assert stream.stats.assembled == len(boxes) and slide.fill_value == 0
    pixels = _collect(stream)[0]
    assert pixels.shape == (len(boxes), 150, 150) and pixels.dtype == np.uint16
    np.testing.assert_array_equal(pixels, _expected(slide, 0, boxes))
    slide.close()


# -- levels without stored tiles: bands read with Slide.read_region ------------------------


@pytest.fixture
def strip_slide(tmp_path, image):
    path = tmp_path / "strips.tif"
    tifffile.imwrite(path, image, photometric="rgb", compression="zlib", rowsperstrip=48)
    slide = _open(path)
    yield slide
    slide.close()


@pytest.mark.parametrize(("size0", "shift"), [(TILE, (0, 0)), (100, (-30, 17))])
def test_strip_tiff_is_read_in_one_band_per_grid_row(strip_slide, region_reads, size0, shift):
    boxes = _grid(strip_slide, 0, size0, margin=1) + np.array([*shift, 0, 0])
    expected = _expected(strip_slide, 0, boxes)
    rows = len(np.unique(boxes[:, 1]))
    stream = TileStream(strip_slide, 0, boxes, batch_size=5, workers=2)
    assert "strips" in stream.stats.fast_path
    assert stream.stats.banded == len(boxes) == stream.stats.general
    assert stream.stats.bands == rows and stream.stats.fast == 0
    calls = region_reads(strip_slide)
    np.testing.assert_array_equal(_collect(stream)[0], expected)
    # One read per grid row, though rows are split across batches of 5.
    assert len(calls) == rows
    assert stream.cache_nbytes <= 3 * (size0 * 3) * (WIDTH + 3 * size0)


def test_ome_zarr_levels_with_uneven_downsamples_are_read_in_bands(tmp_path, region_reads):
    image = _image(1001, 1303, seed=5)
    write_ome_zarr(tmp_path / "s.ome.zarr", image, chunk=128)
    slide = _open(tmp_path / "s.ome.zarr")
    assert slide.level_info[1].shape == (500, 651)  # 2.002 x 2.0015: not a whole number
    calls = region_reads(slide)
    for level, size0 in ((0, 200), (1, 300), (2, 200)):
        boxes = _grid_from(slide, size0, (-45, 31))
        expected = _expected(slide, level, boxes)
        stream = TileStream(slide, level, boxes, batch_size=4, workers=2)
        assert stream.stats.banded == len(boxes)
        calls.clear()
        np.testing.assert_array_equal(_collect(stream)[0], expected)
        assert len(calls) == stream.stats.bands == len(np.unique(boxes[:, 1]))
    slide.close()


def test_virtual_level_is_read_in_bands(tmp_path, region_reads):
    # Single-level slides get virtual levels (computed by the reader): no stored tiles.
    image = np.full((2304, 2304, 3), 200, dtype=np.uint8)
    image[::7] = 30
    slide = _open(_write(tmp_path / "single.tif", image, "zlib", levels=1))
    assert slide.level_info[1].virtual
    boxes = _grid_from(slide, 512, (-100, 50))
    boxes = boxes[boxes[:, 1] < 600]  # two rows: computed levels are slow to read
    expected = _expected(slide, 1, boxes)
    stream = TileStream(slide, 1, boxes, batch_size=3)
    assert stream.stats.banded == len(boxes) and "virtual" in stream.stats.fast_path
    calls = region_reads(slide)
    np.testing.assert_array_equal(_collect(stream)[0], expected)
    assert len(calls) == stream.stats.bands == len(np.unique(boxes[:, 1]))
    slide.close()


def test_bands_end_at_gaps_and_row_changes(strip_slide, region_reads):
    boxes = np.array(
        [(0, 0, 100, 100), (100, 0, 100, 100), (150, 0, 100, 100), (400, 0, 100, 100),
         (500, 0, 100, 100), (0, 100, 100, 100), (180, 100, 100, 100), (100, 100, 100, 100)]
    )  # fmt: skip
    stream = TileStream(strip_slide, 0, boxes, batch_size=8, workers=2)
    # Overlapping boxes and gaps up to a box width stay in a band; a wider gap (250 to
    # 400), a new row and a step back start one: [0, 100, 150], [400, 500], [0, 180], [100].
    assert stream.stats.bands == 4
    expected = _expected(strip_slide, 0, boxes)
    calls = region_reads(strip_slide)
    np.testing.assert_array_equal(_collect(stream)[0], expected)
    assert len(calls) == 4


def test_a_band_read_too_wide_is_cut_to_the_boxes(strip_slide, monkeypatch):
    # read_region may give a column more than asked when no level-0 width maps exactly.
    monkeypatch.setattr(stream_module, "_level0_width", lambda columns, scale: columns + 1)
    boxes = _grid(strip_slide, 0, 100, margin=1) + np.array([-30, 17, 0, 0])
    stream = TileStream(strip_slide, 0, boxes, batch_size=6, workers=2)
    np.testing.assert_array_equal(_collect(stream)[0], _expected(strip_slide, 0, boxes))


def test_level0_width_maps_to_the_columns_asked_for():
    for scale in (1.0, 2.0, 2.0015, 3.9996, 4.0007, 7.5):
        for columns in (1, 2, 99, 256, 1000, 12345):
            width = stream_module._level0_width(columns, scale)
            assert max(1, round(width / scale)) == columns


# -- damaged files ------------------------------------------------------------------------


def _tile_offsets(path: Path) -> tuple[list[int], list[int]]:
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        return list(page.dataoffsets), list(page.databytecounts)


def _cut_in_tile(path, tile: int) -> None:
    """Truncate the file in the middle of stored tile ``tile`` (the tiles before survive)."""
    offsets, counts = _tile_offsets(path)
    path.write_bytes(path.read_bytes()[: offsets[tile] + counts[tile] // 2])


def _zero_tile(path, tile: int) -> None:
    """Overwrite stored tile ``tile``'s bytes with zeros (a corrupt tile)."""
    offsets, counts = _tile_offsets(path)
    data = bytearray(path.read_bytes())
    data[offsets[tile] : offsets[tile] + counts[tile]] = bytes(counts[tile])
    path.write_bytes(bytes(data))


def _names_tile(message: str, tile: int) -> bool:
    """Whether an error message names level 0's stored tile ``tile`` by row and column."""
    across = -(-WIDTH // TILE)
    return (
        "level 0" in message and f"tile (row {tile // across}, column {tile % across})" in message
    )


@pytest.mark.parametrize("compression", ["jpeg", "zlib"])
def test_truncated_file_names_the_tile(tmp_path, image, compression):
    path = _write(tmp_path / "cut.tif", image, compression, levels=1)
    cut = 40  # tiles 0..39 survive (tile 40 is cut in the middle)
    _cut_in_tile(path, cut)
    slide = _open(path)
    boxes = _grid(slide, 0, TILE)
    stream = TileStream(slide, 0, boxes, batch_size=8)
    assert stream.stats.fast == len(boxes)
    seen = []
    with pytest.raises(SlideError) as info:
        for batch in stream:
            seen.append(batch.indices)
    message = str(info.value)
    assert str(path) in message and "truncated" in message and _names_tile(message, cut)
    # Batches before the one holding the cut tile were delivered first.
    assert len(seen) == cut // 8
    assert not _stream_threads(stream)
    slide.close()


@pytest.mark.parametrize("compression", ["jpeg", "zlib"])
def test_corrupt_tile_names_the_tile(tmp_path, image, compression):
    path = _write(tmp_path / "bad.tif", image, compression, levels=1)
    bad = 13
    _zero_tile(path, bad)
    slide = _open(path)
    boxes = _grid(slide, 0, TILE)
    stream = TileStream(slide, 0, boxes, batch_size=4)
    assert stream.stats.fast == len(boxes)
    with pytest.raises(SlideError) as info:
        list(stream)
    message = str(info.value)
    assert "corrupt" in message and _names_tile(message, bad)
    slide.close()


@pytest.mark.parametrize("compression", ["jpeg", "zlib"])
def test_truncated_file_names_the_tile_of_the_first_assembled_box(tmp_path, image, compression):
    path = _write(tmp_path / "cut.tif", image, compression, levels=1)
    cut = 40  # tiles 0..39 survive (tile 40 is cut in the middle)
    _cut_in_tile(path, cut)
    slide = _open(path)
    boxes = _grid(slide, 0, 100) + np.array([-30, 17, 0, 0])
    stream = TileStream(slide, 0, boxes, batch_size=8, workers=2)
    assert stream.stats.assembled == len(boxes)
    # The first box that needs a lost tile, and its first lost tile (row-major).
    tiles = _box_tiles(slide, 0, boxes, TILE)
    first = next(i for i, found in enumerate(tiles) if any(t >= cut for t in found))
    lost = min(t for t in tiles[first] if t >= cut)
    seen = []
    with pytest.raises(SlideError) as info:
        for batch in stream:
            seen.append(batch.indices)
    message = str(info.value)
    assert str(path) in message and "truncated" in message and _names_tile(message, lost)
    assert len(seen) == first // 8
    assert not _stream_threads(stream)
    slide.close()


@pytest.mark.parametrize("compression", ["jpeg", "zlib"])
def test_corrupt_tile_names_the_tile_in_assembled_boxes(tmp_path, image, compression):
    path = _write(tmp_path / "bad.tif", image, compression, levels=1)
    bad = 13
    _zero_tile(path, bad)
    slide = _open(path)
    boxes = _grid(slide, 0, 150) + np.array([40, -60, 0, 0])
    stream = TileStream(slide, 0, boxes, batch_size=3, workers=2)
    assert stream.stats.assembled == len(boxes)
    first = next(i for i, found in enumerate(_box_tiles(slide, 0, boxes, TILE)) if bad in found)
    seen = []
    with pytest.raises(SlideError) as info:
        for batch in stream:
            seen.append(batch.indices)
    message = str(info.value)
    assert "corrupt" in message and _names_tile(message, bad)
    assert len(seen) == first // 3
    slide.close()


def test_truncated_strip_tiff_raises_at_its_band(tmp_path, image):
    path = tmp_path / "strips.tif"
    tifffile.imwrite(path, image, photometric="rgb", compression="zlib", rowsperstrip=48)
    _cut_in_tile(path, 10)  # rows from 480 on are lost
    slide = _open(path)
    boxes = _grid(slide, 0, 100) + np.array([-30, 17, 0, 0])
    stream = TileStream(slide, 0, boxes, batch_size=4, workers=2)
    assert stream.stats.banded == len(boxes)
    seen = []
    with pytest.raises(SlideError) as info:
        for batch in stream:
            seen.append(batch.indices)
    assert str(path) in str(info.value) and "truncated" in str(info.value)
    # Boxes reaching below row 480 fail; every batch before the first of them came.
    first = int(np.argmax(boxes[:, 1] + 100 > 480))
    assert len(seen) == first // 4
    assert not _stream_threads(stream)
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


@pytest.mark.parametrize("layout", ["tiles", "strips"])
def test_break_and_close_stop_the_workers_of_assembled_and_banded_boxes(tmp_path, image, layout):
    path = tmp_path / f"{layout}.tif"
    if layout == "tiles":
        _write(path, image, "zlib", levels=1)
    else:
        tifffile.imwrite(path, image, photometric="rgb", compression="zlib", rowsperstrip=48)
    slide = _open(path)
    boxes = _grid(slide, 0, 100, margin=2) + np.array([-30, 17, 0, 0])
    stream = TileStream(slide, 0, boxes, batch_size=2, workers=2)
    assert stream.stats.assembled + stream.stats.banded == len(boxes)
    for _ in stream:
        assert _stream_threads(stream)
        break
    assert not _stream_threads(stream)
    iterator = iter(stream)
    next(iterator)
    stream.close()
    assert not _stream_threads(stream)
    assert list(iterator) == []
    # A fresh pass after both starts with empty caches and reads every tile again.
    np.testing.assert_array_equal(_collect(stream)[0], _expected(slide, 0, boxes))
    assert not _stream_threads(stream)
    slide.close()


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
    with pytest.raises(ValueError, match="cache_bytes"):
        TileStream(slide, 0, [(0, 0, 128, 128)], cache_bytes=-1)
