"""Level-0 boxes: the one box type and the one overlap test.

A box is ``(x, y, w, h)`` in level-0 pixels and covers the half-open ranges
``[x, x + w) × [y, y + h)``: two boxes that only touch do not overlap. Lesions, tissue
pieces, tiles, regions and artefacts are all boxes of this kind.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "Box",
    "box_cells",
    "box_centres",
    "cell_boxes",
    "on_mask",
    "overlap_area",
    "overlapping",
    "overlaps",
]

Box = tuple[int, int, int, int]  # level-0 (x, y, w, h)


def overlap_area(a: Sequence[float], b: Sequence[float]) -> float:
    """The area two boxes share (0 when they are apart or only touch)."""
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0)


def overlaps(a: Sequence[float], b: Sequence[float], gap: float = 0) -> bool:
    """Whether two boxes share area, or come closer than ``gap`` px when it is positive."""
    return (
        a[0] < b[0] + b[2] + gap
        and b[0] < a[0] + a[2] + gap
        and a[1] < b[1] + b[3] + gap
        and b[1] < a[1] + a[3] + gap
    )


def overlapping(boxes: np.ndarray, others: Sequence[Sequence[float]]) -> np.ndarray:
    """(N,) bool: which of ``boxes`` ((N, 4) level-0) share area with any of ``others``."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    hit = np.zeros(len(boxes), dtype=bool)
    x0, y0 = boxes[:, 0], boxes[:, 1]
    x1, y1 = x0 + boxes[:, 2], y0 + boxes[:, 3]
    for bx, by, bw, bh in others:
        hit |= (x0 < bx + bw) & (bx < x1) & (y0 < by + bh) & (by < y1)
    return hit


def box_cells(
    boxes: Sequence[Sequence[float]],
    origin: tuple[int, int],
    tile_size: int,
    shape: tuple[int, int],
) -> np.ndarray:
    """(H', W') bool: the cells of a grid (level-0 origin, tile edge) that overlap any box."""
    out = np.zeros(tuple(shape), dtype=bool)
    x0, y0 = origin
    t = tile_size
    for x, y, w, h in boxes:
        c0, c1 = math.floor((x - x0) / t), math.ceil((x + w - x0) / t)
        r0, r1 = math.floor((y - y0) / t), math.ceil((y + h - y0) / t)
        out[max(r0, 0) : max(r1, 0), max(c0, 0) : max(c1, 0)] = True
    return out


def cell_boxes(
    cells: np.ndarray, cell_px: float, tile_px: int, slide_size: tuple[int, int]
) -> np.ndarray:
    """(N, 4) int64 level-0 square boxes of ``tile_px`` centred on grid cells, shifted to
    lie inside the slide.

    Args:
        cells: (N, 2) (row, col) of a grid of ``cell_px`` level-0 px per cell from (0, 0).
        cell_px: level-0 px per cell.
        tile_px: box edge in level-0 px.
        slide_size: level-0 (width, height).
    """
    cells = np.asarray(cells, dtype=np.float64).reshape(-1, 2)
    centres = (cells + 0.5) * cell_px  # (N, 2) y, x
    x0 = np.round(centres[:, 1] - tile_px / 2)
    y0 = np.round(centres[:, 0] - tile_px / 2)
    width, height = slide_size
    x0 = np.clip(x0, 0, max(0, width - tile_px))
    y0 = np.clip(y0, 0, max(0, height - tile_px))
    n = len(cells)
    return np.stack([x0, y0, np.full(n, tile_px), np.full(n, tile_px)], 1).astype(np.int64)


def on_mask(points: np.ndarray, mask: np.ndarray, downsample: float) -> np.ndarray:
    """Whether level-0 points fall on True pixels of a mask drawn at ``downsample``.

    Pixel (i, j) of the mask covers level-0 [j·d, (j+1)·d) × [i·d, (i+1)·d) (as the
    synthetic slides' truth masks and the tissue masks are drawn); a point outside the
    mask is False. Where a tile "is" on a mask (tumour, tissue) is where its centre is:
    ``on_mask(box_centres(boxes), mask, d)``.

    Args:
        points: (..., 2) level-0 (x, y).
        mask: (h, w) bool.
        downsample: level-0 px per mask pixel.

    Returns:
        (...,) bool.
    """
    points = np.asarray(points, dtype=np.float64)
    cols = np.floor(points[..., 0] / downsample).astype(np.int64)
    rows = np.floor(points[..., 1] / downsample).astype(np.int64)
    inside = (rows >= 0) & (rows < mask.shape[0]) & (cols >= 0) & (cols < mask.shape[1])
    out = np.zeros(points.shape[:-1], dtype=bool)
    out[inside] = np.asarray(mask, dtype=bool)[rows[inside], cols[inside]]
    return out


def box_centres(boxes: np.ndarray) -> np.ndarray:
    """(N, 2) level-0 (x, y) centres of (N, 4) level-0 boxes."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return boxes[:, :2] + boxes[:, 2:] / 2
