"""The shapes of a synthetic IHC slide: cells, tumour regions, folds and pen strokes.

Tumour regions, vessels, ducts and stain blushes are noisy rotated ellipses of the same
family as the tissue pieces (:func:`.shapes.piece_depth`); folds are wavy bands and pen
marks arcs. Cells are a jittered-lattice Voronoi tessellation. Like the H&E shapes, each
is a pure function of level-0 positions, so any window of any level gives the same values
whichever caller (renderer tile, truth mask, layout check) asks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .shapes import centres, hash01, piece_depth, piece_extent, pieces_mask, span, value_noise


@dataclass(frozen=True)
class Cells:
    """The Voronoi cell of every pixel of a grid (level-0 px).

    Attributes:
        index: (H, W) flat index of the pixel's cell in the lattice window.
        lattice_x: (ny, nx) lattice column of each cell of the window.
        lattice_y: (ny, nx) lattice row of each cell of the window.
        centre_x: (ny, nx) level-0 x of each cell's centre.
        centre_y: (ny, nx) level-0 y of each cell's centre.
        dx: (H, W) pixel x minus its cell's centre x.
        dy: (H, W) pixel y minus its cell's centre y.
        edge: (H, W) distance to the boundary with the nearest neighbouring cell.
        index2: (H, W) flat index of the second-nearest cell (the neighbour across the
            nearest boundary).
        dx2: (H, W) pixel x minus the second-nearest centre's x.
        dy2: (H, W) pixel y minus the second-nearest centre's y.
    """

    index: np.ndarray
    lattice_x: np.ndarray
    lattice_y: np.ndarray
    centre_x: np.ndarray
    centre_y: np.ndarray
    dx: np.ndarray
    dy: np.ndarray
    edge: np.ndarray
    index2: np.ndarray
    dx2: np.ndarray
    dy2: np.ndarray


def voronoi(
    seed: int, xs: np.ndarray, ys: np.ndarray, spacing: float, jitter: float = 0.85
) -> Cells:
    """The cells of a jittered square lattice on the grid ``ys x xs`` (level-0 px).

    Every lattice square holds one cell centre, so the nearest centre of a pixel is among
    the 3 x 3 squares around its own; the boundary distance is the distance to the
    bisector with the second-nearest centre.

    Args:
        seed: Seed of the centres' hash.
        xs: Level-0 x of the output pixel centres (increasing).
        ys: Level-0 y of the output pixel centres (increasing).
        spacing: Lattice spacing, level-0 px (the mean cell diameter).
        jitter: How far a centre strays from its square's middle, as a share of the square.
    """
    gx = np.floor(xs / spacing).astype(np.int64)
    gy = np.floor(ys / spacing).astype(np.int64)
    ix0, iy0 = int(gx[0]) - 1, int(gy[0]) - 1
    nx, ny = int(gx[-1]) - ix0 + 2, int(gy[-1]) - iy0 + 2
    lx = np.arange(ix0, ix0 + nx)[None, :] + np.zeros((ny, 1), dtype=np.int64)
    ly = np.arange(iy0, iy0 + ny)[:, None] + np.zeros((1, nx), dtype=np.int64)
    cxl = (lx + 0.5 + jitter * (hash01(seed, lx, ly) - 0.5)) * spacing
    cyl = (ly + 0.5 + jitter * (hash01(seed + 1, lx, ly) - 0.5)) * spacing
    jx = (gx - ix0)[None, :]
    jy = (gy - iy0)[:, None]
    px = xs[None, :]
    py = ys[:, None]
    shape = (ys.size, xs.size)
    best = np.full(shape, np.inf)
    second = np.full(shape, np.inf)
    best_i = np.zeros(shape, dtype=np.intp)
    second_i = np.zeros(shape, dtype=np.intp)
    bx, by = np.zeros(shape), np.zeros(shape)
    sx, sy = np.zeros(shape), np.zeros(shape)
    for oy in (-1, 0, 1):
        for ox in (-1, 0, 1):
            flat = (jy + oy) * nx + (jx + ox)  # (H, W)
            cx = cxl.ravel()[flat]
            cy = cyl.ravel()[flat]
            d2 = (px - cx) ** 2 + (py - cy) ** 2
            closer = d2 < best
            runner = ~closer & (d2 < second)
            second = np.where(closer, best, np.where(runner, d2, second))
            sx = np.where(closer, bx, np.where(runner, cx, sx))
            sy = np.where(closer, by, np.where(runner, cy, sy))
            second_i = np.where(closer, best_i, np.where(runner, flat, second_i))
            best = np.where(closer, d2, best)
            bx = np.where(closer, cx, bx)
            by = np.where(closer, cy, by)
            best_i = np.where(closer, flat, best_i)
    gap = np.sqrt((sx - bx) ** 2 + (sy - by) ** 2)
    edge = (second - best) / (2.0 * np.maximum(gap, 1e-9))
    return Cells(
        index=best_i,
        lattice_x=lx,
        lattice_y=ly,
        centre_x=cxl,
        centre_y=cyl,
        dx=(px - bx).astype(np.float32),
        dy=(py - by).astype(np.float32),
        edge=edge.astype(np.float32),
        index2=second_i,
        dx2=(px - sx).astype(np.float32),
        dy2=(py - sy).astype(np.float32),
    )


def blob_depth(blob: Mapping[str, Any], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Depth (> 0 inside, about 1 at the centre) of a noisy ellipse: a tumour region, a
    vessel, a duct or a stain blush, all of the tissue pieces' shape family."""
    return piece_depth(blob, xs, ys)


