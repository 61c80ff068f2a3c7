"""Tests of tissue detection, tissue pieces and tile grids on images drawn in numpy."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import dask.array as da
import numpy as np
import pytest

from napari_slide_attention.slide.reader import SlideError
from napari_slide_attention.slide.tissue import (
    TileGrid,
    TissueMask,
    TissueParams,
    tile_grid,
    tissue_mask,
    tissue_mask_from_rgb,
    tissue_pieces,
)

# Mask-level images: 16 level-0 px per image px at 0.5 µm/px, i.e. 8 µm per image px, the
# default mask resolution.
DS = 16
MPP = 0.5
SHAPE = (300, 400)

HE_STROMA, HE_NUCLEI = (230, 150, 190), (120, 60, 150)
IHC_HEMATOXYLIN, IHC_DAB = (200, 205, 228), (175, 140, 110)


# ----------------------------------------------------------------------------------------------
# Drawing


def ellipse(shape, cy, cx, ry, rx):
    """(h, w) bool filled ellipse."""
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def background(rng, shape=SHAPE, level=243.0, noise=3.0):
    """(h, w, 3) float glass: near white with sensor noise."""
    return rng.normal(level, noise, (*shape, 3))


def paint(img, region, base, speck, speck_share, rng, noise=6.0):
    """Textured stain in ``region``: a base colour with specks (nuclei, DAB) and noise."""
    n = int(region.sum())
    colours = np.where(rng.random(n)[:, None] < speck_share, speck, base).astype(np.float64)
    img[region] = colours + rng.normal(0, noise, (n, 3))


def to_uint8(img):
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def iou(a, b):
    return np.count_nonzero(a & b) / np.count_nonzero(a | b)


def he_blobs(shape=SHAPE):
    """Three H&E-like pieces of different sizes, largest first."""
    return [
        ellipse(shape, 200, 290, 70, 80),
        ellipse(shape, 80, 110, 50, 70),
        ellipse(shape, 70, 300, 30, 40),
    ]


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def he_image(rng):
    img = background(rng)
    blobs = he_blobs()
    for blob in blobs:
        paint(img, blob, HE_STROMA, HE_NUCLEI, 0.25, rng)
    return to_uint8(img), blobs


# ----------------------------------------------------------------------------------------------
# Tissue mask


def test_he_mask_matches_drawn_tissue(he_image):
    img, blobs = he_image
    truth = np.logical_or.reduce(blobs)
    for method in ("auto", "saturation", "od"):
        tm = tissue_mask_from_rgb(img, DS, TissueParams(method=method), mpp=MPP)
        assert tm.mask.shape == SHAPE
        assert tm.mask.dtype == bool
        assert iou(tm.mask, truth) >= 0.9, method
    assert tm.downsample == DS
    assert tm.fraction == pytest.approx(truth.mean(), rel=0.1)


def test_pale_ihc_mask_matches_drawn_tissue(rng):
    img = background(rng)
    blob = ellipse(SHAPE, 150, 200, 80, 110)
    paint(img, blob, IHC_HEMATOXYLIN, IHC_DAB, 0.1, rng)
    img = to_uint8(img)
    for method in ("auto", "od"):
        tm = tissue_mask_from_rgb(img, DS, TissueParams(method=method), mpp=MPP)
        assert iou(tm.mask, blob) >= 0.9, method


def test_pale_and_strong_stain_on_one_slide(he_image, rng):
    # Otsu alone puts its threshold between the pale and the strongly stained tissue; the
    # cap above the glass keeps the pale piece.
    img, blobs = he_image
    img = img.astype(np.float64)
    pale = ellipse(SHAPE, 230, 90, 45, 60)
    paint(img, pale, IHC_HEMATOXYLIN, IHC_DAB, 0.1, rng)
    img = to_uint8(img)
    truth = np.logical_or.reduce([*blobs, pale])

    tm = tissue_mask_from_rgb(img, DS, TissueParams(), mpp=MPP)
    assert iou(tm.mask, truth) >= 0.9
    assert tm.mask[pale].mean() > 0.9

    plain_otsu = tissue_mask_from_rgb(img, DS, TissueParams(glass_sigmas=None), mpp=MPP)
    assert plain_otsu.mask[pale].mean() < 0.5


@pytest.mark.parametrize("method", ["auto", "saturation", "od"])
def test_tinted_glass(rng, method):
    # Yellowish glass (white balance) is more saturated than the saturation floor: the
    # thresholds must follow the glass, not the floors.
    img = rng.normal((245, 240, 222), 3.0, (*SHAPE, 3))
    strong = ellipse(SHAPE, 150, 230, 80, 110)
    pale = ellipse(SHAPE, 60, 60, 40, 40)
    paint(img, strong, HE_STROMA, HE_NUCLEI, 0.25, rng)
    paint(img, pale, IHC_HEMATOXYLIN, IHC_DAB, 0.1, rng)
    tm = tissue_mask_from_rgb(to_uint8(img), DS, TissueParams(method=method), mpp=MPP)
    assert iou(tm.mask, strong | pale) >= 0.9


@pytest.mark.parametrize("method", ["auto", "saturation", "od"])
@pytest.mark.parametrize("level", [243.0, 250.0, 232.0])
def test_blank_slide_has_no_tissue(rng, method, level):
    img = to_uint8(background(rng, level=level, noise=4.0))
    tm = tissue_mask_from_rgb(img, DS, TissueParams(method=method), mpp=MPP)
    assert tm.fraction < 1e-3


def test_constant_images():
    white = np.full((*SHAPE, 3), 255, np.uint8)
    assert tissue_mask_from_rgb(white, DS, mpp=MPP).fraction == 0
    black = np.zeros((*SHAPE, 3), np.uint8)
    assert tissue_mask_from_rgb(black, DS, mpp=MPP).fraction == 0


def test_small_holes_filled_large_holes_kept(rng):
    img = background(rng)
    blob = ellipse(SHAPE, 150, 200, 110, 150)
    # 10,000 µm² at 8 µm/px is 156 px: a hole of radius 4 (~50 px) is filled, radius 15
    # (~700 px) is a lumen and stays.
    small_hole = ellipse(SHAPE, 100, 130, 4, 4)
    large_hole = ellipse(SHAPE, 170, 260, 15, 15)
    paint(img, blob & ~small_hole & ~large_hole, HE_STROMA, HE_NUCLEI, 0.25, rng)
    tm = tissue_mask_from_rgb(to_uint8(img), DS, TissueParams(), mpp=MPP)
    assert tm.mask[small_hole].all()
    assert tm.mask[large_hole].mean() < 0.2
    assert iou(tm.mask, blob & ~large_hole) >= 0.9

    no_fill = tissue_mask_from_rgb(to_uint8(img), DS, TissueParams(fill_holes=False), mpp=MPP)
    assert no_fill.mask[small_hole].mean() < 0.5


def test_small_specks_dropped(he_image, rng):
    img, _ = he_image
    img = img.astype(np.float64)
    # 50,000 µm² at 8 µm/px is 781 px: 8x8 specks are dust, a radius-20 piece (~1250 px) stays.
    specks = np.zeros(SHAPE, bool)
    for y, x in [(20, 20), (280, 20), (150, 380), (20, 200)]:
        specks[y - 4 : y + 4, x - 4 : x + 4] = True
    kept = ellipse(SHAPE, 250, 60, 20, 20)
    paint(img, specks | kept, HE_STROMA, HE_NUCLEI, 0.25, rng)
    tm = tissue_mask_from_rgb(to_uint8(img), DS, TissueParams(), mpp=MPP)
    assert not tm.mask[specks].any()
    assert tm.mask[kept].mean() > 0.9

    keep_all = tissue_mask_from_rgb(to_uint8(img), DS, TissueParams(min_piece_area_um2=0), mpp=MPP)
    assert keep_all.mask[specks].mean() > 0.5


def test_pen_and_black_border_excluded(he_image):
    img, blobs = he_image
    img = img.copy()
    dark = np.zeros(SHAPE, bool)
    dark[:, :12] = True  # black scanner border
    dark[150:155, 20:380] = True  # pen line across glass and tissue
    dark[10:40, 150:250] = True  # a black pen blot on glass
    img[dark] = (20, 20, 25)
    truth = np.logical_or.reduce(blobs) & ~dark
    tm = tissue_mask_from_rgb(img, DS, TissueParams(), mpp=MPP)
    assert not tm.mask[dark].any()
    assert iou(tm.mask, truth) >= 0.9


def test_grey_image_uses_optical_density(rng):
    img = background(rng)
    blob = ellipse(SHAPE, 150, 200, 80, 110)
    paint(img, blob, HE_STROMA, HE_NUCLEI, 0.25, rng)
    grey = to_uint8(img.mean(axis=-1))
    tm = tissue_mask_from_rgb(grey, DS, TissueParams(method="auto"), mpp=MPP)
    assert iou(tm.mask, blob) >= 0.9
    with pytest.raises(ValueError, match="saturation"):
        tissue_mask_from_rgb(grey, DS, TissueParams(method="saturation"), mpp=MPP)


def test_float_and_rgba_input(he_image):
    img, _ = he_image
    reference = tissue_mask_from_rgb(img, DS, mpp=MPP).mask
    rgba = np.concatenate([img, np.full((*SHAPE, 1), 255, np.uint8)], axis=-1)
    np.testing.assert_array_equal(tissue_mask_from_rgb(rgba, DS, mpp=MPP).mask, reference)
    as_float = img.astype(np.float32) / 255
    np.testing.assert_array_equal(tissue_mask_from_rgb(as_float, DS, mpp=MPP).mask, reference)


def test_unknown_mpp_uses_assumed_mpp(he_image):
    img, _ = he_image
    known = tissue_mask_from_rgb(img, DS, mpp=MPP)
    assumed = tissue_mask_from_rgb(img, DS, TissueParams(assumed_mpp=MPP))
    np.testing.assert_array_equal(known.mask, assumed.mask)
    assert assumed.mpp is None


# ----------------------------------------------------------------------------------------------
# TissueMask helpers


def test_to_level0_box_snaps_outward_and_clips():
    mask = np.zeros((10, 20), bool)
    mask[2:5, 3:9] = True
    tm = TissueMask(mask, downsample=3.2, slide_shape=(31, 62))
    assert tm.to_level0_box(3, 2, 6, 3) == (9, 6, 29 - 9, 16 - 6)  # 9.6 -> 9, 28.8 -> 29
    assert tm.to_level0_box(10, 2, 10, 8) == (32, 6, 30, 25)  # clipped to (31, 62)


def test_resize_to():
    mask = np.zeros((4, 6), bool)
    mask[1, 2] = True
    tm = TissueMask(mask, downsample=8.0, slide_shape=(30, 45))
    up = tm.resize_to((8, 12))
    np.testing.assert_array_equal(up, np.kron(mask, np.ones((2, 2), bool)))
    # A pyramid level of downsample 4 whose size was rounded up beyond the mask.
    level = tm.resize_to((9, 13), downsample=4.0)
    assert level.shape == (9, 13)
    np.testing.assert_array_equal(level[:8, :12], up)
    assert not level[8:].any() and not level[:, 12:].any()
    assert tm.resize_to((2, 3)).shape == (2, 3)


# ----------------------------------------------------------------------------------------------
# Pieces


def test_pieces_match_drawn_blobs(he_image):
    img, blobs = he_image
    tm = tissue_mask_from_rgb(img, DS, TissueParams(), mpp=MPP, slide_shape=(4800, 6400))
    pieces = tissue_pieces(tm)
    assert [p.label for p in pieces] == [1, 2, 3]
    areas = [p.area_px for p in pieces]
    assert areas == sorted(areas, reverse=True)
    for piece, blob in zip(pieces, blobs, strict=True):
        rows, cols = np.nonzero(blob)
        expected = (
            cols.min() * DS,
            rows.min() * DS,
            (cols.max() + 1 - cols.min()) * DS,
            (rows.max() + 1 - rows.min()) * DS,
        )
        # Within two mask pixels on every side.
        np.testing.assert_allclose(piece.box, expected, atol=2 * DS)
        assert piece.area_px == pytest.approx(blob.sum() * DS**2, rel=0.05)
        assert piece.area_um2 == pytest.approx(piece.area_px * MPP**2)
        x, y, w, h = piece.mask_box
        assert piece.mask.shape == (h, w)
        assert iou(piece.mask, blob[y : y + h, x : x + w]) > 0.9

    # Only pieces of at least the area asked for.
    big = tissue_pieces(tm, min_area_um2=pieces[1].area_um2)
    assert [p.area_px for p in big] == areas[:2]


def test_pieces_of_equal_area_in_reading_order():
    mask = np.zeros((20, 20), bool)
    mask[12:15, 2:5] = True
    mask[2:5, 12:15] = True
    mask[2:5, 2:5] = True
    mask[10:18, 10:18] = True
    tm = TissueMask(mask, downsample=4.0, params=TissueParams(min_piece_area_um2=0))
    boxes = [p.box for p in tissue_pieces(tm)]
    assert boxes == [(40, 40, 32, 32), (8, 8, 12, 12), (48, 8, 12, 12), (8, 48, 12, 12)]


def test_select_keeps_one_piece():
    mask = np.zeros((20, 20), bool)
    mask[2:8, 2:8] = True
    mask[6:18, 9:18] = True  # its box overlaps the first piece's box
    tm = TissueMask(mask, downsample=2.0, params=TissueParams(min_piece_area_um2=0))
    small = tissue_pieces(tm)[1]
    only = tm.select(small)
    assert only.mask.sum() == 36
    assert only.mask[2:8, 2:8].all()
    assert only.downsample == tm.downsample


# ----------------------------------------------------------------------------------------------
# Tile grids


def brute_force_fractions(mask, ds, tile, shape, sub=1):
    """Tissue fraction of lattice tiles by painting the mask at level 0.

    Level 0 is sampled ``sub`` times per px, which is exact when ``ds * sub`` is an integer.
    """
    height, width = shape
    ys = (np.arange(height * sub) + 0.5) / sub  # level-0 sample centres
    xs = (np.arange(width * sub) + 0.5) / sub
    r = np.floor(ys / ds).astype(int)
    c = np.floor(xs / ds).astype(int)
    inside = (r[:, None] < mask.shape[0]) & (c[None, :] < mask.shape[1])
    level0 = np.zeros((len(ys), len(xs)), bool)
    level0[inside] = mask[
        np.minimum(r, mask.shape[0] - 1)[:, None], np.minimum(c, mask.shape[1] - 1)
    ][inside]
    rows, cols = height // tile, width // tile
    t = tile * sub
    cropped = level0[: rows * t, : cols * t]
    return cropped.reshape(rows, t, cols, t).mean(axis=(1, 3))


@pytest.mark.parametrize(
    ("ds", "tile", "sub"),
    [
        (4.0, 6, 1),  # tiles not aligned to mask pixels
        (4.0, 3, 1),  # tiles smaller than a mask pixel
        (4.0, 8, 1),  # aligned
        (2.5, 4, 2),  # fractional downsample
    ],
)
def test_tile_fractions_match_brute_force(ds, tile, sub):
    rng = np.random.default_rng(7)
    mask = rng.random((37, 53)) < 0.4
    mask[5:20, 10:40] = True
    # The slide extends past the mask in y and ends inside it in x.
    shape = (math.ceil(37 * ds) + 5, math.floor(53 * ds) - 7)
    tm = TissueMask(mask, downsample=ds, slide_shape=shape)
    grid = tile_grid(tm, tile, min_tissue=0.5)
    expected = brute_force_fractions(mask, ds, tile, shape, sub)
    assert grid.shape == expected.shape == (shape[0] // tile, shape[1] // tile)
    assert grid.origin == (0, 0)
    np.testing.assert_allclose(grid.tissue_fraction, expected, atol=1e-9)


def test_min_tissue():
    rng = np.random.default_rng(3)
    tm = TissueMask(rng.random((40, 40)) < 0.5, downsample=4.0)
    grid = tile_grid(tm, 12, min_tissue=0.5)
    np.testing.assert_array_equal(grid.in_tissue, grid.tissue_fraction >= 0.5 - 1e-9)
    assert len(grid) == np.count_nonzero(grid.in_tissue)
    assert len(tile_grid(tm, 12, min_tissue=0.0)) == grid.tissue_fraction.size
    full = tile_grid(tm, 12, min_tissue=1.0)
    assert np.all(full.fractions() > 1 - 1e-9)
    # A tile exactly at the threshold is kept despite rounding.
    half = np.zeros((8, 8), bool)
    half[:, :4] = True
    exact = tile_grid(TissueMask(half, downsample=3.0), 24, min_tissue=0.5)
    assert exact.tissue_fraction[0, 0] == pytest.approx(0.5)
    assert len(exact) == 1


def test_grid_helpers():
    mask = np.zeros((10, 10), bool)
    mask[0:5, 5:10] = True  # top-right quarter
    tm = TissueMask(mask, downsample=10.0)  # level-0 100 x 100
    grid = tile_grid(tm, 25, min_tissue=0.5)
    assert isinstance(grid, TileGrid)
    assert grid.shape == (4, 4)
    np.testing.assert_array_equal(grid.indices(), [[0, 2], [0, 3], [1, 2], [1, 3]])
    np.testing.assert_array_equal(grid.coords(), [[50, 0], [75, 0], [50, 25], [75, 25]])
    np.testing.assert_array_equal(grid.boxes()[:, 2:], 25)
    np.testing.assert_array_equal(grid.boxes()[:, :2], grid.coords())
    assert grid.coords().dtype == np.int64
    assert len(grid) == 4


def test_piece_grids_lie_on_the_slide_lattice(he_image):
    img, _ = he_image
    slide_shape = (SHAPE[0] * DS - 37, SHAPE[1] * DS - 5)
    tm = tissue_mask_from_rgb(img, DS, TissueParams(), mpp=MPP, slide_shape=slide_shape)
    tile = 224
    whole = tile_grid(tm, tile, min_tissue=0.3)
    assert whole.shape == (slide_shape[0] // tile, slide_shape[1] // tile)
    whole_cells = {tuple(rc): i for i, rc in enumerate(whole.indices(lattice=True))}
    whole_coords = whole.coords()

    seen = set()
    for piece in tissue_pieces(tm):
        grid = tile_grid(tm, tile, min_tissue=0.3, box=piece.box)
        assert grid.origin[0] % tile == 0 and grid.origin[1] % tile == 0
        # The grid covers the piece's box (snapped outward, clipped to whole tiles).
        x, y, w, h = piece.box
        assert grid.origin[0] <= x and grid.origin[1] <= y
        assert grid.origin[0] + grid.shape[1] * tile >= min(x + w, whole.shape[1] * tile)
        assert grid.origin[1] + grid.shape[0] * tile >= min(y + h, whole.shape[0] * tile)
        # Its tiles are whole-slide tiles, with the same tissue fraction.
        r0, c0 = grid.lattice_offset
        np.testing.assert_allclose(
            grid.tissue_fraction,
            whole.tissue_fraction[r0 : r0 + grid.shape[0], c0 : c0 + grid.shape[1]],
        )
        for rc, xy in zip(grid.indices(lattice=True), grid.coords(), strict=True):
            i = whole_cells[tuple(rc)]
            np.testing.assert_array_equal(whole_coords[i], xy)
            seen.add(tuple(rc))
    # Every in-tissue tile of the slide belongs to some piece's grid.
    assert seen == set(whole_cells)


def test_box_grid_is_clipped_to_the_slide():
    tm = TissueMask(np.ones((10, 10), bool), downsample=10.0)  # level-0 100 x 100
    grid = tile_grid(tm, 30, min_tissue=0.5, box=(70, -20, 500, 51))
    # Column 2 (60-90) only: column 3 would end at 120 > 100; rows 0-1 (y up to 31).
    assert grid.origin == (60, 0)
    assert grid.shape == (2, 1)
    assert len(grid) == 2
    empty = tile_grid(tm, 30, box=(95, 95, 3, 3))
    assert empty.shape[0] * empty.shape[1] == 0
    assert len(empty) == 0
    assert empty.coords().shape == (0, 2)


# ----------------------------------------------------------------------------------------------
# Slides


@dataclass
class FakeLevel:
    index: int
    shape: tuple[int, int]
    downsample: float
    tile_shape: tuple[int, int] = (64, 64)


@dataclass
class FakeSlide:
    """The attributes of ``slide.reader.Slide`` that tissue detection uses."""

    levels: list
    level_info: list
    mpp: tuple[float, float] | None
    rgb: bool = True
    path: Path = field(default_factory=lambda: Path("fake.tif"))

    def level_for(self, mpp=None, downsample=None):
        if mpp is not None:
            if self.mpp is None:
                raise ValueError("mpp unknown")
            downsample = mpp / (0.5 * (self.mpp[0] + self.mpp[1]))
        fits = [info.downsample <= downsample * (1 + 1e-9) for info in self.level_info]
        return max(i for i, ok in enumerate(fits) if ok) if any(fits) else 0

    def read_region(self, level, x, y, w, h):  # pragma: no cover - not used here
        raise NotImplementedError


def fake_slide(base, mpp, reps=(8, 2, 1)):
    """Pyramid whose levels repeat the pixels of ``base`` ``reps`` times, level 0 first.

    Args:
        base: (h, w, 3), (h, w) or (c, h, w)-like image of the coarsest level.
        mpp: Level-0 µm per px or None.
        reps: Repetition of ``base`` per level.
    """
    levels, info = [], []
    for i, rep in enumerate(reps):
        arr = np.repeat(np.repeat(base, rep, axis=0), rep, axis=1)
        levels.append(da.from_array(arr, chunks=(64, 64, *arr.shape[2:])))
        info.append(FakeLevel(i, arr.shape[:2], reps[0] / rep))
    rgb = base.ndim == 3 and base.shape[-1] == 3
    return FakeSlide(levels, info, None if mpp is None else (mpp, mpp), rgb=rgb)


@pytest.fixture
def slide_image(rng):
    # Coarsest level (100, 150) at downsample 8; level 0 (800, 1200).
    shape = (100, 150)
    img = background(rng, shape)
    blob = ellipse(shape, 50, 75, 30, 45)
    paint(img, blob, HE_STROMA, HE_NUCLEI, 0.25, rng)
    return to_uint8(img), blob


@pytest.mark.parametrize(
    ("mpp", "params", "level", "downsample", "mask_shape"),
    [
        (1.0, TissueParams(mask_mpp=8), 2, 8.0, (100, 150)),  # a level at the target
        (1.0, TissueParams(mask_mpp=16), 2, 16.0, (50, 75)),  # beyond the pyramid: 2x2 blocks
        (1.0, TissueParams(mask_mpp=4), 1, 4.0, (200, 300)),  # a level at the target
        (1.0, TissueParams(mask_mpp=6), 1, 4.0, (200, 300)),  # the finer level, no blocks
        (1.0, TissueParams(mask_mpp=2), 0, 2.0, (400, 600)),  # level 0 in 2x2 blocks
        (0.5, TissueParams(mask_mpp=8), 2, 16.0, (50, 75)),  # finer slide: ds 16 asked
        (None, TissueParams(), 2, 32.0, (25, 37)),  # mask_downsample 32; partial block trimmed
        (None, TissueParams(mask_downsample=4), 1, 4.0, (200, 300)),
        (1.0, TissueParams(max_mask_side=60), 2, 24.0, (33, 50)),  # too big: 3x3 blocks
    ],
)
def test_tissue_mask_level_choice(slide_image, mpp, params, level, downsample, mask_shape):
    base, blob = slide_image
    slide = fake_slide(base, mpp=mpp)
    tm = tissue_mask(slide, params)
    assert tm.level == level
    assert tm.downsample == downsample
    assert tm.mask.shape == mask_shape
    assert tm.slide_shape == (800, 1200)
    assert tm.mpp == (None if mpp is None else (mpp, mpp))
    assert iou(tm.resize_to((100, 150), downsample=8.0), blob) >= 0.9


def test_tissue_mask_on_grey_and_multichannel_slides(slide_image):
    base, blob = slide_image
    grey = fake_slide(base.mean(axis=-1).astype(np.uint8), mpp=1.0)
    assert not grey.rgb
    tm = tissue_mask(grey, TissueParams(mask_mpp=8))
    assert iou(tm.mask, blob) >= 0.9
    with pytest.raises(ValueError, match="saturation"):
        tissue_mask(grey, TissueParams(method="saturation"))
    channels = fake_slide(np.zeros((100, 150, 5), np.uint16), mpp=1.0)
    with pytest.raises(SlideError, match=r"^fake\.tif: tissue detection needs an 8-bit RGB"):
        tissue_mask(channels)


# ----------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "otsu"},
        {"closing_radius_um": -1},
        {"opening_radius_um": float("nan")},
        {"max_hole_area_um2": -5},
        {"min_piece_area_um2": float("inf")},
        {"mask_mpp": 0},
        {"mask_downsample": 0.5},
        {"max_mask_side": 0},
        {"assumed_mpp": -0.5},
        {"min_saturation": 1.5},
        {"white_level": 0.1, "black_level": 0.2},
        {"glass_sigmas": -1},
        # sizes that would cost minutes or memory without finding more tissue
        {"mask_mpp": 1e-6},
        {"closing_radius_um": 1e9},
        {"smooth_sigma_um": 5000},
        {"max_mask_side": 10**9},
        {"assumed_mpp": 1e9},
    ],
)
def test_params_validation(kwargs):
    with pytest.raises(ValueError):
        TissueParams(**kwargs)


def test_input_validation(he_image):
    img, _ = he_image
    tm = tissue_mask_from_rgb(img, DS, mpp=MPP)
    with pytest.raises(ValueError, match="empty"):
        tissue_mask_from_rgb(np.zeros((0, 10, 3), np.uint8), DS)
    with pytest.raises(ValueError, match="shape"):
        tissue_mask_from_rgb(np.zeros((10, 10, 2), np.uint8), DS)
    with pytest.raises(ValueError, match="downsample"):
        tissue_mask_from_rgb(img, 0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tissue_mask_from_rgb(img.astype(np.float32), DS)
    with pytest.raises(ValueError, match="mpp"):
        tissue_mask_from_rgb(img, DS, mpp=(0.5, 0.5, 0.5))
    for bad in (0, -256, 2.5, True):
        with pytest.raises(ValueError, match="tile_size"):
            tile_grid(tm, bad)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="min_tissue"):
            tile_grid(tm, 256, min_tissue=bad)
    with pytest.raises(ValueError, match="box"):
        tile_grid(tm, 256, box=(0, 0, -10, 10))
    with pytest.raises(ValueError, match="min_area_um2"):
        tissue_pieces(tm, min_area_um2=-1)
    with pytest.raises(ValueError, match="2-D"):
        TissueMask(np.zeros((3, 3, 3), bool), 2.0)
