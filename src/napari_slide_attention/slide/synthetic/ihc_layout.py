"""Where an IHC slide's tissue, tumour regions, normal ducts and distractors go.

All of it is drawn from the seed, never from the label: slides of every class drawn from
one seed share their layout and differ only in how the tumour stains, so the distractors
carry no label information. Things are placed on a coarse grid (about 512 px on the long
side) with distances to the glass and to the tumour; their exact shapes are those of
:mod:`.ihc_shapes`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..boxes import overlaps
from .ihc import (
    ARTEFACT_KINDS,
    ARTEFACTS_PER_MM2,
    DUCT_PRESENCE,
    DUCT_SPACING_UM,
    MARGIN_UM,
    SIZES_UM,
    TUMOUR_SHARE,
)
from .ihc_shapes import (
    arc_distance,
    arc_extent,
    band_distance,
    band_extent,
    blob_depth,
    blob_extent,
    tumour_mask,
)
from .layout import make_layout
from .shapes import centres, pieces_mask, span

_LAYOUT_GRID = 512  # coarse grid for placing things: about this many px on the long side


def make_ihc_layout(
    width: int, height: int, seed: int, *, mpp: float, n_pieces: int | None
) -> dict[str, Any]:
    """Choose the tissue pieces, tumour regions, distractors and normal ducts from the seed.

    The label plays no part: slides of every class drawn from one seed share their layout
    and differ only in how the tumour stains.

    Raises:
        ValueError: If the tumour or a distractor cannot be placed (a slide too small).
    """
    base = make_layout(
        width,
        height,
        seed,
        label_index=0,
        n_classes=2,
        n_pieces=n_pieces,
        n_lesions=0,
        lesion_size=8,
        mixed=False,
    )
    rng = np.random.default_rng([seed, 0x14C])
    pieces = base["pieces"]
    px_um = 1.0 / mpp
    for piece in pieces:
        # A torn rim: a finer octave of rim noise, about 40 µm across.
        piece["ragged"] = {
            "amplitude": float(0.025 + 0.015 * rng.random()),
            "scale": float(40.0 * px_um),
            "seed": int(rng.integers(2**31)),
        }
    grid = _Grid(width, height, pieces)
    tumours = _place_tumours(grid, pieces, rng)
    grid.set_tumour(tumour_mask(pieces, tumours, 0, 0, grid.w, grid.h, grid.d))
    artefacts = _place_artefacts(grid, pieces, rng, mpp)
    ducts = _place_ducts(grid, rng, mpp, artefacts)
    return {
        "pieces": pieces,
        "tumours": tumours,
        "artefacts": artefacts,
        "ducts": ducts,
    }


class _Grid:
    """The coarse grid things are placed on: tissue, tumour, distances (level-0 px)."""

    def __init__(self, width: int, height: int, pieces: list[dict[str, Any]]) -> None:
        from scipy import ndimage

        self.width, self.height = width, height
        self.d = float(max(1, math.ceil(max(width, height) / _LAYOUT_GRID)))
        self.w, self.h = math.ceil(width / self.d), math.ceil(height / self.d)
        self.xs = centres(0, self.w, self.d)
        self.ys = centres(0, self.h, self.d)
        self.tissue = pieces_mask(pieces, 0, 0, self.w, self.h, self.d)
        # Distance from the glass, level-0 px.
        self.rim = ndimage.distance_transform_edt(np.pad(self.tissue, 1))[1:-1, 1:-1] * self.d
        self.tumour = np.zeros_like(self.tissue)
        self.from_tumour = np.full(self.tissue.shape, np.inf)

    def set_tumour(self, mask: np.ndarray) -> None:
        from scipy import ndimage

        self.tumour = mask
        if mask.any():
            self.from_tumour = ndimage.distance_transform_edt(~mask) * self.d

    @property
    def tissue_mm2(self) -> float:
        return float(self.tissue.sum()) * self.d * self.d

    def cell(self, index: int) -> tuple[float, float]:
        gy, gx = divmod(index, self.w)
        return float(self.xs[gx]), float(self.ys[gy])


def _place_tumours(
    grid: _Grid, pieces: list[dict[str, Any]], rng: np.random.Generator
) -> list[dict[str, Any]]:
    """Tumour regions whose union covers a share of the tissue drawn from TUMOUR_SHARE."""
    tissue_px = float(grid.tissue.sum())
    if tissue_px == 0:
        raise ValueError("the slide has no tissue to place a tumour in")
    deep = np.flatnonzero(grid.rim.ravel() >= 0.4 * grid.rim.max())
    for _ in range(20):
        target = float(rng.uniform(*TUMOUR_SHARE))
        n = int(rng.integers(1, 4))
        drafts = []
        for _ in range(n):
            cx, cy = grid.cell(int(deep[rng.integers(deep.size)]))
            drafts.append(
                {
                    "center": [cx + float(rng.uniform(-0.5, 0.5)) * grid.d, cy],
                    "ratio": float(rng.uniform(0.5, 0.9)),
                    "weight": float(rng.uniform(0.7, 1.3)),
                    "angle": float(rng.uniform(0.0, math.pi)),
                    "amplitude": float(rng.uniform(0.22, 0.32)),
                    "noise_seed": int(rng.integers(2**31)),
                    "ragged_seed": int(rng.integers(2**31)),
                }
            )

        def regions(scale: float, drafts: list[dict[str, Any]] = drafts) -> list[dict[str, Any]]:
            return [_region(draft, scale) for draft in drafts]

        def share(scale: float) -> float:
            mask = tumour_mask(pieces, regions(scale), 0, 0, grid.w, grid.h, grid.d)
            return float(mask.sum()) / tissue_px

        lo, hi = 0.0, float(max(grid.width, grid.height))
        for _ in range(30):
            mid = (lo + hi) / 2.0
            if share(mid) < target:
                lo = mid
            else:
                hi = mid
        found = share(hi)
        if abs(found - target) <= 0.02:
            return regions(hi)
    raise ValueError(
        f"could not place tumour regions covering {TUMOUR_SHARE[0]:.0%}-{TUMOUR_SHARE[1]:.0%} "
        f"of the tissue of a {grid.width} x {grid.height} slide"
    )


def _region(draft: dict[str, Any], scale: float) -> dict[str, Any]:
    a = scale * draft["weight"]
    b = a * draft["ratio"]
    return {
        "center": list(draft["center"]),
        "axes": [a, b],
        "angle": draft["angle"],
        "amplitude": draft["amplitude"],
        "noise_scale": 0.6 * b,
        "noise_seed": draft["noise_seed"],
        # An infiltrative outline: a finer octave of rim noise.
        "ragged": {"amplitude": 0.12, "scale": 0.15 * b, "seed": draft["ragged_seed"]},
    }


def _blob(
    center: tuple[float, float],
    radius: float,
    ratio: float,
    amplitude: float,
    rng: np.random.Generator,
) -> dict[str, Any]:
    return {
        "center": [float(center[0]), float(center[1])],
        "axes": [float(radius), float(radius * ratio)],
        "angle": float(rng.uniform(0.0, math.pi)),
        "amplitude": float(amplitude),
        "noise_scale": float(0.8 * radius * ratio),
        "noise_seed": int(rng.integers(2**31)),
    }


def _place_artefacts(
    grid: _Grid, pieces: list[dict[str, Any]], rng: np.random.Generator, mpp: float
) -> list[dict[str, Any]]:
    """The distractors: counts from the tissue area, positions from the seed."""
    tissue_mm2 = grid.tissue_mm2 * mpp * mpp / 1e6
    # On small slides distractors and their margins shrink with the slide.
    margin = min(MARGIN_UM / mpp, 0.02 * min(grid.width, grid.height))
    cap = 0.06 * min(grid.width, grid.height)
    placed: list[dict[str, Any]] = []
    for kind in ARTEFACT_KINDS:
        count = max(1, round(ARTEFACTS_PER_MM2[kind] * tissue_mm2))
        for _ in range(count):
            placed.append(_place_one(kind, grid, pieces, rng, mpp, margin, cap, placed))
    return placed


def _place_one(
    kind: str,
    grid: _Grid,
    pieces: list[dict[str, Any]],
    rng: np.random.Generator,
    mpp: float,
    margin: float,
    cap: float,
    placed: list[dict[str, Any]],
) -> dict[str, Any]:
    shrink = 1.0
    for attempt in range(300):
        if attempt and attempt % 30 == 0:
            shrink *= 0.75
            margin *= 0.75
        if kind in ("vessel", "dab_stroma", "dab_duct"):
            lo, hi = SIZES_UM[kind]
            radius = min(float(rng.uniform(lo, hi)) / mpp, cap) * shrink
            reach = radius * 1.35
            ok = (grid.rim >= reach + margin) & (grid.from_tumour >= reach + margin)
            cand = np.flatnonzero(ok.ravel())
            if cand.size == 0:
                continue
            centre = grid.cell(int(cand[rng.integers(cand.size)]))
            ratio = {"vessel": (0.35, 0.7), "dab_stroma": (0.5, 0.9), "dab_duct": (0.7, 0.95)}
            amplitude = {"vessel": 0.12, "dab_stroma": 0.3, "dab_duct": 0.08}[kind]
            shape = _blob(centre, radius, float(rng.uniform(*ratio[kind])), amplitude, rng)
            if kind == "dab_duct":
                shape["lumen"] = float(rng.uniform(0.35, 0.55))
            box = _exact_box(
                lambda xs, ys, s=shape: blob_depth(s, xs, ys) > 0, blob_extent(shape), grid, pieces
            )
        elif kind == "fold":
            length = min(float(rng.uniform(*SIZES_UM["fold_length"])) / mpp, 6 * cap) * shrink
            width = min(float(rng.uniform(*SIZES_UM["fold_width"])) / mpp, cap / 2) * shrink
            cand = np.flatnonzero(grid.tissue.ravel())
            centre = grid.cell(int(cand[rng.integers(cand.size)]))
            shape = {
                "center": list(centre),
                "angle": float(rng.uniform(0.0, math.pi)),
                "length": float(length),
                "width": float(width),
                "noise_seed": int(rng.integers(2**31)),
            }
            band = _coarse(
                grid, band_extent(shape), lambda xs, ys, s=shape: band_distance(s, xs, ys) < 0
            )
            box = None
            # Mostly on tissue (a fold is tissue lying on itself).
            if band.any() and (band & grid.tissue).sum() >= 0.3 * band.sum():
                box = _exact_box(
                    lambda xs, ys, s=shape: band_distance(s, xs, ys) < 0,
                    band_extent(shape),
                    grid,
                    pieces,
                )
        else:  # pen
            radius = min(float(rng.uniform(*SIZES_UM["pen_radius"])) / mpp, 4 * cap) * shrink
            width = min(float(rng.uniform(*SIZES_UM["pen_width"])) / mpp, cap / 2) * shrink
            # Through a point of the tissue rim, the circle's centre out on the glass side
            # or the tissue side at random.
            rim = np.flatnonzero(((grid.rim > 0) & (grid.rim <= 2 * grid.d)).ravel())
            if rim.size == 0:
                continue
            px, py = grid.cell(int(rim[rng.integers(rim.size)]))
            heading = float(rng.uniform(0.0, 2 * math.pi))
            span_ = float(rng.uniform(0.6, 1.4)) * min(1.0, 2.0 * cap / radius)
            shape = {
                "center": [px - radius * math.cos(heading), py - radius * math.sin(heading)],
                "radius": float(radius),
                "angles": [heading - span_ / 2, heading + span_ / 2],
                "width": float(width),
                "ink": int(rng.integers(3)),
                "noise_seed": int(rng.integers(2**31)),
            }
            stroke = _coarse(
                grid,
                arc_extent(shape),
                lambda xs, ys, s=shape: arc_distance(s, xs, ys) < s["width"] / 2,
            )
            box = None
            if (stroke & grid.tissue).any():
                box = _exact_box(
                    lambda xs, ys, s=shape: arc_distance(s, xs, ys) < s["width"] / 2,
                    arc_extent(shape),
                    grid,
                    pieces,
                    on_tissue=False,
                )
        if box is None:
            continue
        if kind in ("fold", "pen"):
            mask = band if kind == "fold" else stroke
            if (mask & (grid.from_tumour < margin + grid.d)).any():
                continue
        if any(overlaps(box, other["box"], margin) for other in placed):
            continue
        return {"kind": kind, "box": list(box), "shape": shape}
    raise ValueError(
        f"could not place a {kind} distractor on a {grid.width} x {grid.height} slide "
        "(too little tissue outside the tumour)"
    )


def _coarse(grid: _Grid, extent: tuple[float, float, float, float], inside) -> np.ndarray:
    """A shape's mask on the coarse grid, evaluated within its extent only."""
    out = np.zeros_like(grid.tissue)
    sx = span(grid.xs, extent[0], extent[2])
    sy = span(grid.ys, extent[1], extent[3])
    if sx.start < sx.stop and sy.start < sy.stop:
        out[sy, sx] = inside(grid.xs[sx], grid.ys[sy])
    return out


