"""The shape functions of a synthetic slide, shared by the layout, the renderer and the truth.

Tissue pieces are noisy rotated ellipses and lesions noisy discs, evaluated at level-0
pixel centres with a stateless hash and value noise, so any window of any level gives
bit-identical values whichever caller (renderer tile, truth mask, layout check) asks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xC2B2AE3D27D4EB4F)
_F1 = np.uint64(0xFF51AFD7ED558CCD)
_F2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)
_S11 = np.uint64(11)


def hash01(seed: int, ix: np.ndarray, iy: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) values hashed from integer lattice coordinates (broadcast).

    A stateless hash instead of a random generator, so any window of the lattice can be
    evaluated on its own and gives the same values whichever tile asks.
    """
    salt = np.uint64((seed * 0x165667B19E3779F9) & 0xFFFFFFFFFFFFFFFF)
    # Wrap-around multiplication is the point of the hash; numpy warns about it on scalars.
    with np.errstate(over="ignore"):
        h = np.atleast_1d(np.asarray(ix, dtype=np.int64)).astype(np.uint64) * _M1
        h = h ^ (np.asarray(iy, dtype=np.int64).astype(np.uint64) * _M2) ^ salt
        h ^= h >> _S33
        h *= _F1
        h ^= h >> _S33
        h *= _F2
        h ^= h >> _S33
    return (h >> _S11).astype(np.float64) * (1.0 / 2**53)


def centres(start: int, n: int, downsample: float) -> np.ndarray:
    """Level-0 coordinates of the centres of output pixels ``start .. start + n - 1``.

    Shared by the renderer and :func:`tissue_mask_truth` so both evaluate the shape
    functions at bit-identical positions.
    """
    return (np.arange(start, start + n, dtype=np.float64) + 0.5) * downsample


def _smoothstep(t: np.ndarray) -> np.ndarray:
    return t * t * (3.0 - 2.0 * t)


def value_noise(
    seed: int,
    xs: np.ndarray,
    ys: np.ndarray,
    sx: float,
    sy: float | None = None,
    dtype: type[np.floating[Any]] = np.float64,
) -> np.ndarray:
    """Smooth [0, 1) value noise on the grid ``ys x xs`` with lattice spacing ``sx, sy``.

    Interpolated separably with element-wise operations only: they give the same bits
    whatever the window, so the tissue-mask truth equals what the renderer drew (a matrix
    product would not promise that, and OpenBLAS threading made it slower too).
    """
    gx = xs / sx
    gy = ys / (sx if sy is None else sy)
    ix = np.floor(gx)
    iy = np.floor(gy)
    tx = _smoothstep(gx - ix).astype(dtype)
    ty = _smoothstep(gy - iy).astype(dtype)
    ix0, iy0 = int(ix[0]), int(iy[0])
    nx = int(ix[-1]) - ix0 + 2
    ny = int(iy[-1]) - iy0 + 2
    lat = hash01(
        seed,
        np.arange(ix0, ix0 + nx)[None, :],
        np.arange(iy0, iy0 + ny)[:, None],
    ).astype(dtype)
    jx = (ix - ix0).astype(np.intp)
    jy = (iy - iy0).astype(np.intp)
    rows = lat[:, jx] * (1 - tx) + lat[:, jx + 1] * tx  # (ny, len(xs))
    return rows[jy] * (1 - ty)[:, None] + rows[jy + 1] * ty[:, None]


# ----------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------


def piece_extent(piece: Mapping[str, Any]) -> tuple[float, float, float, float]:
    """Level-0 ``(x0, y0, x1, y1)`` outside which the piece's shape test is always False."""
    cx, cy = piece["center"]
    a, b = piece["axes"]
    th = piece["angle"]
    grow = 1.0 + piece["amplitude"] + piece.get("ragged", {}).get("amplitude", 0.0)
    ex = grow * math.hypot(a * math.cos(th), b * math.sin(th))
    ey = grow * math.hypot(a * math.sin(th), b * math.cos(th))
    # A little slack so floating-point rounding at the rim can never clip the shape.
    return cx - ex - 2.0, cy - ey - 2.0, cx + ex + 2.0, cy + ey + 2.0


