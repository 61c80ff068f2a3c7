"""What every slide backend needs to turn stored arrays into a Slide's levels.

The TIFF family (``tiff.py``) and OME-Zarr (``omezarr.py``) both present a stored array
as a lazy dask level in (Y, X[, C]) layout (``pixel_layout``, ``lazy_level``), read
regions through a view that turns decoder failures into ``SlideError`` (``CheckedLevel``,
``LayoutSource``), check pixel sizes (``plausible_mpp``) and read associated images on
first access (``AssociatedImages``). Not a public API: ``slide.reader`` is.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import tifffile

from .reader import MAX_MPP, MIN_MPP, SlideError

# Names of the associated images a slide may hold besides its pyramid.
ASSOCIATED_NAMES = ("label", "macro", "thumbnail", "map", "overview")


class CheckedLevel:
    """Array view of one stored level that turns read failures into SlideError.

    dask slices it chunk by chunk. Before a read the tiles it touches are checked
    against the file's length, so a truncated file fails with the tile's position
    instead of decoding a short buffer into garbage.
    """

    def __init__(
        self,
        path: Path,
        level: int,
        array: Any,
        *,
        page: tifffile.TiffPage | None = None,
        file_size: int | None = None,
    ):
        self.path = path
        self.level = level
        self.array = array
        self.shape = tuple(array.shape)
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)
        self.page = page
        self.file_size = file_size
        self._beyond_eof: np.ndarray | None = None
        if page is not None and file_size is not None:
            offsets = np.asarray(page.dataoffsets, dtype=np.int64)
            counts = np.asarray(page.databytecounts, dtype=np.int64)
            self._beyond_eof = offsets + counts > file_size

    def _segments(self, rows: slice, cols: slice) -> Iterator[tuple[int, int, int]]:
        """Yield (segment index, tile row, tile column) of the stored segments a read touches."""
        page = self.page
        height, width = self.shape[0], self.shape[1]
        if page.is_tiled:
            tile_h, tile_w = page.tilelength, page.tilewidth
        else:
            tile_h, tile_w = page.rowsperstrip or height, width
        per_row = max(1, math.ceil(width / tile_w))
        r0, r1 = (rows.start or 0) // tile_h, max(0, math.ceil((rows.stop or height) / tile_h) - 1)
        c0, c1 = (cols.start or 0) // tile_w, max(0, math.ceil((cols.stop or width) / tile_w) - 1)
        for r in range(r0, r1 + 1):
            for c in range(c0, c1 + 1):
                yield r * per_row + c, r, c

    def _check_extent(self, key: tuple[slice, ...]) -> None:
        if self._beyond_eof is None or not self._beyond_eof.any():
            return
        for index, r, c in self._segments(key[0], key[1]):
            if index < len(self._beyond_eof) and self._beyond_eof[index]:
                raise SlideError(
                    self.path,
                    f"truncated file: level {self.level} tile (row {r}, column {c}) lies beyond "
                    f"the end of the file ({self.file_size} bytes); the file was cut short "
                    "while copying or writing",
                )

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        self._check_extent(key)
        try:
            return np.asarray(self.array[key])
        except SlideError:
            raise
        except Exception as exc:  # decoder and zarr errors come in many types
            raise self._locate_failure(key, exc) from exc

    def _locate_failure(self, key: tuple[slice, ...], exc: Exception) -> SlideError:
        """Name the stored tile that fails to decode, reading the region tile by tile."""
        rows, cols = key[0], key[1]
        where = f"rows {rows.start}:{rows.stop}, columns {cols.start}:{cols.stop}"
        if self.page is not None:
            tile_h, tile_w = stored_tile_shape(self.page)
            for _, r, c in self._segments(rows, cols):
                tile = (slice(r * tile_h, (r + 1) * tile_h), slice(c * tile_w, (c + 1) * tile_w))
                try:
                    self.array[tile + key[2:]]
                except Exception as tile_exc:
                    exc = tile_exc
                    where = (
                        f"tile (row {r}, column {c}) at level pixels y={r * tile_h}, x={c * tile_w}"
                    )
                    break
        return SlideError(
            self.path,
            f"corrupt image data: level {self.level} {where} cannot be decoded "
            f"({type(exc).__name__}: {exc})",
        )


def stored_tile_shape(page: tifffile.TiffPage) -> tuple[int, int]:
    """(height, width) of a TIFF page's stored tiles, or of its strips."""
    if page.is_tiled:
        return (int(page.tilelength), int(page.tilewidth))
    return (int(page.rowsperstrip or page.imagelength), int(page.imagewidth))


class AssociatedImages(Mapping):
    """Label, macro and thumbnail images, read when first asked for."""

    def __init__(self, path: Path, readers: dict[str, Any]):
        self._path = path
        self._readers = readers
        self._cache: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._readers:
            raise KeyError(name)
        if name not in self._cache:
            try:
                self._cache[name] = np.asarray(self._readers[name]())
            except Exception as exc:
                raise SlideError(self._path, f"cannot read the {name} image: {exc}") from exc
        return self._cache[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)


@dataclass
class PixelLayout:
    """How a stored array maps to (Y, X) or (Y, X, C) channels-last."""

    axes: str
    rgb: bool
    transpose: tuple[int, ...] | None
    squeeze: tuple[int, ...]
    drop_alpha: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def native(self) -> bool:
        """True when the stored layout is already (Y, X[, S]) so tiles decode in place."""
        return self.transpose is None and not self.squeeze and not self.drop_alpha

    def to_yxc(self, array):
        if self.squeeze:
            index = tuple(0 if i in self.squeeze else slice(None) for i in range(array.ndim))
            array = array[index]
        if self.transpose is not None:
            array = array.transpose(self.transpose)
        if self.drop_alpha:
            array = array[..., :3]
        return array


