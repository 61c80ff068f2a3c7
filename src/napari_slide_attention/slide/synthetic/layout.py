"""Where a synthetic slide's tissue pieces and lesions go, chosen from the seed."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from ..boxes import overlaps
from .shapes import pieces_mask

# Coarse grid used to place lesions: about this many pixels along the longest side.
_LAYOUT_GRID = 1024
# Lesions are meant to be needles: warn when they exceed this share of the tissue.
_MAX_LESION_FRACTION = 0.01


def make_layout(
    width: int,
    height: int,
    seed: int,
    *,
    label_index: int,
    n_classes: int,
    n_pieces: int | None,
    n_lesions: int | None,
    lesion_size: int,
    mixed: bool,
) -> dict[str, list[dict[str, Any]]]:
    """Choose tissue pieces and lesion positions from the seed."""
    rng = np.random.default_rng(seed)
    if n_pieces is None:
        n_pieces = int(rng.integers(1, 4))
    if n_lesions is None:
        n_lesions = 0 if label_index == 0 else int(rng.integers(2, 5))

    # One cell per piece along the long side, so pieces never touch: each stays inside its
    # cell minus a margin, with background in between.
    horizontal = width >= height
    long_side = width if horizontal else height
    cell_len = long_side / n_pieces
    pieces = []
    for k in range(n_pieces):
        if horizontal:
            cw, ch = cell_len, float(height)
            ccx, ccy = (k + 0.5) * cell_len, height / 2.0
        else:
            cw, ch = float(width), cell_len
            ccx, ccy = width / 2.0, (k + 0.5) * cell_len
        amp = 0.12 + 0.1 * rng.random()
        # Elongated cells get elongated pieces, or the pieces would be tiny.
        aspect = min(cw, ch) / max(cw, ch)
        lo = max(0.25, min(0.55, aspect))
        hi = max(lo + 0.1, min(0.9, aspect + 0.35))
        ratio = lo + (hi - lo) * rng.random()
        if cw > 1.15 * ch:
            angle = rng.uniform(-0.3, 0.3)
        elif ch > 1.15 * cw:
            angle = math.pi / 2 + rng.uniform(-0.3, 0.3)
        else:
            angle = rng.uniform(0.0, math.pi)
        a, b = 1.0, ratio
        ex = math.hypot(a * math.cos(angle), b * math.sin(angle))
        ey = math.hypot(a * math.sin(angle), b * math.cos(angle))
        avail_x = cw / 2.0 * 0.88 / (1.0 + amp)
        avail_y = ch / 2.0 * 0.88 / (1.0 + amp)
        scale = min(avail_x / ex, avail_y / ey) * (0.7 + 0.3 * rng.random())
        slack_x = max(0.0, avail_x - scale * ex) * (1.0 + amp)
        slack_y = max(0.0, avail_y - scale * ey) * (1.0 + amp)
        pieces.append(
            {
                "center": [
                    float(ccx + rng.uniform(-slack_x, slack_x)),
                    float(ccy + rng.uniform(-slack_y, slack_y)),
                ],
                "axes": [float(a * scale), float(b * scale)],
                "angle": float(angle),
                "amplitude": float(amp),
                "noise_scale": float(0.45 * b * scale),
                "noise_seed": int(rng.integers(2**31)),
                "stain": float(0.97 + 0.06 * rng.random()),
            }
        )

    lesion_classes = [label_index] * n_lesions
    if mixed and label_index >= 2:
        lesion_classes.append(int(rng.integers(1, label_index)))
    lesions = _place_lesions(width, height, pieces, lesion_classes, lesion_size, rng)
    return {"pieces": pieces, "lesions": lesions}


def _place_lesions(
    width: int,
    height: int,
    pieces: list[dict[str, Any]],
    lesion_classes: list[int],
    lesion_size: int,
    rng: np.random.Generator,
) -> list[dict[str, Any]]:
    if not lesion_classes:
        return []
    from scipy import ndimage  # only needed here; keeps module import light

    d = max(1.0, math.ceil(max(width, height) / _LAYOUT_GRID))
    grid_w, grid_h = math.ceil(width / d), math.ceil(height / d)
    coarse = pieces_mask(pieces, 0, 0, grid_w, grid_h, d)
    tissue_area = float(coarse.sum()) * d * d
    side_max = math.ceil(lesion_size * 1.15)
    total = len(lesion_classes) * side_max * side_max
    if tissue_area == 0 or total > tissue_area * 0.5:
        raise ValueError(
            f"lesion_size={lesion_size} is too large for the tissue of a {width} x {height} "
            f"slide ({len(lesion_classes)} lesions of up to {side_max}^2 px vs about "
            f"{tissue_area:.0f} px^2 of tissue)"
        )
    # Expected lesion area: discs inscribed in the boxes, about pi/4 of them.
    fraction = len(lesion_classes) * lesion_size**2 * (math.pi / 4) / tissue_area
    if fraction > _MAX_LESION_FRACTION:
        warnings.warn(
            f"lesions cover about {fraction:.1%} of the tissue (more than "
            f"{_MAX_LESION_FRACTION:.0%}); use a larger slide or a smaller lesion_size for a "
            "needle-in-a-haystack task",
            UserWarning,
            stacklevel=4,
        )
    # Candidates: coarse pixels far enough from the tissue rim for the whole box; the exact
    # level-0 check below is what guarantees it.
    dist = ndimage.distance_transform_edt(np.pad(coarse, 1))[1:-1, 1:-1] * d
    cand = np.flatnonzero(dist >= side_max * 0.75 + 2 * d)
    if cand.size == 0:
        raise ValueError(
            f"lesion_size={lesion_size} does not fit inside any tissue piece of a "
            f"{width} x {height} slide"
        )
    lesions: list[dict[str, Any]] = []
    gap = lesion_size / 2.0
    for cls in lesion_classes:
        for _ in range(500):
            w = round(lesion_size * rng.uniform(0.85, 1.15))
            h = round(lesion_size * rng.uniform(0.85, 1.15))
            idx = int(cand[rng.integers(cand.size)])
            gy, gx = divmod(idx, grid_w)
            cx = (gx + rng.random()) * d
            cy = (gy + rng.random()) * d
            x, y = round(cx - w / 2), round(cy - h / 2)
            if x < 0 or y < 0 or x + w > width or y + h > height:
                continue
            if any(overlaps((x, y, w, h), les["box"], gap) for les in lesions):
                continue
            if not pieces_mask(pieces, x, y, w, h, 1.0).all():
                continue
            lesions.append(
                {"class_index": cls, "box": [x, y, w, h], "noise_seed": int(rng.integers(2**31))}
            )
            break
        else:
            raise ValueError(
                f"could not place {len(lesion_classes)} non-overlapping lesions of "
                f"lesion_size={lesion_size} inside the tissue of a {width} x {height} slide"
            )
    return lesions
