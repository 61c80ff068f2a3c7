"""The pixels of a synthetic slide: glass, H&E-like tissue and lesion textures, stain.

Tiles of any pyramid level are rendered one at a time from the layout, at the scale of
that level, so memory stays bounded by a few tiles whatever the slide size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .shapes import (
    centres,
    hash01,
    lesion_inside,
    nuclei_coverage,
    piece_extent,
    piece_inside,
    span,
    value_noise,
)

# Grey level of the glass around the tissue.
_BACKGROUND_LEVEL = 240


def level_shape(width: int, height: int, level: int) -> tuple[int, int]:
    """(rows, columns) of a pyramid level: level 0 halved ``level`` times, rounded up."""
    d = 2**level
    return -(-height // d), -(-width // d)


@dataclass(frozen=True)
class _Texture:
    """H&E-like look of one class: stroma colour plus a jittered lattice of nuclei."""

    stroma: tuple[float, float, float]
    nucleus: tuple[float, float, float]
    cell: float  # lattice spacing, level-0 px: one nucleus at most per cell
    density: float  # probability that a cell holds a nucleus
    radius: float  # mean nucleus radius, level-0 px
    pleomorphism: float  # relative radius spread
    elongation: float  # maximum extra axis ratio

    @property
    def coverage(self) -> float:
        """Expected share of pixels covered by nuclei (ellipse area is pi r^2)."""
        r2 = self.radius**2 * (1.0 + self.pleomorphism**2 / 3.0)
        return self.density * math.pi * r2 / self.cell**2


def _texture(class_index: int, n_classes: int) -> _Texture:
    """Texture of a class: risk ``t`` in [0, 1] moves every feature monotonically.

    Higher risk means bluer, darker stroma; denser, larger, more variable and darker nuclei,
    so every class has its own mean colour and nuclear pattern.
    """
    t = class_index / (n_classes - 1)

    def lerp(p: tuple[float, ...], q: tuple[float, ...]) -> tuple[float, float, float]:
        r, g, b = (pi + (qi - pi) * t for pi, qi in zip(p, q, strict=True))
        return r, g, b

    return _Texture(
        stroma=lerp((236.0, 168.0, 200.0), (176.0, 118.0, 186.0)),
        nucleus=lerp((112.0, 62.0, 150.0), (42.0, 18.0, 84.0)),
        cell=16.0 - 6.0 * t,
        density=0.35 + 0.6 * t,
        radius=2.8 + 1.4 * t,
        pleomorphism=0.12 + 0.3 * t,
        elongation=0.25 + 0.35 * t,
    )


class Renderer:
    """Renders tiles of any pyramid level from the layout, one at a time."""

    def __init__(
        self,
        width: int,
        height: int,
        seed: int,
        tile_size: int,
        pieces: list[dict[str, Any]],
        lesions: list[dict[str, Any]],
        n_classes: int,
    ) -> None:
        self.width = width
        self.height = height
        self.seed = seed
        self.ts = tile_size
        self.pieces = pieces
        self.lesions = lesions
        self.textures = [_texture(k, n_classes) for k in range(n_classes)]
        self.piece_extents = [piece_extent(p) for p in pieces]
        self.stats: dict[str, Any] = {
            "tissue_px": 0,
            "lesion_px": 0,
            "piece_bounds": [[width, height, -1, -1] for _ in pieces],
        }
        # A small bank of grain tiles: per-pixel noise is too slow to draw per tile and
        # repeating grain of +-2 grey levels is invisible.
        rng = np.random.default_rng([seed, 0x5EED])
        # About 15 bytes per pixel per bank entry; stay within ~64 MB.
        n_bank = max(1, min(8, 2**26 // (15 * tile_size * tile_size)))
        grain = rng.integers(-2, 3, size=(n_bank, tile_size, tile_size, 1), dtype=np.int16)
        chroma = rng.integers(-1, 2, size=(n_bank, tile_size, tile_size, 3), dtype=np.int16)
        # Background tiles are only read, never modified, so the bank can be yielded as is.
        self.background = (_BACKGROUND_LEVEL + grain + chroma).astype(np.uint8)
        # Tissue gets a stronger grain than the glass.
        self.tissue_base = (255 + 2 * grain + chroma).astype(np.float32)
        self.stain = np.asarray([p["stain"] for p in pieces] + [1.0], dtype=np.float32)

    def tiles(self, level: int) -> Iterator[np.ndarray]:
        """Yield the tiles of ``level`` in row-major order, each ``(ts, ts, 3)`` uint8."""
        rows, cols = level_shape(self.width, self.height, level)
        ts = self.ts
        for ty in range(-(-rows // ts)):
            for tx in range(-(-cols // ts)):
                yield self._tile(level, tx * ts, ty * ts, rows, cols)

    def _bank(self, level: int, x0: int, y0: int) -> int:
        h = hash01(self.seed ^ 0x6A1, np.array([x0 + 7919 * level]), np.array([y0]))
        return int(h[0] * self.background.shape[0])

    def _pieces_on(self, xs: np.ndarray, ys: np.ndarray):
        """Yields ``(index, piece, column slice, row slice)`` of each tissue piece whose
        extent meets the tile whose pixel centres are ``xs`` × ``ys`` (level-0 px)."""
        for i, (piece, ext) in enumerate(zip(self.pieces, self.piece_extents, strict=True)):
            sx, sy = span(xs, ext[0], ext[2]), span(ys, ext[1], ext[3])
            if sx.start < sx.stop and sy.start < sy.stop:
                yield i, piece, sx, sy

    def _tile(self, level: int, x0: int, y0: int, rows: int, cols: int) -> np.ndarray:
        ts = self.ts
        d = float(2**level)
        bank = self._bank(level, x0, y0)
        xs = centres(x0, ts, d)
        ys = centres(y0, ts, d)

        tissue = np.zeros((ts, ts), dtype=bool)
        piece_id = None
        for i, piece, sx, sy in self._pieces_on(xs, ys):
            sub = piece_inside(piece, xs[sx], ys[sy])
            if not sub.any():
                continue
            tissue[sy, sx] |= sub
            if piece_id is None:
                piece_id = np.full((ts, ts), -1, dtype=np.int8)
            piece_id[sy, sx][sub] = i
            if level == 0:
                self._track_piece(i, sub, x0 + sx.start, y0 + sy.start, rows, cols)

        background = self.background[bank]
        if piece_id is None:
            return background

        classes = np.zeros((ts, ts), dtype=np.int8)
        present = set()
        for les in self.lesions:
            bx, by, bw, bh = les["box"]
            sx, sy = span(xs, bx, bx + bw), span(ys, by, by + bh)
            if sx.start >= sx.stop or sy.start >= sy.stop:
                continue
            sub = lesion_inside(les, xs[sx], ys[sy])
            classes[sy, sx][sub] = les["class_index"]
            present.add(les["class_index"])
            if level == 0:
                valid = sub[: max(0, rows - y0 - sy.start), : max(0, cols - x0 - sx.start)]
                self.stats["lesion_px"] += int(valid.sum())
        if level == 0:
            self.stats["tissue_px"] += int(tissue[: rows - y0, : cols - x0].sum())

        # Everything is composed as "darkness" (255 - rgb), which is linear in the stain
        # amounts, so the stain strength of each piece is one multiplication.
        dark = self._darkness(0, xs, ys, d)
        for k in sorted(present):
            dark = np.where((classes == k)[:, :, None], self._darkness(k, xs, ys, d), dark)
        # Per-piece stain strength: sections of one slide are rarely stained identically.
        dark *= self.stain[piece_id][:, :, None]
        out = np.subtract(self.tissue_base[bank], dark, out=dark)
        np.clip(out, 0, 255, out=out)
        return np.where(tissue[:, :, None], out.astype(np.uint8), background)

    def _track_piece(self, i: int, sub: np.ndarray, x0: int, y0: int, rows: int, cols: int) -> None:
        grow_bounds(self.stats["piece_bounds"][i], sub, x0, y0, rows, cols)

    def _darkness(self, k: int, xs: np.ndarray, ys: np.ndarray, d: float) -> np.ndarray:
        """``255 - rgb`` (float32) of class ``k``'s texture at level-0 positions ``ys x xs``."""
        tex = self.textures[k]
        seed = self.seed * 131 + k
        # Stroma: broad eosin variation plus fibre-like streaks; an octave finer than two
        # output pixels would only alias, so it is left out (its mean is zero).
        shade = np.ones((ys.size, xs.size), dtype=np.float32)
        for sx, sy, amp, s in ((180.0, 180.0, 0.06, 1), (70.0, 14.0, 0.05, 2)):
            if min(sx, sy) / d >= 2.0:
                noise = value_noise(seed * 7 + s, xs, ys, sx, sy, np.float32)
                shade += np.float32(2 * amp) * noise - np.float32(amp)

        # Nuclei drawn sharply at full resolution, fading to their mean coverage by a
        # downsample of 4 where they are smaller than a pixel.
        fade = min(1.0, (d - 1.0) / 3.0)
        alpha: np.ndarray | np.float32 = np.float32(tex.coverage * fade)
        if fade < 1.0:
            alpha = alpha + np.float32(1.0 - fade) * self._nuclei(tex, seed, xs, ys, d)
        stroma = 255.0 - np.asarray(tex.stroma, dtype=np.float32)
        nucleus = 255.0 - np.asarray(tex.nucleus, dtype=np.float32)
        dark = (shade * (1 - alpha))[:, :, None] * stroma
        dark += alpha[:, :, None] * nucleus if fade < 1.0 else alpha * nucleus
        return dark

    @staticmethod
    def _nuclei(tex: _Texture, seed: int, xs: np.ndarray, ys: np.ndarray, d: float) -> np.ndarray:
        """Nuclear coverage in [0, 1]: at most one jittered elliptical nucleus per cell."""
        return nuclei_coverage(
            seed,
            xs,
            ys,
            d,
            cell=tex.cell,
            density=tex.density,
            radius=tex.radius,
            pleomorphism=tex.pleomorphism,
            elongation=tex.elongation,
        )


def grow_bounds(
    bounds: list[int], inside: np.ndarray, x0: int, y0: int, rows: int, cols: int
) -> None:
    """Grow ``bounds`` ([x_min, y_min, x_max, y_max], level pixels) to take in the True
    pixels of ``inside``, a window whose top-left pixel is (x0, y0), cut to the level's
    ``rows`` × ``cols`` (the part of a tile past the level's edge does not count)."""
    inside = inside[: max(0, rows - y0), : max(0, cols - x0)]
    cols_any = np.flatnonzero(inside.any(axis=0))
    rows_any = np.flatnonzero(inside.any(axis=1))
    if cols_any.size == 0:
        return
    bounds[0] = min(bounds[0], x0 + int(cols_any[0]))
    bounds[1] = min(bounds[1], y0 + int(rows_any[0]))
    bounds[2] = max(bounds[2], x0 + int(cols_any[-1]))
    bounds[3] = max(bounds[3], y0 + int(rows_any[-1]))
