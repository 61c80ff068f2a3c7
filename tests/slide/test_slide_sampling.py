"""Tissue pieces as samples: labels, grids, chunked reads, augmentation."""

from __future__ import annotations

import numpy as np
import pytest

from napari_slide_attention.slide.boxes import box_cells
from napari_slide_attention.slide.reader import open_slide
from napari_slide_attention.slide.sampling import (
    Augmentation,
    piece_label,
    piece_tiles,
    read_level_for,
    slide_pieces,
    tile_edge_px,
    tissue_statistics,
)


def test_piece_label_is_the_highest_risk_lesion_inside():
    risk = (0, 2, 1, 3)  # class 1 is riskier than class 2 here
    box = (0, 0, 100, 100)
    lesions = [((10, 10, 5, 5), 1), ((50, 50, 5, 5), 2), ((500, 500, 5, 5), 3)]
    assert piece_label(box, lesions, 0, risk) == 1
    assert piece_label(box, [], 0, risk) == 0


def test_pieces_carry_grids_on_the_slide_lattice_and_lesion_labels(tiny_cohort):
    entry = next(e for e in tiny_cohort if e.label == 3)
    with open_slide(entry.slide) as slide:
        tile = tile_edge_px(slide, 64.0)
        assert tile == 128  # 64 µm at 0.5 µm/px
        pieces = slide_pieces(slide, tile, label=3, lesions=entry.lesions, risk=(0, 1, 2, 3))
    assert pieces
    for p in pieces:
        assert p.grid.origin[0] % tile == 0 and p.grid.origin[1] % tile == 0
        has_lesion = bool(p.lesions)
        assert p.label == (3 if has_lesion else 0)
        assert p.cells.shape == (p.n_tiles,)
    assert any(p.lesions for p in pieces)
    with_lesion = next(p for p in pieces if p.lesions)
    grid = with_lesion.grid
    boxes = [b for b, _ in with_lesion.lesions]
    assert box_cells(boxes, grid.origin, grid.tile_size, grid.shape).any()


def test_without_lesion_boxes_every_piece_takes_the_slide_label(tiny_cohort):
    entry = next(e for e in tiny_cohort if e.label == 2)
    with open_slide(entry.slide) as slide:
        pieces = slide_pieces(slide, 128, label=2, risk=(0, 1, 2, 3))
    assert {p.label for p in pieces} == {2}


def test_read_level_is_the_coarsest_that_does_not_upsample(tiny_cohort):
    with open_slide(tiny_cohort.entries[0].slide) as slide:
        assert read_level_for(slide, 128, 64) == 1  # 2 level-0 px per input px
        assert read_level_for(slide, 128, 128) == 0
        assert read_level_for(slide, 128, 100) == 0  # 1.28: level 1 would upsample
        coarsest = max(i.index for i in slide.level_info if i.downsample <= 8)
        assert coarsest >= 1 and read_level_for(slide, 512, 64) == coarsest