def blob_extent(blob: Mapping[str, Any]) -> tuple[float, float, float, float]:
    """Level-0 ``(x0, y0, x1, y1)`` outside which a blob's depth is never positive."""
    return piece_extent(blob)


def band_distance(fold: Mapping[str, Any], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Signed distance (level-0 px, < 0 inside) to the edge of a fold's wavy band.

    A fold is a strip of tissue lying on itself: ``length`` x ``width`` around ``center``
    along ``angle``, its midline bent by low-frequency noise, its ends tapered.
    """
    cx, cy = fold["center"]
    c, s = math.cos(fold["angle"]), math.sin(fold["angle"])
    dx = (xs - cx)[None, :]
    dy = (ys - cy)[:, None]
    u = dx * c + dy * s  # along the band
    v = -dx * s + dy * c  # across it
    half_len = fold["length"] / 2.0
    bend = value_noise(fold["noise_seed"], xs, ys, fold["length"] / 3.0) - 0.5
    v = v - bend * fold["width"] * 1.5
    taper = np.sqrt(np.clip(1.0 - (u / half_len) ** 2, 0.0, 1.0))
    return np.abs(v) - fold["width"] / 2.0 * taper


def arc_distance(pen: Mapping[str, Any], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Distance (level-0 px) to the midline of a pen stroke: an arc of a circle."""
    cx, cy = pen["center"]
    radius = pen["radius"]
    a0, a1 = pen["angles"]
    dx = (xs - cx)[None, :]
    dy = (ys - cy)[:, None]
    r = np.sqrt(dx * dx + dy * dy)
    # Angle measured from the arc's middle, so the span test needs no wrap-around.
    mid = (a0 + a1) / 2.0
    half = abs(a1 - a0) / 2.0
    theta = np.arctan2(
        dy * math.cos(mid) - dx * math.sin(mid), dx * math.cos(mid) + dy * math.sin(mid)
    )
    on_arc = np.abs(r - radius)
    ends = []
    for a in (a0, a1):
        ex, ey = cx + radius * math.cos(a), cy + radius * math.sin(a)
        ends.append(np.sqrt((xs[None, :] - ex) ** 2 + (ys[:, None] - ey) ** 2))
    return np.where(np.abs(theta) <= half, on_arc, np.minimum(ends[0], ends[1]))


def arc_extent(pen: Mapping[str, Any]) -> tuple[float, float, float, float]:
    """Level-0 ``(x0, y0, x1, y1)`` of a pen stroke, its width included."""
    cx, cy = pen["center"]
    radius = pen["radius"]
    a0, a1 = pen["angles"]
    angles = np.linspace(a0, a1, 65)
    px = cx + radius * np.cos(angles)
    py = cy + radius * np.sin(angles)
    pad = pen["width"] / 2.0 + 2.0
    return (
        float(px.min() - pad),
        float(py.min() - pad),
        float(px.max() + pad),
        float(py.max() + pad),
    )


def band_extent(fold: Mapping[str, Any]) -> tuple[float, float, float, float]:
    """Level-0 ``(x0, y0, x1, y1)`` outside which a fold's band never reaches."""
    cx, cy = fold["center"]
    reach = fold["length"] / 2.0 + fold["width"] * 1.5 + 2.0
    return cx - reach, cy - reach, cx + reach, cy + reach


def tumour_mask(
    pieces: Sequence[Mapping[str, Any]],
    regions: Sequence[Mapping[str, Any]],
    x: int,
    y: int,
    w: int,
    h: int,
    downsample: float,
) -> np.ndarray:
    """Tumour mask of output pixels ``[y, y + h) x [x, x + w)`` at ``downsample``: inside a
    tumour region and inside the tissue."""
    xs = centres(x, w, downsample)
    ys = centres(y, h, downsample)
    mask = np.zeros((h, w), dtype=bool)
    for region in regions:
        x0, y0, x1, y1 = blob_extent(region)
        sx, sy = span(xs, x0, x1), span(ys, y0, y1)
        if sx.start >= sx.stop or sy.start >= sy.stop:
            continue
        # Row blocks keep the float64 temporaries small for large regions.
        block = max(1, 2**21 // max(sx.stop - sx.start, 1))
        for r0 in range(sy.start, sy.stop, block):
            r1 = min(r0 + block, sy.stop)
            mask[r0:r1, sx] |= blob_depth(region, xs[sx], ys[r0:r1]) > 0.0
    if mask.any():
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        tissue = pieces_mask(pieces, x + c0, y + r0, c1 - c0, r1 - r0, downsample)
        mask[r0:r1, c0:c1] &= tissue
    return mask
