"""The distractors of an IHC slide drawn over a tile: vessels, folds and pen marks.

Each takes the tile's transmitted light and level-0 pixel centres and gives it back with
the distractor drawn (the pen: the ink's own transmitted light, as it lies on the glass
too). The DAB blush and stained ducts are drawn with the stroma and the ducts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .ihc_shapes import (
    arc_distance,
    arc_extent,
    band_distance,
    band_extent,
    blob_depth,
    blob_extent,
)
from .ihc_stains import lerp
from .shapes import value_noise

# Pen inks: blue, green, black (optical density per unit, R, G, B).
_INKS = np.array([[1.3, 0.8, 0.25], [1.1, 0.45, 0.8], [1.0, 1.0, 0.9]], dtype=np.float32)
# Packed red blood cells: dark red-brown, and like DAB they absorb blue and green.
_RBC = np.array([0.55, 1.35, 1.25], dtype=np.float32)


def _misses(extent: Sequence[float], xs: np.ndarray, ys: np.ndarray) -> bool:
    x0, y0, x1, y1 = extent
    return x1 < xs[0] or x0 > xs[-1] or y1 < ys[0] or y0 > ys[-1]


def vessel_light(
    light: np.ndarray,
    vessels: Sequence[dict[str, Any]],
    wall: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    d: float,
    px: float,
) -> np.ndarray:
    """Blood vessels packed with red cells: dark red-brown blobs with a thin wall.

    Args:
        light: (H, W, 3) transmitted light of the tile so far.
        vessels: The vessels' blob shapes.
        wall: (3,) transmitted light of a vessel wall.
        xs: Level-0 x of the tile's pixel centres.
        ys: Level-0 y of the tile's pixel centres.
        d: Level-0 px per output pixel.
        px: Level-0 px per µm.
    """
    for vessel in vessels:
        if _misses(blob_extent(vessel), xs, ys):
            continue
        depth = blob_depth(vessel, xs, ys)
        if not (depth > -0.05).any():
            continue
        aa = d / vessel["axes"][1]
        outer = np.clip(depth / aa + 0.5, 0.0, 1.0)
        lumen = np.clip((depth - 0.2) / aa + 0.5, 0.0, 1.0)
        light = lerp(light, wall, outer - lumen)
        amount = np.ones_like(depth)
        cell_px = 7.0 * px
        if cell_px / d >= 2.0:  # red cells, 7 µm across
            amount = 0.75 + 0.5 * value_noise(vessel["noise_seed"] + 7, xs, ys, cell_px / 2)
        rbc = np.exp(-amount[:, :, None] * _RBC).astype(np.float32)
        light = lerp(light, rbc, lumen)
    return light


def fold_light(
    light: np.ndarray,
    folds: Sequence[dict[str, Any]],
    xs: np.ndarray,
    ys: np.ndarray,
    d: float,
    px: float,
) -> np.ndarray:
    """Tissue folded onto itself: the stains' optical density doubled over a band, with a
    darker crease along its edges (arguments as :func:`vessel_light`)."""
    for fold in folds:
        if _misses(band_extent(fold), xs, ys):
            continue
        dist = band_distance(fold, xs, ys)
        inside = np.clip(-dist / d + 0.5, 0.0, 1.0)
        if not inside.any():
            continue
        crease_px = max(3.0 * px, d)
        crease = np.clip(1.0 - np.abs(dist) / crease_px, 0.0, 1.0) * 0.6
        power = (1.0 + 1.2 * inside + crease).astype(np.float32)
        light = light ** power[:, :, None]
    return light


def pen_light(
    pens: Sequence[dict[str, Any]], xs: np.ndarray, ys: np.ndarray, d: float, px: float
) -> np.ndarray | None:
    """Light (H, W, 3) let through by pen ink, on glass and tissue alike (None: no ink on
    the tile); arguments as :func:`vessel_light`."""
    out = None
    for pen in pens:
        if _misses(arc_extent(pen), xs, ys):
            continue
        dist = arc_distance(pen, xs, ys)
        alpha = np.clip((pen["width"] / 2.0 - dist) / d + 0.5, 0.0, 1.0)
        if not alpha.any():
            continue
        streak_px = 20.0 * px
        strength: np.ndarray | np.float32 = np.float32(0.9)
        if streak_px / d >= 2.0:  # the marker's streaks
            noise = value_noise(pen["noise_seed"], xs, ys, streak_px, streak_px / 4)
            strength = 0.7 + 0.4 * noise
        light = np.exp(-(alpha * strength)[:, :, None] * _INKS[pen["ink"]]).astype(np.float32)
        out = light if out is None else out * light
    return out
