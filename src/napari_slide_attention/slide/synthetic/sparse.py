"""A large, mostly empty slide: copies of a small synthetic slide on a wide canvas of glass.

Real scans are large and mostly glass (a 100,000 x 100,000 px slide may hold a few
needle biopsies). Rendering such a slide tile by tile takes as long as the slide is big,
so this writes only the tiles the copies touch and leaves every other tile *empty* (no
bytes in the file, a TIFF "sparse" tile), as slide converters do. The file stays a few
megabytes whatever the canvas, which is what scale and memory tests need: a reader or a
model that touches every tile of the canvas shows up at once, in time and in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .checks import check_int
from .rendering import level_shape
from .truth import FORMAT_VERSION, GENERATOR, read_sidecar, sidecar_path
from .writer import _level_count, _write_pyramid

__all__ = ["write_sparse_slide"]

# Glass between the copies' tiles: the near-white of the synthetic slides' background.
_GLASS = 242
# Default places of the copies, as fractions of the free canvas (x, y).
_PLACES = ((0.1, 0.1), (0.5, 0.45), (0.85, 0.8))


class _SparseTiles:
    """The canvas's tiles level by level: the copies' pixels, glass around them in the
    tiles they touch, ``None`` (an empty tile) everywhere else."""

    def __init__(self, source: np.ndarray, places: Sequence[tuple[int, int]], size, tile):
        self.places, self.size, self.tile = list(places), size, tile
        self._levels = [source]  # the source image at each level, halved by 2x2 means

    def _source(self, level: int) -> np.ndarray:
        while len(self._levels) <= level:
            prev = self._levels[-1].astype(np.float32)
            h, w = prev.shape[0] // 2 * 2, prev.shape[1] // 2 * 2
            if h == 0 or w == 0:
                self._levels.append(self._levels[-1])
                continue
            halved = prev[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
            self._levels.append(np.round(halved).astype(np.uint8))
        return self._levels[level]

    def tiles(self, level: int) -> Iterator[np.ndarray | None]:
        source, d, t = self._source(level), 2**level, self.tile
        rows, cols = level_shape(*self.size, level)
        boxes = [(x // d, y // d, source.shape[1], source.shape[0]) for x, y in self.places]
        first = True
        for ty in range(0, rows, t):
            for tx in range(0, cols, t):
                tile = None
                for x, y, w, h in boxes:
                    x0, y0, x1, y1 = max(tx, x), max(ty, y), min(tx + t, x + w), min(ty + t, y + h)
                    if x0 >= x1 or y0 >= y1:
                        continue
                    if tile is None:
                        tile = np.full((t, t, 3), _GLASS, np.uint8)
                    tile[y0 - ty : y1 - ty, x0 - tx : x1 - tx] = source[
                        y0 - y : y1 - y, x0 - x : x1 - x
                    ]
                if tile is None and first:  # tifffile takes its dtype from the first tile
                    tile = np.full((t, t, 3), _GLASS, np.uint8)
                first = False
                yield tile


def write_sparse_slide(
    path: str | os.PathLike[str],
    source: str | os.PathLike[str],
    canvas: tuple[int, int] = (100_000, 100_000),
    places: Sequence[tuple[int, int]] | None = None,
    *,
    quality: int = 90,
) -> Path:
    """Returns the path of a pyramidal TIFF of ``canvas`` (width, height) px holding copies
    of a small synthetic slide, every tile they do not touch empty.

    Args:
        path: where to write the TIFF.
        source: a slide written by ``write_synthetic_slide`` (its level 0 is read whole, so
            at most 64 million pixels); its mpp, magnification and tile size are kept.
        canvas: level-0 (width, height) of the new slide, at least the source's.
        places: level-0 (x, y) of each copy's top-left corner; default three copies spread
            over the canvas. Copies may overlap; later ones cover earlier ones.
        quality: JPEG quality of the written tiles.

    Raises:
        ValueError: a canvas smaller than the source, a copy off the canvas, a source too
            large to hold in memory or not a synthetic slide.
    """
    import tifffile

    info = read_sidecar(sidecar_path(Path(source)))
    width, height = canvas
    check_int("canvas width", width, minimum=1)
    check_int("canvas height", height, minimum=1)
    with tifffile.TiffFile(source) as tif:
        page = tif.pages[0]
        if page.imagewidth * page.imagelength > 64_000_000:
            raise ValueError(f"{source}: the source slide must be at most 64 million pixels")
        image = page.asarray()[..., :3]
    h, w = image.shape[:2]
    if width < w or height < h:
        raise ValueError(f"the canvas {width} x {height} px is smaller than {source} ({w} x {h})")
    if places is None:
        places = [(round(fx * (width - w)), round(fy * (height - h))) for fx, fy in _PLACES]
    for x, y in places:
        if not (0 <= x <= width - w and 0 <= y <= height - h):
            raise ValueError(f"a copy at ({x}, {y}) does not fit the {width} x {height} canvas")
    tile = int(info["tile_size"])
    mpp, magnification = float(info["mpp"]), float(info["magnification"])
    described: dict[str, Any] = {
        "generator": GENERATOR,
        "version": FORMAT_VERSION,
        "mpp": [mpp, mpp],
        "magnification": magnification,
        "label": info["label"],
        "sparse": {"source": Path(source).name, "places": [list(p) for p in places]},
    }
    path = Path(path)
    _write_pyramid(
        path,
        _SparseTiles(image, places, (width, height), tile),
        (width, height),
        _level_count(width, height, None),
        tile,
        quality,
        mpp,
        json.dumps(described),
    )
    return path