def piece_inside(piece: Mapping[str, Any], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Tissue test of one piece on the grid ``ys x xs`` (level-0 coordinates).

    A rotated ellipse whose rim is pushed in and out by low-frequency noise, which gives
    smooth, irregular, blob-like sections.
    """
    return piece_depth(piece, xs, ys) > 0.0


def piece_depth(piece: Mapping[str, Any], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """How far inside one piece each point of the grid ``ys x xs`` lies (> 0 inside).

    In units of the piece's axes (the rim at 0, about 1 at the centre). A piece with a
    ``ragged`` entry (``amplitude``, ``scale``, ``seed``) gets a second, finer octave of rim
    noise: the torn edge of a cut section. ``depth > 0`` is exactly :func:`piece_inside`.
    """
    cx, cy = piece["center"]
    a, b = piece["axes"]
    th = piece["angle"]
    c, s = math.cos(th), math.sin(th)
    dx = xs - cx
    dy = ys - cy
    u = (dx * (c / a))[None, :] + (dy * (s / a))[:, None]
    v = (dx * (-s / b))[None, :] + (dy * (c / b))[:, None]
    rho = np.sqrt(u * u + v * v)
    noise = value_noise(piece["noise_seed"], xs, ys, piece["noise_scale"])
    limit = 1.0 + piece["amplitude"] * (2.0 * noise - 1.0)
    ragged = piece.get("ragged")
    if ragged:
        fine = value_noise(ragged["seed"], xs, ys, ragged["scale"])
        limit = limit + ragged["amplitude"] * (2.0 * fine - 1.0)
    return limit - rho


def span(coords: np.ndarray, lo: float, hi: float) -> slice:
    return slice(
        int(np.searchsorted(coords, lo, side="left")),
        int(np.searchsorted(coords, hi, side="right")),
    )


def pieces_mask(
    pieces: Sequence[Mapping[str, Any]], x: int, y: int, w: int, h: int, downsample: float
) -> np.ndarray:
    """Tissue mask of output pixels ``[y, y + h) x [x, x + w)`` at ``downsample``."""
    xs = centres(x, w, downsample)
    mask = np.zeros((h, w), dtype=bool)
    # Row blocks keep the float64 temporaries small for large masks.
    block = max(1, 2**22 // max(w, 1))
    for r0 in range(0, h, block):
        ys = centres(y + r0, min(block, h - r0), downsample)
        for piece in pieces:
            x0, y0, x1, y1 = piece_extent(piece)
            sx, sy = span(xs, x0, x1), span(ys, y0, y1)
            if sx.start >= sx.stop or sy.start >= sy.stop:
                continue
            sub = piece_inside(piece, xs[sx], ys[sy])
            mask[r0 + sy.start : r0 + sy.stop, sx] |= sub
    return mask


def lesion_inside(lesion: Mapping[str, Any], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Lesion test on the grid ``ys x xs``: a noisy disc inscribed in the lesion box."""
    bx, by, bw, bh = lesion["box"]
    u = (xs - (bx + bw / 2.0)) / (bw / 2.0)
    v = (ys - (by + bh / 2.0)) / (bh / 2.0)
    rho2 = u[None, :] ** 2 + v[:, None] ** 2
    noise = value_noise(lesion["noise_seed"], xs, ys, max(bw, bh) / 2.5)
    limit = 1.0 - 0.3 * noise
    return rho2 < limit * limit


def nuclei_coverage(
    seed: int,
    xs: np.ndarray,
    ys: np.ndarray,
    downsample: float,
    *,
    cell: float,
    density: float,
    radius: float,
    pleomorphism: float,
    elongation: float,
) -> np.ndarray:
    """Nuclear coverage in [0, 1] on the grid ``ys x xs``: at most one jittered elliptical
    nucleus per lattice cell.

    Args:
        seed: Seed of the per-cell hash.
        xs: Level-0 x of the output pixel centres.
        ys: Level-0 y of the output pixel centres.
        downsample: Level-0 px per output pixel (sets the anti-aliased rim's width).
        cell: Lattice spacing, level-0 px.
        density: Probability that a cell holds a nucleus.
        radius: Mean nucleus radius, level-0 px.
        pleomorphism: Relative radius spread.
        elongation: Maximum extra axis ratio.
    """
    c = cell
    cx = np.floor(xs / c)
    cy = np.floor(ys / c)
    cx0, cy0 = int(cx[0]), int(cy[0])
    ncx, ncy = int(cx[-1]) - cx0 + 1, int(cy[-1]) - cy0 + 1
    gx = np.arange(cx0, cx0 + ncx)[None, :]
    gy = np.arange(cy0, cy0 + ncy)[:, None]

    def u(stream: int) -> np.ndarray:
        return hash01(seed * 16 + stream, gx, gy)

    r = radius * (1.0 + pleomorphism * (2.0 * u(1) - 1.0))
    elong = 1.0 + elongation * u(2)
    ra, rb = r * np.sqrt(elong), r / np.sqrt(elong)
    # Keep each nucleus inside its own cell so a pixel only has to look at one cell.
    slack = np.maximum(0.0, c / 2.0 - ra - 0.5)
    ox = c / 2.0 + slack * (2.0 * u(3) - 1.0)
    oy = c / 2.0 + slack * (2.0 * u(4) - 1.0)
    phi = math.pi * u(5)
    present = u(6) < density
    cos, sin = np.cos(phi), np.sin(phi)
    # Absent nuclei get a huge inverse radius, so their coverage clips to zero.
    inv_a = np.where(present, 1.0 / ra, 1e3)
    inv_b = np.where(present, 1.0 / rb, 1e3)
    coef = [
        (cos * inv_a).astype(np.float32).ravel(),
        (sin * inv_a).astype(np.float32).ravel(),
        (-sin * inv_b).astype(np.float32).ravel(),
        (cos * inv_b).astype(np.float32).ravel(),
    ]
    flat = (cy - cy0).astype(np.intp)[:, None] * ncx + (cx - cx0).astype(np.intp)[None, :]
    fx = (xs - cx * c).astype(np.float32)[None, :]
    fy = (ys - cy * c).astype(np.float32)[:, None]
    dx = fx - ox.astype(np.float32).ravel()[flat]
    dy = fy - oy.astype(np.float32).ravel()[flat]
    p = dx * coef[0][flat] + dy * coef[1][flat]
    q = dx * coef[2][flat] + dy * coef[3][flat]
    dist = np.sqrt(p * p + q * q)
    # Anti-aliased rim about one output pixel wide.
    return np.clip((1.0 - dist) * np.float32(radius / downsample) + 0.5, 0.0, 1.0)