class LayoutSource:
    """Region reads from a checked level, returned in the slide's (Y, X[, C]) layout."""

    def __init__(self, checked: CheckedLevel, layout: PixelLayout):
        self.checked = checked
        self.layout = layout
        self._axes = [a for i, a in enumerate(layout.axes) if i not in layout.squeeze]

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        rows, cols = key
        full = []
        for i, axis in enumerate(self.layout.axes):
            if i in self.layout.squeeze:
                full.append(0)
            elif axis == "Y":
                full.append(rows)
            elif axis == "X":
                full.append(cols)
            else:
                full.append(slice(None))
        if all(isinstance(k, slice) for k in full):
            pixels = self.checked[tuple(full)]
        else:
            pixels = np.asarray(self.checked.array[tuple(full)])
        if self.layout.transpose is not None:
            pixels = pixels.transpose(self.layout.transpose)
        if self.layout.drop_alpha:
            pixels = pixels[..., :3]
        return pixels


def pixel_layout(path: Path, axes: str, shape: tuple[int, ...], dtype: np.dtype) -> PixelLayout:
    """Decide how to present a stored array, refusing layouts that are not slides.

    RGB(A) 8-bit -> (Y, X, 3) RGB. Grayscale (any integer or float type) -> (Y, X).
    Multichannel (C, or S != 3/4) -> (Y, X, C) channels-last, not RGB. Z/T/other
    axes of length 1 are dropped; longer ones are refused (z-stacks and time series
    are not whole-slide images).
    """
    axes = axes.upper()
    squeeze = []
    channel_axis = None
    for i, (axis, size) in enumerate(zip(axes, shape, strict=True)):
        if axis in "YX":
            continue
        if axis in "SC" and channel_axis is None and size > 1:
            channel_axis = i
            continue
        if size == 1:
            squeeze.append(i)
            continue
        raise SlideError(
            path,
            f"unsupported pixel layout: axes {axes} with shape {shape}; only 2-D images "
            "(one plane, optionally with channels) are slides. Save one plane as its own file.",
        )
    if "Y" not in axes or "X" not in axes:
        raise SlideError(path, f"unsupported pixel layout: axes {axes} have no Y and X")
    kept = [i for i in range(len(axes)) if i not in squeeze]
    order = [axes.index("Y"), axes.index("X")] + (
        [channel_axis] if channel_axis is not None else []
    )
    transpose = tuple(kept.index(i) for i in order)
    if transpose == tuple(range(len(transpose))):
        transpose = None
    channels = shape[channel_axis] if channel_axis is not None else 1
    rgb = (
        dtype == np.uint8
        and channel_axis is not None
        and axes[channel_axis] == "S"
        and channels in (3, 4)
    )
    if (
        dtype == np.uint8
        and channel_axis is not None
        and axes[channel_axis] == "C"
        and channels == 3
    ):
        rgb = True  # planar RGB (OME writers store it as C)
    notes = []
    if not rgb:
        notes.append(
            f"not an 8-bit RGB slide ({channels} channel(s) of {dtype}): opened as "
            f"{'grayscale' if channels == 1 else 'multichannel'}; the models need RGB brightfield"
        )
    return PixelLayout(
        axes=axes,
        rgb=bool(rgb),
        transpose=transpose,
        squeeze=tuple(squeeze),
        drop_alpha=bool(rgb and channels == 4),
        notes=notes,
    )


def lazy_level(path: Path, index: int, checked: CheckedLevel, chunks, layout) -> da.Array:
    """One level as a dask array over its checked view, in (Y, X[, C]) layout."""
    array = da.from_array(
        checked,
        chunks=chunks,
        lock=False,
        asarray=False,
        fancy=False,
        name=f"slide-{_token(path)}-{index}",
        meta=np.empty((0,) * checked.ndim, dtype=checked.dtype),
    )
    return layout.to_yxc(array)


def level_downsample(shape0: tuple[int, int], shape: tuple[int, int]) -> float:
    """Level-0 pixels per pixel of a level: the mean of the row and column ratios."""
    return 0.5 * (shape0[1] / shape[1] + shape0[0] / shape[0])


def _token(path: Path) -> str:
    """A name for the slide's dask arrays that changes when the file does."""
    stat = path.stat()
    text = f"{path.resolve()}-{stat.st_size}-{stat.st_mtime_ns}"
    return hashlib.sha1(text.encode()).hexdigest()[:16]


# Micrometres per unit, for the unit names OME metadata and NGFF axes use.
UNIT_TO_UM = {
    "m": 1e6,
    "meter": 1e6,
    "cm": 1e4,
    "centimeter": 1e4,
    "mm": 1e3,
    "millimeter": 1e3,
    "µm": 1.0,
    "um": 1.0,
    "μm": 1.0,
    "micron": 1.0,
    "micrometer": 1.0,
    "nm": 1e-3,
    "nanometer": 1e-3,
}


def plausible_mpp(path: Path, mpp: tuple[float, float] | None, source: str, notes: list[str]):
    """The pixel size as floats, or None (noted) when it is not a microscope's."""
    if mpp is None:
        return None
    if all(MIN_MPP <= v <= MAX_MPP for v in mpp):
        return (float(mpp[0]), float(mpp[1]))
    notes.append(f"ignored implausible pixel size {mpp} µm from {source}")
    return None
