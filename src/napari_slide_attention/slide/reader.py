"""Open pyramidal whole-slide images lazily: ``open_slide(path) -> Slide``.

TIFF-based formats (Aperio SVS, Hamamatsu NDPI, OME-TIFF, generic pyramidal or
single-level tiled TIFF) are read through tifffile's zarr view of the file; OME-Zarr
through zarr. Every level is a dask array chunked at the file's native tile size, so
nothing is decoded until a region is asked for.

This module is the public surface (``Slide``, ``Level``, ``SlideError``,
``MissingMppWarning``, ``open_slide``); the backends that build a Slide are ``tiff.py``
and ``omezarr.py``, sharing ``levels.py``.

Coordinates: ``x``/``y`` are columns/rows in level-0 pixels everywhere in this package;
``mpp`` is micrometres per level-0 pixel as ``(x, y)``.
"""

from __future__ import annotations

import contextlib
import math
import stat
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import tifffile

__all__ = [
    "Level",
    "MissingMppWarning",
    "Slide",
    "SlideError",
    "open_slide",
]

# Extensions that are whole-slide formats and nothing else: a failure to open one of
# these is reported to the user rather than left for another reader to try.
SLIDE_SUFFIXES = (".svs", ".ndpi", ".ome.tif", ".ome.tiff", ".ome.zarr", ".btf", ".tf8", ".qptiff")
TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".btf", ".tf8", ".qptiff")
# Formats people will drop on us that we do not read; named so the error says so.
UNSUPPORTED_SUFFIXES = {
    ".mrxs": "3DHISTECH MIRAX",
    ".czi": "Zeiss CZI",
    ".vsi": "Olympus VSI",
    ".isyntax": "Philips iSyntax",
    ".scn": "Leica SCN",
    ".bif": "Ventana BIF",
    ".vms": "Hamamatsu VMS",
    ".vmu": "Hamamatsu VMU",
    ".dcm": "DICOM",
}


# A microscope's level-0 pixel is between ~10 nm and ~100 µm (0.25 at 40x, 0.5 at 20x):
# a pixel size outside this, from a file or an --mpp typo, describes no slide scan (TIFF
# writers that put 72 dpi, 353 µm/px, into the resolution tags are not describing one).
MIN_MPP, MAX_MPP = 0.01, 100.0


