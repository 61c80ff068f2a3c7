"""Tissue detection on real slide files: synthetic slides written, read back, and checked."""

from __future__ import annotations

import numpy as np
import pytest

from napari_slide_attention.slide.reader import open_slide
from napari_slide_attention.slide.synthetic import (
    read_sidecar,
    tissue_mask_truth,
    write_synthetic_slide,
)
from napari_slide_attention.slide.tissue import tile_grid, tissue_mask, tissue_pieces


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.mark.parametrize(("seed", "label"), [(0, "carcinoma"), (1, "normal"), (5, "low-grade")])
def test_mask_recovers_the_synthetic_tissue_pieces(tmp_path, seed, label):
    path = tmp_path / f"needle-{seed}.tif"
    write_synthetic_slide(path, size=(8192, 6144), label=label, seed=seed)
    truth = read_sidecar(path)
    slide = open_slide(path)
    mask = tissue_mask(slide)
    expected = tissue_mask_truth(truth, mask.downsample)[: mask.mask.shape[0], : mask.mask.shape[1]]
    assert _iou(mask.mask, expected) >= 0.9
    pieces = tissue_pieces(mask, mpp=slide.mpp)
    assert len(pieces) == len(truth["pieces"])

    # Each true piece has a detected piece whose edges lie within 3 mask pixels of its own.
    def edges(box):
        x, y, w, h = box
        return np.array([x, y, x + w, y + h])

    tolerance = 3 * mask.downsample
    for true_piece in truth["pieces"]:
        true_edges = edges(true_piece["box"])
        assert any(np.all(np.abs(edges(p.box) - true_edges) <= tolerance) for p in pieces), (
            true_piece["box"],
            [p.box for p in pieces],
        )
    # Every lesion lies in tissue tiles of the grid: the models will see it.
    grid = tile_grid(mask, 256, min_tissue=0.25)
    boxes = grid.boxes()
    for lesion in truth["lesions"]:
        x, y, w, h = lesion["box"]
        cx, cy = x + w / 2, y + h / 2
        inside = (
            (boxes[:, 0] <= cx)
            & (cx < boxes[:, 0] + 256)
            & (boxes[:, 1] <= cy)
            & (cy < boxes[:, 1] + 256)
        )
        assert inside.any()