def _exact_box(
    inside,
    extent: tuple[float, float, float, float],
    grid: _Grid,
    pieces: list[dict[str, Any]],
    *,
    on_tissue: bool = True,
) -> tuple[int, int, int, int] | None:
    """Exact level-0 box of a shape (its part on tissue, unless ``on_tissue`` is off),
    evaluated at level-0 pixel centres within its extent, in row blocks."""
    x0, y0 = max(0, math.floor(extent[0])), max(0, math.floor(extent[1]))
    x1 = min(grid.width, math.ceil(extent[2]))
    y1 = min(grid.height, math.ceil(extent[3]))
    if x1 <= x0 or y1 <= y0:
        return None
    xs = centres(x0, x1 - x0, 1.0)
    rows: list[int] = []
    cols_lo, cols_hi = x1 - x0, -1
    block = max(1, 2**20 // (x1 - x0))
    for r0 in range(y0, y1, block):
        r1 = min(r0 + block, y1)
        mask = inside(xs, centres(r0, r1 - r0, 1.0))
        if on_tissue:
            mask &= pieces_mask(pieces, x0, r0, x1 - x0, r1 - r0, 1.0)
        hit_rows = np.flatnonzero(mask.any(axis=1))
        if hit_rows.size:
            rows += [r0 + int(hit_rows[0]), r0 + int(hit_rows[-1])]
            hit_cols = np.flatnonzero(mask.any(axis=0))
            cols_lo = min(cols_lo, int(hit_cols[0]))
            cols_hi = max(cols_hi, int(hit_cols[-1]))
    if not rows:
        return None
    return x0 + cols_lo, min(rows), cols_hi - cols_lo + 1, max(rows) - min(rows) + 1


def _place_ducts(
    grid: _Grid, rng: np.random.Generator, mpp: float, artefacts: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Normal ducts on a jittered lattice, in the stroma, away from tumour and distractors."""
    spacing = DUCT_SPACING_UM / mpp
    margin = MARGIN_UM / mpp
    lo, hi = (v / mpp for v in SIZES_UM["duct"])
    ducts = []
    for gy in range(math.ceil(grid.height / spacing)):
        for gx in range(math.ceil(grid.width / spacing)):
            keep, jx, jy, r, ratio, lumen = rng.random(6)
            if keep >= DUCT_PRESENCE:
                continue
            cx = (gx + 0.2 + 0.6 * jx) * spacing
            cy = (gy + 0.2 + 0.6 * jy) * spacing
            radius = lo + (hi - lo) * r
            i = min(grid.h - 1, int(cy / grid.d))
            j = min(grid.w - 1, int(cx / grid.d))
            reach = radius * 1.2
            if grid.rim[i, j] < reach or grid.from_tumour[i, j] < reach + margin:
                continue
            box = (cx - reach, cy - reach, 2 * reach, 2 * reach)
            if any(overlaps(box, a["box"], margin) for a in artefacts):
                continue
            duct = _blob((cx, cy), radius, 0.75 + 0.25 * ratio, 0.08, rng)
            duct["lumen"] = float(0.35 + 0.2 * lumen)
            ducts.append(duct)
    return ducts