class SlideError(Exception):
    """A slide that cannot be opened or read; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class MissingMppWarning(UserWarning):
    """The slide has no usable pixel size; coordinates fall back to pixels."""


@dataclass(frozen=True)
class Level:
    """One level of a slide's pyramid.

    Attributes:
        index: position in the pyramid, 0 = full resolution.
        shape: (height, width) in this level's pixels.
        downsample: level-0 pixels per pixel of this level.
        tile_shape: (height, width) of the stored tiles or strips; None for levels
            computed on the fly.
        virtual: True when the level is not stored in the file but computed from
            the level above it (single-level slides).
    """

    index: int
    shape: tuple[int, int]
    downsample: float
    tile_shape: tuple[int, int] | None
    virtual: bool = False


@dataclass
class Slide:
    """A whole-slide image opened lazily.

    Attributes:
        path: the file or OME-Zarr directory.
        vendor: "aperio", "hamamatsu", "ome-tiff", "generic-tiff" or "ome-zarr".
        levels: one dask array per pyramid level, level 0 first; (H, W, 3) uint8 for
            RGB slides, (H, W) or (H, W, C) channels-last otherwise.
        level_info: shape, downsample and tile size of each level.
        mpp: (x, y) micrometres per level-0 pixel, or None when unknown.
        mpp_source: where mpp came from ("metadata", "override") or None.
        magnification: objective magnification (e.g. 20.0) or None when unknown.
        rgb: True for 8-bit RGB brightfield slides (the models' input).
        associated: label/macro/thumbnail images, read on first access.
        metadata: the vendor's metadata as a flat dict.
        notes: non-fatal problems found while opening (shown by ``info``).
    """

    path: Path
    vendor: str
    levels: list[da.Array]
    level_info: list[Level]
    mpp: tuple[float, float] | None
    mpp_source: str | None
    magnification: float | None
    rgb: bool
    associated: Mapping[str, np.ndarray]
    metadata: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    _sources: list[Any] = field(default_factory=list, repr=False)
    _pages: list[tifffile.TiffPage | None] = field(default_factory=list, repr=False)
    _closers: list[Any] = field(default_factory=list, repr=False)

    # -- geometry ---------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0 in pixels."""
        height, width = self.level_info[0].shape
        return width, height

    @property
    def level_count(self) -> int:
        return len(self.levels)

    @property
    def dtype(self) -> np.dtype:
        return self.levels[0].dtype

    @property
    def channels(self) -> int:
        return 1 if self.levels[0].ndim == 2 else int(self.levels[0].shape[2])

    @property
    def tile_shape(self) -> tuple[int, int] | None:
        """(height, width) of level 0's stored tiles or strips."""
        return self.level_info[0].tile_shape

    def require_rgb(self) -> None:
        """Raise SlideError unless the slide is 8-bit RGB, what the models read.

        Call before any work on a slide for a model: a grey, 16-bit, float or
        multichannel slide opens (its pixels are fine to look at) but is not what an RGB
        brightfield model was trained on.
        """
        if self.rgb:
            return
        raise SlideError(
            self.path, f"{self.pixel_kind()}; the models read 8-bit RGB brightfield slides"
        )

    def pixel_kind(self) -> str:
        """What the pixels are, in words: "a grey slide of uint8", "an RGB slide of uint16"."""
        channels = self.channels
        if channels == 1:
            kind = "a grey slide"
        elif channels == 3:
            kind = "an RGB slide"
        else:
            kind = f"a {channels}-channel slide"
        return f"{kind} of {np.dtype(self.dtype)}"

    def level_mpp(self, level: int) -> tuple[float, float] | None:
        """Micrometres per pixel (x, y) at a level, or None when the slide's mpp is unknown."""
        if self.mpp is None:
            return None
        info = self.level_info[level]
        height0, width0 = self.level_info[0].shape
        return (
            self.mpp[0] * width0 / info.shape[1],
            self.mpp[1] * height0 / info.shape[0],
        )

    def level_for(self, mpp: float | None = None, downsample: float | None = None) -> int:
        """Return the coarsest level that is still at least as fine as asked.

        Args:
            mpp: wanted micrometres per pixel (needs the slide's mpp).
            downsample: wanted level-0 pixels per pixel.
        """
        if (mpp is None) == (downsample is None):
            raise ValueError("level_for takes exactly one of mpp= or downsample=")
        if mpp is not None:
            if mpp <= 0:
                raise ValueError(f"mpp must be positive, got {mpp}")
            if self.mpp is None:
                raise SlideError(
                    self.path,
                    "the slide's pixel size (mpp) is unknown, so a level cannot be chosen "
                    "by mpp; pass mpp= to open_slide or --mpp on the command line",
                )
            downsample = mpp / (0.5 * (self.mpp[0] + self.mpp[1]))
        if downsample <= 0:
            raise ValueError(f"downsample must be positive, got {downsample}")
        best = 0
        for info in self.level_info:
            # A hair of tolerance: stored levels are rounded (e.g. 4.0007 for "4").
            if info.downsample <= downsample * 1.001:
                best = info.index
        return best

    # -- pixels -----------------------------------------------------------------------
    @property
    def fill_value(self) -> int:
        """What pixels outside the slide read as: white for RGB (glass), 0 otherwise."""
        return 255 if self.rgb else 0

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Return the pixels of a level-0 box read at a level.

        The box (x, y, w, h) is in level-0 pixels; the result has
        ``(round(h / downsample), round(w / downsample))`` rows and columns of that
        level. Parts outside the slide read as ``fill_value``.

        Args:
            level: pyramid level to read from.
            x: left edge, level-0 px (may be negative).
            y: top edge, level-0 px (may be negative).
            w: width, level-0 px.
            h: height, level-0 px.
        """
        if not 0 <= level < self.level_count:
            raise ValueError(f"level {level} does not exist (the slide has {self.level_count})")
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got w={w}, h={h}")
        info = self.level_info[level]
        height, width = info.shape
        sy = self.level_info[0].shape[0] / height
        sx = self.level_info[0].shape[1] / width
        lx0, ly0 = math.floor(x / sx), math.floor(y / sy)
        out_w, out_h = max(1, round(w / sx)), max(1, round(h / sy))
        out_shape = (out_h, out_w, *self.levels[level].shape[2:])
        cx0, cy0 = max(lx0, 0), max(ly0, 0)
        cx1, cy1 = min(lx0 + out_w, width), min(ly0 + out_h, height)
        if cx0 >= cx1 or cy0 >= cy1:
            return np.full(out_shape, self.fill_value, dtype=self.dtype)
        pixels = self._sources[level][cy0:cy1, cx0:cx1]
        if pixels.shape[:2] == (out_h, out_w):
            return pixels
        out = np.full(out_shape, self.fill_value, dtype=self.dtype)
        out[cy0 - ly0 : cy1 - ly0, cx0 - lx0 : cx1 - lx0] = pixels
        return out

    def tiff_page(self, level: int) -> tifffile.TiffPage | None:
        """Return the TIFF page that stores a level, or None (OME-Zarr, virtual levels).

        TileStream decodes that page's tiles itself on its fast path.
        """
        return self._pages[level] if level < len(self._pages) else None

    # -- description ------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Return the slide's facts as plain JSON-able values (``slide-attention info``)."""
        return {
            "path": str(self.path),
            "vendor": self.vendor,
            "dimensions": list(self.dimensions),
            "dtype": str(self.dtype),
            "channels": self.channels,
            "rgb": self.rgb,
            "mpp": list(self.mpp) if self.mpp else None,
            "mpp_source": self.mpp_source,
            "magnification": self.magnification,
            "tile_shape": list(self.tile_shape) if self.tile_shape else None,
            "levels": [
                {
                    "index": info.index,
                    "shape": list(info.shape),
                    "downsample": round(info.downsample, 4),
                    "mpp": [round(v, 5) for v in self.level_mpp(info.index)] if self.mpp else None,
                    "tile_shape": list(info.tile_shape) if info.tile_shape else None,
                    "virtual": info.virtual,
                }
                for info in self.level_info
            ],
            "associated": list(self.associated),
            "notes": list(self.notes),
        }

    def close(self) -> None:
        """Close the file; the slide's arrays cannot be read afterwards."""
        for closer in self._closers:
            with contextlib.suppress(Exception):
                closer()
        self._closers.clear()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------
# Opening
# ----------------------------------------------------------------------------------------


def open_slide(
    path: str | Path,
    *,
    mpp: float | tuple[float, float] | None = None,
    magnification: float | None = None,
) -> Slide:
    """Open a whole-slide image lazily and return a Slide.

    Args:
        path: an SVS, NDPI, OME-TIFF, pyramidal or tiled TIFF file, or an OME-Zarr
            directory.
        mpp: micrometres per level-0 pixel, overriding (or supplying) the file's own;
            one number or (x, y).
        magnification: objective magnification overriding the file's own.

    Raises:
        SlideError: the file is missing, not a slide, or damaged; the message says which.
    """
    path = Path(path)
    if not path.exists():
        raise SlideError(path, "no such file or directory")
    mode = path.stat().st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        # Opening a FIFO for reading would wait for a writer; a device may never end.
        raise SlideError(
            path,
            f"not a regular file (a {_file_kind(mode)}); slides are read from files or "
            "OME-Zarr directories",
        )
    override = _normalise_mpp(path, mpp)
    suffix = _suffix(path)
    if suffix in UNSUPPORTED_SUFFIXES:
        raise SlideError(
            path,
            f"{UNSUPPORTED_SUFFIXES[suffix]} files are not supported; "
            "convert the slide to OME-TIFF (e.g. with bfconvert) or OME-Zarr (bioformats2raw)",
        )
    # The backends build Slides, so they import this module; it imports them only here.
    if path.is_dir():
        from .omezarr import open_ome_zarr

        slide = open_ome_zarr(path)
    else:
        from .tiff import open_tiff

        slide = open_tiff(path)
    if override is not None:
        slide.mpp, slide.mpp_source = override, "override"
    if magnification is not None:
        if magnification <= 0:
            raise ValueError(f"magnification must be positive, got {magnification}")
        slide.magnification = float(magnification)
    if slide.mpp is None:
        warnings.warn(
            f"{path}: the slide has no usable pixel size (mpp); distances are in pixels. "
            "Pass mpp= to open_slide (or --mpp) if you know it.",
            MissingMppWarning,
            stacklevel=2,
        )
    return slide


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return name
    return "special file"


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for double in (".ome.tif", ".ome.tiff", ".ome.zarr"):
        if name.endswith(double):
            return double
    return path.suffix.lower()


def _normalise_mpp(path: Path, mpp: float | tuple[float, float] | None) -> tuple | None:
    if mpp is None:
        return None
    values = (float(mpp), float(mpp)) if np.isscalar(mpp) else tuple(float(v) for v in mpp)
    if len(values) != 2 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"mpp must be a positive number or (x, y) pair, got {mpp!r}")
    return values