def test_piece_tiles_give_the_grid_tiles_in_order_and_repeat_identically(tiny_cohort):
    entry = tiny_cohort.entries[0]
    with open_slide(entry.slide) as slide:
        sample = slide_pieces(slide, 128)[0]
        tiles = piece_tiles(slide, sample, 1, chunk_tiles=7)
        first = np.concatenate([b.copy() for b in tiles])
        again = np.concatenate([b.copy() for b in tiles])
        np.testing.assert_array_equal(first, again)
        assert first.shape == (sample.n_tiles, 64, 64, 3) and first.dtype == np.uint8
        sizes = [len(b) for b in tiles]
        assert max(sizes) <= 7 and len(sizes) == -(-sample.n_tiles // 7)
        assert min(sizes) >= max(sizes) - len(sizes)  # balanced: no tiny last batch
        np.testing.assert_array_equal(tiles.cells, sample.cells)
        assert tiles.shape == sample.grid_shape and len(tiles) == sample.n_tiles
        # each tile is read_region of its box at level 1
        boxes = sample.grid.boxes()
        for k in (0, len(boxes) // 2, len(boxes) - 1):
            x, y, w, h = (int(v) for v in boxes[k])
            np.testing.assert_array_equal(first[k], slide.read_region(1, x, y, w, h))


@pytest.mark.parametrize("rotations", [1, 2, 3])
@pytest.mark.parametrize("flip", [False, True])
def test_rotated_grid_is_the_grid_of_the_rotated_piece(tiny_cohort, rotations, flip):
    entry = tiny_cohort.entries[1]
    with open_slide(entry.slide) as slide:
        sample = slide_pieces(slide, 128)[0]
        plain_tiles = piece_tiles(slide, sample, 1)
        plain = np.concatenate([b.copy() for b in plain_tiles])
        cells, shape = plain_tiles.cells, plain_tiles.shape
        aug = Augmentation(1.0, rotations, flip)
        rot_tiles = piece_tiles(slide, sample, 1, augmentation=aug)
        rotated = np.concatenate([b.copy() for b in rot_tiles])
        rot_cells, rot_shape = rot_tiles.cells, rot_tiles.shape

    def mosaic(tiles, cells, shape):
        h, w = shape
        out = np.zeros((h * 64, w * 64, 3), np.uint8)
        for t, c in zip(tiles, cells.tolist(), strict=True):
            r, q = divmod(c, w)
            out[r * 64 : (r + 1) * 64, q * 64 : (q + 1) * 64] = t
        return out

    expected = np.rot90(mosaic(plain, cells, shape), rotations)
    if flip:
        expected = expected[:, ::-1]
    np.testing.assert_array_equal(mosaic(rotated, rot_cells, rot_shape), expected)


def test_scale_augmentation_lays_the_grid_with_a_scaled_tile(tiny_cohort):
    with open_slide(tiny_cohort.entries[2].slide) as slide:
        sample = slide_pieces(slide, 128)[0]
        bigger = sample.augmented(Augmentation(1.2), 0.5)
        assert bigger.grid.tile_size == 154 and bigger.n_tiles < sample.n_tiles
        assert next(iter(piece_tiles(slide, bigger, 1))).shape[1:3] == (77, 77)
    draws = {Augmentation.draw(np.random.default_rng(s)) for s in range(50)}
    assert all(0.8 <= d.scale <= 1.2 for d in draws)
    assert {d.rotations for d in draws} == {0, 1, 2, 3} and {d.flip for d in draws} == {0, 1}


def test_tissue_statistics_leave_out_glass():
    tissue = np.full((8, 8, 3), (200, 100, 150), np.uint8)
    glass = np.full((8, 8, 3), 245, np.uint8)
    mean, std = tissue_statistics([tissue, glass])
    np.testing.assert_allclose(mean, np.array([200, 100, 150]) / 255, atol=1e-6)
    assert max(std) < 1e-3
    with pytest.raises(ValueError, match="no tissue"):
        tissue_statistics([glass])


def test_a_tile_is_on_a_mask_where_its_centre_is():
    from napari_slide_attention.slide.boxes import box_centres, on_mask

    # a tumour mask at downsample 8: level-0 x in [16, 32), y in [8, 24) is tumour
    mask = np.zeros((4, 6), dtype=bool)
    mask[1:3, 2:4] = True
    boxes = np.array(
        [
            [12, 4, 16, 16],  # centre (20, 12): tumour, though most of the box is not
            [0, 0, 16, 16],  # centre (8, 8): stroma, though it touches the tumour's corner
            [24, 16, 7, 7],  # centre (27.5, 19.5): tumour
            [40, 40, 16, 16],  # centre (48, 48): beyond the mask: not tumour
            [-20, -20, 8, 8],  # off the slide
        ]
    )
    assert box_centres(boxes)[0].tolist() == [20.0, 12.0]
    assert on_mask(box_centres(boxes), mask, 8.0).tolist() == [True, False, True, False, False]
    # any leading shape: a grid of cell centres
    cells = np.stack(np.meshgrid([4.0, 20.0], [4.0, 12.0]), axis=-1)  # (2, 2, 2) x, y
    assert on_mask(cells, mask, 8.0).tolist() == [[False, False], [False, True]]
